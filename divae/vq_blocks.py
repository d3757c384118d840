"""Convolutional building blocks of the VQGAN-family encoder and decoder (GroupNorm + SiLU ResNet blocks,
single-head spatial self-attention, 2x down/up-sampling).

Names carry a `VQ` prefix where the UNet (divae/unet_blocks.py, divae/unet.py) has a block of the same role
but other arithmetic: `VQDownsample` pads (0, 1, 0, 1) as taming's VQGAN does (weights load from its
checkpoints), the UNet's `Downsample` pads 1 on every side as ADM does."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from divae.attention import attention


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be divisible by norm_groups ({groups})")
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """(B, c_in, H, W) -> (B, c_out, H, W): norm-SiLU-conv twice with a residual (1x1 conv if c_in != c_out)."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual. (B, C, H, W) -> same."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C)
        a = attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)  # SDPA, one head
        return x + self.proj(a.transpose(1, 2).reshape(b, c, h, w))


class VQDownsample(nn.Module):
    """Stride-2 3x3 conv with (0, 1, 0, 1) padding: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VQUpsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQStage(nn.Module):
    """ResNet blocks, each optionally followed by attention, then an optional resampler."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, attn: bool, dropout: float, groups: int,
                 resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            [ResnetBlock(c_in if i == 0 else c_out, c_out, dropout, groups) for i in range(n_blocks)])
        self.attns = nn.ModuleList([AttnBlock(c_out, groups) if attn else nn.Identity() for _ in range(n_blocks)])
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, attn in zip(self.blocks, self.attns):
            x = attn(block(x))
        return self.resample(x)


class MidBlock(nn.Module):
    """ResNet - attention - ResNet at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn = AttnBlock(channels, groups)
        self.block2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attn(self.block1(x)))
