"""Side-by-side benchmarks of `python -m evaluation.recon_fid`: before/after a commit, or fp32 against bf16.

    python bench/eval_ab.py speed --before 5a03363 --checkpoint runs/demo/decoder/divae.safetensors \
        --data runs/demo/data/eval --num-images 64 --rounds 2
    python bench/eval_ab.py precision --checkpoint runs/demo/decoder/divae.safetensors --data runs/demo/data/eval

speed: a git worktree of `--before` and this tree run the same command alternately (interleaved A/B, one
process each, --ref-stats-dir '' so both featurise the originals), for --decoder cnn and for the fast solver
(dpmpp2m); prints images/s of each run and the min/median per side. precision: the same evaluation in fp32
and bf16 with the same seeds; prints FID/PSNR/SSIM of each and the differences.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"cnn": ["--decoder", "cnn"],
           "dpmpp2m": ["--decoder", "diffusion", "--sampler", "dpmpp2m", "--steps", "10"]}


def run(tree: Path, args: list[str], out: Path) -> dict:
    """One `python -m evaluation.recon_fid` process in `tree`; returns its results.json."""
    cmd = [sys.executable, "-m", "evaluation.recon_fid", *args, "--out", str(out), "--ref-stats-dir", "",
           "--no-lpips", "--num-show", "0"]
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads((out / "results.json").read_text())


def speed(a: argparse.Namespace, common: list[str], tmp: Path) -> None:
    before = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), a.before], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for name, extra in CONFIGS.items():
            rates: dict[str, list[float]] = {"before": [], "after": []}
            for r in range(a.rounds):
                for side, tree in (("before", before), ("after", ROOT)) if r % 2 == 0 else (("after", ROOT),
                                                                                           ("before", before)):
                    res = run(tree, common + extra, tmp / f"{name}_{side}_{r}")
                    rates[side].append(res["images_per_s"])
                    print(f"{name:8s} round {r} {side:6s}: {res['images_per_s']:.3f} images/s  FID {res['fid']:.3f}  "
                          f"PSNR {res['psnr']:.3f}  SSIM {res['ssim']:.5f}", flush=True)
            for side, v in rates.items():
                print(f"{name:8s} {side:6s}: min {min(v):.3f}  median {statistics.median(v):.3f} images/s", flush=True)
            ratio = statistics.median(rates["after"]) / statistics.median(rates["before"])
            print(f"{name:8s} after/before (median): {ratio:.2f}x", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)


def precision(a: argparse.Namespace, common: list[str], tmp: Path) -> None:
    out = {}
    for prec in ("fp32", "bf16"):
        res = run(ROOT, common + CONFIGS["dpmpp2m"] + ["--precision", prec], tmp / prec)
        out[prec] = res
        print(f"{prec}: FID {res['fid']:.4f}  PSNR {res['psnr']:.4f}  SSIM {res['ssim']:.5f}  "
              f"{res['images_per_s']:.3f} images/s ({res['num_images']} images)", flush=True)
    d = {k: out["bf16"][k] - out["fp32"][k] for k in ("fid", "psnr", "ssim")}
    print(f"bf16 - fp32: FID {d['fid']:+.4f}  PSNR {d['psnr']:+.4f} dB  SSIM {d['ssim']:+.5f}")
    print(json.dumps({"fid_fp32": out["fp32"]["fid"], "fid_bf16": out["bf16"]["fid"], "psnr_fp32": out["fp32"]["psnr"],
                      "psnr_bf16": out["bf16"]["psnr"], "ssim_fp32": out["fp32"]["ssim"],
                      "ssim_bf16": out["bf16"]["ssim"], "num_images": out["fp32"]["num_images"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["speed", "precision"])
    p.add_argument("--before", default="HEAD", help="speed: the commit to compare with this tree")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    common = ["--checkpoint", a.checkpoint, "--data", a.data, "--num-images", str(a.num_images),
              "--batch-size", str(a.batch_size)]
    with tempfile.TemporaryDirectory(prefix="divae_eval_ab_") as tmp:
        (speed if a.what == "speed" else precision)(a, common, Path(tmp))


if __name__ == "__main__":
    main()
