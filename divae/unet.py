"""The DiVAE decoder network: an ADM UNet (Improved DDPM / guided diffusion) that also sees z_q.

    cfg = UNET_PRESETS["decoder_f16"]
    unet = UNetModel(cfg)
    out = unet(x_t, t, cond=z_q)   # x_t (B, 3, H, W), t (B,) long, z_q (B, d, h, w) -> (B, 6, H, W)

Embedding injection (the paper's ablation, Tables 3 and 4): `cond_position` in {"encoder", "middle",
"decoder", "none"} x `cond_method` in {"concat", "add", "attention"}. "encoder" / "decoder" inject at the
first block of every encoder / decoder level, "middle" before the middle block (the paper's best, and
our default). z_q is layer-normalised per token, projected with a 1x1 conv and resampled to the
resolution where it enters (concat, add), or attended to as tokens (attention). The network is fully
convolutional: any H, W divisible by 2^(len(channel_mult) - 1) and any token grid work.

Precision: with `fp32_edges` (the default) the input conv, the timestep-embedding MLP and the output layer
(norm, SiLU, conv) run in float32 whatever the parameters' dtype and any autocast, as improved-diffusion
keeps them; the body runs in the dtype of its parameters (bf16 under a bf16 engine). At small t the noise in
x_t is a few bf16 ulps of x_0 (sqrt(1 - abar_0) = 0.01, while bf16 spaces values near 1 by 2^-7), so a bf16
input conv would see little of it, and the output conv predicts epsilon and v, whose errors the sampler
multiplies by up to sqrt(1/abar - 1) (~157 at t = T-1 under the linear schedule). Inputs may come in any
floating dtype: the model casts them where they enter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from divae.attention import AttnBackend
from divae.unet_blocks import (
    AttentionBlock,
    CondAdd,
    CondConcat,
    CrossAttentionBlock,
    Downsample,
    EdgeConv2d,
    EdgeGroupNorm,
    EdgeLinear,
    Fp32Edge,
    LowPrecisionGroupNorm,
    ResBlock,
    Upsample,
    norm_groups,
    timestep_embedding,
    zero_module,
)

CondPosition = Literal["encoder", "middle", "decoder", "none"]
CondMethod = Literal["concat", "add", "attention"]
COND_POSITIONS: tuple[str, ...] = get_args(CondPosition)
COND_METHODS: tuple[str, ...] = get_args(CondMethod)


@dataclass
class UNetConfig:
    """ADM UNet hyper-parameters plus the conditioning on z_q.

    image_size: training resolution; with it `attention_resolutions` (feature sizes at that resolution)
        become downsampling factors, which also hold for other input sizes.
    out_channels: channels predicted per pixel; the model outputs 2 * out_channels when learn_sigma
        (epsilon and the variance interpolation v).
    channel_mult: width multiplier per level; the middle block runs at image_size / 2^(levels-1).
    num_head_channels: channels per attention head (-1: use num_heads heads).
    cond_channels: d, channels of z_q.
    token_grid: tokens per side of the VQ's grid at image_size (image_size / the VQ's downsampling factor: 16 for
        f16 at 256 px). A description of the data, not of the network: the UNet never reads it (it resamples any
        z_q grid to where it enters, so other grids and aspect ratios decode, see the module doc). Read by the
        trainer, where no VQ is at hand: the planner's FLOP trace builds z_q of this size (trainer.flops.
        unet_parts) and picks the VQ preset of this grid before the VQ stage ran (tasks.decoder.vq_config_of),
        and the prior stage takes it as the grid the decoder file decodes (tasks.prior, against prior.image_h/w).
    cond_embed_channels: for concat, channels z_q is projected to; 0 = the feature width where it enters.
    use_checkpoint: activation checkpointing of every block (saves memory, costs one more forward).
    attn_backend: "auto" | "sdpa" | "xformers", see divae.attention.
    fp32_edges: run the input conv, the timestep MLP and the output layer in float32 (see the module doc).
    anchor_channels: extra input channels concatenated to x_t, `forward(..., anchor=...)`: the base image of an
        anchored decoder (divae.anchor; 3), 0 for none.
    bf16_norms: the blocks' GroupNorms run in the autocast dtype with float32 statistics
        (unet_blocks.LowPrecisionGroupNorm) instead of CUDA autocast's float32; off by default.
    """

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    num_head_channels: int = 16
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    learn_sigma: bool = True
    cond_channels: int = 8
    token_grid: int = 8
    cond_position: CondPosition = "middle"
    cond_method: CondMethod = "concat"
    cond_embed_channels: int = 0
    use_checkpoint: bool = False
    attn_backend: AttnBackend = "auto"
    fp32_edges: bool = True
    bf16_norms: bool = False
    anchor_channels: int = 0

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if self.cond_position not in COND_POSITIONS:
            raise ValueError(f"cond_position {self.cond_position!r} not in {COND_POSITIONS}")
        if self.cond_method not in COND_METHODS:
            raise ValueError(f"cond_method {self.cond_method!r} not in {COND_METHODS}")
        if self.anchor_channels < 0:
            raise ValueError(f"anchor_channels must be >= 0, got {self.anchor_channels}")
        if not self.channel_mult or self.num_res_blocks < 1 or self.model_channels < 1:
            raise ValueError("channel_mult must be non-empty, num_res_blocks and model_channels >= 1")
        for r in self.attention_resolutions:
            if r < 1 or self.image_size % r:
                raise ValueError(f"attention resolution {r} does not divide image_size {self.image_size}")

    @property
    def downsample_factor(self) -> int:
        """Input side / middle-block side."""
        return 2 ** (len(self.channel_mult) - 1)


class UNetStage(nn.ModuleList):
    """A sequence of layers called with what each needs: ResBlocks get emb, injectors get cond."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, (CondConcat, CondAdd, CrossAttentionBlock)):
                x = layer(x, cond)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ADM UNet: forward(x (B, in, H, W), t (B,) long, cond (B, d, h, w) | None, anchor (B, anchor_channels, H, W)
    | None) -> (B, out[*2], H, W)."""

    casts_own_inputs = True  # takes inputs in any float dtype (a wrapper must not pre-cast x_t to bf16)

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_ch = cfg.model_channels, self._emb_channels()
        self.time_embed = nn.Sequential(EdgeLinear(mc, emb_ch), nn.SiLU(), EdgeLinear(emb_ch, emb_ch))
        self.input_blocks, skip_chs, ch = self._build_encoder()
        self.middle_block = self._build_middle(ch)
        self.output_blocks, ch = self._build_decoder(ch, skip_chs)
        out_ch = cfg.out_channels * (2 if cfg.learn_sigma else 1)
        self.out = nn.Sequential(EdgeGroupNorm(norm_groups(ch), ch), nn.SiLU(),
                                 zero_module(EdgeConv2d(ch, out_ch, 3, padding=1)))
        self.set_fp32_edges(cfg.fp32_edges)
        for m in self.modules():
            if isinstance(m, LowPrecisionGroupNorm):
                m.low_precision = cfg.bf16_norms

    # -- construction (modules are created in forward order, so a seed gives the same initial weights) ----------
    def _emb_channels(self) -> int:
        """Width of the timestep embedding every ResBlock receives: 4 * model_channels (ADM)."""
        return 4 * self.cfg.model_channels

    def _res_kwargs(self) -> dict:
        return dict(dropout=self.cfg.dropout, use_scale_shift_norm=self.cfg.use_scale_shift_norm)

    def _head_kwargs(self) -> dict:
        cfg = self.cfg
        return dict(num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels, backend=cfg.attn_backend)

    def _attention_factors(self) -> set[int]:
        """Downsampling factors (input side / feature side) with self-attention: attention_resolutions, given
        as feature sides at image_size, hold for any input size as factors."""
        return {self.cfg.image_size // r for r in self.cfg.attention_resolutions}

    def _inject_before(self, where: str, first: bool, ch: int) -> tuple[list[nn.Module], int]:
        """Injection layers placed before a stage's ResBlock (concat, add), and the channels they add."""
        cfg = self.cfg
        if cfg.cond_position != where or not first:
            return [], 0
        if cfg.cond_method == "concat":
            extra = cfg.cond_embed_channels or ch
            return [CondConcat(cfg.cond_channels, extra)], extra
        if cfg.cond_method == "add":
            return [CondAdd(cfg.cond_channels, ch)], 0
        return [], 0

    def _inject_after(self, where: str, first: bool, ch: int) -> list[nn.Module]:
        """Injection layers placed after a stage's ResBlock (cross-attention to the tokens)."""
        cfg = self.cfg
        if cfg.cond_position == where and first and cfg.cond_method == "attention":
            return [CrossAttentionBlock(ch, cfg.cond_channels, **self._head_kwargs())]
        return []

    def _res_stage(self, where: str, first: bool, in_ch: int, out_ch: int, attn: bool) -> list[nn.Module]:
        """Injection before, a ResBlock, attention at the listed resolutions, injection after."""
        layers, extra = self._inject_before(where, first, in_ch)
        layers.append(ResBlock(in_ch + extra, self._emb_channels(), out_ch, **self._res_kwargs()))
        if attn:
            layers.append(AttentionBlock(out_ch, **self._head_kwargs()))
        return layers + self._inject_after(where, first, out_ch)

    def _build_encoder(self) -> tuple[nn.ModuleList, list[int], int]:
        """(input blocks, the channels of each skip connection they leave, the width at the bottom): the input
        conv, then per level num_res_blocks stages and (but at the last level) a downsampling stage."""
        cfg, mc, attn_ds = self.cfg, self.cfg.model_channels, self._attention_factors()
        blocks = nn.ModuleList([UNetStage([EdgeConv2d(cfg.in_channels + cfg.anchor_channels, mc, 3, padding=1)])])
        skip_chs, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for i in range(cfg.num_res_blocks):
                blocks.append(UNetStage(self._res_stage("encoder", i == 0, ch, mult * mc, ds in attn_ds)))
                ch = mult * mc
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = (ResBlock(ch, self._emb_channels(), ch, down=True, **self._res_kwargs())
                        if cfg.resblock_updown else Downsample(ch))
                blocks.append(UNetStage([down]))
                skip_chs.append(ch)
                ds *= 2
        return blocks, skip_chs, ch

    def _build_middle(self, ch: int) -> UNetStage:
        """The middle block at the bottom width `ch`: [injection,] ResBlock, attention, [injection,] ResBlock."""
        emb_ch, res = self._emb_channels(), self._res_kwargs()
        layers, extra = self._inject_before("middle", True, ch)
        layers += [ResBlock(ch + extra, emb_ch, ch, **res), AttentionBlock(ch, **self._head_kwargs())]
        layers += self._inject_after("middle", True, ch)
        layers.append(ResBlock(ch, emb_ch, ch, **res))
        return UNetStage(layers)

    def _build_decoder(self, ch: int, skip_chs: list[int]) -> tuple[nn.ModuleList, int]:
        """(output blocks, the width at the top): per level num_res_blocks + 1 stages, each taking one skip
        connection (popped from `skip_chs`, consumed), the last one upsampling (but at the top level)."""
        cfg, mc, attn_ds = self.cfg, self.cfg.model_channels, self._attention_factors()
        blocks, ds = nn.ModuleList(), cfg.downsample_factor
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = self._res_stage("decoder", i == 0, ch + skip_chs.pop(), mult * mc, ds in attn_ds)
                ch = mult * mc
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, self._emb_channels(), ch, up=True, **self._res_kwargs())
                                  if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                blocks.append(UNetStage(layers))
        return blocks, ch

    @property
    def conditional(self) -> bool:
        return self.cfg.cond_position != "none"

    def _run(self, stage: UNetStage, h: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None):
        if self.cfg.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, cond, use_reentrant=False)
        return stage(h, emb, cond)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                      anchor: torch.Tensor | None) -> None:
        cfg = self.cfg
        if cfg.anchor_channels and (anchor is None or anchor.shape != (x.shape[0], cfg.anchor_channels, *x.shape[2:])):
            raise ValueError(f"this UNet takes anchor (B, {cfg.anchor_channels}, H, W) beside x "
                             f"{tuple(x.shape)}, got {None if anchor is None else tuple(anchor.shape)}")
        if not cfg.anchor_channels and anchor is not None:
            raise ValueError("this UNet has anchor_channels=0; do not pass anchor")
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        f = cfg.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"H and W must be multiples of {f} (2^(levels-1)), got {tuple(x.shape[2:])}; "
                             "pad or crop the input")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        if self.conditional:
            if cond is None:
                raise ValueError(f"this UNet is conditioned ({cfg.cond_position}/{cfg.cond_method}): pass "
                                 "cond=z_q of shape (B, cond_channels, h, w)")
            if cond.dim() != 4 or cond.shape[0] != x.shape[0] or cond.shape[1] != cfg.cond_channels:
                raise ValueError(f"cond must be (B={x.shape[0]}, cond_channels={cfg.cond_channels}, h, w), "
                                 f"got {tuple(cond.shape)}")
        elif cond is not None:
            raise ValueError("this UNet is unconditional (cond_position='none'); do not pass cond")

    def set_fp32_edges(self, flag: bool) -> None:
        """Switch the edge layers between float32 and the body's dtype (no weights change). The layers' flag is
        the state; `cfg` (possibly a shared preset) is only read at construction."""
        for m in self.modules():
            if isinstance(m, Fp32Edge):
                m.fp32 = flag

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                anchor: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, H, W), t (B,) timesteps, cond z_q (B, d, h, w), anchor (B, anchor_channels, H, W)
        (concatenated to x) -> (B, out[*2], H, W) float32 (the body's dtype without `fp32_edges`)."""
        self._check_inputs(x, t, cond, anchor)
        if anchor is not None:
            x = torch.cat([x, anchor.to(x.dtype)], dim=1)
        body_dtype = next(self.middle_block.parameters()).dtype
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels)).to(body_dtype)
        if cond is not None:
            cond = cond.to(body_dtype)
        conv_in = self.input_blocks[0][0]
        h = conv_in(x if conv_in.fp32 else x.to(body_dtype)).to(body_dtype)
        hs = [h]
        for stage in self.input_blocks[1:]:
            h = self._run(stage, h, emb, cond)
            hs.append(h)
        h = self._run(self.middle_block, h, emb, cond)
        for stage in self.output_blocks:
            h = self._run(stage, torch.cat([h, hs.pop()], dim=1), emb, cond)
        return self.out(h)


