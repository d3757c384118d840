"""Distillation stage: a student UNet learns to decode tokens in 1 or 2 network evaluations.

The teacher is a decoder-stage export (`distill.teacher`, a DiVAE file with a UNet); the student starts as a copy
of its UNet, and the VQ (encoder, codebook) is the teacher's, frozen. Per micro-batch, for each image:

    x_T ~ N(0, I)                                   (the trainer's RNG: checkpointed, so a resume is bitwise)
    target = teacher sample from x_T                (distill.teacher_sampler, distill.teacher_steps; no grad)
    x_hat  = student DDIM from x_T over distill.student_timesteps   (1 or 2 UNet calls, with gradient)
    loss   = teacher_weight * MSE(x_hat, target) + data_weight * MSE(x_hat, x_0)
             + perceptual_weight * LPIPS(x_hat, x_0)

The teacher's deterministic sampler (DDIM eta = 0 or DPM-Solver++) defines a map noise -> image; regressing the
student onto it is the one-step knowledge distillation of Luhman & Luhman (2021), with two steps the unrolled form
of progressive distillation's last stages (Salimans & Ho 2022). The data terms are what SSDD and epsilon-VAE add:
the student may then leave the teacher's blur behind where the teacher has it. Intermediate x_0 estimates are
clipped as the sampler clips them (`diffusion.clip_denoised`), the final one is not (its gradient is kept).

The student's `unet` and `diffusion` sections must equal the teacher's (checked against the file at build time; a
config sets them with `_base_:` on the teacher's config). The export records the student's sampler (DDIM over
`student_timesteps`) in its metadata (`divae.model.SAMPLING_KEY`): `DiVAE.decode_tokens`, `evaluation.recon_fid`,
`evaluation.t2i_fid` and `divae.generate` use it unless told otherwise.

Logged: loss, teacher_mse, data_mse, lpips (when on). Sample grids: input, teacher, student.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn

from divae.diffusion import create_diffusion, sample
from divae.diffusion.samplers import SamplerName
from divae.lpips import LPIPS
from divae.model import DiVAE, read_pretrained
from divae.unet import UNetConfig, UNetModel
from divae.utils.config import from_dict, to_dict
from divae.utils.params import sub_state
from divae.vq import VQConfig, VQModel
from trainer.flops import unet_parts
from trainer.tasks.base import COMMON_SECTIONS, Task
from trainer.tasks.decoder import DecoderNet, token_embeddings, unet_param_counts, unet_stage_flops, vq_config_of


@dataclass
class DistillTaskConfig:
    teacher: str = ""  # decoder-stage export (required)
    tokens: Literal["encode", "precomputed"] = "encode"  # as decoder.tokens
    teacher_sampler: SamplerName = "dpmpp2m"  # deterministic: ddim (eta 0) or dpmpp2m; ddpm draws its own noise
    teacher_steps: int = 20
    student_timesteps: list[int] = field(default_factory=lambda: [999])  # training timesteps the student runs at
    teacher_weight: float = 1.0  # MSE to the teacher's sample
    data_weight: float = 0.0  # MSE to the image
    perceptual_weight: float = 0.0  # LPIPS to the image
    perceptual_images: int = 0  # images per micro-batch LPIPS sees; 0 = all
    lpips_path: str | None = None

    def __post_init__(self):
        if not 1 <= len(self.student_timesteps) <= 4:
            raise ValueError(f"distill.student_timesteps={self.student_timesteps}: give 1 to 4 timesteps "
                             "(e.g. [999] for one step, [499, 999] for two)")
        if sorted(set(self.student_timesteps)) != sorted(self.student_timesteps) or min(self.student_timesteps) < 0:
            raise ValueError(f"distill.student_timesteps={self.student_timesteps}: distinct timesteps >= 0")
        if self.teacher_steps < 1:
            raise ValueError("distill.teacher_steps must be >= 1")
        if min(self.teacher_weight, self.data_weight, self.perceptual_weight, self.perceptual_images) < 0:
            raise ValueError("distill weights and perceptual_images must be >= 0")
        if self.teacher_weight + self.data_weight + self.perceptual_weight == 0:
            raise ValueError("distill: every loss weight is 0; set teacher_weight, data_weight or perceptual_weight")

    @property
    def sampling(self) -> dict:
        """What the export records as its default sampler (`divae.model.SAMPLING_KEY`)."""
        return {"sampler": "ddim", "timesteps": sorted(self.student_timesteps),
                "distilled_from": f"{self.teacher_sampler}:{self.teacher_steps}"}


def _check_same(name: str, teacher: dict, student: dict, path: str) -> None:
    keys = (teacher.keys() | student.keys()) - {"use_checkpoint"}
    diff = sorted(k for k in keys if teacher.get(k) != student.get(k))
    if diff:
        k = diff[0]
        raise ValueError(f"{name}.{k}={student.get(k)!r} but the teacher {path} has {teacher.get(k)!r} (differing: "
                         f"{diff}): the student is a copy of the teacher; base the config on the teacher's")


class DistillTask(Task):
    config_sections = (*COMMON_SECTIONS, "unet", "diffusion", "distill")
    phases = ("model",)
    ema_phases = ("model",)

    @classmethod
    def required_files(cls, cfg) -> list[tuple[str, str, str]]:
        return [("distill.teacher", cfg.distill.teacher,
                 "a decoder-stage export (e.g. distill.teacher=runs/demo/decoder/divae.safetensors)")]

    @classmethod
    def frozen_vq_config(cls, cfg) -> VQConfig | None:
        return vq_config_of(cfg.distill.teacher, cfg.unet)

    @classmethod
    def sample_flops(cls, cfg, vq_cfg=None, forward: bool = True) -> dict[str, float]:
        """The student's chained calls (each call's activations kept for the one backward) and the teacher's
        sampler, one UNet forward per step."""
        d = cfg.distill
        return unet_stage_flops(cfg, vq_cfg, len(d.student_timesteps), d.teacher_steps, d.tokens == "encode", False,
                                forward)

    @classmethod
    def traced_parts(cls, cfg, checkpointing: bool, batch: int):
        return unet_parts(replace(cfg.unet, use_checkpoint=checkpointing), batch, len(cfg.distill.student_timesteps))

    @classmethod
    def param_counts(cls, cfg, vq_cfg=None) -> tuple[int, int]:
        return unet_param_counts(cfg, vq_cfg, 1)  # frozen: the VQ and the teacher (the student's twin)

    def build_models(self) -> dict[str, nn.Module]:
        cfg, dcfg = self.cfg, self.cfg.distill
        self.check_required(cfg)
        file_cfg, state = read_pretrained(dcfg.teacher)
        if not file_cfg.get("unet"):
            raise ValueError(f"{dcfg.teacher} holds no UNet (a VQ-stage export?): distill.teacher needs a decoder "
                             "export")
        if file_cfg.get("anchor"):
            raise ValueError(f"{dcfg.teacher} is an anchored decoder (divae/anchor.py); distilling one is not "
                             "supported yet: distill.teacher needs a decoder trained with decoder.anchor=false")
        _check_same("unet", file_cfg["unet"], to_dict(cfg.unet), dcfg.teacher)
        _check_same("diffusion", file_cfg["diffusion"], to_dict(cfg.diffusion), dcfg.teacher)
        if max(dcfg.student_timesteps) >= cfg.diffusion.timesteps:
            raise ValueError(f"distill.student_timesteps={dcfg.student_timesteps}: timesteps run 0.."
                             f"{cfg.diffusion.timesteps - 1}")
        if dcfg.tokens == "precomputed" and cfg.data.random_flip:
            raise ValueError("distill.tokens=precomputed needs data.random_flip=false")
        self.vq_cfg = from_dict(VQConfig, file_cfg["vq"])
        self.vq_state = sub_state(state, "vq")
        unet_state = sub_state(state, "unet")
        self.unet_cfg = replace(cfg.unet, use_checkpoint=cfg.deepspeed.activation_checkpointing)
        self.frozen_vq = VQModel(self.vq_cfg)
        self.frozen_vq.load_state_dict(self.vq_state)
        self.frozen_vq.requires_grad_(False).eval().to(self.device)
        self.teacher = UNetModel(from_dict(UNetConfig, file_cfg["unet"]))
        self.teacher.load_state_dict(unet_state)
        self.teacher.requires_grad_(False).eval().to(self.device)
        self.student_diffusion = create_diffusion(cfg.diffusion, sorted(dcfg.student_timesteps))
        self.lpips = None
        if dcfg.perceptual_weight > 0:
            self.lpips = LPIPS(dcfg.lpips_path).to(self.device).requires_grad_(False).eval()
        student = UNetModel(self.unet_cfg)
        student.load_state_dict(unet_state)
        return {"model": DecoderNet(student)}

    def init_from(self, path: str, models: dict[str, nn.Module]) -> None:
        _, state = read_pretrained(path)
        models["model"].unet.load_state_dict(sub_state(state, "unet"))

    def _bf16(self) -> bool:
        return next(self.engines["model"].module.parameters()).dtype == torch.bfloat16

    @torch.no_grad()
    def teacher_sample(self, x_T: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The teacher's image from x_T (B, 3, H, W) given z_q, under the engine's autocast; float32."""
        dcfg = self.cfg.distill
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16()):
            x = sample(self.teacher, self.cfg.diffusion, tuple(x_T.shape), sampler=dcfg.teacher_sampler,
                       steps=dcfg.teacher_steps, model_kwargs={"cond": cond}, device=self.device, x_T=x_T)
        return x.float()

    def student_decode(self, net, x_T: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """DDIM (eta 0) over the student's timesteps from x_T, differentiable; the last x_0 estimate unclipped."""
        diffusion = self.student_diffusion
        model = diffusion.wrap_model(net)
        x = x_T
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            clip = self.cfg.diffusion.clip_denoised and i > 0
            x, _ = diffusion.ddim_sample(model, x, t, torch.zeros_like(x), clip_denoised=clip,
                                         model_kwargs={"cond": cond})
        return x.float()

    def loss(self, batch: dict, phase: str, step: int):
        dcfg = self.cfg.distill
        x0 = self.images(batch)
        cond = token_embeddings(self.frozen_vq, batch, x0, dcfg.tokens, self.cfg.data.image_size)
        x_T = torch.randn_like(x0)
        target = self.teacher_sample(x_T, cond)
        x_hat = self.student_decode(self.engines["model"], x_T, cond)
        teacher_mse = (x_hat - target).square().mean()
        data_mse = (x_hat - x0).square().mean()
        loss = dcfg.teacher_weight * teacher_mse + dcfg.data_weight * data_mse
        metrics = {"teacher_mse": teacher_mse.detach(), "data_mse": data_mse.detach()}
        if self.lpips is not None:
            k = dcfg.perceptual_images or x0.shape[0]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16()):
                d = self.lpips(x0[:k].contiguous(), x_hat[:k].contiguous()).float().mean()
            loss = loss + dcfg.perceptual_weight * d
            metrics["lpips"] = d.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics

    @torch.no_grad()
    def sample(self, batch: dict) -> dict[str, torch.Tensor]:
        x0 = self.images(batch)
        cond = token_embeddings(self.frozen_vq, batch, x0, self.cfg.distill.tokens, self.cfg.data.image_size)
        net = self.engines["model"].module
        gen = torch.Generator(device="cpu").manual_seed(0)
        x_T = torch.randn(x0.shape, generator=gen).to(self.device)
        net.eval()
        student = self.student_decode(net, x_T, cond)
        net.train()
        return {"input": x0, "teacher": self.teacher_sample(x_T, cond).clamp(-1, 1), "student": student.clamp(-1, 1)}

    def export(self, path: str, weights: dict[str, dict[str, torch.Tensor]], info: dict | None = None) -> None:
        model = DiVAE(self.vq_cfg, self.unet_cfg, self.cfg.diffusion, sampling=self.cfg.distill.sampling)
        model.vq.load_state_dict(self.vq_state)
        model.unet.load_state_dict(sub_state(weights["model"], "unet"))
        model.save_pretrained(path, info)
