"""DeepSpeed engine construction: ZeRO stage, bf16 with fp32 gradient accumulation, clipping, accumulation,
AdamW with linear warm-up then constant or cosine learning rate.

One optimizer path on every device: a client `torch.optim.AdamW`, `fused=True` when its parameters are on
CUDA (a kernel shipped in the torch wheel). DeepSpeed's own FusedAdam is never used: it is JIT-compiled with
nvcc + ninja on first use (pip CUDA wheels ship no nvcc, and 8-16 ranks compiling into one extensions folder
is a known hang), and the CPU tests would not cover it. The learning-rate schedule is a client `LambdaLR`
stepped by the engine at every optimizer step and saved in its checkpoints.

GPU throughput switches (`DeepSpeedConfig`, applied by `configure_backends`, no-ops on CPU): TF32 matmul and
cuDNN convolutions and `cudnn.benchmark` on by default; `channels_last` and `compile` (torch.compile of the
model's forward, state-dict keys unchanged) off by default; ZeRO's `overlap_comm` on for ZeRO-2/3 on CUDA;
`grad_comm_dtype` fp32 by default (gradients reduced in the fp32 accumulation dtype, as torchtitan's and
Megatron's defaults; "bf16" halves the bytes at the cost of a lossy sum over many ranks).

Gradient reduction dtype: `ds_config` always writes DeepSpeed's `communication_data_type` (`reduction_dtype`):
left out, DeepSpeed reduces in the model's dtype, bf16 (its engines report `communication_data_type=bfloat16`
under ZeRO-1 and ZeRO-2). The trade-off, measured on CPU (1M N(0, 1e-3) bf16 gradients per rank, the mean
against the exact one): a bf16 ring sum, rounded at each of the N-1 hops, is off by 0.37% (relative L2) on 8
ranks, 0.50% on 16, 0.96% on 64; an fp32 sum rounded once to bf16 by 0.17% whatever N. fp32 sends twice the
bytes of bf16.

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
    overlap_comm: bool | None = None  # None: on for ZeRO >= 2 on CUDA (comm overlaps backward), off on CPU
    grad_comm_dtype: Literal["fp32", "bf16"] | None = None  # gradient reduction dtype; None: fp32 (`reduction_dtype`)
    tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls and cuDNN convolutions (the fp32 edges)
    cudnn_benchmark: bool = True  # CUDA: autotune convolution algorithms (fixed shapes in training)
    channels_last: bool = False  # NHWC image inputs (convs then run NHWC): faster convs on tensor cores
    compile: bool = False  # torch.compile the model's forward (minutes of compile time at start)
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_comm_dtype not in (None, "fp32", "bf16"):
            raise ValueError(f"grad_comm_dtype must be fp32, bf16 or null, got {self.grad_comm_dtype!r}")


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


def _channels_last(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_channels_last(v) for v in x)
    if isinstance(x, dict):
        return {k: _channels_last(v) for k, v in x.items()}
    return x


class CastIO(nn.Module):
    """Runs `inner` in the dtype of its parameters, taking and returning fp32 tensors.

    `inner` is the real model (its parameters are DeepSpeed-managed); reach it as `engine.module.inner`.
    Its floating inputs are cast to that dtype first, unless `inner.casts_own_inputs` is true. With
    `channels_last`, 4-D floating inputs are made NHWC: every convolution then runs NHWC (its output keeps the
    input's layout). The weights keep their layout: DeepSpeed broadcasts and flattens parameters as
    contiguous tensors (a channels_last weight fails its start-up broadcast).
    """

    def __init__(self, inner: nn.Module, channels_last: bool = False):
        super().__init__()
        self.inner = inner
        self.channels_last = channels_last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.channels_last:
            args, kwargs = _channels_last(args), _channels_last(kwargs)
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


def reduction_dtype(ds: DeepSpeedConfig) -> Literal["fp32", "bf16"]:
    """The dtype gradients are reduced (all-reduced / reduce-scattered) in across ranks: `grad_comm_dtype`,
    fp32 when unset; always fp32 for fp32 training (bf16 reduction of fp32 gradients is not offered)."""
    if ds.precision == "fp32":
        return "fp32"
    return ds.grad_comm_dtype or "fp32"


def ds_config(ds: DeepSpeedConfig, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float,
              optim: OptimConfig, use_cuda: bool) -> dict:
    """The DeepSpeed JSON config for one engine. Never an "optimizer" section: the client AdamW is the one
    optimizer on every device (see the module docstring); `use_cuda` only sets the communication defaults."""
    overlap = ds.overlap_comm if ds.overlap_comm is not None else (use_cuda and ds.zero_stage >= 2)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size,
                              "overlap_comm": overlap},
        "checkpoint": {"tag_validation": "FAIL"},
    }
    if ds.zero_stage == 3:
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
        # DeepSpeed's "memory-efficient" linear replaces torch.nn.functional.linear for the whole process, for
        # good: every later nn.Linear (LPIPS, evaluation, the planner's traces) then saves its fp32 input under
        # autocast instead of the bf16 cast, the opposite of memory-efficient.
        cfg["zero_optimization"]["memory_efficient_linear"] = False
    if ds.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
        # DeepSpeed 0.19 has no ZeRO-0 path with bf16 weights and fp32 accumulation (it raises); there
        # gradients accumulate in bf16, fine for a few micro-batches.
        cfg["data_types"] = {"grad_accum_dtype": "fp32" if ds.zero_stage > 0 else "bf16"}
    cfg["communication_data_type"] = reduction_dtype(ds)  # explicit: DeepSpeed's default is the model's dtype
    return cfg


def adamw_kwargs(optim: OptimConfig, on_cuda: bool) -> dict[str, Any]:
    """Keyword arguments of the client `torch.optim.AdamW` (fused kernel when the parameters are on CUDA)."""
    kw: dict[str, Any] = {"lr": optim.lr, "betas": optim.betas, "eps": optim.eps, "weight_decay": optim.weight_decay}
    if on_cuda:
        kw["fused"] = True
    return kw


def configure_backends(ds: DeepSpeedConfig, use_cuda: bool) -> None:
    """Process-wide CUDA math switches from `ds` (TF32, cudnn.benchmark); nothing on CPU."""
    if not use_cuda:
        return
    torch.backends.cuda.matmul.allow_tf32 = ds.tf32
    torch.backends.cudnn.allow_tf32 = ds.tf32
    torch.backends.cudnn.benchmark = ds.cudnn_benchmark


def client_optimizer(engine) -> torch.optim.Optimizer:
    """The client optimizer inside a DeepSpeed engine (below ZeRO's or bf16's wrapper, if any)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.AdamW) and getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    return opt


