"""The anchored diffusion decoder: diffusion on the residual of the VQ's CNN decoder.

An anchored DiVAE decodes tokens in two parts:

    base = clamp(cnn_decoder(z_q), -1, 1)                 # the VQ's own CNN decoder: one deterministic pass
    r    = sample the UNet given (z_q, base)              # a diffusion over the scaled residual
    x    = base + scale * r

In training the UNet learns the residual r = (x_0 - base) / scale with the stage's usual diffusion loss; it sees
the base image as `anchor_channels` extra input channels beside x_t (`UNetConfig.anchor_channels`). The
diffusion is there to add what a regression cannot: the detail the tokens leave open, sampled instead of
averaged away.

Why (measured, bench/RESULTS.md "Decoder objectives" and "Anchored diffusion decoder"): at the scale this project
can train on a CPU, a plain diffusion decoder spends its whole budget relearning the colours and shapes that the
CNN decoder gets in a few hundred steps, and stays 0.08-0.12 LPIPS behind it (DESIGN.md section 6c). The same split
between a regression of the mean and a diffusion of the residual is the recipe of NVIDIA's CorrDiff (Mardani et
al. 2023) and of DiffuseVAE (Pandey et al. 2022). Because the UNet's output layer starts at zero, an x_0-predicting
anchored decoder decodes exactly the base image before training (every sampler), so training starts from the CNN
decoder's quality; a v-predicting one starts near it. On the demo's tokens, one UNet evaluation of an anchored
decoder trained on the fair CNN's file beats that CNN on LPIPS (by 2% after 2,400 steps); more sampling steps do
not help yet at that scale (seven training photos).

`scale` (the residual's unit, in the [-1, 1] pixel scale) brings the residual to a spread the noise schedule
suits: the CNN decoder's error is a small signal (standard deviation ~0.07 on the demo's training crops, ~0.15 on
held-out ones), and the schedule's signal-to-noise ratios assume data of standard deviation ~0.5. Samplers run
without clipping x_0-hat to [-1, 1] (the residual is not an image); the decoded image is clamped.

A DiVAE file records the anchor in its config: "anchor": null or {"scale": float}.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from divae.diffusion import DiffusionConfig, sample
from divae.vq import VQModel

BASE_CHANNELS = 3  # the base image's channels: what `UNetConfig.anchor_channels` must be for an anchored decoder


def check_anchor(anchor: object, anchor_channels: int | None) -> None:
    """Refuse an `anchor` entry (from a file's metadata or a config: untrusted) that cannot decode, or one that
    disagrees with the UNet's extra input channels (`anchor_channels`; None: the entry alone is checked)."""
    if anchor is None:
        if anchor_channels:
            raise ValueError(f"unet.anchor_channels={anchor_channels} but the decoder has no anchor: set "
                             "anchor={'scale': ...} or unet.anchor_channels=0")
        return
    scale = anchor.get("scale") if isinstance(anchor, dict) else None
    if (not isinstance(anchor, dict) or set(anchor) != {"scale"} or isinstance(scale, bool)
            or not isinstance(scale, (int, float)) or not math.isfinite(scale) or not 0 < scale <= 4):
        raise ValueError(f"anchor={str(anchor)[:200]}: expected {{'scale': a number in (0, 4]}} or null")
    if anchor_channels is not None and anchor_channels != BASE_CHANNELS:
        raise ValueError(f"an anchored decoder needs unet.anchor_channels={BASE_CHANNELS} (the base image), got "
                         f"{anchor_channels}")


def base_image(vq: VQModel, z_q: torch.Tensor) -> torch.Tensor:
    """The CNN decoder's reconstruction of z_q (B, d, h, w) -> (B, 3, h*f, w*f) float32 in [-1, 1], no gradient."""
    with torch.no_grad():
        return vq.decode(z_q).float().clamp(-1, 1)


def to_residual(x0: torch.Tensor, base: torch.Tensor, scale: float) -> torch.Tensor:
    """Images and their base (B, 3, H, W) in [-1, 1] -> the residual the diffusion models, in units of `scale`."""
    return (x0 - base) / scale


def from_residual(r: torch.Tensor, base: torch.Tensor, scale: float) -> torch.Tensor:
    """The inverse of `to_residual`: a residual (B, 3, H, W) in units of `scale` -> images (not clamped)."""
    return base + scale * r


def unet_inputs(vq: VQModel, z_q: torch.Tensor, anchor: dict | None,
                conditional: bool = True) -> tuple[dict, torch.Tensor | None]:
    """The UNet's keyword inputs for the embeddings z_q (B, d, h, w) ({"cond": z_q} when `conditional`, plus
    {"anchor": base} when anchored), and the base image (B, 3, H, W) of an anchored decoder (else None): the
    diffusion's x_0 is then the residual, `from_residual(x_0, base, anchor["scale"])` the image."""
    kwargs = {"cond": z_q} if conditional else {}
    if anchor is None:
        return kwargs, None
    base = base_image(vq, z_q)
    return {**kwargs, "anchor": base}, base


def decode(model: Callable, diffusion_cfg: DiffusionConfig, vq: VQModel, z_q: torch.Tensor, shape: tuple,
           anchor: dict | None, conditional: bool = True, **how) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] sampled from `model` (a UNet or its engine wrapper) given z_q, anchored or
    not; `how`: the keyword arguments of `divae.diffusion.sample` (sampler, steps, seeds, device, ...)."""
    kwargs, base = unet_inputs(vq, z_q, anchor, conditional)
    x = sample(model, diffusion_cfg, shape, model_kwargs=kwargs or None,
               clip_denoised=False if base is not None else None, **how)
    return (x if base is None else from_residual(x, base, anchor["scale"])).clamp(-1, 1)
