"""Learning curves of candidate VQ recipes for `make demo`: held-out PSNR after N optimizer steps.

    python bench/demo_recipe.py --candidates base,lr2e-3,... --steps 300 --every 50

A plain single-process torch loop (AdamW, bf16 autocast as the trainer runs, the demo's crops), so that
candidates are compared on equal optimizer steps and equal images seen; the seconds per step are printed too
(the demo's budget is wall time). The equal-bits floor (bicubic upsampling of the largest 8-bit RGB thumbnail
with no more bits than the tokens) is printed beside each curve. Results go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from divae.quantizer import QuantizerConfig  # noqa: E402
from divae.vq import VQ_PRESETS, VQModel  # noqa: E402
from divae.vq_loss import VQLoss, VQLossConfig  # noqa: E402
from evaluation.floors import equal_bits_floor  # noqa: E402
from scripts.demo import EVAL_PHOTO, TRAIN_PHOTOS, Schedule, photo, random_crops  # noqa: E402


def crops(names, n: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    ims = [np.asarray(c) for name in names for c in random_crops(photo(name), n, size, rng)]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, H, W)


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over images of the per-image PSNR (uint8 scale) of [-1, 1] tensors."""
    a = ((x.clamp(-1, 1) + 1) * 127.5).round()
    b = ((y.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


CANDIDATES = {
    # name: (vq overrides, quantizer overrides, loss overrides, lr, batch)
    "base": ({}, {}, {}, 1e-3, 16),
}


def parse_candidate(spec: str) -> dict:
    """'k=v;k=v' with keys among ch, ch_mult, K, d, z, cdim, lr, b1, b2, batch, l2w, beta, decay, restart, l2norm,
    res, attn, noq."""
    out = {}
    for kv in filter(None, spec.split(";")):
        k, v = kv.split("=")
        out[k] = v
    return out


def build(c: dict, size: int) -> tuple[VQModel, VQLoss, float, int]:
    base = VQ_PRESETS["tiny_f4"]
    q = QuantizerConfig(use_ema=True, kmeans_init=True, restart_after_steps=int(c.get("restart", 20)),
                        ema_decay=float(c.get("decay", 0.99)), beta=float(c.get("beta", 0.25)),
                        codebook_dim=int(c["cdim"]) if "cdim" in c else None, l2_normalize=c.get("l2norm") == "1")
    mult = tuple(int(m) for m in c.get("ch_mult", "1-2-4").split("-"))
    cfg = replace(base, resolution=size, ch=int(c.get("ch", 32)), ch_mult=mult, n_embed=int(c.get("K", 512)),
                  embed_dim=int(c.get("d", 32)), z_channels=int(c.get("z", 32)),
                  num_res_blocks=int(c.get("res", 1)),
                  attn_resolutions=tuple(int(a) for a in c["attn"].split("-")) if c.get("attn") else (),
                  quantizer=q)
    loss = VQLoss(VQLossConfig(perceptual_weight=0.0, l2_weight=float(c.get("l2w", 0.0)), disc_start=10**9))
    model = VQModel(cfg)
    if c.get("noq") == "1":  # the architecture's ceiling: no quantization at all (z_q = z_e)
        model.quantizer.forward = lambda z: (z, None, torch.zeros(()), {"usage": torch.ones(())})
    return model, loss, float(c.get("lr", 1e-3)), int(c.get("batch", 16))


def run(name: str, spec: str, train: torch.Tensor, held: torch.Tensor, steps: int, every: int, seed: int) -> dict:
    torch.manual_seed(seed)
    c = parse_candidate(spec)
    model, loss_fn, lr, batch = build(c, train.shape[-1])
    betas = (float(c.get("b1", 0.5)), float(c.get("b2", 0.9)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    curve, t_train = [], 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, step / 20)
        x = to_float(train[torch.randint(0, len(train), (batch,), generator=g)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x_hat, qloss, stats = model(x)
        x_hat = x_hat.float()
        nll, _ = loss_fn.reconstruction_loss(x, x_hat)
        loss = nll + qloss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t_train += time.perf_counter() - t0
        if step % every == 0 or step == steps:
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                recs = torch.cat([model(to_float(held[i:i + 64]))[0].float() for i in range(0, len(held), 64)])
            model.train()
            p = psnr(to_float(held), recs)
            curve.append((step, round(p, 2), round(float(stats["usage"]), 3)))
            print(f"  {name:<14} step {step:>5}  held-out PSNR {p:6.2f} dB  usage {float(stats['usage']):.2f}  "
                  f"{t_train / step * 1000:.0f} ms/step", flush=True)
    k, h = model.cfg.n_embed, train.shape[-1] // model.downsample_factor
    return {"name": name, "spec": spec, "curve": curve, "ms_per_step": t_train / steps * 1000,
            "bits": h * h * math.log2(k)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", nargs="+", default=["base="], help="name=spec, spec 'k=v;k=v' (see parse_candidate)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--size", type=int, default=Schedule.image_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    train = crops(TRAIN_PHOTOS, Schedule.train_crops_per_photo, a.size, 0)
    held = crops((EVAL_PHOTO,), Schedule.eval_crops, a.size, 1)
    results = []
    for cand in a.candidates:
        name, spec = cand.split("=", 1)
        r = run(name, spec, train, held, a.steps, a.every, a.seed)
        fl = equal_bits_floor(held, r["bits"])
        r["floor"] = fl
        print(f"  {name}: equal-bits floor ({fl['side']}x{fl['side']} thumbnail, {fl['bits']} bits <= "
              f"{r['bits']:.0f}) {fl['psnr']:.2f} dB", flush=True)
        results.append(r)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
