"""Where a diffusion decoder learns: the diagnostic of DESIGN.md section 6c for one or more decoder exports.

    python bench/decoder_diagnostic.py --decoders x0=runs/demo/decoder/divae.safetensors v=runs/v/divae.safetensors \
        --crops runs/demo/data/eval --n 48

For each decoder, on the first `--n` held-out crops (the evaluation's shards, or PNG files) and their tokens from
the decoder's own VQ:
- the one-step estimate x_0-hat from (x_t, t, z_q) at t in --t: PSNR (dB) and the colour error (mean absolute
  error of each crop's average colour, in 8-bit levels): where the parameterization has learned;
- samples at each sampler:steps in --samplers (e.g. ddim:1 is one network evaluation from pure noise, a one-shot
  regression; dpmpp2m:20 the demo's sampler; own: a distilled student's own sampler): PSNR and LPIPS, so a
  decoder whose advantage comes from denoising shows it (better with more steps), one that ignores x_t does not;
- the VQ's CNN decoder on the same tokens and crops, the baseline (a VQ-only export, such as the fair CNN
  baseline of `vq_task.train=decoder`, gets this row alone), and each sample's LPIPS minus the CNN's on the same
  crops (mean and standard error of the paired difference: the test of "beats the CNN decoder"). An anchored
  decoder (divae/anchor.py) trained on the fair CNN's file holds that CNN, so its CNN row is the fair baseline.
Each figure is a mean over crops with its standard error. Prints a Markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from divae.anchor import from_residual, to_residual, unet_inputs  # noqa: E402
from divae.diffusion import create_diffusion  # noqa: E402
from divae.lpips import LPIPS  # noqa: E402
from divae.model import DiVAE  # noqa: E402
from evaluation.data import open_dataset  # noqa: E402
from evaluation.metrics import psnr, to_uint8  # noqa: E402


def load_crops(path: Path, n: int) -> torch.Tensor:
    """The first n crops as float (n, 3, H, W) in [-1, 1]: from shards (a folder with manifest.json, decoded as
    `evaluation.recon_fid` reads them) or the sorted PNG files of a folder."""
    if (path / "manifest.json").is_file():
        data = open_dataset(path)
        ims = np.stack([np.asarray(data[i]["image"]) for i in range(min(n, len(data)))])
    else:
        files = sorted(path.glob("*.png"))[:n]
        if not files:
            raise SystemExit(f"no PNG crops in {path}")
        ims = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 127.5 - 1


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    return v.mean().item(), (v.std() / max(len(v), 1) ** 0.5).item()


def scores(x: torch.Tensor, ref: torch.Tensor, lpips: LPIPS | None) -> dict[str, tuple[float, float]]:
    """PSNR (dB), colour error (8-bit levels) and LPIPS, each (mean, s.e.) over images."""
    a, b = to_uint8(x), to_uint8(ref)
    out = {"psnr": mean_se(psnr(a, b)),
           "colour": mean_se((a.double().mean((2, 3)) - b.double().mean((2, 3))).abs().mean(1))}
    if lpips is not None:
        with torch.no_grad():
            per_image = torch.cat([lpips(ref[i:i + 16], x[i:i + 16].clamp(-1, 1)) for i in range(0, len(x), 16)])
        out["lpips"] = mean_se(per_image)
        out["lpips_per_image"] = per_image
    return out


def paired_gap(s: dict, cnn: dict) -> tuple[float, float] | None:
    """LPIPS of a sample minus the CNN decoder's on the same crops: (mean, standard error of the paired
    difference); negative means the diffusion decoder is closer to the originals."""
    if "lpips_per_image" not in s or "lpips_per_image" not in cnn:
        return None
    return mean_se(s["lpips_per_image"] - cnn["lpips_per_image"])


@torch.no_grad()
def one_step_x0(model: DiVAE, x0: torch.Tensor, z_q: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    """x_0-hat from x_t = q_sample(x_0, t) with fixed noise: (B, 3, H, W). For an anchored decoder the diffusion's
    x_0 is the residual of the CNN decoder: noised, estimated and turned back into an image."""
    diffusion = create_diffusion(model.diffusion_cfg)
    kwargs, base = unet_inputs(model.vq, z_q, model.anchor, model.unet.conditional)
    target = x0 if base is None else to_residual(x0, base, model.anchor["scale"])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    tt = torch.full((x0.shape[0],), t, dtype=torch.long)
    xt = diffusion.q_sample(target, tt, noise)
    out = model.unet(xt, tt, **kwargs)
    pred = diffusion.x0_from_prediction(out[:, :x0.shape[1]].float(), xt, tt)
    return (pred if base is None else from_residual(pred, base, model.anchor["scale"])).clamp(-1, 1)


def diagnose(name: str, path: str, crops: torch.Tensor, ts: list[int], samplers: list[tuple[str, int]],
             lpips: LPIPS | None, batch: int) -> dict:
    model = DiVAE.from_pretrained(path).eval()
    idx = torch.cat([model.encode(crops[i:i + batch]) for i in range(0, len(crops), batch)])
    z_q = model.vq.embed(idx)
    res: dict = {"decoder": name, "path": path, "x0_by_t": {}, "samples": {}}
    res["cnn"] = scores(model.vq.decode(z_q).clamp(-1, 1), crops, lpips)
    if model.unet is None:  # a VQ export (e.g. the fair CNN baseline): its CNN decoder only
        return res
    res["diffusion"] = model.diffusion_cfg.__dict__
    res["x0_by_t"] = {t: scores(one_step_x0(model, crops, z_q, t, seed=t), crops, None) for t in ts}
    for sampler, steps in samplers:
        if sampler == "own" and model.sampling is None:
            continue  # not a distilled export
        how = {"sampler": None, "steps": None} if sampler == "own" else {"sampler": sampler, "steps": steps}
        x = torch.cat([model.decode_tokens(idx[i:i + batch], **how, seeds=range(i, i + len(idx[i:i + batch])))
                       for i in range(0, len(idx), batch)])
        label = f"own: {model.sampling_label(None, None)}" if sampler == "own" else f"{sampler}:{steps}"
        res["samples"][label] = scores(x.clamp(-1, 1), crops, lpips)
        res["samples"][label]["lpips_vs_cnn"] = paired_gap(res["samples"][label], res["cnn"])
    return res


def table(results: list[dict]) -> str:
    f = lambda ms, d=2: f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}"  # noqa: E731
    ts = next((list(r["x0_by_t"]) for r in results if r["x0_by_t"]), [])
    lines = ["| decoder | x_0-hat PSNR at t = " + " / ".join(map(str, ts)) + " | colour error at t = "
             + " / ".join(map(str, ts)) + " |", "|---|---|---|"]
    for r in results:
        if not r["x0_by_t"]:
            continue
        lines.append(f"| {r['decoder']} | " + " / ".join(f"{v['psnr'][0]:.1f}" for v in r["x0_by_t"].values())
                     + " | " + " / ".join(f"{v['colour'][0]:.1f}" for v in r["x0_by_t"].values()) + " |")
    lines += ["", "| decoder | reconstruction | PSNR (dB) | LPIPS | LPIPS minus the CNN's (paired) |",
              "|---|---|---|---|---|"]
    for r in results:
        rows = [("CNN decoder (same tokens)", r["cnn"]), *r["samples"].items()]
        for label, s in rows:
            lp = f(s["lpips"], 4) if "lpips" in s else "-"
            gap = f(s["lpips_vs_cnn"], 4) if s.get("lpips_vs_cnn") else "-"
            lines.append(f"| {r['decoder']} | {label} | {f(s['psnr'])} | {lp} | {gap} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoders", nargs="+", required=True, help="name=path of decoder exports (divae.safetensors)")
    p.add_argument("--crops", default="runs/demo/data/eval", help="held-out shards (manifest.json) or PNG folder")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--t", default="50,200,500,800,950")
    p.add_argument("--samplers", default="ddim:1,ddim:2,dpmpp2m:20,own",
                   help="sampler:steps, comma-separated; own: a distilled export's own sampler")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--no-lpips", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    crops = load_crops(Path(args.crops), args.n)
    lpips = None if args.no_lpips else LPIPS().eval()
    samplers = [(s.split(":")[0], int(s.split(":")[1])) if ":" in s else (s, 0) for s in args.samplers.split(",")]
    ts = [int(t) for t in args.t.split(",")]
    results = [diagnose(*spec.split("=", 1), crops, ts, samplers, lpips, args.batch) for spec in args.decoders]
    print(f"{len(crops)} held-out crops from {args.crops}\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=lambda v: v.tolist()
                                              if isinstance(v, torch.Tensor) else str(v)))


if __name__ == "__main__":
    main()
