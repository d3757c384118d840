"""Building blocks of the ADM UNet (Improved DDPM / guided-diffusion semantics) and its conditioning.

Feature maps are (B, C, H, W); `emb` is the timestep embedding (B, E); `cond` is the quantized image
embedding z_q (B, d, h, w). Every block works for any H, W (no fixed size), and with channels-last input.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from divae.attention import attention


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps (int or float) -> (B, dim) float32, [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_2d(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """2-D sin/cos position code on normalised coordinates ((i + 0.5) / h, (j + 0.5) / w) -> (h*w, dim).

    Normalised coordinates make a 16x16 token grid and a 64x64 feature map agree on where a token is, so
    cross-attention can align features with tokens at any resolution or aspect ratio.
    """
    n = max(dim // 4, 1)
    # frequencies pi .. 256 pi: the finest resolves 1/256 of the image side
    freqs = math.pi * 256.0 ** (torch.arange(n, device=device, dtype=torch.float32) / max(n - 1, 1))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    ay, ax = gy.reshape(-1, 1) * freqs, gx.reshape(-1, 1) * freqs
    emb = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])) if emb.shape[1] < dim else emb[:, :dim]


def norm_groups(ch: int, max_groups: int = 32) -> int:
    """The largest group count <= 32 that divides ch (32 for the usual widths)."""
    return math.gcd(ch, max_groups)


def normalization(ch: int) -> nn.GroupNorm:
    return LowPrecisionGroupNorm(norm_groups(ch), ch)


class LowPrecisionGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state dict) that, with `low_precision` set (UNetConfig.bf16_norms),
    runs in the autocast dtype: (B, C, H, W) bf16 in, bf16 out, the per-group mean and variance accumulated in
    float32 inside the native kernel (CPU and CUDA). CUDA autocast otherwise runs group_norm in float32 (its
    fp32 op list): an fp32 copy of the input, an fp32 output that the next layer casts back, twice the bytes
    of the norm-SiLU pair. Measured against the float32 norm of the same bf16 input and bf16 weights
    (tests/test_low_precision_norm.py, 4x256x32x32, mean 4x the spread): 0.17% relative error, the same as rounding
    that float32 output to bf16 (what the next bf16 layer does anyway); statistics in bf16 would give 0.71%.
    Without autocast, or in float32, it is the plain GroupNorm."""

    low_precision: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        if not self.low_precision or dtype == torch.float32:
            return super().forward(x)
        w, b = (p.to(dtype) if p is not None else None for p in (self.weight, self.bias))
        with torch.autocast(kind, enabled=False):
            return F.group_norm(x.to(dtype), self.num_groups, w, b, self.eps)


