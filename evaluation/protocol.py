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
  after any rank received SIGUSR1 or SIGTERM (`runtime.signals`); then `Preempted` is raised on every rank (the CLI
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
from evaluation.accumulator import Accumulator, discard_partial, finished_results, load_partial, save_partial
from evaluation.data import manifest_bytes
from evaluation.fid import frechet_distance, load_stats, save_stats
from evaluation.inception import FEATURE_DIM, INPUT_SIZE
from evaluation.metrics import psnr, ssim, to_unit_range
from evaluation.report import save_grid, write_results_md
from runtime import signals
from runtime.collectives import all_gather_object, broadcast_object, rank_and_world

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


def exit_after_stop(e: Preempted, out: Path, label: str) -> int:
    """What an evaluation CLI does after `Preempted` (the partial sums are saved): after SIGUSR1 rank 0 leaves
    `<out>/REQUEUE` (the Slurm script requeues on it); the process group is closed. Returns the exit code
    (`runtime.signals.exit_for_signal`)."""
    code, requeue = signals.exit_for_signal(e.signum)
    if requeue and rank_and_world()[0] == 0:
        (out / signals.REQUEUE_MARKER).write_text(f"{e.pos}\n")
    log.warning("%s: %s; exiting with code %d (%s)", label, e, code, "requeue" if requeue else "stopped")
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


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


def data_sha256(dataset: object) -> str | None:
    """sha256 of the dataset's manifest (`evaluation.data.manifest_bytes`: for shards it holds every shard's
    sha256, so another data set at the same path has another hash), or None for a dataset without one."""
    if getattr(dataset, "manifest", None) is None:
        return None
    return hashlib.sha256(manifest_bytes(dataset)).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# The evaluation


@dataclass(frozen=True)
class _Share:
    """This rank's part of one evaluation: the images it reads (`mine`, global indices), the protocol's
    fingerprint that results and partial sums must match, and where they are kept (None: nothing is written)."""

    dataset: Sequence
    cfg: ReconEvalConfig
    label: str
    rank: int
    world: int
    n_total: int
    mine: range
    fingerprint: str
    out: Path | None
    partial: Path | None
    device: torch.device

    @property
    def n_batches(self) -> int:
        """Batches every rank runs (the same on all, so they can agree at every boundary)."""
        return math.ceil(math.ceil(self.n_total / self.world) / self.cfg.batch_size)


@dataclass(frozen=True)
class _Measures:
    """What one batch goes through: the callable under test and the figures' networks (see
    `evaluate_reconstructions`)."""

    reconstruct: Reconstruct
    extractor: torch.nn.Module
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


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
    stop_on_signals: bool = False,
    extra: dict | None = None,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    score_name: str = "score",
    report: Callable[[dict, dict, Path], None] | None = None,
) -> dict:
    """Reconstruct the first N images of `dataset` (this rank's share), and return the all-reduced figures
    (same dict on every rank). `extractor` maps uint8 (B,3,H,W) -> (B, 2048) (the FID Inception);
    `lpips(x, y)` takes [-1, 1] floats and returns (B,) or (B,1,1,1) distances; `protocol` is recorded in
    results.json and, with the world size and batch size, must match for a resume. With `out_dir`
    None nothing is written and nothing resumes (quick in-training use). `stop_on_signals`: the ranks agree at
    every batch boundary on the signals `runtime.signals` recorded (the caller installs its handlers); when any rank
    received one, all ranks save and raise `Preempted`. `extra`: more fields for results.json (e.g. the process
    group's timeout). `score(outputs uint8 (B,3,H,W), global indices (B,)) -> (B,)`: a per-output figure whose mean
    is reported as results[score_name] (e.g. the CLIP score of text-to-image). `report(results, samples, out_dir)`
    replaces the default results.md and samples.png (rank 0; samples maps global index -> (original, output)
    uint8). With `cfg.paired` False the outputs are not reconstructions (text-to-image): PSNR/SSIM/LPIPS are None
    and only the FID compares the two sets."""
    cfg = cfg or ReconEvalConfig()
    measures = _Measures(reconstruct, extractor, lpips if cfg.paired else None, score)
    share, protocol = _plan_share(dataset, cfg, measures, protocol, codebook_size, out_dir, label)
    done = broadcast_object(finished_results(share.out, share.fingerprint)
                            if share.out is not None and share.rank == 0 else None)
    if done is not None:  # e.g. the CNN half of a `--decoder both` job that was preempted later
        log.info("%s: %s already holds this evaluation's results; not repeating it", label, share.out)
        return done
    acc = _resume(share, ref_stats_path, codebook_size)
    start_pos, t_start = acc.pos, time.perf_counter()
    t_recon = _run_batches(share, acc, measures, stop_on_signals)
    timing = torch.tensor([acc.pos - start_pos, time.perf_counter() - t_start, t_recon], dtype=torch.float64,
                          device=share.device)
    results, samples = _combine(share, acc, timing, ref_stats_path)
    results.update(_figures(acc, cfg, measures, score_name, int(results["num_images"])))
    results.update(resumed=start_pos > 0, protocol=protocol, **(extra or {}))
    if share.out is not None:
        _write_outputs(share, results, samples, report)
    results["_samples"] = samples  # in-memory only (not in results.json)
    return results


