"""The reconstruction-FID protocol core (DESIGN.md section 6): sharding, float64 sums across ranks, partial
saves, resume, stop on a signal, outputs. The CLI is `evaluation.recon_fid`.

`evaluate_reconstructions(dataset, reconstruct, ...)` takes any indexable dataset of uint8 images and a
`reconstruct(images_uint8 (B,3,H,W), global_indices (B,)) -> uint8 (B,3,H,W)` callable (or one that returns
`(images, token_indices (B,h,w))`, which adds codebook figures). Protocol:
- rank r of W takes global indices r, r+W, r+2W, ... < N: no padding, no duplicates; the all-reduced image
  count is asserted to equal N. Every rank runs the same number of batches, ceil(ceil(N/W) / B) (a short
  share ends with an empty batch), so the ranks can agree at every batch boundary;
- reconstructions stay in memory as uint8; the callable seeds each image's noise from its global index, so the
  figures do not depend on W or the batch size (up to float32 rounding in batched kernels);
- features: the FID Inception (evaluation.inception), float64 sums of x and x x^T per rank, all-reduced; PSNR
  and SSIM (float64) are computed and summed on the device, with no host synchronisation per batch;
- reference statistics of the originals are cached (`ref_stats_path`) and reused by later runs;
- partial sums are saved (atomically, all ranks at the same batch) every `save_every` images per rank, every
  `save_every_min` minutes (rank clocks reduced by MAX at each batch boundary), and at the first batch boundary
  after any rank received SIGUSR1 or SIGTERM (`StopFlag`); then `Preempted` is raised on every rank (the CLI
  requeues after SIGUSR1 and stops for good after SIGTERM, the trainer's rule). A rerun
  with the same protocol and world size continues from there and ends with the same figure as an
  uninterrupted run;
- an item whose loading raises `data_pipeline.images.SkipImage` (a folder's truncated or non-image file) is
  skipped with a warning and listed in results.json ("skipped": index, reason, file); the figures cover the
  other images. Any other error (a damaged shard: `ShardError`) ends the evaluation, naming the item.
Outputs in `out_dir`: results.json (figures + protocol), results.md (Table 1 form), samples.png.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from data_pipeline.images import SkipImage
from divae.utils.files import atomic_file
from divae.utils.logging import get_logger
from evaluation.data import manifest_bytes
from evaluation.fid import FeatureStats, frechet_distance, load_stats, save_stats
from evaluation.inception import FEATURE_DIM, INPUT_SIZE
from evaluation.metrics import CodebookCounter, psnr, ssim, to_unit_range
from evaluation.report import save_grid, write_results_md
from trainer.launch import all_gather_object, broadcast_object, rank_and_world

log = get_logger(__name__)

Reconstruct = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class ReconEvalConfig:
    num_images: int | None = None  # None: the whole dataset
    batch_size: int = 16  # per rank
    save_every: int = 1024  # images per rank between partial saves (rounded up to whole batches); 0: never
    save_every_min: float = 0.0  # minutes between partial saves (at the next batch boundary); 0: never
    num_show: int = 8  # images (global indices 0..num_show-1) in samples.png
    ssim: bool = True  # SSIM (float64, on the device; scikit-image's figure)
    # False: the outputs are not reconstructions of the dataset's images (text-to-image: the dataset is only the
    # FID reference set), so PSNR/SSIM/LPIPS are not computed and reported as None
    paired: bool = True


class Preempted(Exception):
    """Raised on every rank after the partial sums were saved because a rank received SIGUSR1 or SIGTERM."""

    def __init__(self, signum: int, pos: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after {pos} images of this rank's share; "
                         "partial sums saved, a rerun resumes from them")
        self.signum, self.pos = signum, pos


class StopFlag:
    """SIGUSR1 / SIGTERM handlers that only record the signal; the evaluation acts on it at the next batch
    boundary (collectively: SIGUSR1 on any rank outranks SIGTERM). `install()` returns self; `restore()` puts the
    previous handlers back."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame) -> None:  # noqa: ARG002
        self.received = self.received or signum

    def install(self) -> StopFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ----------------------------------------------------------------------------------------------------------
# Data


