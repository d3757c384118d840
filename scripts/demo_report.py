"""The report of `make demo` (scripts/demo.py): report.md, samples.png and summary.json from the steps' results.

Everything here reads what the steps wrote (recon_fid's results and sample grids, the floors, the timings) and
formats it; nothing trains or evaluates. `pm`, `FIGURE_KEYS`, `grid_rows` and `labelled_rows` are shared with
scripts/mini_table1.py.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

if TYPE_CHECKING:  # the schedule's fields only; no import of the orchestration at run time
    from scripts.demo import Schedule

# the figures of one evaluation that the report, summary.json and the floors keep
FIGURE_KEYS = ("label", "fid", "psnr", "ssim", "lpips", "num_images", "psnr_sem", "ssim_sem", "lpips_sem")


def rel(p: Path | str) -> str:
    p = Path(p)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def grid_rows(path: Path, size: int, pad: int = 2) -> list[Image.Image]:
    """Split a recon_fid samples.png (rows of images, `pad` px apart) into one image per row."""
    im = Image.open(path).convert("RGB")
    rows = (im.height - pad) // (size + pad)
    return [im.crop((0, pad + r * (size + pad), im.width, pad + r * (size + pad) + size)) for r in range(rows)]


def labelled_rows(rows: list[Image.Image], labels: list[str], path: Path, size: int, scale: int = 2) -> Path:
    """Stack image rows (each `size` px high) into `path`, upscaled x`scale`, each with its label at the left."""
    width = max(r.width for r in rows)
    label_w, gap = 150, 4
    h = size * scale
    canvas = Image.new("RGB", (label_w + width * scale, len(rows) * (h + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (row, label) in enumerate(zip(rows, labels)):
        y = gap + i * (h + gap)
        canvas.paste(row.resize((row.width * scale, h), Image.Resampling.NEAREST), (label_w, y))
        draw.multiline_text((6, y + h // 2 - 12), label, fill="black")
    canvas.save(path)
    return path


def write_samples(out: Path, sched: Schedule, labels: list[str], scale: int = 2) -> Path:
    """samples.png: originals, VQGAN, DiVAE (fast sampler), DiVAE (DDPM) as labelled rows, upscaled x`scale`."""
    fast = grid_rows(out / "eval" / "fast" / "samples.png", sched.image_size)  # originals, cnn, diffusion
    ddpm = grid_rows(out / "eval" / "ddpm" / "samples.png", sched.image_size)  # originals, diffusion
    return labelled_rows([fast[0], fast[1], fast[2], ddpm[1]], labels, out / "samples.png", sched.image_size, scale)


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def pm(r: dict, key: str, digits: int) -> str:
    """A figure with its standard error over images, when there is one."""
    sem = r.get(f"{key}_sem")
    return _f(r.get(key), digits) + (f" ± {sem:.{digits}f}" if sem is not None else "")


def _gap_noise(a: dict, b: dict, key: str) -> float | None:
    """Standard error of the difference of two means over the same crops, taken as independent (an upper
    bound: the errors of two reconstructions of the same crops are positively correlated)."""
    sa, sb = a.get(f"{key}_sem"), b.get(f"{key}_sem")
    return None if sa is None or sb is None else (sa**2 + sb**2) ** 0.5


def demo_checks(ev: dict) -> dict:
    """The demo's acceptance figures: VQGAN's PSNR over the equal-bits floor (target >= 1 dB) and DiVAE's (fast
    sampler) against VQGAN (target >= -1.5 dB)."""
    return {"vq_over_floor_db": ev["cnn"]["psnr"] - ev["thumbnail"]["psnr"],
            "divae_vs_vq_db": ev["fast"]["psnr"] - ev["cnn"]["psnr"]}


def write_report(out: Path, sched: Schedule, info: dict, timings: dict, commands: list[str]) -> Path:
    """report.md: the reconstruction table with the floors and the verdicts, training, timings, the commands
    that ran, and how to go further; `info` holds the steps' results (data, vq, decoder, eval)."""
    text = (_intro(sched, info["eval"]["cnn"], timings) + _recon_section(sched, info) + _training_section(info)
            + _runs_section(timings, commands) + _going_further(out))
    path = out / "report.md"
    path.write_text(text)
    return path


