"""Exponential moving average of the fp32 master weights, sharded like the optimizer state.

    ema = EMA(engine.module.inner, EMAConfig(decay=0.9999), engine=engine)
    ... after each optimizer step, on every rank: ema.update(step)
    ema.state_dict()  # collective: {param name: full fp32 tensor}, what the weights-only export writes

The average is taken of DeepSpeed's fp32 master weights, not of the module's bf16 copy: at lr 1e-4 an Adam
step is below one bf16 ulp of most weights, so the bf16 copy moves in stairs and an EMA of it has bf16
resolution (DiT and ADM average fp32 weights). Each rank keeps the EMA of the piece of the master weights its
optimizer holds (`master_fragments`): the whole model under ZeRO-0, 1/N of it under ZeRO-1/2/3, exactly as
the fp32 master weights and Adam moments. The update is one fused `torch._foreach_lerp_` over those pieces: no
gather, no Python loop over parameters. `state_dict()` assembles the full tensors (one all-reduce of the
flattened model, only at export and checkpoint time); `load_state_dict` takes full tensors (the checkpoint
format is unchanged) and keeps this rank's pieces, so a checkpoint resumes on any world size.

Without an engine (a plain module) the module's own parameters are the master weights (cast to fp32 if they
are not). Frozen parameters are not averaged: their current values are exported (gathered under ZeRO-3).
Buffers (e.g. BatchNorm statistics, an EMA codebook) are copied at each update, not averaged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
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


@dataclass
class Fragment:
    """This rank's piece of one trained parameter's fp32 master weights."""

    name: str  # the parameter's name in the model
    start: int  # index of the piece's first element in the flattened parameter
    master: torch.Tensor | None  # 1-D fp32 view of the optimizer's master weights; None: cast `param` each time
    param: nn.Parameter


def _unfused_masters(optimizer) -> dict[int, torch.Tensor]:
    """{id(bf16 parameter): its fp32 master} of DeepSpeed's FP16_UnfusedOptimizer (bf16 under ZeRO-0)."""
    groups = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if groups[0] is None or groups[1] is None:
        return {}
    return {id(lp): hp for lg, hg in zip(*groups) for lp, hp in zip(lg, hg)}


def _z3_fragment(name: str, p: nn.Parameter) -> Fragment | None:
    """ZeRO-3: the partition of `p` on this rank (partition r covers [r * size, (r + 1) * size) of the
    flattened parameter, the last one padded)."""
    local = p._z3_optimizer.get_local_fp32_param(p)
    group = getattr(p, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    start = rank * p.ds_tensor.ds_numel
    numel = max(0, min(p.ds_tensor.ds_numel, p.ds_numel - start))
    return Fragment(name, start, local.view(-1).narrow(0, 0, numel), p) if numel else None


def is_sharded(engine) -> bool:
    """True when `engine`'s optimizer partitions the master weights over the ranks (ZeRO >= 1; DeepSpeed's
    BF16_Optimizer, which bf16 ZeRO-1 uses)."""
    return engine is not None and (engine.zero_optimization_stage() >= 1
                                   or type(engine.optimizer).__name__ == "BF16_Optimizer")


def master_fragments(model: nn.Module, engine=None) -> list[Fragment]:
    """This rank's pieces of the fp32 master weights of `model`'s trained parameters. `engine`: the DeepSpeed
    engine training `model` (None: the module's own parameters are the master weights)."""
    opt = getattr(engine, "optimizer", None)
    unfused = _unfused_masters(opt)
    sharded = is_sharded(engine)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):
            frag = _z3_fragment(name, p)
        elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2, BF16_Optimizer: a slice of a flat partition
            m = p._hp_mapping
            frag = Fragment(name, m.lp_fragment_address.start, m.get_hp_fragment().view(-1), p)
        elif sharded:  # a partitioned optimizer holds no piece of this parameter on this rank
            frag = None
        elif id(p) in unfused:
            frag = Fragment(name, 0, unfused[id(p)].view(-1), p)
        elif engine is not None and p.dtype != torch.float32:
            raise RuntimeError(f"no fp32 master weights found for {name} ({type(opt).__name__})")
        else:
            frag = Fragment(name, 0, p.detach().view(-1) if p.dtype == torch.float32 else None, p)
        if frag is not None:
            out.append(frag)
    return out


