"""Shared inputs of the text-to-image tests: a tiny DiVAE (f8, 64x64, K=256), a tiny prior with its tokenizer
(8x8 tokens, K=256, random weights: speed and plumbing, not quality) and a COCO-shaped folder made by the real
`prepare_coco` from a captions JSON and PNGs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def scene(i: int, size: int = 96) -> tuple[np.ndarray, list[str]]:
    """A synthetic photo (a coloured shape on grey) and two captions for it."""
    names = list(COLOURS)
    colour, shape = names[i % 4], SHAPES[(i // 4) % 2]
    img = Image.new("RGB", (size, size + 16 * (i % 3)), (128 + 8 * i % 60, 128, 128))
    from PIL import ImageDraw

    d = ImageDraw.Draw(img)
    box = (20 + 3 * i, 24, 70 + 3 * i, 74)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLOURS[colour])
    return np.asarray(img), [f"a {colour} {shape} on grey", f"one {shape} painted {colour}"]


def make_coco(root: Path, n: int = 8, size: int = 64) -> Path:
    """`prepare_coco` output (n pairs, all of them drawn) at root/coco; returns that folder."""
    from data_pipeline.prepare_coco import main as prepare_coco

    (root / "val2014").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        img, caps = scene(i)
        name = f"COCO_val2014_{i:012d}.png"
        Image.fromarray(img).save(root / "val2014" / name)
        images.append({"id": 100 + i, "file_name": name})
        anns += [{"id": 10 * i + k, "image_id": 100 + i, "caption": c} for k, c in enumerate(caps)]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    prepare_coco(["--captions", str(root / "captions.json"), "--images", str(root / "val2014"), "--out",
                  str(root / "coco"), "--num-pairs", str(n), "--seed", "0", "--size", str(size), "--workers", "1",
                  "--no-progress"])
    return root / "coco"


def make_models(root: Path, captions: list[str]) -> tuple[Path, Path]:
    """(prior.safetensors, divae.safetensors) with random weights, matching each other (8x8 tokens, K=256)."""
    from divae.diffusion import DiffusionConfig
    from divae.model import DiVAE
    from divae.prior import PriorConfig, PriorModel
    from divae.prior_io import save_prior
    from divae.text_tokenizer import TextTokenizer
    from divae.unet import UNET_PRESETS
    from divae.vq import VQ_PRESETS

    torch.manual_seed(0)
    vq = VQ_PRESETS["tiny"]
    unet = replace(UNET_PRESETS["tiny"], cond_channels=vq.embed_dim, token_grid=8)
    DiVAE(vq, unet, DiffusionConfig(timesteps=50)).save_pretrained(root / "divae.safetensors")
    tok = TextTokenizer.train(captions * 2, vocab_size=300, max_length=16)
    cfg = PriorConfig(text_vocab_size=300, text_len=16, image_vocab_size=vq.n_embed, image_h=8, image_w=8, dim=64,
                      n_heads=4, enc_layers=1, dec_layers=2, attn_backend="sdpa")
    save_prior(root / "prior.safetensors", PriorModel(cfg), tok)
    return root / "prior.safetensors", root / "divae.safetensors"
