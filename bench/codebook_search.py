"""The nearest-code search under bf16 autocast: how many assignments a bf16 search gets wrong, and what the
float32 search (what `divae.quantizer.nearest_code` now always runs) costs beside it.

    python bench/codebook_search.py                      # K = 8192, d = 256, 4096 vectors (issue 12's case)
    python bench/codebook_search.py --k 16384 --device cuda

Codes sit away from the origin (c0 + 0.05 noise, as after some training); vectors are drawn near them. For each
offset scale of c0 it prints the share of vectors whose bf16 assignment differs from the float64 one, for the
former search (`addmm` recast to bf16 by autocast) and for the current one under the same autocast; then the
time of both, interleaved A/B repetitions (min and median), as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from divae.quantizer import nearest_code


def bf16_search(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The former search as autocast ran it: ||c||^2 - 2 z.c with the matmul in bf16."""
    c_sq = codebook.pow(2).sum(1)
    with torch.autocast(z.device.type, dtype=torch.bfloat16):
        d = torch.addmm(c_sq.unsqueeze(0), z, codebook.t(), beta=1.0, alpha=-2.0)
    return d.argmin(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=8192)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    print(f"K={args.k} d={args.d} N={args.n} on {dev}")
    print("| offset |c0| | bf16 search wrong | current search under bf16 autocast wrong |")
    print("|---|---|---|")
    for scale in (0.0, 0.25, 1.0):
        c0 = scale * torch.randn(args.d, generator=g)
        cb = (c0 + 0.05 * torch.randn(args.k, args.d, generator=g)).to(dev)
        z = (c0 + 0.05 * torch.randn(args.n, args.d, generator=g)).to(dev)
        exact = torch.cdist(z.double(), cb.double()).argmin(1)
        old = (bf16_search(z, cb) != exact).float().mean().item()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            new = (nearest_code(z, cb) != exact).float().mean().item()
        print(f"| {float(c0.norm()):.1f} | {old:.2%} | {new:.2%} |")

    times: dict[str, list[float]] = {"bf16 (former)": [], "fp32 (current)": []}
    for _ in range(args.reps):  # interleaved A/B
        for name, fn in (("bf16 (former)", lambda: bf16_search(z, cb)),
                         ("fp32 (current)", lambda: nearest_code(z, cb))):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:15s} min {min(ts) * 1e3:8.2f} ms  median {statistics.median(ts) * 1e3:8.2f} ms")
    ratio = statistics.median(times["fp32 (current)"]) / statistics.median(times["bf16 (former)"])
    print(f"fp32 / bf16 median time ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
