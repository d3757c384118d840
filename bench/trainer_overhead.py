"""The trainer's per-step overhead over a plain torch loop on the same model, data and loss (one run each).

    python bench/trainer_overhead.py [--steps 30] [--batch 8] [--work runs/trainer_overhead]

Both sides train the decoder_tiny UNet on the same 64 px shards (made here from scikit-image's photographs),
conditioned on a randomly initialised tiny VQ's z_q, with the hybrid loss under bf16 autocast, AdamW and gradient
clipping, one process. The trainer side is `python -m trainer.train` (DeepSpeed ZeRO-2 bf16 engine, EMA,
metrics, NaN guard); its step time is the `step_time` of metrics.jsonl. The plain side is a loop written here:
loader -> VQ encode -> loss -> backward -> clip -> AdamW step, in fp32 weights under autocast. Prints the median
step time of each after `--skip` warm-up steps and the overhead in percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def plain_loop(config: Path, shards: Path, vq_file: Path, steps: int, batch: int) -> list[float]:
    """Step times (s) of a plain torch loop on the model, data and loss of the trainer's run."""
    import torch

    from data_pipeline.loaders import DataConfig, build_loader
    from divae.diffusion import create_diffusion, create_schedule_sampler
    from divae.model import DiVAE
    from divae.unet import UNetModel
    from trainer.config import load_train_config

    cfg = load_train_config(config)
    torch.manual_seed(0)
    vq = DiVAE.from_pretrained(vq_file).vq.eval().requires_grad_(False)
    unet = UNetModel(cfg.unet).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr)
    diffusion = create_diffusion(cfg.diffusion)
    sampler = create_schedule_sampler(cfg.diffusion.schedule_sampler, diffusion.num_timesteps)
    loader = build_loader(DataConfig(path=str(shards), image_size=64, batch_size=batch, num_workers=0), 0, 1)
    times, it = [], iter(loader)
    while len(times) < steps:
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        x0 = b["image"].float()
        with torch.no_grad():
            z = vq.embed(vq.encode(x0))
        t, w = sampler.sample(x0.shape[0], torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (diffusion.training_losses(unet, x0, t, model_kwargs={"cond": z})["loss"] * w).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ = loss.item()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--work", default="runs/trainer_overhead")
    args = p.parse_args()
    from gpu_check import make_shards, make_vq

    from trainer.config import load_train_config

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(work / "data", 64, 32)
    vq_cfg = load_train_config(ROOT / "configs/vq_tiny.yaml").vq
    vq_file = make_vq(work / "vq.safetensors", vq_cfg)
    run_dir = work / "run"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    cmd = [sys.executable, "-m", "trainer.train", "--config", "configs/decoder_tiny.yaml", f"data.path={shards}",
           f"decoder.vq_weights={vq_file}", f"train.run_dir={run_dir}", f"train.steps={args.steps}",
           f"train.batch_size={args.batch}", "logging.every=1", "logging.sample_every=0", "logging.progress=false",
           "logging.wandb_mode=disabled", "checkpoint.every=0", "checkpoint.export=false",
           f"unet.cond_channels={vq_cfg.embed_dim}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    trainer = [r["step_time"] for r in rows][args.skip:]
    plain = plain_loop(run_dir / "config.yaml", shards, vq_file, args.steps, args.batch)[args.skip:]
    mt, mp = statistics.median(trainer), statistics.median(plain)
    print(f"decoder_tiny, batch {args.batch}, 1 process, {args.steps - args.skip} steps after {args.skip} warm-up:")
    print(f"  trainer (DeepSpeed ZeRO-2 bf16): median {1000 * mt:.1f} ms/step (min {1000 * min(trainer):.1f})")
    print(f"  plain torch loop:                median {1000 * mp:.1f} ms/step (min {1000 * min(plain):.1f})")
    print(f"  trainer overhead: {100 * (mt / mp - 1):+.1f}% (median), {100 * (min(trainer) / min(plain) - 1):+.1f}% "
          "(min)")


if __name__ == "__main__":
    main()