def _intro(sched: Schedule, cnn: dict, timings: dict) -> str:
    total = sum(t["seconds"] for t in timings.values())
    cpu = os.cpu_count()
    return f"""# DiVAE demo report

Everything below ran on this machine ({cpu} CPU cores, {platform.machine()}, Python {platform.python_version()}), from
photographs that ship inside scikit-image. Total wall time of the steps: **{total / 60:.1f} min**.

![samples](samples.png)

Rows of `samples.png`: held-out originals; the VQGAN baseline (the VQ stage's own CNN decoder, the VQGAN
architecture trained without its GAN term at this budget); DiVAE (the
diffusion decoder) with {sched.fast_sampler} in {sched.fast_steps} steps; DiVAE with DDPM ancestral sampling
({sched.ddpm_steps} of the T = 1000 timesteps). Every reconstruction starts from the same {_tok(cnn)} tokens.

"""


def _recon_table(sched: Schedule, ev: dict) -> list[str]:
    """The markdown rows of the reconstruction table: the three floors, VQGAN, DiVAE (fast sampler, DDPM)."""
    fast_label = f"DiVAE, {sched.fast_sampler} {sched.fast_steps} steps"
    ddpm_label = f"DiVAE, DDPM {sched.ddpm_steps} steps"
    thumb = ev["thumbnail"]
    thumb_label = (f"Equal-bits floor: {thumb['side']}x{thumb['side']} thumbnail, bicubic "
                   f"({thumb['thumbnail_bits']} <= {thumb['token_bits']:.0f} token bits)")
    rows = [("Uniform noise (floor)", ev["noise"]), ("Mean training image (floor)", ev["mean"]), (thumb_label, thumb),
            ("VQGAN baseline (CNN decoder)", ev["cnn"]), (fast_label, ev["fast"]), (ddpm_label, ev["ddpm"])]
    table = ["| Reconstruction | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ | FID ↓ | Images |", "|---|---|---|---|---|---|"]
    table += [f"| {name} | {pm(r, 'psnr', 2)} | {pm(r, 'ssim', 3)} | {pm(r, 'lpips', 3)} | {_f(r['fid'], 1)} | "
              f"{r['num_images']} |" for name, r in rows]
    return table


def _winner(cnn: dict, fast: dict, key: str, lower: bool) -> str:
    """Which of VQGAN (`cnn`) and DiVAE (`fast`) is better on `key` (`lower`: lower is better), and whether the
    gap exceeds twice its noise."""
    a, b = cnn[key], fast[key]
    if a is None or b is None:
        return f"{key}: -"
    noise = _gap_noise(cnn, fast, key)
    best = "VQGAN" if (a < b) == lower else "DiVAE"
    verdict = f"{best} by {abs(a - b):.3g}"
    if noise is not None:
        gap = "a gap" if abs(a - b) > 2 * noise else "within the noise"
        verdict += f" (twice its noise: {2 * noise:.2g}, {gap})"
    return f"{key.upper()} {_f(a, 3)} vs {_f(b, 3)}: {verdict}"


def _recon_section(sched: Schedule, info: dict) -> str:
    ev, data = info["eval"], info["data"]
    thumb, cnn, fast, ddpm = ev["thumbnail"], ev["cnn"], ev["fast"], ev["ddpm"]
    checks = demo_checks(ev)
    cb = cnn.get("codebook") or {}
    return f"""## Reconstructions of the held-out photo

{info['data']['eval']} crops ({sched.image_size}x{sched.image_size}, several scales) of \
`skimage.data.{data['eval_photo']}`, a photograph the models never saw; the models trained on \
{info['data']['train']} crops of {len(data['train_photos'])} other photos ({', '.join(data['train_photos'])}).

{chr(10).join(_recon_table(sched, ev))}

- FID here is computed on {info['data']['eval']} images (DDPM: the first {ddpm['num_images']}) against the originals'
  TF-Inception statistics: with so few images it is dominated by estimation noise and only the large gaps mean
  anything (noise and the mean image against real reconstructions). Read it beside PSNR, SSIM and LPIPS.
- `±` is the standard error of the mean over the crops (a gap under about twice the combined errors is noise).
- DiVAE against the VQGAN baseline at this tiny scale (a few minutes of CPU training; the paper trains for days
  on GPUs): {_winner(cnn, fast, 'psnr', False)}; {_winner(cnn, fast, 'lpips', True)}; \
{_winner(cnn, fast, 'fid', True)} (FID on so few images has no
  error bar here; only large gaps mean anything). Both decoders see the same tokens; the CNN decoder regresses to
  the mean, which PSNR rewards, while the diffusion decoder samples detail, which the perceptual figures reward.
- The tokenizer against the equal-bits floor (a {thumb['side']}x{thumb['side']} 8-bit thumbnail carries
  {thumb['thumbnail_bits']} bits, the {_tok(cnn)} tokens {thumb['token_bits']:.0f}): VQGAN
  {checks['vq_over_floor_db']:+.2f} dB PSNR over it (the demo's target: at least +1 dB), DiVAE
  {checks['divae_vs_vq_db']:+.2f} dB against VQGAN (target: within 1.5 dB).
- Codebook: {cb.get('usage', 0) * 100:.0f}% of the K = {cnn['protocol'].get('codebook_size')} codes used on the
  held-out crops (perplexity {_f(cb.get('perplexity'), 1)}).

"""


