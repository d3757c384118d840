"""Data pipeline throughput on this machine.

    python bench/data_throughput.py [--n 200] [--size 256]

Prepare: images/s of one process turning realistic JPEGs (ImageNet-like 500x375 .. 1600x1200, q=90, made
from scikit-image photos) into 256x256 q=95 JPEGs, with and without draft decoding. Loader: samples/s of
one DataLoader worker (decode + batch) reading MDS shards, plus the full loader with the float conversion.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image


def _photos() -> list[np.ndarray]:
    """Real colour photos (H, W, 3) uint8 of varied sizes from skimage.data."""
    from skimage import data

    out = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    return [np.ascontiguousarray(a[..., :3]) for a in out]


def _crop(arr: np.ndarray, i: int) -> np.ndarray:
    """A distinct crop of the photo per i."""
    h, w = arr.shape[:2]
    dy, dx = (i * 7) % max(1, h // 8), (i * 13) % max(1, w // 8)
    return np.ascontiguousarray(arr[dy:h - (i % 3) * 5, dx:w - (i % 2) * 9])


def realistic_jpegs(n: int) -> list[bytes]:
    sizes = [(500, 375), (500, 333), (640, 480), (1024, 768), (1600, 1200), (375, 500)]  # ImageNet-like mix
    p = _photos()
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        buf = io.BytesIO()
        Image.fromarray(_crop(p[i % len(p)], i)).resize((w, h), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_prepare(jpegs: list[bytes], size: int, draft: bool) -> float:
    from data_pipeline.images import ImageConfig, preprocess

    cfg = ImageConfig(size=size, draft=draft)
    preprocess(jpegs[0], cfg)
    t = time.perf_counter()
    for d in jpegs:
        preprocess(d, cfg)
    return len(jpegs) / (time.perf_counter() - t)


def bench_loader(path: str, size: int, n: int) -> tuple[float, float]:
    from data_pipeline.loaders import DataConfig, _collate, _decode, build_loader
    from data_pipeline.reader import ShardReader

    r = ShardReader(path, decode_image=False)
    raws = [r[i] for i in range(len(r))]
    t = time.perf_counter()  # what one worker does per sample: decode + collate
    for i in range(0, len(raws), 32):
        _collate([dict(s, image=_decode(s["jpg"], size)) for s in raws[i:i + 32]])
    per_worker = len(raws) / (time.perf_counter() - t)
    loader = build_loader(DataConfig(path=path, batch_size=32, num_workers=1, image_size=size,
                                     clean_stale_shm=False))
    it = iter(loader)
    next(it)
    t, k = time.perf_counter(), 0
    for b in it:
        k += len(b["key"])
    full = k / (time.perf_counter() - t)
    return per_worker, full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    jpegs = realistic_jpegs(args.n)
    mp = np.mean([Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1] for d in jpegs]) / 1e6
    print(f"inputs: {len(jpegs)} JPEGs, mean {mp:.2f} MP, mean {np.mean([len(d) for d in jpegs]) / 1e3:.0f} KB")
    for draft in (True, False):
        print(f"prepare {args.size}px, draft={draft}: {bench_prepare(jpegs, args.size, draft):.1f} images/s "
              "per process")
    from data_pipeline.images import ImageConfig, preprocess
    from data_pipeline.shards import STANDARD_COLUMNS, ShardWriter

    with tempfile.TemporaryDirectory() as d:
        cfg = ImageConfig(size=args.size)
        with ShardWriter(d + "/s", dict(STANDARD_COLUMNS), shard_size=100, source={"kind": "bench"}) as w:
            for rep in range(3):
                for i, data in enumerate(jpegs):
                    jpg, (ww, hh) = preprocess(data, cfg)
                    w.write({"jpg": jpg, "label": i % 10, "caption": "", "key": f"{rep}_{i}",
                             "orig_size": f"{ww}x{hh}"})
        per_worker, full = bench_loader(d + "/s", args.size, args.n)
        print(f"loader {args.size}px: {per_worker:.1f} samples/s per worker (decode + collate); "
              f"{full:.1f} samples/s end to end with 1 worker (MDS, batch 32, float [-1,1] + flips)")


if __name__ == "__main__":
    main()