_TINY = UNetConfig()
UNET_PRESETS: dict[str, UNetConfig] = {
    # 64x64 images, 8x8 tokens (f8): middle block at 8x8. Trains on CPU in well under a second a step.
    "tiny": _TINY,
    # 64x64 images, 16x16 tokens (f4): middle block at 16x16.
    "tiny_f4": replace(_TINY, channel_mult=(1, 2, 4), attention_resolutions=(16,), token_grid=16),
    # A mid-size model for benchmarks and small real runs: 128x128 images, 16x16 tokens.
    "small_f8": UNetConfig(
        image_size=128, model_channels=64, channel_mult=(1, 1, 2, 4), num_res_blocks=2,
        attention_resolutions=(32, 16), num_head_channels=64, cond_channels=64, token_grid=16,
    ),
    # Paper scale, 256x256 with 16x16 tokens (f16): middle block at 16x16.
    "decoder_f16": UNetConfig(
        image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
        attention_resolutions=(32, 16), num_head_channels=64, cond_channels=256, token_grid=16,
    ),
    # Paper scale, 256x256 with 32x32 tokens (f8): middle block at 32x32.
    "decoder_f8": UNetConfig(
        image_size=256, model_channels=256, channel_mult=(1, 1, 2, 4), num_res_blocks=2,
        attention_resolutions=(32,), num_head_channels=64, cond_channels=256, token_grid=32,
    ),
}
