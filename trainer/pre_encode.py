"""Pre-encode a shard folder: add each image's VQ token indices as a `tokens` column, into new shards.

    python -m trainer.pre_encode --vq runs/vq_f16/divae.safetensors \
        --src data/imagenet256/train --dst data/imagenet256_f16tok/train [--batch-size 64] [--device cuda]
    torchrun --nproc_per_node 8 -m trainer.pre_encode --vq ... --src data/cc3m256 --dst data/cc3m256_f8tok

The decoder stage then reads z_q from the stored indices instead of running the encoder every epoch:
`decoder.tokens=precomputed data.path=<dst> data.random_flip=false` (the indices belong to the unflipped
images); the prior stage reads them with the captions. `tokens` holds the (h, w) indices row-major as int16 bytes
when K <= 32768, else int32 (`data_pipeline.tokens.tokens_from_bytes` decodes them). Samples keep their order;
every other column is copied.

Scale (Conceptual Captions: 3.3M images): output shard k holds exactly source shard k's samples, so ranks
(torchrun / srun: RANK, WORLD_SIZE) take disjoint shards (k % WORLD_SIZE == RANK) and a shard's bytes do not
depend on the number of ranks. A DataLoader (--workers processes) decodes the JPEGs; batches never cross a shard.
--precision bf16 (the default on CUDA) runs the encoder under bf16 autocast while the codebook search stays
fp32 (`divae.quantizer.nearest_code`); fp32 (the default on CPU) runs everything in fp32.

Resume: each shard is written to a temporary name and renamed, then a receipt `.pre_encode/<shard>.json` (its
size, sha256, MDS index entry) is written the same way. After a kill (even -9) a rerun of the same command skips
the shards with a receipt and redoes the rest; the result is byte-identical to an uninterrupted run. The settings
(VQ file hash, source manifest hash, batch size, precision) are recorded in `.pre_encode/settings.json`; a rerun
with other settings is refused. Rank 0 writes index.json and manifest.json (last) once every shard has a receipt.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from data_pipeline.tokens import tokens_dtype
from divae.model import DiVAE
from divae.utils.cli import UsageError, run_cli
from divae.utils.files import sha256_file
from trainer import faults

STATE_DIR = ".pre_encode"


class _Samples(torch.utils.data.Dataset):
    """Global sample index -> the stored columns plus the decoded "image" (ShardReader; opened lazily per worker)."""

    def __init__(self, src: str):
        from data_pipeline.reader import ShardReader

        self.reader = ShardReader(src)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict:
        return self.reader[i]


def _batches(starts: list[int], counts: list[int], shards: list[int], batch_size: int) -> list[list[int]]:
    """Batches of global indices for `shards`, in order, each inside one shard."""
    out = []
    for k in shards:
        idx = list(range(starts[k], starts[k] + counts[k]))
        out += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.pre_encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vq", required=True, help="DiVAE weights file from the VQ stage (<run_dir>/divae.safetensors)")
    p.add_argument("--src", required=True, help="shard folder (data_pipeline.prepare_* output)")
    p.add_argument("--dst", required=True, help="new shard folder (a rerun of the same command resumes it)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding JPEGs per rank")
    p.add_argument("--device", default=None, help="default: cuda:<LOCAL_RANK> when CUDA is available, else cpu")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="encoder precision (auto: bf16 on CUDA, fp32 on CPU); the codebook search is always fp32")
    p.add_argument("--wait-min", type=float, default=24 * 60.0,
                   help="minutes rank 0 waits for the other ranks' shards before giving up")
    p.add_argument("--debug", action="store_true", help="print the traceback of expected errors too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from data_pipeline.shards import MANIFEST, load_manifest

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    m = _check_args(args, rank, world)
    dst = Path(args.dst)
    if (dst / MANIFEST).is_file():
        done = load_manifest(str(dst))
        if rank == 0:
            print(f"{dst} is complete ({done['num_samples']} samples); nothing to do")
        return done
    cuda = torch.cuda.is_available()
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"))
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    settings = _check_settings(args, dst, m, precision)

    model = DiVAE.from_pretrained(args.vq, device=device).eval().requires_grad_(False)
    dtype = tokens_dtype(model.vq.cfg.n_embed)
    receipt = [dst / STATE_DIR / f"{s['basename']}.json" for s in m["shards"]]
    mine = [k for k in range(len(receipt)) if k % world == rank and not receipt[k].is_file()]
    if mine:
        encode = functools.partial(_encode, model, device=device, precision=precision, dtype=dtype)
        _encode_shards(args, dst, m, mine, receipt, encode, rank)
    if rank != 0:
        return {}
    _wait_for_receipts(receipt, args.wait_min)
    manifest = _write_manifest(args, dst, m, receipt, settings)
    print(f"wrote {manifest['num_samples']} samples with `tokens` ({dtype.name}, f={model.downsample_factor}, "
          f"{precision}) to {dst}")
    return manifest


def _check_args(args: argparse.Namespace, rank: int, world: int) -> dict:
    """Check the ranks and the arguments before any work (raises UsageError); returns the source manifest."""
    from data_pipeline.shards import load_manifest

    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")
    if not Path(args.vq).is_file():
        raise UsageError(f"--vq {args.vq}: no such file (the VQ stage's divae.safetensors)")
    try:
        return load_manifest(args.src)
    except FileNotFoundError as e:
        raise UsageError(f"--src: {e}") from None


def _check_settings(args: argparse.Namespace, dst: Path, m: dict, precision: str) -> dict:
    """The settings the tokens depend on, recorded in `<dst>/.pre_encode/settings.json` by the first run; raises
    UsageError when a partial pre-encoding there used other ones (its shards would differ from this run's)."""
    from data_pipeline.shards import MANIFEST

    settings = {"vq_sha256": sha256_file(args.vq), "src": os.path.abspath(args.src),
                "src_manifest_sha256": sha256_file(Path(args.src) / MANIFEST), "batch_size": args.batch_size,
                "precision": precision, "format": m["format"]}
    state = dst / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    if not (state / "settings.json").is_file():
        _write_json(state / "settings.json", settings)
    old = json.loads((state / "settings.json").read_text())
    if old != settings:
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        raise UsageError(f"--dst {dst} holds a partial pre-encoding with other settings ({', '.join(diff)}); rerun "
                         f"with the same ones, or delete {dst} to start over")
    return settings


def _encode(model: DiVAE, images: list[np.ndarray], *, device: torch.device, precision: str,
            dtype: np.dtype) -> list[bytes]:
    """uint8 (H, W, 3) images -> each one's (h, w) token indices as row-major `dtype` bytes."""
    f = model.downsample_factor
    imgs = np.stack(images)  # (B, H, W, 3) uint8
    if imgs.shape[1] % f or imgs.shape[2] % f:
        raise ValueError(f"images of {imgs.shape[1]}x{imgs.shape[2]} are not divisible by the VQ's f={f}")
    x = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        idx = model.encode(x).cpu().numpy().astype(dtype)
    return [row.tobytes() for row in idx]


def _encode_shards(args: argparse.Namespace, dst: Path, m: dict, mine: list[int], receipt: list[Path],
                   encode: Callable[[list[np.ndarray]], list[bytes]], rank: int) -> None:
    """Write this rank's shards `mine` (source shard k -> output shard k, with `tokens`), each followed by its
    receipt; the DataLoader's batches never cross a shard."""
    from data_pipeline.shards import write_shard

    columns = {**m["columns"], "tokens": "bytes"}
    counts = [s["samples"] for s in m["shards"]]
    starts = np.cumsum([0] + counts[:-1]).tolist()
    t0, n_done = time.perf_counter(), 0
    loader = torch.utils.data.DataLoader(_Samples(args.src), batch_sampler=_batches(starts, counts, mine,
                                                                                    args.batch_size),
                                         num_workers=args.workers, collate_fn=list)
    it = iter(loader)
    for k in mine:
        samples = []
        while len(samples) < counts[k]:
            batch = next(it)
            for s, tok in zip(batch, encode([s["image"] for s in batch])):
                samples.append({**{c: s[c] for c in m["columns"]}, "tokens": tok})
        info = write_shard(str(dst), k, m["format"], samples, columns)
        faults.kill_after_shard(k)
        if info["basename"] != m["shards"][k]["basename"]:
            raise RuntimeError(f"shard {k} was written as {info['basename']}, the source calls it "
                               f"{m['shards'][k]['basename']}")
        _write_json(receipt[k], info)
        n_done += counts[k]
        print(f"rank {rank}: shard {k + 1}/{len(counts)} done ({n_done} samples this run, "
              f"{n_done / (time.perf_counter() - t0):.1f} images/s)", flush=True)


def _wait_for_receipts(receipt: list[Path], wait_min: float) -> None:
    """Wait (rank 0) until every shard has its receipt; raises RuntimeError after `wait_min` minutes."""
    deadline = time.monotonic() + 60 * wait_min
    while not all(r.is_file() for r in receipt):
        if time.monotonic() > deadline:
            missing = [r.stem for r in receipt if not r.is_file()]
            raise RuntimeError(f"waited {wait_min} min for {len(missing)} shards of the other ranks "
                               f"({missing[:3]}...); rerun the command to finish them")
        time.sleep(1.0)


def _write_manifest(args: argparse.Namespace, dst: Path, m: dict, receipt: list[Path], settings: dict) -> dict:
    """index.json and manifest.json (last) of `dst` from the receipts, keeping the source's description."""
    from data_pipeline.shards import finalize

    columns = {**m["columns"], "tokens": "bytes"}
    shards = [json.loads(r.read_text()) for r in receipt]
    keep = {k: m[k] for k in ("source", "preprocessing", "classes") if k in m}
    return finalize(str(dst), m["format"], columns, shards, counts={"written": sum(s["samples"] for s in m["shards"])},
                    derived_from={"path": os.path.abspath(args.src), "added_column": "tokens",
                                  "vq_sha256": settings["vq_sha256"], "precision": settings["precision"],
                                  "batch_size": args.batch_size}, **keep)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, prog="python -m trainer.pre_encode")


if __name__ == "__main__":
    sys.exit(cli())
