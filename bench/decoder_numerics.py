"""bf16 numerics of the diffusion decoder: fp32 edges (issue 12 item 4) and the learned-variance v clamp (item 5).

    python bench/decoder_numerics.py                    # ~15 min on 2 CPU cores
    python bench/decoder_numerics.py --steps 100 --variants before after

Trains the tiny ADM UNet (unconditional, 64x64, hybrid loss, learned-range variance) with a real single-process
DeepSpeed ZeRO-2 engine, exactly as the trainer builds it, once per variant with the same seed, data and steps:

    fp32          fp32 weights and activations (the reference)
    before        bf16, edges in bf16 (x_t cast to bf16 before the input conv), v through a straight-through clamp
    edges         bf16 with fp32 edges (input conv, time MLP, output layer), straight-through clamp
    after         bf16 with fp32 edges, v unclamped (what the code does now)

Every `--eval-every` steps each model is scored in its own precision on fixed held-out crops (a photo never
trained on), fixed timesteps and fixed noise: the epsilon MSE and the vlb term L_t (bits/dim) per timestep
quartile and for t < 25 (`_qlow`), and the spread of v (mean |v|, share of |v| > 1, max |v|). At the end the
model trained with fp32 edges is also scored with its edges in bf16 (same weights: the forward precision alone).
Prints a table; the last evaluation is what bench/RESULTS.md quotes. Data: random 64x64 crops of scikit-image
photos (shipped offline).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch

VARIANTS = ("fp32", "before", "edges", "after")


def photos(names: list[str]) -> list[torch.Tensor]:
    from skimage import data

    out = []
    for n in names:
        a = getattr(data, n)()
        a = a[0] if isinstance(a, tuple) else a
        out.append(torch.from_numpy(np.ascontiguousarray(a[..., :3])).permute(2, 0, 1).float() / 127.5 - 1)
    return out


def crops(images: list[torch.Tensor], n: int, size: int, g: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        im = images[int(torch.randint(len(images), (1,), generator=g))]
        y = int(torch.randint(im.shape[1] - size + 1, (1,), generator=g))
        x = int(torch.randint(im.shape[2] - size + 1, (1,), generator=g))
        out.append(im[:, y : y + size, x : x + size])
    return torch.stack(out)


def st_clamp_frac(v: torch.Tensor) -> torch.Tensor:
    """The former rule: v clamped to [-1, 1] in the forward pass, gradient passed straight through."""
    v = v + (v.clamp(-1.0, 1.0) - v).detach()
    return (v + 1) / 2


@torch.no_grad()
def evaluate(net, diffusion, x0: torch.Tensor, per_quartile: int, seed: int) -> dict[str, float]:
    """Epsilon MSE, vlb term and v statistics per timestep quartile, on fixed t and noise."""
    T = diffusion.num_timesteps
    g = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    buckets = {str(q): (q * T // 4, (q + 1) * T // 4) for q in range(4)}
    buckets["low"] = (0, T // 40)  # t < 25: where x_t's noise is a few bf16 ulps of x_0
    for q, (lo, hi) in buckets.items():
        t = torch.randint(lo, hi, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = diffusion.q_sample(x0, t, noise)
        mse, vb, v_all = [], [], []
        for s in range(0, x0.shape[0], per_quartile):
            sl = slice(s, s + per_quartile)
            output = net(xt[sl], t[sl]).float()
            p = diffusion.p_from_output(output, xt[sl], t[sl])
            mse.append(((output[:, :3] - noise[sl]) ** 2).mean(dim=(1, 2, 3)))
            vb.append(diffusion.vb_terms_bpd(p, x0[sl], xt[sl], t[sl]))
            v_all.append(output[:, 3:].flatten())
        v = torch.cat(v_all)
        out[f"mse_q{q}"] = float(torch.cat(mse).mean())
        out[f"vb_q{q}"] = float(torch.cat(vb).mean())
        out[f"absv_q{q}"] = float(v.abs().mean())
        out[f"out_q{q}"] = float((v.abs() > 1).float().mean())
        out[f"maxv_q{q}"] = float(v.abs().max())
    return out


def run_variant(name: str, args, train_imgs, held_out: torch.Tensor) -> list[tuple[int, dict]]:
    from divae.diffusion import DiffusionConfig, create_diffusion, create_schedule_sampler
    from divae.unet import UNET_PRESETS, UNetModel
    from trainer.engine import DeepSpeedConfig, OptimConfig, build_engine

    torch.manual_seed(args.seed)
    cfg = replace(UNET_PRESETS["tiny"], cond_position="none", fp32_edges=name in ("fp32", "edges", "after"))
    model = UNetModel(cfg)
    diffusion = create_diffusion(DiffusionConfig(loss="hybrid", model_var_type="learned_range"))
    if name in ("before", "edges"):
        diffusion.variance_frac = st_clamp_frac
    sampler = create_schedule_sampler("uniform", diffusion.num_timesteps)
    engine = build_engine(model, DeepSpeedConfig(zero_stage=2, precision="fp32" if name == "fp32" else "bf16"),
                          OptimConfig(lr=args.lr, warmup_steps=20), micro_batch=args.batch, grad_accum=1,
                          world_size=1, grad_clip=1.0, total_steps=args.steps)
    g = torch.Generator().manual_seed(args.seed)
    curve = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x0 = crops(train_imgs, args.batch, 64, g)
        x0 = torch.where(torch.rand(args.batch, 1, 1, 1, generator=g) < 0.5, x0, x0.flip(3))
        t, w = sampler.sample(args.batch, torch.device("cpu"))
        losses = diffusion.training_losses(engine, x0, t)
        engine.backward((losses["loss"] * w).mean())
        engine.step()
        if step % args.eval_every == 0 or step == args.steps:
            engine.module.eval()
            ev = evaluate(engine.module, diffusion, held_out, args.batch * 4, seed=args.seed + 1)
            engine.module.train()
            curve.append((step, ev))
            print(f"  {name:7s} step {step:4d} ({time.perf_counter() - t0:6.0f} s)  "
                  + " ".join(f"mse_q{q}={ev[f'mse_q{q}']:.4f}" for q in range(4))
                  + f" mse_qlow={ev['mse_qlow']:.4f}  vb_q0={ev['vb_q0']:.4f} |v|_q0={ev['absv_q0']:.3f}"
                  + f" out_q0={ev['out_q0']:.3f}"
                  + f" max|v|={max(ev[f'maxv_q{q}'] for q in range(4)):.2f}", flush=True)
    if name == "after":  # the same weights with bf16 edges: what the forward precision alone does
        engine.module.eval()
        engine.module.inner.set_fp32_edges(False)
        curve.append((args.steps, evaluate(engine.module, diffusion, held_out, args.batch * 4, seed=args.seed + 1)))
        engine.module.inner.set_fp32_edges(True)
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["before", "after", "edges", "fp32"], choices=VARIANTS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--held-out", type=int, default=64, help="held-out crops (chelsea, never trained on)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from runtime.launch import init_distributed

    init_distributed()
    train_imgs = photos(["astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"])
    held_out = crops(photos(["chelsea"]), args.held_out, 64, torch.Generator().manual_seed(123))
    results = {}
    for name in args.variants:
        print(f"variant {name}:", flush=True)
        results[name] = run_variant(name, args, train_imgs, held_out)

    print(f"\nlast evaluation (step {args.steps}, {args.held_out} held-out crops, fixed t and noise):")
    cols = ["mse_qlow"] + [f"mse_q{q}" for q in range(4)] + ["vb_qlow", "vb_q0", "absv_q0", "out_q0", "maxv"]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    rows = [(name, curve[-2 if name == "after" else -1][1]) for name, curve in results.items()]
    if "after" in results:
        rows.append(("after, scored with bf16 edges", results["after"][-1][1]))
    for name, ev in rows:
        ev["maxv"] = max(ev[f"maxv_q{q}"] for q in range(4))
        print(f"| {name} | " + " | ".join(f"{ev[c]:.4f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
