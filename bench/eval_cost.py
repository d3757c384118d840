"""What the reconstruction-FID protocol costs: images/s per sampler and steps, and the 50k protocol's wall time
and device-hours at that rate.

    python bench/eval_cost.py --checkpoint runs/demo/decoder/divae.safetensors          # a trained file
    python bench/eval_cost.py --preset f16 --batch 8 --device cuda --precision bf16      # paper scale, random

For each sampler/steps pair (default: ddpm 1000, ddim 25, dpmpp2m 20, plus the CNN decoder) the real
reconstruct callable of `evaluation.recon_fid` (encode, decode with per-image device noise, in --precision)
is timed at two short step counts k1 < k2 on one batch; a line through the two gives the fixed cost and the
cost per step, extrapolated to the asked steps (sampling is linear in steps). The per-image cost of the
evaluation itself (Inception features of original and reconstruction, PSNR, SSIM) is timed once and added.
Prints images/s per device and, for --num-images (50,000) on --devices devices, the wall time and
device-hours. Timings are the min over --repeats. Random weights time like trained ones.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from evaluation.inception import load_inception
from evaluation.metrics import psnr, ssim
from evaluation.recon_fid import make_divae_reconstruct

PRESETS = {"f16": ("vq_f16", "decoder_f16"), "f8": ("vq_f8", "decoder_f8"), "tiny": ("tiny", "tiny")}


def build_model(args: argparse.Namespace):
    from divae.diffusion import DiffusionConfig
    from divae.model import DiVAE
    from divae.unet import UNET_PRESETS
    from divae.vq import VQ_PRESETS

    if args.checkpoint:
        return DiVAE.from_pretrained(args.checkpoint)
    vq_name, unet_name = PRESETS[args.preset]
    vq = VQ_PRESETS[vq_name]
    unet = replace(UNET_PRESETS[unet_name], cond_channels=vq.embed_dim)
    torch.manual_seed(0)
    return DiVAE(vq, unet, DiffusionConfig())


def timed(fn, device: torch.device, repeats: int) -> float:
    """min wall seconds of fn() over `repeats` runs (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a DiVAE file (default: --preset with random weights)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch", type=int, default=4, help="images per batch (per device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "tf32"], default="fp32")
    p.add_argument("--samplers", nargs="+", default=["ddpm:1000", "ddim:25", "dpmpp2m:20", "cnn"],
                   help="sampler:steps pairs, or cnn")
    p.add_argument("--probe-steps", default="2,4", help="the two short step counts that are timed")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-images", type=int, default=50_000)
    p.add_argument("--devices", type=int, default=8, help="devices of the protocol run (wall time)")
    p.add_argument("--json", default=None, help="also write the figures here (for trainer/plan.py)")
    args = p.parse_args()
    device = torch.device(args.device)
    model = build_model(args).to(device).eval().requires_grad_(False)
    size = model.unet.cfg.image_size if model.unet is not None else 256
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, device=device)
    idx = torch.arange(args.batch)
    k1, k2 = (int(k) for k in args.probe_steps.split(","))

    extractor = load_inception(device=device)
    recon = images.roll(1, -1)

    def evaluate_batch():
        extractor(images), extractor(recon), psnr(images, recon), ssim(images, recon)

    t_eval = timed(evaluate_batch, device, args.repeats) / args.batch
    print(f"{device.type} {torch.get_num_threads()} threads, {args.precision}, {size}x{size}, batch {args.batch}; "
          f"evaluation (2x Inception, PSNR, SSIM): {t_eval * 1e3:.1f} ms/image")
    rows = []
    for spec in args.samplers:
        sampler, _, steps = spec.partition(":")
        if sampler == "cnn":
            rec = make_divae_reconstruct(model, "cnn", "ddpm", None, 0, device, args.precision)
            per_image = timed(lambda rec=rec: rec(images, idx), device, args.repeats) / args.batch
            per_step, steps = None, 0
        else:
            steps = int(steps)
            t = {}
            for k in (k1, k2):
                rec = make_divae_reconstruct(model, "diffusion", sampler, k, 0, device, args.precision)
                t[k] = timed(lambda rec=rec: rec(images, idx), device, args.repeats) / args.batch
            per_step = max((t[k2] - t[k1]) / (k2 - k1), 0.0)
            per_image = max(t[k1] - k1 * per_step, 0.0) + steps * per_step  # fixed cost + steps x per step
        rate = 1.0 / (per_image + t_eval)
        hours = args.num_images / rate / 3600
        rows.append({"sampler": sampler, "steps": steps, "images_per_s": rate, "device_hours": hours,
                     "wall_hours": hours / args.devices, "ms_per_step_per_image": None if per_step is None
                     else per_step * 1e3})
        step_txt = f"{per_step * 1e3:8.2f} ms/step/image" if per_step is not None else " " * 22
        print(f"{sampler:8s} {steps:5d} steps: {step_txt}  {rate:9.4f} images/s per device  "
              f"{args.num_images} images: {hours:10.2f} {device.type}-hours, {hours / args.devices:9.2f} h wall "
              f"on {args.devices}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "precision": args.precision, "image_size": size, "batch": args.batch,
                       "eval_ms_per_image": t_eval * 1e3, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