def _plan_share(dataset: Sequence, cfg: ReconEvalConfig, measures: _Measures, protocol: dict | None,
                codebook_size: int | None, out_dir: str | os.PathLike | None, label: str) -> tuple[_Share, dict]:
    """This rank's share and the protocol record (what results.json states and a resume must match)."""
    rank, world = rank_and_world()
    n_total = len(dataset) if cfg.num_images is None else cfg.num_images
    if not 0 < n_total <= len(dataset):
        raise ValueError(f"num_images={cfg.num_images} but the dataset holds {len(dataset)} images")
    if n_total < 2:
        raise ValueError("FID needs at least 2 images")
    protocol = dict(protocol or {})
    protocol["data_manifest_sha256"] = data_sha256(dataset)  # finished results and partial sums are of this data
    protocol.update(num_images=n_total, world_size=world, batch_size=cfg.batch_size, ssim=cfg.ssim and cfg.paired,
                    lpips=measures.lpips is not None, codebook_size=codebook_size, feature_dim=FEATURE_DIM,
                    inception_input=f"uint8, TF1 bilinear resize to {INPUT_SIZE}x{INPUT_SIZE}, (x-128)/128",
                    inception_weights_sha256=getattr(measures.extractor, "weights_sha256", None),
                    sharding="global index i to rank i % world_size, no padding")
    out = Path(out_dir) if out_dir is not None else None
    partial = out / "partial" / f"rank{rank:05d}-of-{world:05d}.pt" if out is not None else None
    share = _Share(dataset, cfg, label, rank, world, n_total, shard_indices(n_total, rank, world),
                   json.dumps(protocol, sort_keys=True, default=str), out, partial,
                   next(measures.extractor.parameters()).device)
    return share, protocol


def _resume(share: _Share, ref_stats_path: str | os.PathLike | None, codebook_size: int | None) -> Accumulator:
    """A fresh accumulator, or this rank's partial sums. Whether to compute the originals' statistics: rank 0
    decides (reference cache present or not, or what the partial sums say), all follow."""
    state = load_partial(share.out, share.partial, share.fingerprint, share.world) if share.out is not None else None
    if state is not None:
        need_real = bool(state["need_real"])
    else:
        need_real = ref_stats_path is None or not Path(ref_stats_path).is_file()
    need_real = broadcast_object(need_real)
    if state is not None and bool(state["need_real"]) != need_real:
        raise ValueError(f"{share.out / 'partial'} is inconsistent across ranks; delete it to start over")
    acc = Accumulator(share.device, need_real, codebook_size)
    if state is not None:
        acc.load_state_dict(state)
        log.info("%s: resuming at %d/%d images of rank 0's share", share.label, acc.pos, len(share.mine))
    if acc.batches < 0:
        acc.batches = math.ceil(acc.pos / share.cfg.batch_size)
    if share.partial is not None:
        share.partial.parent.mkdir(parents=True, exist_ok=True)
    return acc


def _load_batch(share: _Share, p: int) -> tuple[torch.Tensor | None, torch.Tensor, list[dict], int]:
    """(images, their global indices, skipped items, positions consumed) of this rank's share from position p."""
    images, idx, skipped = [], [], []
    positions = list(share.mine[p:p + share.cfg.batch_size])
    for i in positions:
        try:
            images.append(load_image(share.dataset[i]))
            idx.append(i)
        except SkipImage as e:
            log.warning("%s: skipped item %d, %s: %s", share.label, i, e.reason, e.detail)
            skipped.append({"index": i, "reason": e.reason, "detail": e.detail})
    return (torch.stack(images) if images else None), torch.tensor(idx, dtype=torch.int64), skipped, len(positions)


