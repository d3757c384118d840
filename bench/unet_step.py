"""UNet training-step benchmark: forward + backward milliseconds per image, fp32 and bf16 autocast.

    python bench/unet_step.py                                   # CPU: tiny and small_f8, batch 4
    python bench/unet_step.py --presets tiny decoder_f16 --device cuda --batch 8 --checkpoint
    python bench/unet_step.py --presets small_f8 --compare-adm ~/src/guided-diffusion [--compile] [--compile-ours]

Prints the parameter count of every preset first (built on the meta device, no memory), then one line per
(preset, dtype): ms/image, images/s, achieved TFLOP/s (trainer.flops: the UNet's forward + backward FLOPs per
image), MFU where the card's peak is known, and on CUDA the peak memory. The step is the real decoder loss:
q_sample, UNet forward with z_q, hybrid loss, backward (no optimizer step).

`--compare-adm DIR` also builds openai/guided-diffusion's UNetModel (imported from DIR, its source checkout; never
vendored) at the same config (channels, levels, attention at the same resolutions, scale-shift norm, resblock
up/down, learned-sigma output; it has no z_q input) and times both steps interleaved (A, B, A, B, ...) on the
same inputs and loss, printing min and median ms/image of each and the ratio ours / guided-diffusion.
`--json FILE` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from divae.diffusion import DiffusionConfig, create_diffusion  # noqa: E402
from divae.unet import UNET_PRESETS, UNetModel  # noqa: E402
from divae.utils.params import count_parameters  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.flops import device_peak  # noqa: E402
from trainer.tasks import DecoderTask  # noqa: E402


def print_param_counts() -> None:
    print("parameters per preset:")
    for name, cfg in UNET_PRESETS.items():
        with torch.device("meta"):
            n = count_parameters(UNetModel(cfg))
        grid = cfg.image_size // cfg.downsample_factor
        print(f"  {name:12s} {n / 1e6:9.2f} M  ({cfg.image_size}x{cfg.image_size} px, {cfg.token_grid}x{cfg.token_grid}"
              f" tokens of dim {cfg.cond_channels}, middle block {grid}x{grid}, channel_mult {cfg.channel_mult})")


def adm_model(cfg, adm_dir: str) -> torch.nn.Module:
    """guided-diffusion's UNetModel at the config of ours, imported from its source folder `adm_dir`."""
    sys.path.insert(0, str(Path(adm_dir).expanduser().resolve()))
    from guided_diffusion.unet import UNetModel as ADMUNet  # noqa: PLC0415 - the user's checkout, at run time

    return ADMUNet(image_size=cfg.image_size, in_channels=cfg.in_channels, model_channels=cfg.model_channels,
                   out_channels=cfg.out_channels * (2 if cfg.learn_sigma else 1), num_res_blocks=cfg.num_res_blocks,
                   attention_resolutions=tuple(cfg.image_size // r for r in cfg.attention_resolutions),
                   dropout=cfg.dropout, channel_mult=tuple(cfg.channel_mult), num_heads=cfg.num_heads,
                   num_head_channels=cfg.num_head_channels, use_scale_shift_norm=cfg.use_scale_shift_norm,
                   resblock_updown=cfg.resblock_updown, use_checkpoint=cfg.use_checkpoint)


def make_step(model: torch.nn.Module, cfg, batch: int, device: torch.device, bf16: bool, cond: bool):
    """One training step (forward, hybrid loss, backward) of `model` on fixed inputs."""
    diffusion = create_diffusion(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1).to(device)
    z = torch.randn(batch, cfg.cond_channels, cfg.token_grid, cfg.token_grid, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    kwargs = {"cond": z} if cond else {}

    def step() -> None:
        torch.manual_seed(1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_losses(model, x0, t, model_kwargs=kwargs)["loss"].mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def timed(step, sync) -> float:
    t0 = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t0


def bench(name: str, batch: int, steps: int, warmup: int, device: torch.device, bf16: bool, ckpt: bool,
          adm_dir: str | None = None, compile_: str = "") -> dict:
    """compile_: "" (both eager), "both" (both torch.compile'd), "ours" (DiVAE compiled, guided-diffusion eager:
    the project's best setting against the peer as shipped)."""
    cfg = replace(UNET_PRESETS[name], use_checkpoint=ckpt)
    torch.manual_seed(0)
    models = {"divae": UNetModel(cfg).to(device).train()}
    if adm_dir:
        torch.manual_seed(0)
        adm = adm_model(cfg, adm_dir).to(device).train()
        if bf16:  # guided-diffusion's own mixed precision (convert_to_fp16: the torso's convs in 16 bit), in bf16
            for part in (adm.input_blocks, adm.middle_block, adm.output_blocks):
                for mod in part.modules():
                    if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):
                        mod.to(torch.bfloat16)
            adm.dtype = torch.bfloat16
        models["adm"] = adm
    if compile_:
        models = {k: torch.compile(m) if compile_ == "both" or k == "divae" else m for k, m in models.items()}
    fns = {k: make_step(m, cfg, batch, device, bf16, cond=(k == "divae")) for k, m in models.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):  # interleaved A/B: drifts in machine load hit both alike
        for k, f in fns.items():
            times[k].append(timed(f, sync))
    flops = DecoderTask.sample_flops(TrainConfig(unet=replace(cfg, use_checkpoint=False)), forward=False)["train"]
    _, peak = device_peak(device)
    tag = f"{'bf16' if bf16 else 'fp32'}{ {'': '', 'both': ' compiled', 'ours': ' ours compiled'}[compile_]}"
    out = {"preset": name, "dtype": tag, "batch": batch, "flops_per_image": flops}
    for k, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        n = count_parameters(models[k])
        tflops = flops * batch / med / 1e12
        extra = f", MFU {tflops * 1e12 / peak:.1%}" if peak and k == "divae" else ""
        if device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            extra += f", peak mem {out['peak_mem_gib']:.2f} GiB"
        out[k] = {"params": n, "ms_per_image_median": 1000 * med / batch, "ms_per_image_min": 1000 * best / batch,
                  "tflops": tflops, **({"mfu": tflops * 1e12 / peak} if peak else {})}
        print(f"  {name:12s} {tag:14s} {k:5s} batch {batch}: fwd+bwd {1000 * med / batch:8.1f} ms/image (median of "
              f"{steps}, min {1000 * best / batch:.1f}), {batch / med:7.1f} images/s, {n / 1e6:.2f} M params, "
              f"{tflops:.3f} TFLOP/s{extra}")
    if "adm" in times:
        for stat, fn in (("median", statistics.median), ("min", min)):
            out[f"ratio_{stat}"] = fn(times["divae"]) / fn(times["adm"])
        print(f"  {name:12s} {tag:14s} ratio divae / guided-diffusion: {out['ratio_median']:.3f} (median), "
              f"{out['ratio_min']:.3f} (min)")
    return out


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
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--compile-ours", action="store_true",
                   help="also time DiVAE compiled against guided-diffusion eager (as shipped)")
    p.add_argument("--compare-adm", metavar="DIR", help="guided-diffusion source folder: time its UNetModel too")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare_adm and not (Path(args.compare_adm).expanduser() / "guided_diffusion" / "unet.py").is_file():
        p.error(f"--compare-adm {args.compare_adm}: no guided_diffusion/unet.py there (a guided-diffusion checkout)")
    device = torch.device(args.device)
    print_param_counts()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"train step on {device} ({torch.get_num_threads()} threads, {os.cpu_count()} cores, load average "
          f"{load:.1f}, torch {torch.__version__}{', checkpointing' if args.checkpoint else ''}):")
    results = []
    for name in args.presets:
        for dt in args.dtypes:
            for comp in ["", *(["both"] if args.compile else []), *(["ours"] if args.compile_ours else [])]:
                results.append(bench(name, args.batch, args.steps, args.warmup, device, dt == "bf16",
                                     args.checkpoint, args.compare_adm, comp))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "results": results}, indent=1))


if __name__ == "__main__":
    main()
