"""Outputs of an evaluation: the Table 1 style Markdown (the sample grid: data_pipeline.images.save_grid)."""

from __future__ import annotations

import os
from pathlib import Path

# save_grid lives in data_pipeline.images (one writer for training and evaluation); protocol.py and recon_fid.py
# import it from here.
from data_pipeline.images import save_grid  # noqa: F401

# Table 1 of the paper (reconstruction FID, 50k ImageNet val), printed under our table for comparison.
PAPER_TABLE1 = [("VQGAN", "f16", 16384, 4.98), ("DiVAE", "f16", 16384, 4.07), ("DiVAE DDIM25", "f16", 16384, 7.07),
                ("VQGAN", "f8", 8192, 1.49), ("DiVAE", "f8", 8192, 1.24), ("DiVAE DDIM25", "f8", 8192, 3.14)]


def _fmt(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_results_md(results: list[dict], path: str | os.PathLike) -> None:
    """A Markdown table in the form of the paper's Table 1, plus our extra figures."""
    lines = ["| Model | Dataset | D → R | Rate | dim Z | Sampler | Steps | FID | PSNR | SSIM | LPIPS | "
             "Codebook usage | Perplexity | Images |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["protocol"]
        th, tw = r.get("tokens_hw") or (None, None)
        ih, iw = r.get("image_hw") or (None, None)
        dr = f"{th}x{tw} → {ih}x{iw}" if th else "-"
        rate = f"f{ih // th}" if th else "-"
        cb = r.get("codebook") or {}
        lines.append(
            f"| {r['label']} | {p.get('dataset_name', '-')} | {dr} | {rate} | {p.get('codebook_size') or '-'} | "
            f"{p.get('sampler') or '-'} | {p.get('steps') or '-'} | {r['fid']:.2f} | {_fmt(r['psnr'], 2)} | "
            f"{_fmt(r['ssim'], 4)} | {_fmt(r['lpips'], 4)} | {_fmt(cb.get('usage'), 3)} | "
            f"{_fmt(cb.get('perplexity'), 1)} | {r['num_images']} |")
    skipped = (results[0].get("skipped") or []) if results else []
    if skipped:
        listed = "; ".join(f"{s['detail']}: {s['reason']}" for s in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        lines += ["", f"Skipped {len(skipped)} input(s) that are not usable images (all in results.json): {listed}"]
    paper = ", ".join(f"{m} {rate} (K={k}) {fid}" for m, rate, k, fid in PAPER_TABLE1)
    lines += ["", f"FID of reconstructions against their own originals (val vs val), TF-Inception pool features, "
                  f"uint8, no JPEG. Paper, Table 1 (50,000 ImageNet val): {paper}.", ""]
    Path(path).write_text("\n".join(lines))