def _run_batches(share: _Share, acc: Accumulator, measures: _Measures, stop_on_signals: bool) -> float:
    """This rank's remaining batches into `acc`, the next batch decoded while one runs; partial sums saved as
    configured and on an agreed stop signal (then `Preempted`). Returns the seconds spent in `reconstruct`."""
    cfg = share.cfg
    save_every = math.ceil(cfg.save_every / cfg.batch_size) * cfg.batch_size if cfg.save_every else 0
    t_recon, t_saved = 0.0, time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:  # decode the next batch while this one runs
        pending = pool.submit(_load_batch, share, acc.pos) if acc.batches < share.n_batches else None
        while pending is not None:
            images, idx, skipped, consumed = pending.result()
            nxt = acc.pos + consumed
            acc.batches += 1
            pending = pool.submit(_load_batch, share, nxt) if acc.batches < share.n_batches else None
            acc.skipped += skipped
            if images is not None:  # else every item of the batch was skipped, or this rank's share is done
                t_recon += _measure(acc, images, idx, measures, cfg)
            acc.pos = nxt
            if share.partial is None:
                continue
            signum, time_due = _agree_at_boundary(share, stop_on_signals, t_saved)
            if acc.batches < share.n_batches and (signum or time_due or (save_every and acc.pos % save_every == 0)):
                save_partial(acc, share.partial, share.fingerprint)
                t_saved = time.monotonic()
                log.info("%s: %d/%d images (rank 0's share), partial sums saved%s", share.label, acc.pos,
                         len(share.mine), f" on {signal.Signals(signum).name}" if signum else "")
                if signum:
                    pending.cancel()
                    raise Preempted(signum, acc.pos)
    if share.partial is not None and (save_every or cfg.save_every_min or stop_on_signals):
        save_partial(acc, share.partial, share.fingerprint)  # a failure in what follows loses no work
    return t_recon


