"""UNet training-step benchmark: forward + backward milliseconds per image, fp32 and bf16 autocast.

    python bench/unet_step.py                                   # CPU: tiny and small_f8, batch 4
    python bench/unet_step.py --presets tiny decoder_f16 --device cuda --batch 8 --checkpoint

Prints the parameter count of every preset first (built on the meta device, no memory), then one line per
(preset, dtype): ms/image, images/s, and on CUDA the peak memory. The step is the real decoder loss:
q_sample, UNet forward with z_q, hybrid loss, backward (no optimizer step).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

from divae.diffusion import DiffusionConfig, create_diffusion
from divae.unet import UNET_PRESETS, UNetModel, count_parameters


def print_param_counts() -> None:
    print("parameters per preset:")
    for name, cfg in UNET_PRESETS.items():
        with torch.device("meta"):
            n = count_parameters(UNetModel(cfg))
        grid = cfg.image_size // cfg.downsample_factor
        print(f"  {name:12s} {n / 1e6:9.2f} M  ({cfg.image_size}x{cfg.image_size} px, {cfg.token_grid}x{cfg.token_grid}"
              f" tokens of dim {cfg.cond_channels}, middle block {grid}x{grid}, channel_mult {cfg.channel_mult})")


def bench(name: str, batch: int, steps: int, warmup: int, device: torch.device, bf16: bool, ckpt: bool) -> None:
    cfg = replace(UNET_PRESETS[name], use_checkpoint=ckpt)
    torch.manual_seed(0)
    model = UNetModel(cfg).to(device).train()
    diffusion = create_diffusion(DiffusionConfig())
    x0 = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    z = torch.randn(batch, cfg.cond_channels, cfg.token_grid, cfg.token_grid, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_losses(model, x0, t, model_kwargs={"cond": z})["loss"].mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    best, med = min(times), sorted(times)[len(times) // 2]
    extra = f", peak mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
    print(f"  {name:12s} {'bf16' if bf16 else 'fp32'}  batch {batch}: fwd+bwd {1000 * med / batch:8.1f} ms/image"
          f" (median of {steps}, best {1000 * best / batch:.1f}), {batch / med:7.1f} images/s{extra}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small_f8"], choices=sorted(UNET_PRESETS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print_param_counts()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"train step on {device} ({torch.get_num_threads()} threads, {os.cpu_count()} cores, load average "
          f"{load:.1f}, torch {torch.__version__}{', checkpointing' if args.checkpoint else ''}):")
    for name in args.presets:
        for dt in args.dtypes:
            bench(name, args.batch, args.steps, args.warmup, device, dt == "bf16", args.checkpoint)


if __name__ == "__main__":
    main()