def build_engine(module: nn.Module, ds: DeepSpeedConfig, optim: OptimConfig, *, micro_batch: int,
                 grad_accum: int, world_size: int, grad_clip: float, total_steps: int):
    """Wrap `module` (its trainable parameters) in a DeepSpeed engine with AdamW and the lr schedule.

    Returns the engine; `engine.module.inner` is `module` (cast to the compute dtype by DeepSpeed).
    """
    import deepspeed

    use_cuda = torch.cuda.is_available()
    configure_backends(ds, use_cuda)
    if ds.zero_stage == 0 and ds.precision == "bf16" and grad_accum > 1:
        log.warning("zero_stage 0 with bf16 accumulates gradients in bf16; use zero_stage >= 1 for fp32 "
                    "accumulation over %d micro-batches", grad_accum)
    config = ds_config(ds, micro_batch, grad_accum, world_size, grad_clip, optim, use_cuda)
    if ds.precision == "bf16" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        # batch_norm wants its running statistics in the dtype of its weight (e.g. the PatchGAN's BN layers)
        config["data_types"]["buffer_dtype"] = "bf16"
    if use_cuda:  # DeepSpeed would move it later; the fused AdamW wants its parameters on CUDA when built
        module.to(torch.device("cuda", torch.cuda.current_device()))
    if ds.compile:
        module.compile(mode=ds.compile_mode)  # in place: parameter names and checkpoints are unchanged
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    optimizer = torch.optim.AdamW(params, **adamw_kwargs(optim, all(p.is_cuda for p in params)))

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, optim, total_steps))

    engine, *_ = deepspeed.initialize(model=CastIO(module, ds.channels_last), model_parameters=params,
                                      optimizer=optimizer, lr_scheduler=schedule, config=config)
    return engine


def engine_lr(engine) -> float:
    return float(engine.get_lr()[0])


def grad_norm(engine) -> float:
    n = engine.get_global_grad_norm()
    if n is None:
        return float("nan")
    return float(n.item() if isinstance(n, torch.Tensor) else n)
