"""The first run on a lent GPU (DESIGN.md 6c): every figure the CPU cannot give, in one results file, < 8 min.

    bash bench/gpu_check.sh                    # on one H100/H200-class GPU
    bash bench/gpu_check.sh --cpu-dry-run      # the same steps at tiny sizes on CPU (the test suite runs it)

Steps, each with its own time limit; a failing step is recorded and the next one runs:
1. `pytest -m gpu` (dry run: their collection only; conftest deselects them without CUDA);
2. `bench/unet_step.py` at paper scale (decoder_f16, bf16, batch 8): ms/image, peak memory, MFU;
3. a 20-step 1-GPU ZeRO-2 bf16 `trainer.train` run of configs/decoder_f16.yaml at its preset micro-batch (8:
   256 images over the default 16 GPUs x grad_accum 2), on 256 px shards made here from the photographs in
   scikit-image and a randomly initialised vq_f16 export (checks that the micro-batch fits; MFU, images/s and
   peak memory from its metrics.jsonl);
4. `evaluation.recon_fid` on a few of those images with the decoder the run exported (DPM-Solver++ 10 steps).

Writes `--out` (default bench/gpu_check_results.json; `trainer.plan` reads its MFU as the measured figure for
the card) and prints it. Exit 0 when every step passed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable


def run_step(name: str, cmd: list[str], timeout: float, results: dict, ok: tuple[int, ...] = (0,)) -> bool:
    """Run one step; record its exit code (`ok`: the codes that mean success, recorded as 0), seconds and the
    tail of its output."""
    t0 = time.time()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, out = (0 if p.returncode in ok else p.returncode), p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timed out after {timeout} s\n{(e.stdout or b'')[-2000:]!r}"
    results["steps"][name] = {"rc": rc, "seconds": round(time.time() - t0, 1), "tail": out[-1500:]}
    print(out[-1500:], flush=True)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="same steps, tiny sizes, on CPU")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_check_results.json"))
    p.add_argument("--work", default="runs/gpu_check", help="scratch folder (shards, runs)")
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    import torch

    from trainer.config import load_train_config
    from trainer.flops import card_key

    results: dict = {"dry_run": dry, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "steps": {},
                     "torch": torch.__version__}
    if not dry:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-dry-run on CPU", file=sys.stderr)
            return 2
        results["device"] = torch.cuda.get_device_name()
        results["card"] = card_key(results["device"])
    t_start = time.time()

    # 1. the tests marked gpu
    gpu_tests = [PY, "-m", "pytest", "-m", "gpu", "-q", "tests/test_gpu_unet.py"]
    # (dry run: collection only; without CUDA conftest deselects them all, pytest's exit code 5)
    run_step("pytest_gpu", gpu_tests + (["--collect-only"] if dry else []), 180, results, (0, 5) if dry else (0,))

    # 2. the UNet step at paper scale
    bench_json = work / "unet_step.json"
    unet = ["--presets", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0"] if dry else \
        ["--presets", "decoder_f16", "--device", "cuda", "--batch", "8", "--steps", "5", "--warmup", "2"]
    if run_step("unet_step", [PY, "bench/unet_step.py", *unet, "--dtypes", "bf16", "--json", str(bench_json)],
                120 if dry else 150, results):
        r = json.loads(bench_json.read_text())["results"][0]
        results["unet_step"] = {"preset": r["preset"], "batch": r["batch"], "flops_per_image": r["flops_per_image"],
                                "peak_mem_gib": r.get("peak_mem_gib"), **r["divae"]}

    # 3. 20 optimizer steps of decoder_f16 on one GPU, ZeRO-2, bf16, at the preset's micro-batch
    size, micro, steps = (64, 2, 3) if dry else (256, 8, 20)
    vq_cfg = load_train_config("configs/vq_tiny.yaml" if dry else "configs/vq_f16.yaml").vq
    shards = make_shards(work / "data", size, 16 if dry else 64)
    vq_file = make_vq(work / "vq.safetensors", vq_cfg)
    run_dir = work / "decoder_run"
    config = "configs/decoder_tiny.yaml" if dry else "configs/decoder_f16.yaml"
    train = [PY, "-m", "trainer.train", "--config", config, f"data.path={shards}", f"decoder.vq_weights={vq_file}",
             f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.batch_size={micro}", "train.grad_accum=1",
             "deepspeed.zero_stage=2", "deepspeed.precision=bf16", "logging.every=5" if not dry else "logging.every=1",
             "logging.sample_every=0", "logging.progress=false", "logging.wandb_mode=disabled", "checkpoint.every=0",
             "data.num_workers=0" if dry else "data.num_workers=8"]
    if dry:
        train.append(f"unet.cond_channels={vq_cfg.embed_dim}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume of the last check
    if run_step("train_decoder_f16", train, 150 if dry else 200, results):
        m = last_metrics(run_dir)
        results["train"] = {k: m.get(k) for k in ("step", "images_per_s_per_gpu", "tflops_per_gpu", "mfu",
                                                  "flops_per_sample", "peak_mem_mb", "step_time", "loss")}
        results["train"]["micro_batch"] = micro
        results["train_mfu"] = m.get("mfu")

    # 4. reconstruction FID on a few images with the exported decoder
    export = run_dir / "divae.safetensors"
    fid_out = work / "recon_fid"
    fid_args = ["--num-images", "2", "--batch-size", "2", "--decoder", "diffusion", "--steps", "2", "--no-lpips",
                "--no-ssim"] if dry else ["--num-images", "16", "--batch-size", "8", "--decoder", "both",
                                          "--steps", "10"]
    run_step("recon_fid", [PY, "-m", "evaluation.recon_fid", "--checkpoint", str(export), "--data", str(shards),
                           "--sampler", "dpmpp2m", "--out", str(fid_out), *fid_args], 240 if dry else 120, results)
    if (fid_out / "results.json").is_file():
        results["recon_fid"] = json.loads((fid_out / "results.json").read_text())

    results["total_seconds"] = round(time.time() - t_start, 1)
    results["ok"] = all(s["rc"] == 0 for s in results["steps"].values())
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({k: v for k, v in results.items() if k != "steps"}, indent=1, default=str)[:4000])
    print("steps:", {k: (s["rc"], s["seconds"]) for k, s in results["steps"].items()}, "->", args.out)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
