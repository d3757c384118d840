"""The per-rank state of a reconstruction evaluation and its files: the running sums (`Accumulator`), the partial
sums a preempted evaluation leaves (`save_partial`, `load_partial`) and the finished results a rerun reuses
(`finished_results`). `evaluation.protocol` drives them."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from divae.utils.logging import get_logger
from evaluation.fid import FeatureStats
from evaluation.inception import FEATURE_DIM
from evaluation.metrics import CodebookCounter

log = get_logger(__name__)


class Accumulator:
    """This rank's running sums of one evaluation (everything in it adds across ranks): Inception feature
    statistics of the outputs (and of the originals unless cached), float64 sums of the per-image figures and their
    squares, codebook counts, the first `num_show` images, and the items skipped. Its state dict is the partial-sums
    file a resume reads."""

    def __init__(self, device: torch.device, need_real: bool, codebook_size: int | None):
        self.pos = 0  # images of this rank's share done
        self.batches = 0  # batch boundaries passed (the same on every rank)
        self.need_real = need_real
        self.fake = FeatureStats(FEATURE_DIM, device)
        self.real = FeatureStats(FEATURE_DIM, device) if need_real else None
        self.codebook = CodebookCounter(codebook_size, device) if codebook_size else None
        # float64 sums: count, psnr, ssim, lpips, number of inf PSNRs (exact reconstructions), `score`, then the
        # sums of squares of psnr, ssim, lpips (for the standard error of each mean)
        self.sums = torch.zeros(9, dtype=torch.float64, device=device)
        self.samples: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tokens_hw: list[int] | None = None
        self.skipped: list[dict] = []  # {"index", "reason", "detail"} of items that are not usable images
        self.has_squares = True

    def state_dict(self) -> dict:
        idx = sorted(self.samples)
        state = {"pos": self.pos, "batches": self.batches, "need_real": self.need_real, "fake": self.fake.state_dict(),
                 "sums": self.sums.cpu(), "sample_idx": torch.tensor(idx, dtype=torch.int64),
                 "tokens_hw": torch.tensor(self.tokens_hw or [], dtype=torch.int64), "skipped": list(self.skipped)}
        if self.real is not None:
            state["real"] = self.real.state_dict()
        if self.codebook is not None:
            state["codebook"] = self.codebook.counts.cpu()
        if idx:
            state["sample_orig"] = torch.stack([self.samples[i][0] for i in idx])
            state["sample_recon"] = torch.stack([self.samples[i][1] for i in idx])
        return state

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])
        self.batches = int(state.get("batches", -1))  # -1: a file from before issue 16
        self.fake.load_state_dict(state["fake"])
        if self.real is not None:
            self.real.load_state_dict(state["real"])
        if self.codebook is not None:
            self.codebook.counts.copy_(state["codebook"])
        # a file from before `score` holds 5 sums, from before the squares 6: it cannot give standard errors
        self.sums[:len(state["sums"])].copy_(state["sums"])
        self.has_squares = len(state["sums"]) >= 9
        self.tokens_hw = state["tokens_hw"].tolist() or None
        self.skipped = list(state.get("skipped", []))
        for k, i in enumerate(state["sample_idx"].tolist()):
            self.samples[i] = (state["sample_orig"][k], state["sample_recon"][k])


def save_partial(acc: Accumulator, path: Path, fingerprint: str) -> None:
    """Write the partial sums to `path` (atomically) and a readable progress file beside them."""
    tmp = path.with_name(f"{path.name}.tmp")
    torch.save({"fingerprint": fingerprint, **acc.state_dict()}, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves either the old or the new file
    progress = path.with_suffix(".json")  # human-readable progress beside the sums
    tmp.write_text(json.dumps({"pos": acc.pos, "batches": acc.batches, "fingerprint": fingerprint}))
    os.replace(tmp, progress)


MAX_RESULTS_BYTES = 16 << 20  # results.json holds figures and a list of skipped items: kilobytes


def finished_results(out: Path, fingerprint: str) -> dict | None:
    """The results of a finished evaluation with this protocol in `out`, with its samples; else None. Files
    that cannot be read (written by hand, or by a version that did not write them atomically and was killed
    mid-write) are not results: the evaluation runs again and replaces them, with a warning."""
    res, npz = out / "results.json", out / "samples.npz"
    if not res.is_file() or not npz.is_file():
        return None
    try:
        if res.stat().st_size > MAX_RESULTS_BYTES:
            raise ValueError(f"larger than {MAX_RESULTS_BYTES >> 20} MiB")
        done = json.loads(res.read_text())
        if not isinstance(done, dict) or json.dumps(done.get("protocol"), sort_keys=True, default=str) != fingerprint:
            return None
        with np.load(npz, allow_pickle=False) as z:
            done["_samples"] = {int(i): (torch.from_numpy(o), torch.from_numpy(r))
                                for i, o, r in zip(z["index"], z["original"], z["reconstruction"])}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("%s or %s is unreadable (%s: %s): evaluating again", res, npz, type(e).__name__, e)
        return None
    return done


def load_partial(out: Path, partial: Path, fingerprint: str, world: int) -> dict | None:
    """This rank's partial sums in `partial` (None when there are none), refused when another protocol or world
    size wrote them: a resume must run the same evaluation on as many ranks."""
    others = [p.name for p in (out / "partial").glob("rank*-of-*.pt") if not p.name.endswith(f"-of-{world:05d}.pt")]
    if not partial.is_file():
        state = None
    else:
        state = torch.load(partial, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{partial} was written by an evaluation with another protocol or world size; "
                             f"rerun with the same settings, or delete {partial.parent} to start over")
    if others:
        raise ValueError(f"{out / 'partial'} holds partial sums of another world size ({others[0]}); resume "
                         f"with that many ranks or delete the folder to start over")
    return state


def discard_partial(partial: Path) -> None:
    """The results are written: the partial sums are spent."""
    if partial.is_file():
        partial.unlink()
        partial.with_suffix(".json").unlink(missing_ok=True)
