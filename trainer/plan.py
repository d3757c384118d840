"""Memory and cost planner: will a config fit, how fast will it run, what will it cost. No GPU, no memory.

    python -m trainer.plan --config configs/decoder_f16.yaml --gpus 32 --gpu a100-80gb [key=value ...]
    python -m trainer.plan --recipe --gpus 32 --gpu h100-sxm        # the paper's whole Table 1 recipe

Per config: parameters, FLOPs per sample (trainer.flops: fake tensors), activation memory per sample with and
without activation checkpointing (the bytes autograd saves for backward as a CUDA device holds them: fake
CUDA tensors under CUDA's autocast op lists, `trainer.flops.cuda_saved_bytes`; with checkpointing the blocks'
inputs, each tensor once, plus one block's activations, recomputed during backward), the
model + gradient + optimizer + EMA bytes per GPU under ZeRO 0-3, the largest micro-batch that fits, and steps/s,
wall time, GPU-hours and cost at a stated MFU. `--recipe` adds the cost of the paper's recipe (VQ f16/f8,
decoder f16/f8, the prior, and the 50k-image DDPM-1000 reconstruction FID of each decoder) as one table, and the
same evaluation at fewer UNet evaluations per image (`EVAL_NFE`: DPM-Solver++ 20, a distilled student's 2 and 1;
trainer/tasks/distill.py) beside it.

Memory model per trained parameter (DeepSpeed bf16, `grad_accum_dtype` fp32, client AdamW): bf16 weights 2 B,
fp32 gradients 4 B, fp32 master weights + Adam moments 12 B, fp32 EMA of the master weights 4 B; ZeRO-1
shards the 12 B and the EMA (trainer.ema keeps it like the master weights), ZeRO-2 also the gradients, ZeRO-3
also the weights. fp32 runs: 4 + 4 + 8 + 4 B. Frozen helpers
(the decoder stage's VQ, the VQ stage's LPIPS) are fp32. Usable memory: 92% of the card less 1.5 GiB (CUDA
context, allocator fragmentation, communication buckets). These are estimates: `bench/gpu_check.sh` measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from divae.utils.config import ConfigError
from trainer.config import TrainConfig, load_train_config
from trainer.flops import CARDS, _saved_bytes, cuda_saved_bytes
from trainer.tasks import TASKS

GiB = 2**30
DEFAULT_MFU = 0.35  # conservative; a measured figure (bench/gpu_check.sh's results) replaces it
MEASURED_MFU_FILE = Path(__file__).resolve().parent.parent / "bench" / "gpu_check_results.json"
USD_PER_GPU_HOUR = {"a100-40gb": 1.5, "a100-80gb": 2.0, "h100-pcie": 2.5, "h100-sxm": 3.0, "h200": 3.5, "l40s": 1.0}
RECIPE = (("VQ f16", "configs/vq_f16.yaml"), ("VQ f8", "configs/vq_f8.yaml"),
          ("decoder f16", "configs/decoder_f16.yaml"), ("decoder f8", "configs/decoder_f8.yaml"),
          ("prior (base, f16 tokens)", "configs/prior_base.yaml"))
EVAL_IMAGES, EVAL_STEPS = 50_000, 1000  # Table 1: all of ImageNet val, DDPM 1000 steps
# The recon-FID evaluation by sampler: UNet evaluations per image
EVAL_NFE = (("DDPM-1000", 1000), ("DPM-Solver++ 20", 20), ("distilled student, 2 steps", 2),
            ("distilled student, 1 step", 1))


@dataclass
class Plan:
    name: str
    params: int  # trained parameters
    frozen_params: int  # frozen helpers on the device (fp32)
    flops_train: float  # per sample, forward + backward
    flops_forward: float  # per sample, forward of the trained network
    act: float  # bytes per sample saved for backward, no checkpointing
    act_ckpt: float  # with activation checkpointing (+ one block's recompute)
    fixed: float  # bytes that do not grow with the batch (autocast weight copies, inputs' scaffolding)
    steps: int
    batch: int  # global
    grad_accum: int
    checkpointing: bool
    bf16: bool

    def state_bytes(self, zero: int, gpus: int) -> float:
        """Weights, gradients, optimizer and EMA bytes per GPU under ZeRO stage `zero` (+ frozen helpers)."""
        w, g, opt, ema = (2, 4, 12, 4) if self.bf16 else (4, 4, 8, 4)
        per = w / (gpus if zero >= 3 else 1) + g / (gpus if zero >= 2 else 1) + (opt + ema) / (gpus if zero >= 1 else 1)
        return self.params * per + 4 * self.frozen_params

    def peak_bytes(self, micro: int, zero: int, gpus: int, ckpt: bool) -> float:
        """Predicted peak device bytes per GPU of a step at micro-batch `micro` (what bench/gpu_check.sh
        compares with the measured peak)."""
        return self.state_bytes(zero, gpus) + self.fixed + micro * (self.act_ckpt if ckpt else self.act)

    def max_micro_batch(self, usable: float, zero: int, gpus: int, ckpt: bool) -> int:
        """The largest micro-batch whose `peak_bytes` fits in `usable` bytes."""
        free = usable - self.peak_bytes(0, zero, gpus, ckpt)
        return max(int(free // (self.act_ckpt if ckpt else self.act)), 0)


def _param_counts(cfg: TrainConfig, vq_cfg) -> tuple[int, int]:
    with torch.device("meta"):
        return TASKS[cfg.train.stage].param_counts(cfg, vq_cfg)


@contextlib.contextmanager
def _checkpoint_inputs(counter: list[int], largest: list[int], seen: dict) -> Iterator[None]:
    """Non-reentrant checkpointing keeps each block's inputs outside autograd's saved tensors: count them, and
    the largest block's own activations (recomputed, alive during that block's backward). `seen` is shared
    with the trace's saved-tensor count: a block input that an op outside the blocks also saves is one tensor,
    counted once."""
    import divae.prior
    import divae.unet
    import divae.vq

    mods = (divae.unet, divae.vq, divae.prior)
    originals = [m.checkpoint for m in mods]
    def counting(fn, *args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor) and id(a) not in seen:
                seen[id(a)] = a  # held: ids stay unique for the whole trace
                counter[0] += a.numel() * a.element_size()
        with _saved_bytes() as inner:
            fn(*args)  # the block without checkpointing, on fake tensors: its activation bytes
        largest[0] = max(largest[0], inner[0])
        return originals[0](fn, *args, **kwargs)

    for m in mods:
        m.checkpoint = counting
    try:
        yield
    finally:
        for m, o in zip(mods, originals):
            m.checkpoint = o


def activation_bytes(cfg: TrainConfig, ckpt: bool) -> tuple[float, float]:
    """(bytes per sample, fixed bytes) saved for backward on a CUDA device (trainer.flops.cuda_saved_bytes:
    CUDA's autocast rules on fake CUDA tensors, bf16 trained weights), from traces at batch 1 and 2."""
    bf16 = cfg.deepspeed.precision == "bf16"
    sizes = []
    for b in (1, 2):
        build, step = TASKS[cfg.train.stage].traced_parts(cfg, ckpt, b)
        extra, largest, seen = [0], [0], {}
        with _checkpoint_inputs(extra, largest, seen) if ckpt else contextlib.nullcontext():
            saved = cuda_saved_bytes(build, step, bf16, seen)
        sizes.append(saved + extra[0] + largest[0])
    per = sizes[1] - sizes[0]
    return float(per), float(max(sizes[0] - per, 0))


def make_plan(cfg: TrainConfig, name: str = "") -> Plan:
    task = TASKS[cfg.train.stage]
    vq_cfg = task.frozen_vq_config(cfg)
    fl = task.sample_flops(cfg, vq_cfg)
    params, frozen = _param_counts(cfg, vq_cfg)
    act, fixed = activation_bytes(cfg, False)
    act_ckpt, _ = activation_bytes(cfg, True)
    return Plan(name or cfg.train.run_dir, params, frozen, fl["train"], fl["forward"], act, act_ckpt, fixed,
                cfg.train.steps, cfg.train.batch_size, cfg.train.grad_accum, cfg.deepspeed.activation_checkpointing,
                cfg.deepspeed.precision == "bf16")


def usable_bytes(gpu: str) -> float:
    return CARDS[gpu].memory_gib * GiB * 0.92 - 1.5 * GiB


def measured_mfu(gpu: str) -> float | None:
    """The MFU bench/gpu_check.sh measured on this card (its results file), if any."""
    try:
        r = json.loads(MEASURED_MFU_FILE.read_text())
    except (OSError, ValueError):
        return None
    return r.get("train_mfu") if r.get("card") == gpu and r.get("train_mfu") else None


def hours(flops_total: float, gpus: int, gpu: str, mfu: float) -> float:
    """Wall-clock hours of `flops_total` on `gpus` cards at `mfu`."""
    return flops_total / (gpus * CARDS[gpu].peak_bf16 * mfu) / 3600


def report(p: Plan, gpus: int, gpu: str, mfu: float, usd: float, zero: int) -> str:
    usable = usable_bytes(gpu)
    per = gpus * p.grad_accum
    micro = p.batch // per if p.batch % per == 0 else p.batch / per
    ckpt_word = "on" if p.checkpointing else "off"
    lines = [f"## {p.name}: {gpus} x {CARDS[gpu].name} ({usable / GiB:.1f} GiB usable each), MFU {mfu:.0%}", "",
             f"- parameters: {p.params / 1e6:.1f} M trained, {p.frozen_params / 1e6:.1f} M frozen",
             f"- FLOPs per sample: {p.flops_train / 1e12:.3f} TFLOP forward + backward, "
             f"{p.flops_forward / 1e12:.3f} TFLOP forward",
             f"- activations per sample ({'bf16' if p.bf16 else 'fp32'}): {p.act / GiB:.2f} GiB without "
             f"checkpointing, {p.act_ckpt / GiB:.2f} GiB with; {p.fixed / GiB:.2f} GiB fixed", "",
             "| ZeRO | weights+grads+optimizer+EMA per GPU | largest micro-batch (ckpt off / on) |",
             "|---|---|---|"]
    for z in range(4):
        lines.append(f"| {z} | {p.state_bytes(z, gpus) / GiB:.2f} GiB | {p.max_micro_batch(usable, z, gpus, False)}"
                     f" / {p.max_micro_batch(usable, z, gpus, True)} |")
    fits = p.max_micro_batch(usable, zero, gpus, p.checkpointing)
    verdict = "fits" if isinstance(micro, int) and micro <= fits else "DOES NOT FIT"
    step_s = p.batch * p.flops_train / (gpus * CARDS[gpu].peak_bf16 * mfu)
    wall = p.steps * step_s / 3600
    lines += ["", f"- the config: batch {p.batch} = micro-batch {micro} x accumulation {p.grad_accum} x {gpus} GPUs, "
              f"ZeRO-{zero}, checkpointing {ckpt_word}: {verdict}"
              f" (largest micro-batch {fits})",
              f"- {1 / step_s:.2f} steps/s, {p.steps} steps: {wall:.1f} h wall, {wall * gpus:.0f} GPU-hours, "
              f"${wall * gpus * usd:,.0f} at ${usd:.2f}/GPU-hour"]
    return "\n".join(lines)


def recipe_table(gpus: int, gpu: str, mfu: float, usd: float) -> tuple[str, list[dict], str, list[dict]]:
    """The paper's recipe as a Markdown table and its rows; then its evaluation by sampler (`eval_nfe_table`)."""
    rows, plans = [], {}
    for name, path in RECIPE:
        cfg = load_train_config(path)
        p = plans[name] = make_plan(cfg, name)
        flops = p.steps * p.batch * p.flops_train
        h = hours(flops, gpus, gpu, mfu)
        per = gpus * p.grad_accum
        rows.append({"stage": name, "params_m": p.params / 1e6, "tflop_per_sample": p.flops_train / 1e12,
                     "samples": p.steps * p.batch, "wall_h": h, "gpu_hours": h * gpus,
                     "micro_batch": p.batch / per, "max_micro_batch": p.max_micro_batch(
                         usable_bytes(gpu), cfg.deepspeed.zero_stage, gpus, p.checkpointing)})
    decoders = {dec: plans[dec] for dec in ("decoder f16", "decoder f8")}
    for dec, p in decoders.items():
        flops = EVAL_IMAGES * EVAL_STEPS * p.flops_forward
        h = hours(flops, gpus, gpu, mfu)
        rows.append({"stage": f"recon FID, {dec[8:]}: 50k images x DDPM-1000", "params_m": p.params / 1e6,
                     "tflop_per_sample": EVAL_STEPS * p.flops_forward / 1e12, "samples": EVAL_IMAGES, "wall_h": h,
                     "gpu_hours": h * gpus})
    out = [f"| Stage ({gpus} x {CARDS[gpu].name}, MFU {mfu:.0%}, ${usd:.2f}/GPU-h) | Params | TFLOP/sample | "
           "Samples | Wall | GPU-hours | Cost |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['stage']} | {r['params_m']:.0f} M | {r['tflop_per_sample']:.2f} | {r['samples']:,} | "
                   f"{r['wall_h']:.1f} h | {r['gpu_hours']:,.0f} | ${r['gpu_hours'] * usd:,.0f} |")
    total = sum(r["gpu_hours"] for r in rows)
    out.append(f"| **Total** | | | | {sum(r['wall_h'] for r in rows):.1f} h | {total:,.0f} | ${total * usd:,.0f} |")
    return ("\n".join(out), rows, *eval_nfe_table(decoders, gpus, gpu, mfu, usd))


def eval_nfe_table(plans: dict, gpus: int, gpu: str, mfu: float, usd: float) -> tuple[str, list[dict]]:
    """The 50k-image reconstruction FID of each decoder at each sampler of `EVAL_NFE`: Markdown and rows."""
    rows = []
    for label, nfe in EVAL_NFE:
        row = {"sampler": label, "nfe": nfe}
        for dec, p in plans.items():
            row[f"gpu_hours_{dec[8:]}"] = hours(EVAL_IMAGES * nfe * p.flops_forward, gpus, gpu, mfu) * gpus
        rows.append(row)
    decs = [d[8:] for d in plans]
    out = [f"| recon FID, 50k images ({CARDS[gpu].name}, MFU {mfu:.0%}) | UNet evaluations per image | "
           + " | ".join(f"{d} GPU-hours | {d} cost" for d in decs) + " |", "|---|---|" + "---|---|" * len(decs)]
    for r in rows:
        out.append(f"| {r['sampler']} | {r['nfe']:,} | " + " | ".join(
            f"{r[f'gpu_hours_{d}']:,.2f} | ${r[f'gpu_hours_{d}'] * usd:,.2f}" for d in decs) + " |")
    return "\n".join(out), rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.grad_accum=2")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    p.add_argument("--gpu", default="a100-80gb", choices=sorted(CARDS))
    p.add_argument("--mfu", type=float, default=None,
                   help=f"assumed model FLOP utilization (default: measured on this card, else {DEFAULT_MFU})")
    p.add_argument("--usd-per-gpu-hour", type=float, default=None, help="price (default: a typical cloud rate)")
    p.add_argument("--recipe", action="store_true", help="also print the paper recipe's cost table")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    if not args.config and not args.recipe:
        p.error("give --config and/or --recipe")
    if args.gpus < 1 or (args.mfu is not None and not 0 < args.mfu <= 1):
        p.error("--gpus must be >= 1 and --mfu in (0, 1]")
    mfu = args.mfu or measured_mfu(args.gpu) or DEFAULT_MFU
    usd = args.usd_per_gpu_hour if args.usd_per_gpu_hour is not None else USD_PER_GPU_HOUR[args.gpu]
    out: dict = {"gpus": args.gpus, "gpu": args.gpu, "mfu": mfu, "usd_per_gpu_hour": usd}
    if args.config:
        try:
            cfg = load_train_config(args.config, args.overrides)
        except (ConfigError, ValueError, OSError) as e:
            print(f"trainer.plan: {e}", file=sys.stderr)
            return 2
        plan = make_plan(cfg, Path(args.config).stem)
        print(report(plan, args.gpus, args.gpu, mfu, usd, cfg.deepspeed.zero_stage))
        usable = usable_bytes(args.gpu)
        out["plan"] = {**plan.__dict__, "state_gib": [plan.state_bytes(z, args.gpus) / GiB for z in range(4)],
                       "max_micro": [plan.max_micro_batch(usable, z, args.gpus, False) for z in range(4)],
                       "max_micro_ckpt": [plan.max_micro_batch(usable, z, args.gpus, True) for z in range(4)]}
        per = args.gpus * plan.grad_accum
        if plan.batch % per == 0:  # the config's own micro-batch: its predicted peak
            out["plan"]["peak_gib_config"] = plan.peak_bytes(plan.batch // per, cfg.deepspeed.zero_stage, args.gpus,
                                                             plan.checkpointing) / GiB
    if args.recipe:
        table, rows, nfe_table, nfe_rows = recipe_table(args.gpus, args.gpu, mfu, usd)
        print("\n## The paper's recipe (Table 1)\n\n" + table)
        print("\n## Its evaluation by sampler\n\n" + nfe_table)
        out["recipe"], out["eval_nfe"] = rows, nfe_rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0 if all(math.isfinite(v) for v in (mfu, usd)) else 1


if __name__ == "__main__":
    sys.exit(main())