class Fp32Edge:
    """Mixin of the UNet's edge layers: with `fp32` set they run in float32 whatever the dtype of their
    parameters and any autocast around them (the parameters are upcast inside forward, after a ZeRO-3 hook has
    gathered them, and gradients flow back in the parameters' own dtype); without it they are the plain layer."""

    fp32: bool = True

    def _fp32_call(self, fn, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return fn(x.float(), *(p.float() if p is not None else None for p in (self.weight, self.bias)))


class EdgeConv2d(Fp32Edge, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fp32_call(self._conv_forward, x) if self.fp32 else super().forward(x)


class EdgeLinear(Fp32Edge, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fp32_call(F.linear, x) if self.fp32 else super().forward(x)


class EdgeGroupNorm(Fp32Edge, nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp32:
            return super().forward(x)
        return self._fp32_call(lambda h, w, b: F.group_norm(h, self.num_groups, w, b, self.eps), x)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of a module (the last layer of residual branches) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each position of a (B, C, H, W) map."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.LayerNorm(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a (B, C, h, w) map to size (H, W): nearest copies when enlarging (each token covers its
    patch), area averaging when shrinking, bilinear when one side grows and the other shrinks."""
    h, w = x.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return x
    if H >= h and W >= w:
        return F.interpolate(x, size=size, mode="nearest-exact")
    if H <= h and W <= w:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Upsample(nn.Module):
    """x2 nearest upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int, out_ch: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """x2 downsampling by a strided 3x3 conv, padding 1 on every side (ADM; the VQ's VQDownsample pads (0, 1, 0, 1))."""

    def __init__(self, ch: int, out_ch: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(ch, out_ch or ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResBlock(nn.Module):
    """Residual block with AdaGN: out_norm(h) * (1 + scale(emb)) + shift(emb) when use_scale_shift_norm.

    up / down: BigGAN-style resampling inside the block (nearest x2 / average pool x2, applied to both the
    residual branch and the skip). The last conv is zero-initialised, so a new block is the identity.
    """

    def __init__(self, ch: int, emb_ch: int, out_ch: int | None = None, *, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, up: bool = False, down: bool = False):
        super().__init__()
        out_ch = out_ch or ch
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = normalization(ch)
        self.in_conv = nn.Conv2d(ch, out_ch, 3, padding=1)
        self.up, self.down = up, down
        self.emb_proj = nn.Linear(emb_ch, 2 * out_ch if use_scale_shift_norm else out_ch)
        self.out_norm = normalization(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _heads(ch: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels > 0:
        if ch % num_head_channels:
            raise ValueError(f"{ch} channels are not divisible by num_head_channels={num_head_channels}")
        return ch // num_head_channels
    if ch % num_heads:
        raise ValueError(f"{ch} channels are not divisible by num_heads={num_heads}")
    return num_heads


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised output projection."""

    def __init__(self, ch: int, *, num_heads: int = 1, num_head_channels: int = -1, backend: str = "auto"):
        super().__init__()
        self.heads = _heads(ch, num_heads, num_head_channels)
        self.backend = backend
        self.norm = normalization(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = zero_module(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(tokens).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, backend=self.backend)  # (B, heads, L, hd)
        out = self.proj(out.transpose(1, 2).reshape(b, -1, c))
        return x + out.transpose(1, 2).reshape(b, c, hh, ww)


class CrossAttentionBlock(nn.Module):
    """Cross-attention from feature positions (queries) to the embedding tokens z_q (keys, values).

    Both sides get a 2-D position code on normalised coordinates, so a feature attends to the tokens at
    its own location first, at any feature or token resolution. Zero-initialised output projection.
    """

    def __init__(self, ch: int, cond_ch: int, *, num_heads: int = 1, num_head_channels: int = -1,
                 backend: str = "auto"):
        super().__init__()
        self.heads = _heads(ch, num_heads, num_head_channels)
        self.backend = backend
        self.norm = normalization(ch)
        self.cond_norm = nn.LayerNorm(cond_ch)
        self.cond_in = nn.Linear(cond_ch, ch)
        self.q = nn.Linear(ch, ch)
        self.kv = nn.Linear(ch, 2 * ch)
        self.proj = zero_module(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        _, d, h, w = cond.shape
        hd = c // self.heads
        tokens = self.norm(x).flatten(2).transpose(1, 2) + sincos_2d(hh, ww, c, x.device).to(x.dtype)
        ctx = self.cond_in(self.cond_norm(cond.flatten(2).transpose(1, 2)))
        ctx = ctx + sincos_2d(h, w, c, x.device).to(ctx.dtype)
        q = self.q(tokens).reshape(b, -1, self.heads, hd).transpose(1, 2)
        k, v = self.kv(ctx).reshape(b, -1, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        out = attention(q, k.to(q.dtype), v.to(q.dtype), backend=self.backend)
        out = self.proj(out.transpose(1, 2).reshape(b, -1, c))
        return x + out.transpose(1, 2).reshape(b, c, hh, ww)


class CondProjector(nn.Module):
    """z_q (B, d, h, w) -> LayerNorm per token -> 1x1 conv to out_ch -> resampled to the feature size."""

    def __init__(self, cond_ch: int, out_ch: int):
        super().__init__()
        self.norm = ChannelLayerNorm(cond_ch)
        self.proj = nn.Conv2d(cond_ch, out_ch, 1)

    def forward(self, cond: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize_to(self.proj(self.norm(cond)), size)


class CondConcat(nn.Module):
    """Concatenate the projected embedding to the features: (B, C, H, W) -> (B, C + out_ch, H, W)."""

    def __init__(self, cond_ch: int, out_ch: int):
        super().__init__()
        self.out_ch = out_ch
        self.project = CondProjector(cond_ch, out_ch)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.project(cond, x.shape[-2:]).to(x.dtype)], dim=1)


class CondAdd(nn.Module):
    """Add the projected embedding to the features (same channel count)."""

    def __init__(self, cond_ch: int, ch: int):
        super().__init__()
        self.project = CondProjector(cond_ch, ch)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x + self.project(cond, x.shape[-2:]).to(x.dtype)