def _full_shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


class EMA:
    """fp32 EMA of the master weights of `model`'s trained parameters (this rank's pieces), plus buffers."""

    def __init__(self, model: nn.Module, cfg: EMAConfig, engine=None):
        self.model, self.cfg, self.engine = model, cfg, engine
        self.num_updates = 0
        self.zero3 = engine is not None and engine.zero_optimization_stage() == 3
        self.fragments = master_fragments(model, engine)
        self.shadow = [s.detach().clone() for s in self._sources()]  # this rank's pieces, 1-D fp32
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = {n: _full_shape(p) for n, p in trained}  # full shapes, in model order
        self.frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        self.buffers = {n: (b.detach().float() if b.is_floating_point() else b.detach()).clone()
                        for n, b in model.named_buffers()}

    def _sources(self) -> list[torch.Tensor]:
        return [f.master if f.master is not None else f.param.detach().float().view(-1) for f in self.fragments]

    def decay_now(self) -> float:
        d = self.cfg.decay
        if self.cfg.warmup:
            d = min(d, (1 + self.num_updates) / (10 + self.num_updates))
        return d ** self.cfg.every

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step number `step` (1-based) on every rank (no collective)."""
        if step % self.cfg.every:
            return
        if self.shadow:
            torch._foreach_lerp_(self.shadow, self._sources(), 1.0 - self.decay_now())
        for n, b in self.model.named_buffers():
            self.buffers[n].copy_(b)
        self.num_updates += 1

    def _offsets(self) -> dict[str, int]:
        offsets, at = {}, 0
        for n, shape in self.shapes.items():
            offsets[n], at = at, at + shape.numel()
        return offsets

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 parameters and buffers as {name: tensor}, the keys of `model.state_dict()`. A collective
        when the EMA is sharded (every rank calls it): one all-reduce of the flattened trained parameters."""
        offsets = self._offsets()
        device = self.shadow[0].device if self.shadow else torch.device("cpu")
        flat = torch.zeros(sum(s.numel() for s in self.shapes.values()), dtype=torch.float32, device=device)
        for f, s in zip(self.fragments, self.shadow):
            flat.narrow(0, offsets[f.name] + f.start, s.numel()).copy_(s)
        if dist.is_initialized() and dist.get_world_size() > 1 and is_sharded(self.engine):
            dist.all_reduce(flat)  # every element lives on exactly one rank, zeros elsewhere
        out = {n: flat.narrow(0, offsets[n], shape.numel()).view(shape).clone() for n, shape in self.shapes.items()}
        with self._gathered_frozen():
            params = dict(self.model.named_parameters())
            out.update({n: params[n].detach().float().clone() for n in self.frozen})
        out.update(self.buffers)
        return out

    def _gathered_frozen(self):
        if self.zero3 and self.frozen:
            import deepspeed

            params = dict(self.model.named_parameters())
            return deepspeed.zero.GatheredParameters([params[n] for n in self.frozen], modifier_rank=None)
        return contextlib.nullcontext()

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """Load full tensors (a `state_dict()`, e.g. a checkpoint's ema_<engine>.safetensors, written on any
        world size); this rank keeps its pieces."""
        missing = (set(self.shapes) | set(self.frozen) | set(self.buffers)) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}... (the model changed since the checkpoint?)")
        for f, s in zip(self.fragments, self.shadow):
            s.copy_(state[f.name].reshape(-1).narrow(0, f.start, s.numel()))
        for n in self.buffers:
            self.buffers[n].copy_(state[n])
        self.num_updates = num_updates
