"""Inception feature extraction throughput, interleaved A/B: the project's former copy of the network (from git,
`--before`, default 5a03363) against what `evaluation.inception.load_inception` runs now (torch-fidelity's
FeatureExtractorInceptionV3), same weights, same uint8 batch.

    python bench/fid_throughput.py [--batch 32] [--size 256] [--rounds 5] [--device cpu|cuda] [--threads N]

The two alternate (A B B A A B ...) after one warm-up each, so drifting machine load hits both; prints every
timing, min and median images/s per side, the ratio, and whether the features are bit-identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from evaluation.inception import load_inception

ROOT = Path(__file__).resolve().parents[1]


def former_network(rev: str, weights: str, device: torch.device) -> torch.nn.Module:
    """evaluation/inception.py as of `rev` (the project's own network), loaded as a module from git."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:evaluation/inception.py"], check=True,
                         capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "former_inception.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("former_inception", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["former_inception"] = module
        spec.loader.exec_module(module)
    return module.load_inception(weights, device)


def once(fn, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=256, help="input image side (resized to 299 inside)")
    p.add_argument("--rounds", type=int, default=5, help="timed runs per side")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--before", default="5a03363", help="the commit with the project's own network")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    now = load_inception(args.inception_weights, device)
    sides = {"former copy": former_network(args.before, now.weights_path, device), "torch-fidelity": now}

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g).to(device)
    with torch.no_grad():
        feats = {name: fn(x) for name, fn in sides.items()}  # warm-up, and the features compared
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(once(sides[name], x, device))
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {dev}; batch {args.batch} x {args.size}x{args.size} uint8 -> 299 -> 2048-d; {args.rounds} rounds")
    rate = {}
    for name, t in times.items():
        rate[name] = args.batch / statistics.median(t)
        print(f"{name:15s}: runs {' '.join(f'{args.batch / s:.2f}' for s in t)} images/s; "
              f"max {args.batch / min(t):.2f}, median {rate[name]:.2f} images/s")
    print(f"torch-fidelity / former copy (median): {rate['torch-fidelity'] / rate['former copy']:.3f}x")
    a, b = feats.values()
    print(f"features bit-identical: {torch.equal(a, b)} (max |difference| {(a - b).abs().max().item():.2e})")


if __name__ == "__main__":
    main()
