"""Exponential moving average of the trained weights, kept in fp32 on every rank.

    ema = EMA(engine.module.inner, EMAConfig(decay=0.9999), zero_stage=2)
    ... after each optimizer step: ema.update(step)
    ema.state_dict()  # {param name: fp32 tensor}, what the weights-only export writes

Under ZeRO <= 2 every rank holds the full (bf16 or fp32) weights, so the EMA reads them directly. Under
ZeRO-3 the weights are partitioned; the update gathers them (`deepspeed.zero.GatheredParameters`, a
collective every rank runs) before averaging. That costs one all-gather of the model per update, so
`ema.every` can thin it out. Buffers (e.g. BatchNorm statistics, an EMA codebook) are copied, not averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999  # ADM practice
    # decay_n = min(decay, (1 + n) / (10 + n)) for the n-th update: the EMA then averages over ~n/9 steps until
    # it reaches `decay`, so it never holds much of the initial weights (trainer.config.check_ema_horizon)
    warmup: bool = True
    every: int = 1  # update every N optimizer steps (with decay**N)

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0 or self.every < 1:
            raise ValueError(f"need 0 <= decay < 1 and every >= 1, got decay={self.decay}, every={self.every}")


class EMA:
    """fp32 shadow copy of `model`'s parameters (and buffers)."""

    def __init__(self, model: nn.Module, cfg: EMAConfig, zero_stage: int = 0):
        self.model, self.cfg, self.zero3 = model, cfg, zero_stage == 3
        self.num_updates = 0
        with self._gathered():
            self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}
            self.buffers = {n: (b.detach().float() if b.is_floating_point() else b.detach()).clone()
                            for n, b in model.named_buffers()}

    def _gathered(self):
        if self.zero3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        return torch.no_grad()

    def decay_now(self) -> float:
        d = self.cfg.decay
        if self.cfg.warmup:
            d = min(d, (1 + self.num_updates) / (10 + self.num_updates))
        return d ** self.cfg.every

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step number `step` (1-based) on every rank."""
        if step % self.cfg.every:
            return
        d = self.decay_now()
        with self._gathered(), torch.no_grad():
            for n, p in self.model.named_parameters():
                self.shadow[n].lerp_(p.detach().float(), 1.0 - d)
            for n, b in self.model.named_buffers():
                self.buffers[n].copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers as {name: tensor}, the same keys as `model.state_dict()`."""
        out = dict(self.shadow)
        out.update(self.buffers)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = (set(self.shadow) | set(self.buffers)) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}... (the model changed since the checkpoint?)")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])
        for n in self.buffers:
            self.buffers[n].copy_(state[n])
        self.num_updates = num_updates