def _agree_at_boundary(share: _Share, stop_on_signals: bool, t_saved: float) -> tuple[int | None, bool]:
    """The ranks' agreement at a batch boundary, in one all-reduce (MAX of each): (the stop signal any rank
    received, SIGUSR1 outranking SIGTERM as in the trainer; whether any rank's clock says a timed save is due)."""
    cfg = share.cfg
    flags = torch.tensor([float(signals.local_request()) if stop_on_signals else 0.0,
                          float(cfg.save_every_min > 0 and time.monotonic() - t_saved >= 60 * cfg.save_every_min)],
                         dtype=torch.float64, device=share.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return signals.signal_of(int(flags[0].item())), bool(flags[1].item())


def _measure(acc: Accumulator, images: torch.Tensor, idx: torch.Tensor, measures: _Measures,
             cfg: ReconEvalConfig) -> float:
    """Reconstruct one batch (uint8 (B,3,H,W), global indices (B,)) and add its figures to `acc`. Returns the
    seconds `reconstruct` took."""
    t0 = time.perf_counter()
    result = measures.reconstruct(images, idx)
    recon, tokens = result if isinstance(result, tuple) else (result, None)
    seconds = time.perf_counter() - t0
    if recon.dtype != torch.uint8 or recon.shape != images.shape:
        raise ValueError(f"reconstruct must return uint8 {tuple(images.shape)}, got {recon.dtype} "
                         f"{tuple(recon.shape)}")
    device = acc.sums.device
    images_d, recon_d = images.to(device), recon.to(device)
    acc.fake.update(measures.extractor(recon_d))
    if acc.real is not None:
        acc.real.update(measures.extractor(images_d))
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
    if measures.score is not None:
        acc.sums[5] += measures.score(recon_d, idx).double().sum()
    if measures.lpips is not None:
        d = measures.lpips(to_unit_range(images_d), to_unit_range(recon_d)).double()
        acc.sums[3] += d.sum()
        acc.sums[8] += d.square().sum()
    if tokens is not None:
        acc.tokens_hw = list(tokens.shape[-2:])
        if acc.codebook is not None:
            acc.codebook.update(tokens)
    for k, i in enumerate(idx.tolist()):
        if i < cfg.num_show:
            acc.samples[i] = (images[k].clone(), recon[k].cpu())
    return seconds


def _combine(share: _Share, acc: Accumulator, timing: torch.Tensor,
             ref_stats_path: str | os.PathLike | None) -> tuple[dict, dict]:
    """All-reduce the ranks' sums (timing: images this session summed, seconds and reconstruct seconds by MAX),
    check every image was counted once, and compute the FID on rank 0. Returns (the results without the per-image
    figures, the shown samples {global index: (original, output)})."""
    for stats in (acc.fake, acc.real, acc.codebook):
        if stats is not None:
            stats.all_reduce()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(acc.sums)
        dist.all_reduce(timing[:1])
        dist.all_reduce(timing[1:], op=dist.ReduceOp.MAX)
    count, n_total = int(acc.sums[0].item()), share.n_total
    gathered = all_gather_object((acc.samples, acc.tokens_hw, acc.skipped))
    skipped = sorted((s for _, _, part in gathered for s in part), key=lambda s: s["index"])
    if count + len(skipped) != n_total or int(acc.fake.n) != count:
        raise RuntimeError(f"counted {count} images ({int(acc.fake.n)} feature vectors) and {len(skipped)} skipped, "
                           f"expected {n_total}")
    if count < 2:
        raise ValueError(f"FID needs at least 2 images; {len(skipped)} of the {n_total} were skipped "
                         f"(first: {skipped[0]['detail']}: {skipped[0]['reason']})")
    fid, ref_source = broadcast_object(_fid(acc, count, ref_stats_path, share.fingerprint) if share.rank == 0
                                       else None)
    first_good = min(set(range(n_total)) - {s["index"] for s in skipped})
    done = timing[0].item()
    results = {
        "label": share.label, "fid": fid, "num_images": count,
        "skipped": skipped,  # items that are not usable images (a folder's bad files); not in the figures
        "images_per_s": done / timing[1].item() if done > 0 else None,
        "reconstruct_images_per_s": done / timing[2].item() if done > 0 else None,
        "images_this_session": int(done), "reference_stats": ref_source,
        "tokens_hw": next((t for _, t, _ in gathered if t), None),
        "image_hw": list(load_image(share.dataset[first_good]).shape[1:]),
    }
    return results, {i: s for part, _, _ in gathered for i, s in part.items()}


def _fid(acc: Accumulator, count: int, ref_stats_path: str | os.PathLike | None,
         fingerprint: str) -> tuple[float, str]:
    """(FID, where the originals' statistics came from), on rank 0 alone: it reads and writes the reference cache
    (which may be node-local)."""
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
    return frechet_distance(mu_real, sigma_real, mu_fake, sigma_fake), ref_source


def _figures(acc: Accumulator, cfg: ReconEvalConfig, measures: _Measures, score_name: str, count: int) -> dict:
    """The per-image figures' means over `count` images (None where not measured) and their standard errors
    (the estimation noise of a figure from this many images), the codebook summary and the score."""
    n_inf = int(acc.sums[4].item())
    figures = {
        "psnr": (float("inf") if n_inf else acc.sums[1].item() / count) if cfg.paired else None,
        "psnr_exact_images": n_inf,
        "ssim": acc.sums[2].item() / count if cfg.ssim and cfg.paired else None,
        "lpips": acc.sums[3].item() / count if measures.lpips is not None else None,
        "codebook": acc.codebook.summary() if acc.codebook is not None else None,
    }
    if measures.score is not None:
        figures[score_name] = acc.sums[5].item() / count
    for key, i in (("psnr", 1), ("ssim", 2), ("lpips", 3)):
        if figures[key] is not None and math.isfinite(figures[key]) and acc.has_squares:
            var = max(acc.sums[i + 5].item() / count - figures[key] ** 2, 0.0) * count / (count - 1)
            figures[f"{key}_sem"] = math.sqrt(var / count)
    return figures


def _write_outputs(share: _Share, results: dict, samples: dict, report: Callable | None) -> None:
    """Rank 0 writes samples.npz, results.json (last: it marks the results done; each file whole or not at all)
    and the report (results.md and samples.png by default); then every rank's partial sums are spent."""
    out = share.out
    if share.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        order = sorted(samples)
        orig = torch.stack([samples[i][0] for i in order]) if order else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        rec = torch.stack([samples[i][1] for i in order]) if order else orig
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
    discard_partial(share.partial)
