"""Small models shared by the model and engine tests."""

from __future__ import annotations

import torch
import torch.nn as nn

from divae.unet import UNetConfig, UNetModel


def randomized(cfg: UNetConfig, seed: int = 0) -> UNetModel:
    """A UNet whose zero-initialised layers get small random weights, so every input reaches the output."""
    torch.manual_seed(seed)
    model = UNetModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    return model


def convnet() -> nn.Module:
    """A tiny conv net (with a GroupNorm), seeded: the module of the DeepSpeed engine tests."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 3, 1))