def load_image(item) -> torch.Tensor:
    """A dataset item -> uint8 (3, H, W). Accepts a uint8 tensor/array (3,H,W) or (H,W,3), a PIL image,
    encoded image bytes, or a dict holding one of those under "image" or "jpg"."""
    if isinstance(item, dict):
        for key in ("image", "jpg", "png"):
            if key in item:
                return load_image(item[key])
        raise ValueError(f"dataset item has no 'image' or 'jpg' field (keys: {sorted(item)})")
    if isinstance(item, (bytes, bytearray, memoryview)):
        item = Image.open(io.BytesIO(item))
    if isinstance(item, Image.Image):
        item = np.asarray(item.convert("RGB"))
    if isinstance(item, np.ndarray) and not item.flags.writeable:
        item = item.copy()  # e.g. decoded from a read-only buffer; torch wants writable memory
    t = torch.as_tensor(item)
    if t.dtype != torch.uint8 or t.dim() != 3:
        raise ValueError(f"expected a uint8 image (3,H,W) or (H,W,3), got {t.dtype} {tuple(t.shape)}")
    if t.shape[0] != 3 and t.shape[-1] == 3:
        t = t.permute(2, 0, 1)
    if t.shape[0] != 3:
        raise ValueError(f"expected 3 channels, got shape {tuple(t.shape)}")
    return t.contiguous()


def shard_indices(num_images: int, rank: int, world_size: int) -> range:
    """Global indices of rank `rank`: rank, rank + W, ... < num_images (disjoint, covering, no padding)."""
    return range(rank, num_images, world_size)


# ----------------------------------------------------------------------------------------------------------
# Per-rank accumulator (everything in it adds across ranks)


class _Accumulator:
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


