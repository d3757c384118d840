"""VQ stage of DiVAE: VQGAN-family encoder, codebook quantizer and CNN decoder.

Images are float (B, 3, H, W) in [-1, 1]; H and W must be multiples of f = 2^(len(ch_mult) - 1).
Tokens are (B, H/f, W/f) code indices; z_q is (B, embed_dim, H/f, W/f).

`python -m divae.vq` prints the parameter counts of the presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from divae.quantizer import QuantizerConfig, VectorQuantizer
from divae.utils.params import count_parameters
from divae.vq_blocks import MidBlock, VQDownsample, VQStage, VQUpsample, group_norm


@dataclass
class VQConfig:
    resolution: int = 256  # nominal image size; only used to place attention (attn_resolutions)
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    dropout: float = 0.0
    norm_groups: int = 32
    n_embed: int = 16384  # K, number of codes
    embed_dim: int = 256  # d, code dimension
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    grad_checkpointing: bool = False  # recompute each stage in backward to save activation memory

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


VQ_PRESETS: dict[str, VQConfig] = {
    # taming-transformers ImageNet f16 VQGAN (16x16 tokens at 256 px)
    "vq_f16": VQConfig(),
    # f8 (32x32 tokens at 256 px), K = 8192; as vq_f16 otherwise, attention at the 32x32 token grid
    "vq_f8": VQConfig(ch_mult=(1, 2, 2, 4), attn_resolutions=(32,), n_embed=8192),
    # CPU presets for 64x64 images
    "tiny": VQConfig(resolution=64, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(8,),
                     z_channels=32, norm_groups=8, n_embed=256, embed_dim=32),
    "tiny_f4": VQConfig(resolution=64, ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(),
                        z_channels=32, norm_groups=8, n_embed=256, embed_dim=32),
}


def _run(module: nn.Module, x: torch.Tensor, ckpt: bool) -> torch.Tensor:
    if ckpt and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        g, mults = cfg.norm_groups, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, c_in = cfg.resolution, cfg.ch
        self.stages = nn.ModuleList()
        for i, m in enumerate(mults):
            c_out = cfg.ch * m
            last = i == len(mults) - 1
            self.stages.append(VQStage(c_in, c_out, cfg.num_res_blocks, res in cfg.attn_resolutions, cfg.dropout, g,
                                       None if last else VQDownsample(c_out)))
            c_in = c_out
            res = res if last else res // 2
        self.mid = MidBlock(c_in, cfg.dropout, g)
        self.norm_out = group_norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.stages:
            h = _run(stage, h, self.cfg.grad_checkpointing)
        h = _run(self.mid, h, self.cfg.grad_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h*f, w*f); mirror of the encoder with one extra block per level."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        g, mults = cfg.norm_groups, cfg.ch_mult
        c_in = cfg.ch * mults[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = MidBlock(c_in, cfg.dropout, g)
        self.stages = nn.ModuleList()
        for i in reversed(range(len(mults))):
            c_out = cfg.ch * mults[i]
            self.stages.append(VQStage(c_in, c_out, cfg.num_res_blocks + 1, res in cfg.attn_resolutions, cfg.dropout,
                                       g, VQUpsample(c_out) if i > 0 else None))
            c_in = c_out
            res = res * 2 if i > 0 else res
        self.norm_out = group_norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = _run(self.mid, h, self.cfg.grad_checkpointing)
        for stage in self.stages:
            h = _run(stage, h, self.cfg.grad_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    """Encoder -> 1x1 conv to embed_dim -> codebook -> 1x1 conv to z_channels -> CNN decoder."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        if not cfg.ch_mult:
            raise ValueError("ch_mult must have at least one entry")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantizer = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.quantizer)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def _check_image(self, x: torch.Tensor) -> None:
        f = self.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected images (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {tuple(x.shape[2:])} must be a multiple of the downsampling factor {f}; "
                             "resize or crop the input")

    def encode_pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> continuous z_e (B, embed_dim, H/f, W/f)."""
        self._check_image(x)
        return self.quant_conv(self.encoder(x))

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Images -> (z_q (B, d, h, w) with straight-through gradients, indices (B, h, w), loss, stats)."""
        return self.quantizer(self.encode_pre_quant(x))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> token indices (B, H/f, W/f), LongTensor."""
        return self.quantizer.encode(self.encode_pre_quant(x))

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Token indices (B, h, w) -> z_q (B, embed_dim, h, w), in the dtype of the decoder's weights."""
        return self.quantizer.embed(indices).to(self.post_quant_conv.weight.dtype)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, embed_dim, h, w) -> reconstruction (B, 3, h*f, w*f), nominally in [-1, 1] (not clamped)."""
        if z_q.dim() != 4 or z_q.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"expected z_q (B, {self.cfg.embed_dim}, h, w), got {tuple(z_q.shape)}")
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Images -> (reconstruction (B, 3, H, W), quantizer loss (scalar), stats dict)."""
        z_q, _, qloss, stats = self.quantize(x)
        return self.decode(z_q), qloss, stats

    def last_layer(self) -> nn.Conv2d:
        """The decoder's last conv: where the VQGAN adaptive GAN weight is measured (`vq_loss.LastLayerTap`)."""
        return self.decoder.conv_out


def param_counts(cfg: VQConfig) -> dict[str, int]:
    """Parameter counts of a config (built on the meta device: no memory, instant)."""
    with torch.device("meta"):
        m = VQModel(replace(cfg))
    # an EMA codebook is a buffer, not a parameter, but it is still part of the model
    codebook = count_parameters(m.quantizer) + (m.quantizer.codebook.numel() if cfg.quantizer.use_ema else 0)
    enc = count_parameters(m.encoder) + count_parameters(m.quant_conv)
    dec = count_parameters(m.decoder) + count_parameters(m.post_quant_conv)
    return {"encoder": enc, "codebook": codebook, "decoder": dec, "total": enc + codebook + dec}


def main() -> None:
    print(f"{'preset':<10} {'f':>3} {'K':>6} {'d':>4} {'encoder':>12} {'codebook':>10} {'decoder':>12} {'total':>12}")
    for name, cfg in VQ_PRESETS.items():
        c = param_counts(cfg)
        print(f"{name:<10} {cfg.downsample_factor:>3} {cfg.n_embed:>6} {cfg.embed_dim:>4} {c['encoder']:>12,} "
              f"{c['codebook']:>10,} {c['decoder']:>12,} {c['total']:>12,}")


if __name__ == "__main__":
    main()
