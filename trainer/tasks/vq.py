"""VQ stage: encoder + codebook + CNN decoder (the "generator") and a PatchGAN discriminator, two engines.

Per micro-batch: the generator phase computes L1 (+ LPIPS) + codebook loss and, from `vq_loss.disc_start`
on, the adaptive-weighted GAN term, with the discriminator's parameters frozen so that its gradients stay
clean; the discriminator phase then trains on the (detached) reconstruction of the same batch. Before
disc_start the discriminator phase is skipped (no forward, no optimizer step). Codebook usage and
perplexity are logged. The export is a VQ-only DiVAE file, the input of the decoder stage.

`vq_task.train: decoder` trains only the CNN decoder (post_quant_conv + decoder) on the frozen tokens of the VQ
export named by `checkpoint.init_from`: the encoder, quant_conv and codebook keep that file's values (the
quantizer stays in eval mode: no EMA update, k-means or restart). This is the fair baseline of the diffusion
decoder: the same tokens, its own loss family (taming's L1 + LPIPS, GAN optional) and the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from divae.model import DiVAE, read_pretrained
from divae.utils.config import ConfigError
from divae.utils.params import count_parameters, sub_state
from divae.vq import VQModel
from divae.vq_loss import LastLayerTap, VQLoss
from trainer.flops import vq_parts, vq_train_flops
from trainer.tasks.base import COMMON_SECTIONS, Task, detached


@dataclass
class VQTaskConfig:
    train: Literal["all", "decoder"] = "all"  # "decoder": only the CNN decoder, on init_from's frozen tokens


class VQTask(Task):
    config_sections = (*COMMON_SECTIONS, "vq", "vq_loss", "vq_task")
    phases = ("generator", "discriminator")
    ema_phases = ("generator",)
    max_zero_stage = 2  # the adaptive weight differentiates w.r.t. the full last-layer weight

    @classmethod
    def sample_flops(cls, cfg, vq_cfg=None, forward: bool = True) -> dict[str, float]:
        return {"train": float(vq_train_flops(cfg)), "forward": 0.0, "tokens": 0.0}

    @classmethod
    def traced_parts(cls, cfg, checkpointing: bool, batch: int):
        return vq_parts(replace(cfg, vq=replace(cfg.vq, grad_checkpointing=checkpointing)), batch)

    @classmethod
    def param_counts(cls, cfg, vq_cfg=None) -> tuple[int, int]:
        """Trained: the VQ and the discriminator; frozen: LPIPS (when the perceptual term is on)."""
        from divae.lpips import LPIPS
        from divae.vq_loss import PatchDiscriminator

        lc = cfg.vq_loss
        disc = PatchDiscriminator(lc.disc_in_channels, lc.disc_ndf, lc.disc_n_layers, lc.disc_norm)
        lp = count_parameters(LPIPS(pretrained=False)) if lc.perceptual_weight > 0 else 0
        return count_parameters(VQModel(cfg.vq)) + count_parameters(disc), lp

    def build_models(self) -> dict[str, torch.nn.Module]:
        cfg = self.cfg
        vq_cfg = cfg.vq
        q = vq_cfg.quantizer
        if not q.use_ema and (q.kmeans_init or q.restart_after_steps > 0):
            # These options write the codebook in place; a DeepSpeed engine keeps its own (fp32, partitioned)
            # master copy of every trained parameter and would overwrite those edits at the next step.
            raise ConfigError(
                "vq.quantizer.kmeans_init / restart_after_steps edit the codebook in place, which the DeepSpeed "
                "optimizer's master weights would silently undo; set vq.quantizer.use_ema=true (the codebook is "
                "then a buffer updated by EMA) or turn kmeans_init and restart_after_steps off")
        if cfg.deepspeed.activation_checkpointing:
            vq_cfg = type(vq_cfg)(**{**vq_cfg.__dict__, "grad_checkpointing": True})
        self.vq_cfg = vq_cfg
        vq = VQModel(vq_cfg)
        self.decoder_only = cfg.vq_task.train == "decoder"
        if self.decoder_only:
            if not cfg.checkpoint.init_from:
                raise ConfigError("vq_task.train=decoder trains a CNN decoder on a VQ's frozen tokens: set "
                                  "checkpoint.init_from to that VQ's export (e.g. runs/demo/vq/divae.safetensors)")
            for m in (vq.encoder, vq.quant_conv, vq.quantizer):
                m.requires_grad_(False)
        self.loss_fn = VQLoss(cfg.vq_loss).to(self.device)
        disc = self.loss_fn.discriminator
        return {"generator": vq, "discriminator": disc}

    def attach(self, engines: dict) -> None:
        super().attach(engines)
        # VQLoss calls self.discriminator(...): route it through the engine's dtype-casting wrapper.
        self.loss_fn.discriminator = engines["discriminator"].module
        self._x_hat: torch.Tensor | None = None
        self.tap = LastLayerTap(self.inner("generator").last_layer())

    def _disc_requires_grad(self, flag: bool) -> None:
        for p in self.inner("discriminator").parameters():
            p.requires_grad_(flag)

    def loss(self, batch: dict, phase: str, step: int):
        x = self.images(batch)
        gan_on = self.loss_fn.gan_active(step)
        if self.decoder_only:
            self.inner("generator").quantizer.eval()  # frozen tokens: the engine's train() must not wake it
        if phase == "generator":
            self._disc_requires_grad(False)
            try:
                # the CastIO module, not the engine: engine.forward hooks its outputs so that any backward
                # through them (also the adaptive weight's autograd.grad) would start a gradient reduction
                x_hat, qloss, stats = self.engines["generator"].module(x)
                loss, logs = self.loss_fn.generator_loss(x, x_hat, qloss, step, self.tap)
            finally:
                self._disc_requires_grad(True)
                self.tap.clear()
            self._x_hat = x_hat.detach()
            metrics = detached(logs)  # on the device: the loop reads them once per step
            metrics.update(detached({"usage": stats["usage"], "perplexity": stats["perplexity"],
                                     "gan_on": float(gan_on)}))
            metrics.setdefault("g_loss", 0.0)
            return loss, metrics
        if not gan_on:
            return None
        d_loss, logs = self.loss_fn.discriminator_loss(x, self._x_hat, step)
        self._x_hat = None
        return d_loss, {f"d/{k}": v for k, v in detached(logs).items()}

    @torch.no_grad()
    def sample(self, batch: dict) -> dict[str, torch.Tensor]:
        x = self.images(batch)
        model = self.engines["generator"].module
        model.eval()  # no codebook statistics or restarts from a sampling batch
        try:
            x_hat, _, _ = model(x)
        finally:
            model.train()
            self.tap.clear()
        return {"input": x, "reconstruction": x_hat.clamp(-1, 1)}

    def export(self, path: str, weights: dict[str, dict[str, torch.Tensor]], info: dict | None = None) -> None:
        model = DiVAE(self.vq_cfg)
        model.vq.load_state_dict(weights["generator"])
        model.save_pretrained(path, info)

    def init_from(self, path: str, models: dict[str, torch.nn.Module]) -> None:
        _, state = read_pretrained(path)
        models["generator"].load_state_dict(sub_state(state, "vq"))
