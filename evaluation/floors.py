"""Trivial 'reconstructions' that a tokenizer must beat to be worth its bits.

The equal-bits floor: a tokenizer with an h x w grid of tokens from K codes carries h * w * log2(K) bits per
image. The largest square 8-bit RGB thumbnail that carries no more (side s with 24 s^2 <= bits), upsampled back
with bicubic interpolation, is what the same information buys with no learning at all. A reconstruction figure
(PSNR, SSIM, LPIPS, FID) means something only above it.

Both resizes are PIL's bicubic (the downsampling one is antialiased: its kernel widens with the scale factor), the
thumbnail is rounded to uint8 (that is what makes it 8 bits per channel), and the output is uint8 like every
other reconstruction the evaluation sees.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from evaluation.metrics import psnr


def token_bits(tokens_hw: tuple[int, int], codebook_size: int) -> float:
    """Bits carried by one image's tokens: h * w * log2(K)."""
    return tokens_hw[0] * tokens_hw[1] * math.log2(codebook_size)


def equal_bits_side(bits: float) -> int:
    """The side of the largest square 8-bit RGB thumbnail with no more than `bits` bits (24 bits per pixel)."""
    side = math.isqrt(int(bits // 24))
    if side < 1:
        raise ValueError(f"{bits} bits do not pay for even a 1x1 RGB thumbnail (24 bits)")
    return side


def thumbnail_reconstruction(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, H, W): bicubic down to side x side (rounded to 8 bits), bicubic back up."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    h, w = images.shape[2:]
    out = []
    for im in images.permute(0, 2, 3, 1).cpu().numpy():
        small = Image.fromarray(im).resize((side, side), Image.Resampling.BICUBIC)
        out.append(np.asarray(small.resize((w, h), Image.Resampling.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def equal_bits_floor(images: torch.Tensor, bits: float) -> dict:
    """The equal-bits floor's side, bits and mean PSNR (dB) on uint8 images (B, 3, H, W)."""
    side = equal_bits_side(bits)
    rec = thumbnail_reconstruction(images, side)
    return {"side": side, "bits": 24 * side * side, "psnr": float(psnr(images, rec).mean())}