def _training_section(info: dict) -> str:
    vq, dec, cnn = info["vq"]["last"], info["decoder"]["last"], info["eval"]["cnn"]
    return f"""## Training

| Stage | Steps | Last logged figures |
|---|---|---|
| VQ (f{_f_rate(cnn)}, configs/demo_vq.yaml: L1 + L2, EMA codebook, no GAN) | {info['vq']['steps']} | \
{_fmt_metrics(vq, VQ_KEYS)} |
| Diffusion decoder (configs/demo_decoder.yaml) | {info['decoder']['steps']} | {_fmt_metrics(dec, DEC_KEYS)} |

Beside this report: loss curves in `vq/metrics.jsonl` and `decoder/metrics.jsonl`, training sample grids in
`vq/samples/` and `decoder/samples/`, the evaluation's own tables in `eval/*/results.md`.

"""


def _runs_section(timings: dict, commands: list[str]) -> str:
    """The timings of the steps (reused ones marked) and the commands that ran."""
    timing_rows = [f"| {k} | {v['seconds']:.0f} | {'reused from an earlier run' if v.get('reused') else ''} |"
                   for k, v in timings.items()]
    return f"""## Timings

| Step | Seconds | |
|---|---|---|
{chr(10).join(timing_rows)}

## The commands that produced these results

```
{chr(10).join(commands) if commands else '(none recorded)'}
```

"""


def _going_further(out: Path) -> str:
    return f"""## Going further

- Train longer here: the trainer resumes a run folder from its last checkpoint, so this continues the demo's
  decoder to 3000 steps, after which `python scripts/demo.py` re-evaluates the new weights (and keeps the rest):
  `torchrun --standalone --nproc_per_node 2 -m trainer.train --config configs/demo_decoder.yaml
  train.run_dir={rel(out / 'decoder')} data.path={rel(out / 'data' / 'train')}
  decoder.vq_weights={rel(out / 'vq' / 'divae.safetensors')} train.steps=3000`
- Your own photos: `python -m data_pipeline.prepare_folder --source my_photos/ --out data/my256 --size 256`.
- ImageNet on a Slurm cluster (the paper's scale): shards, the two stages, then the paper's Table 1:
  ```
  python -m data_pipeline.prepare_imagenet --split train --source ILSVRC2012_img_train.tar \\
      --devkit ILSVRC2012_devkit_t12.tar.gz --out data/imagenet256/train --workers 16
  python -m data_pipeline.prepare_imagenet --split val --source ILSVRC2012_img_val.tar \\
      --devkit ILSVRC2012_devkit_t12.tar.gz --out data/imagenet256/val
  sbatch slurm/train_vq.sh configs/vq_f16.yaml
  sbatch slurm/train_decoder.sh configs/decoder_f16.yaml   # reads runs/vq_f16/divae.safetensors
  python -m evaluation.recon_fid --checkpoint runs/decoder_f16/divae.safetensors \\
      --data data/imagenet256/val --decoder both --out runs/eval_f16   # or torchrun --nproc_per_node 8 -m ...
  ```
"""


def write_summary(out: Path, ev: dict, timings: dict) -> Path:
    """summary.json: every figure of the report's table (with its standard errors), the acceptance margins and
    the timings; docs/demo_results.json is this file from the run whose figures the README shows."""
    figures = {k: {f: ev[k].get(f) for f in FIGURE_KEYS if f != "label"}
               for k in ("noise", "mean", "thumbnail", "cnn", "fast", "ddpm")}
    figures["thumbnail"].update({k: ev["thumbnail"][k] for k in ("side", "thumbnail_bits", "token_bits")})
    summary = {"figures": figures, "checks": demo_checks(ev),
               "minutes": sum(t["seconds"] for t in timings.values()) / 60,
               "timings": {k: round(v["seconds"], 1) for k, v in timings.items()}}
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return path


VQ_KEYS = ("l1", "l2", "qloss", "usage", "perplexity")
DEC_KEYS = ("loss", "mse", "vb")


def _tok(r: dict) -> str:
    t = r.get("tokens_hw")
    return f"{t[0]}x{t[1]}" if t else "the same"


def _f_rate(r: dict) -> str:
    t, i = r.get("tokens_hw"), r.get("image_hw")
    return str(i[0] // t[0]) if t and i else "?"


def _fmt_metrics(m: dict, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m) or "-"
