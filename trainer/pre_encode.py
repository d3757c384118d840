"""Pre-encode a shard folder: add each image's VQ token indices as a `tokens` column, into new shards.

    python -m trainer.pre_encode --vq runs/vq_f16/divae.safetensors \
        --src data/imagenet256/train --dst data/imagenet256_f16tok/train [--batch-size 64] [--device cuda]

The decoder stage then reads z_q from the stored indices instead of running the encoder every epoch:
`decoder.tokens=precomputed data.path=<dst> data.random_flip=false` (the indices belong to the unflipped
images). `tokens` holds the (h, w) indices row-major as int16 bytes when K <= 32768, else int32
(`tokens_from_bytes` decodes them). Samples keep their order; every other column is copied.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from divae.model import DiVAE


def tokens_dtype(n_embed: int) -> np.dtype:
    return np.dtype(np.int16) if n_embed <= 2**15 else np.dtype(np.int32)


def tokens_from_bytes(values: list[bytes], grid: int) -> torch.Tensor:
    """Stored `tokens` values (one bytes object per image) -> LongTensor (B, grid, grid)."""
    out = []
    for v in values:
        itemsize = len(v) // (grid * grid)
        if itemsize not in (2, 4) or itemsize * grid * grid != len(v):
            raise ValueError(f"a tokens value of {len(v)} bytes is not a {grid}x{grid} int16/int32 grid; "
                             "was it written for another image size or VQ?")
        out.append(np.frombuffer(v, dtype=np.int16 if itemsize == 2 else np.int32).reshape(grid, grid))
    return torch.from_numpy(np.stack(out).astype(np.int64))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m trainer.pre_encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vq", required=True, help="DiVAE weights file from the VQ stage (<run_dir>/divae.safetensors)")
    p.add_argument("--src", required=True, help="shard folder (data_pipeline.prepare_* output)")
    p.add_argument("--dst", required=True, help="new shard folder to write (must not exist yet)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from data_pipeline.shards import copy_with_extra_column

    device = torch.device(args.device)
    model = DiVAE.from_pretrained(args.vq, device=device)
    dtype = tokens_dtype(model.vq.cfg.n_embed)
    f = model.downsample_factor

    def encode(samples: list[dict]) -> list[bytes]:
        imgs = np.stack([s["image"] for s in samples])  # (B, H, W, 3) uint8
        if imgs.shape[1] % f or imgs.shape[2] % f:
            raise ValueError(f"images of {imgs.shape[1]}x{imgs.shape[2]} are not divisible by the VQ's f={f}")
        x = torch.from_numpy(imgs).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        with torch.no_grad():
            idx = model.encode(x).cpu().numpy().astype(dtype)
        return [row.tobytes() for row in idx]

    manifest = copy_with_extra_column(args.src, args.dst, encode, "tokens", encoding="bytes",
                                      batch_size=args.batch_size)
    n = manifest["counts"]["written"]
    print(f"wrote {n} samples with `tokens` ({dtype.name}, f={f}) to {args.dst}")
    return manifest


if __name__ == "__main__":
    main()
