"""DeepSpeed engine construction: ZeRO stage, bf16 with fp32 gradient accumulation, clipping, accumulation,
AdamW with linear warm-up then constant or cosine learning rate.

On CPU the optimizer is a client `torch.optim.AdamW` (DeepSpeed's FusedAdam is a CUDA kernel that would
be JIT-compiled for nothing); on CUDA DeepSpeed's fused AdamW. The learning-rate schedule is a client
`LambdaLR` stepped by the engine at every optimizer step and saved in its checkpoints.

Every engine wraps its module in `CastIO`: floating inputs are cast to the engine's compute dtype (bf16)
unless the module says it casts them itself (`casts_own_inputs = True`, e.g. the diffusion decoder, whose
UNet keeps x_t in float32 for its input conv), the forward runs under autocast (models make fp32 tensors
inside, e.g. timestep embeddings), and floating outputs come back as fp32, so that tasks compute losses in
fp32 whatever the precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from divae.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (per optimizer step, not per micro-batch)."""

    lr: float = 1e-4  # peak learning rate (paper: 1e-4)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 1000  # linear warm-up from lr/warmup_steps to lr (paper: 1000)
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed runs the models."""

    zero_stage: int = 2  # 0-3
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16: bf16 weights/activations, fp32 master + grad accum
    activation_checkpointing: bool = False  # recompute activations in backward (sets the models' switch)
    reduce_bucket_size: int = 50_000_000  # elements; ZeRO communication bucket
    overlap_comm: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr for the update that follows `step` completed optimizer steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


class CastIO(nn.Module):
    """Runs `inner` in the dtype of its parameters, taking and returning fp32 tensors.

    `inner` is the real model (its parameters are DeepSpeed-managed); reach it as `engine.module.inner`.
    Its floating inputs are cast to that dtype first, unless `inner.casts_own_inputs` is true.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        p = next(self.inner.parameters(), None)
        dtype = p.dtype if p is not None else torch.float32
        if dtype == torch.float32:
            return self.inner(*args, **kwargs)
        # autocast too: models create fp32 tensors inside (timestep embeddings, norms) that meet bf16 weights
        if not getattr(self.inner, "casts_own_inputs", False):
            args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
        with torch.autocast(p.device.type, dtype=dtype):
            out = self.inner(*args, **kwargs)
        return _cast(out, torch.float32)


def ds_config(ds: DeepSpeedConfig, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float,
              optim: OptimConfig, use_cuda: bool) -> dict:
    """The DeepSpeed JSON config for one engine."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size,
                              "overlap_comm": ds.overlap_comm},
        "checkpoint": {"tag_validation": "FAIL"},
    }
    if ds.zero_stage == 3:
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    if ds.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
        # DeepSpeed 0.19 has no ZeRO-0 path with bf16 weights and fp32 accumulation (it raises); there
        # gradients accumulate in bf16, fine for a few micro-batches.
        cfg["data_types"] = {"grad_accum_dtype": "fp32" if ds.zero_stage > 0 else "bf16"}
    if use_cuda:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas),
                                                        "eps": optim.eps, "weight_decay": optim.weight_decay}}
    return cfg


def build_engine(module: nn.Module, ds: DeepSpeedConfig, optim: OptimConfig, *, micro_batch: int,
                 grad_accum: int, world_size: int, grad_clip: float, total_steps: int):
    """Wrap `module` (its trainable parameters) in a DeepSpeed engine with AdamW and the lr schedule.

    Returns the engine; `engine.module.inner` is `module` (cast to the compute dtype by DeepSpeed).
    """
    import deepspeed

    use_cuda = torch.cuda.is_available()
    if ds.zero_stage == 0 and ds.precision == "bf16" and grad_accum > 1:
        log.warning("zero_stage 0 with bf16 accumulates gradients in bf16; use zero_stage >= 1 for fp32 "
                    "accumulation over %d micro-batches", grad_accum)
    config = ds_config(ds, micro_batch, grad_accum, world_size, grad_clip, optim, use_cuda)
    if ds.precision == "bf16" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        # batch_norm wants its running statistics in the dtype of its weight (e.g. the PatchGAN's BN layers)
        config["data_types"]["buffer_dtype"] = "bf16"
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    optimizer = None
    if not use_cuda:
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                      weight_decay=optim.weight_decay)

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, optim, total_steps))

    engine, *_ = deepspeed.initialize(model=CastIO(module), model_parameters=params, optimizer=optimizer,
                                      lr_scheduler=schedule, config=config)
    return engine


def engine_lr(engine) -> float:
    return float(engine.get_lr()[0])


def grad_norm(engine) -> float:
    n = engine.get_global_grad_norm()
    if n is None:
        return float("nan")
    return float(n.item() if isinstance(n, torch.Tensor) else n)