def _save_partial(acc: _Accumulator, path: Path, fingerprint: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    torch.save({"fingerprint": fingerprint, **acc.state_dict()}, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves either the old or the new file
    progress = path.with_suffix(".json")  # human-readable progress beside the sums
    tmp.write_text(json.dumps({"pos": acc.pos, "batches": acc.batches, "fingerprint": fingerprint}))
    os.replace(tmp, progress)


MAX_RESULTS_BYTES = 16 << 20  # results.json holds figures and a list of skipped items: kilobytes


def _finished_results(out: Path, fingerprint: str) -> dict | None:
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


def data_sha256(dataset: object) -> str | None:
    """sha256 of the dataset's manifest (`evaluation.data.manifest_bytes`: for shards it holds every shard's
    sha256, so another data set at the same path has another hash), or None for a dataset without one."""
    if getattr(dataset, "manifest", None) is None:
        return None
    return hashlib.sha256(manifest_bytes(dataset)).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# The evaluation


@torch.inference_mode()
def evaluate_reconstructions(
    dataset: Sequence,
    reconstruct: Reconstruct,
    *,
    extractor: torch.nn.Module,
    cfg: ReconEvalConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    protocol: dict | None = None,
    codebook_size: int | None = None,
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ref_stats_path: str | os.PathLike | None = None,
    label: str = "reconstruction",
    stop: StopFlag | None = None,
    extra: dict | None = None,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    score_name: str = "score",
    report: Callable[[dict, dict, Path], None] | None = None,
) -> dict:
    """Reconstruct the first N images of `dataset` (this rank's share), and return the all-reduced figures
    (same dict on every rank). `extractor` maps uint8 (B,3,H,W) -> (B, 2048) (the FID Inception);
    `lpips(x, y)` takes [-1, 1] floats and returns (B,) or (B,1,1,1) distances; `protocol` is recorded in
    results.json and, with the world size and batch size, must match for a resume. With `out_dir`
    None nothing is written and nothing resumes (quick in-training use). `stop`: a `StopFlag` (installed
    handlers); when any rank's flag is set at a batch boundary, all ranks save and raise `Preempted`.
    `extra`: more fields for results.json (e.g. the process group's timeout). `score(outputs uint8 (B,3,H,W),
    global indices (B,)) -> (B,)`: a per-output figure whose mean is reported as results[score_name] (e.g. the CLIP
    score of text-to-image). `report(results, samples, out_dir)` replaces the default results.md and samples.png
    (rank 0; samples maps global index -> (original, output) uint8). With `cfg.paired` False the outputs are not
    reconstructions (text-to-image): PSNR/SSIM/LPIPS are None and only the FID compares the two sets."""
    cfg = cfg or ReconEvalConfig()
    rank, world = rank_and_world()
    device = next(extractor.parameters()).device
    n_total = len(dataset) if cfg.num_images is None else cfg.num_images
    if not 0 < n_total <= len(dataset):
        raise ValueError(f"num_images={cfg.num_images} but the dataset holds {len(dataset)} images")
    if n_total < 2:
        raise ValueError("FID needs at least 2 images")
    mine = shard_indices(n_total, rank, world)

    protocol = dict(protocol or {})
    protocol["data_manifest_sha256"] = data_sha256(dataset)  # finished results and partial sums are of this data
    if not cfg.paired:
        lpips = None
    protocol.update(num_images=n_total, world_size=world, batch_size=cfg.batch_size, ssim=cfg.ssim and cfg.paired,
                    lpips=lpips is not None, codebook_size=codebook_size, feature_dim=FEATURE_DIM,
                    inception_input=f"uint8, TF1 bilinear resize to {INPUT_SIZE}x{INPUT_SIZE}, (x-128)/128",
                    inception_weights_sha256=getattr(extractor, "weights_sha256", None),
                    sharding="global index i to rank i % world_size, no padding")
    fingerprint = json.dumps(protocol, sort_keys=True, default=str)

    out = Path(out_dir) if out_dir is not None else None
    done = broadcast_object(_finished_results(out, fingerprint) if out is not None and rank == 0 else None)
    if done is not None:  # e.g. the CNN half of a `--decoder both` job that was preempted later
        log.info("%s: %s already holds this evaluation's results; not repeating it", label, out)
        return done

    partial = out / "partial" / f"rank{rank:05d}-of-{world:05d}.pt" if out is not None else None
    resume_state = None
    if partial is not None and partial.is_file():
        resume_state = torch.load(partial, map_location="cpu", weights_only=True)
        if resume_state["fingerprint"] != fingerprint:
            raise ValueError(f"{partial} was written by an evaluation with another protocol or world size; "
                             f"rerun with the same settings, or delete {partial.parent} to start over")
    if out is not None:
        others = [p.name for p in (out / "partial").glob("rank*-of-*.pt") if not p.name.endswith(f"-of-{world:05d}.pt")]
        if others:
            raise ValueError(f"{out / 'partial'} holds partial sums of another world size ({others[0]}); resume "
                             f"with that many ranks or delete the folder to start over")
    # Whether to compute the originals' statistics: rank 0 decides (cache present or not), all follow.
    if resume_state is not None:
        need_real = bool(resume_state["need_real"])
    else:
        need_real = ref_stats_path is None or not Path(ref_stats_path).is_file()
    need_real = broadcast_object(need_real)
    if resume_state is not None and bool(resume_state["need_real"]) != need_real:
        raise ValueError(f"{out / 'partial'} is inconsistent across ranks; delete it to start over")

    acc = _Accumulator(device, need_real, codebook_size)
    if resume_state is not None:
        acc.load_state_dict(resume_state)
        log.info("%s: resuming at %d/%d images of rank 0's share", label, acc.pos, len(mine))
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)

    bs = cfg.batch_size
    n_batches = math.ceil(math.ceil(n_total / world) / bs)  # the same on every rank
    if acc.batches < 0:
        acc.batches = math.ceil(acc.pos / bs)
    save_every = math.ceil(cfg.save_every / bs) * bs if cfg.save_every else 0
    start_pos = acc.pos
    t_start = time.perf_counter()
    t_recon = 0.0
    t_saved = time.monotonic()
    distributed = dist.is_available() and dist.is_initialized()
    flags = torch.zeros(2, dtype=torch.float64, device=device)  # (signal number, time-based save due)

    def load_batch(p: int) -> tuple[torch.Tensor | None, torch.Tensor, list[dict], int]:
        """(images, their global indices, skipped items, positions consumed) of this rank's share from p."""
        images, idx, skipped = [], [], []
        positions = list(mine[p:p + bs])
        for i in positions:
            try:
                images.append(load_image(dataset[i]))
                idx.append(i)
            except SkipImage as e:
                log.warning("%s: skipped item %d, %s: %s", label, i, e.reason, e.detail)
                skipped.append({"index": i, "reason": e.reason, "detail": e.detail})
        return (torch.stack(images) if images else None), torch.tensor(idx, dtype=torch.int64), skipped, len(positions)

    def process(images: torch.Tensor, idx: torch.Tensor) -> None:
        nonlocal t_recon
        t0 = time.perf_counter()
        result = reconstruct(images, idx)
        recon, tokens = result if isinstance(result, tuple) else (result, None)
        t_recon += time.perf_counter() - t0
        if recon.dtype != torch.uint8 or recon.shape != images.shape:
            raise ValueError(f"reconstruct must return uint8 {tuple(images.shape)}, got {recon.dtype} "
                             f"{tuple(recon.shape)}")
        images_d, recon_d = images.to(device), recon.to(device)
        acc.fake.update(extractor(recon_d))
        if acc.real is not None:
            acc.real.update(extractor(images_d))
        acc.sums[0] += len(idx)
        if cfg.paired:
            p = psnr(images_d, recon_d)  # float64 (B,) on the device; no host sync
            finite = torch.isfinite(p)
            acc.sums[1] += torch.where(finite, p, 0).sum()
            acc.sums[6] += torch.where(finite, p, 0).square().sum()
            acc.sums[4] += (~finite).sum()
        if cfg.ssim and cfg.paired:
            ss = ssim(images_d, recon_d)
            acc.sums[2] += ss.sum()
            acc.sums[7] += ss.square().sum()
        if score is not None:
            acc.sums[5] += score(recon_d, idx).double().sum()
        if lpips is not None:
            d = lpips(to_unit_range(images_d), to_unit_range(recon_d)).double()
            acc.sums[3] += d.sum()
            acc.sums[8] += d.square().sum()
        if tokens is not None:
            acc.tokens_hw = list(tokens.shape[-2:])
            if acc.codebook is not None:
                acc.codebook.update(tokens)
        for k, i in enumerate(idx.tolist()):
            if i < cfg.num_show:
                acc.samples[i] = (images[k].clone(), recon[k].cpu())

    with ThreadPoolExecutor(max_workers=1) as pool:  # decode the next batch while this one runs
        pending = pool.submit(load_batch, acc.pos) if acc.batches < n_batches else None
        while pending is not None:
            images, idx, skipped, consumed = pending.result()
            nxt = acc.pos + consumed
            acc.batches += 1
            pending = pool.submit(load_batch, nxt) if acc.batches < n_batches else None
            acc.skipped += skipped
            if images is not None:  # else every item of the batch was skipped, or this rank's share is done
                process(images, idx)
            acc.pos = nxt
            if partial is None:
                continue
            # The batch boundary: the ranks agree on a stop signal and on a time-based save (MAX of each).
            # USR1 (requeue) outranks TERM (stop for good), as in the trainer: encoded 2 and 1 for the MAX
            flags[0] = {signal.SIGUSR1: 2.0, signal.SIGTERM: 1.0}.get(stop.received, 0.0) if stop is not None else 0.0
            flags[1] = float(cfg.save_every_min > 0 and time.monotonic() - t_saved >= 60 * cfg.save_every_min)
            if distributed:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum = {2: signal.SIGUSR1, 1: signal.SIGTERM}.get(int(flags[0].item()), 0)
            time_due = bool(flags[1].item())
            count_due = save_every and acc.pos % save_every == 0
            if acc.batches < n_batches and (signum or time_due or count_due):
                _save_partial(acc, partial, fingerprint)
                t_saved = time.monotonic()
                log.info("%s: %d/%d images (rank 0's share), partial sums saved%s", label, acc.pos, len(mine),
                         f" on {signal.Signals(signum).name}" if signum else "")
                if signum:
                    pending.cancel()
                    raise Preempted(signum, acc.pos)
    if partial is not None and (save_every or cfg.save_every_min or stop is not None):
        _save_partial(acc, partial, fingerprint)  # a failure in what follows loses no work

    # ---- combine ranks
    elapsed = time.perf_counter() - t_start
    done_here = torch.tensor([acc.pos - start_pos, elapsed, t_recon], dtype=torch.float64, device=device)
    acc.fake.all_reduce()
    if acc.real is not None:
        acc.real.all_reduce()
    if acc.codebook is not None:
        acc.codebook.all_reduce()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(acc.sums)
        dist.all_reduce(done_here[:1])
        dist.all_reduce(done_here[1:], op=dist.ReduceOp.MAX)
    count = int(acc.sums[0].item())
    gathered = all_gather_object((acc.samples, acc.tokens_hw, acc.skipped))
    skipped = sorted((s for _, _, part in gathered for s in part), key=lambda s: s["index"])
    if count + len(skipped) != n_total or int(acc.fake.n) != count:
        raise RuntimeError(f"counted {count} images ({int(acc.fake.n)} feature vectors) and {len(skipped)} skipped, "
                           f"expected {n_total}")
    if count < 2:
        raise ValueError(f"FID needs at least 2 images; {len(skipped)} of the {n_total} were skipped "
                         f"(first: {skipped[0]['detail']}: {skipped[0]['reason']})")

    # Rank 0 alone reads/writes the reference cache (it may be node-local) and computes the distance.
    fid, ref_source = None, None
    if rank == 0:
        mu_fake, sigma_fake = acc.fake.mean_cov()
        if acc.real is not None:
            mu_real, sigma_real = acc.real.mean_cov()
            ref_source = "computed"
            if ref_stats_path is not None:
                save_stats(ref_stats_path, mu_real, sigma_real, count, {"protocol": fingerprint})
                ref_source = f"computed, cached to {ref_stats_path}"
        else:
            mu_real, sigma_real, n_ref, _ = load_stats(ref_stats_path)
            if n_ref != count:
                raise ValueError(f"reference statistics {ref_stats_path} cover {n_ref} images, not {count}; delete "
                                 "it (or pass another --ref-stats-dir) to recompute them")
            ref_source = f"cached {ref_stats_path}"
        fid = frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake)
    fid, ref_source = broadcast_object((fid, ref_source))

    n_inf = int(acc.sums[4].item())
    results = {
        "label": label,
        "fid": fid,
        "psnr": (float("inf") if n_inf else acc.sums[1].item() / count) if cfg.paired else None,
        "psnr_exact_images": n_inf,
        "ssim": acc.sums[2].item() / count if cfg.ssim and cfg.paired else None,
        "lpips": acc.sums[3].item() / count if lpips is not None else None,
        "codebook": acc.codebook.summary() if acc.codebook is not None else None,
        "num_images": count,
        "skipped": skipped,  # items that are not usable images (a folder's bad files); not in the figures
        "images_per_s": float(done_here[0] / done_here[1]) if done_here[0] > 0 else None,
        "reconstruct_images_per_s": float(done_here[0] / done_here[2]) if done_here[0] > 0 else None,
        "images_this_session": int(done_here[0]),
        "resumed": start_pos > 0,
        "reference_stats": ref_source,
        "protocol": protocol,
    }
    if score is not None:
        results[score_name] = acc.sums[5].item() / count
    # standard errors of the means over images (the estimation noise of a figure from this many images)
    for key, i in (("psnr", 1), ("ssim", 2), ("lpips", 3)):
        if results[key] is not None and math.isfinite(results[key]) and acc.has_squares:
            var = max(acc.sums[i + 5].item() / count - results[key] ** 2, 0.0) * count / (count - 1)
            results[f"{key}_sem"] = math.sqrt(var / count)
    results.update(extra or {})
    results["tokens_hw"] = next((t for _, t, _ in gathered if t), None)
    samples = {i: s for part, _, _ in gathered for i, s in part.items()}
    first_good = min(set(range(n_total)) - {s["index"] for s in skipped})
    results["image_hw"] = list(load_image(dataset[first_good]).shape[1:])

    if out is not None:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            order = sorted(samples)
            orig = torch.stack([samples[i][0] for i in order]) if order else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
            rec = torch.stack([samples[i][1] for i in order]) if order else orig
            # each file whole or not at all (write-then-rename), results.json last: it marks the results done
            with atomic_file(out / "samples.npz") as f:
                np.savez(f, index=np.array(order, dtype=np.int64), original=orig.numpy(), reconstruction=rec.numpy())
            with atomic_file(out / "results.json", "w") as f:
                f.write(json.dumps(results, indent=2, default=str))
            if report is not None:
                report(results, samples, out)
            else:
                write_results_md([results], out / "results.md")
                if order:
                    save_grid([orig, rec], out / "samples.png")
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if partial is not None and partial.is_file():  # results are written; the partial sums are spent
            partial.unlink()
            partial.with_suffix(".json").unlink(missing_ok=True)
    results["_samples"] = samples  # in-memory only (not in results.json)
    return results


