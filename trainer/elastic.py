"""Elastic resume: a checkpoint written by N ranks continues on M ranks (M < N, M > N, M = 1).

Design (chosen over DeepSpeed's universal checkpoints): every checkpoint of a ZeRO-1/2 engine also holds a
world-size-free copy of its optimizer, `elastic_<engine>.safetensors`, written by rank 0 at save time:

    fp32.<param name>        full fp32 master weight            (the parameter's shape)
    exp_avg.<param name>     full AdamW first moment            (the parameter's shape)
    exp_avg_sq.<param name>  full AdamW second moment           (the parameter's shape)
    metadata "elastic"       JSON: AdamW step, the param groups' lr, the LambdaLR state, the engine's
                             global_steps / global_samples / skipped_steps, the ZeRO stage and DP world size

The full tensors are gathered with DeepSpeed's public tensor-fragment API (`safe_get_full_fp32_param`,
`safe_get_full_optimizer_state`: one all-reduce per parameter and state) and restored on the new world with
the matching setters after the engine was built for M ranks, so DeepSpeed itself re-partitions them. Why not
`ds_to_universal`: it is an offline conversion of every old rank's shard files (a step the relaunch would need
before it can start), written for Megatron layouts, and only tested with fp16/bf16 wrappers on GPU; the
gather-at-save form is plain tensors by name, exact (copies of fp32, no arithmetic), checked bitwise on CPU
with gloo, and readable without unpickling. Its cost: +12 bytes per trainable parameter per checkpoint on
rank 0's disk, and 3 all-reduces of each parameter's size per save. `python -m trainer.checkpoint_tool convert`
writes the same file for a checkpoint saved without it (it needs the N ranks that wrote it, once).

Covered: ZeRO-1 (DeepSpeed's BF16_Optimizer under bf16) and ZeRO-2 (its ZeRO optimizer) through this file;
ZeRO-0 needs nothing (DeepSpeed keeps its unpartitioned optimizer state in one world-size-free file).
ZeRO-3 is refused: its parameters themselves are partitioned, and DeepSpeed 0.19's ZeRO-3 universal path
was not cleanly usable with a client optimizer; relaunch with the same N.

What else carries over on a change of world size (see train.py and docs/reliability.md "Elastic resume"): model,
EMA (rank 0's full copy), step, samples seen, the lr schedule, the MDS data position (mosaicml-streaming's
elastic resume with the run's fixed `num_canonical_nodes`), the global batch (the micro-batch is kept,
accumulation recomputed). Not carried: the per-rank RNG streams (re-derived from seed, step and rank:
reproducible, not equal to the N-rank run), a webdataset position (refused).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from divae.utils.config import ConfigError
from divae.utils.logging import get_logger
from divae.weights_file import WeightsFileError, metadata_json, read_metadata

if TYPE_CHECKING:
    from trainer.config import TrainConfig

log = get_logger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from (a runtime error: exit 1). Defined here, the lowest of
    the checkpoint modules, so that `trainer.checkpoint` (which re-exports it) imports this module one way."""


MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("fp32", *MOMENTS)


def elastic_file(folder: Path, engine_name: str) -> Path:
    return Path(folder) / f"elastic_{engine_name}.safetensors"


def supported(engine) -> bool:
    """Whether `engine` keeps fp32 master weights in ZeRO partitions that this module gathers (ZeRO-1/2)."""
    return any(hasattr(p, "_hp_mapping") for p in engine.module.parameters()) and not any(
        hasattr(p, "ds_id") for p in engine.module.parameters())


def _named(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _base(engine):
    from trainer.engine import client_optimizer

    return client_optimizer(engine)


def _link_moments(engine) -> None:
    """Point each parameter's fragment at this rank's AdamW moments (DeepSpeed does it lazily at its first
    step; a freshly loaded engine has not stepped). Private DeepSpeed API, tested with 0.19."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is None:
        import deepspeed

        raise CheckpointError(f"DeepSpeed {deepspeed.__version__}'s {type(engine.optimizer).__name__} cannot link "
                              "the optimizer state to the parameters (elastic resume is tested with DeepSpeed 0.19)")
    engine.optimizer._hp_optimizer_states_linked = False
    link()


def _opt_step(base) -> float:
    steps = [float(s["step"]) for s in base.state.values() if "step" in s]
    return steps[0] if steps else 0.0


def gather(engine, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Collective (every rank of the engine's data-parallel group): the engine's full fp32 master weights and
    AdamW moments by parameter name (fp32 CPU tensors; empty where `keep` is false: only the writer holds the
    whole model) and the scalar state."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _base(engine)
    linked = bool(base.state)  # no optimizer step yet: AdamW has no moments (they start at zero)
    if linked:
        _link_moments(engine)
    tensors = {}
    for name, p in _named(engine):
        full = {"fp32": safe_get_full_fp32_param(p)}
        for key in MOMENTS:
            full[key] = safe_get_full_optimizer_state(p, key) if linked else torch.zeros(p.shape)
        if keep:
            tensors.update({f"{k}.{name}": v.detach().float().cpu().clone() for k, v in full.items()})
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None  # JSON-able (LambdaLR)
    info = {"optimizer_step": _opt_step(base), "lr": [g["lr"] for g in base.param_groups],
            "lr_scheduler": sched, "global_steps": int(engine.global_steps),
            "global_samples": int(engine.global_samples), "skipped_steps": int(engine.skipped_steps),
            "zero_stage": int(engine.zero_optimization_stage()), "dp_world_size": int(engine.dp_world_size)}
    return tensors, info


def write(path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"elastic": json.dumps(info)})


def read_info(path: Path) -> dict[str, Any]:
    """The elastic info (metadata `elastic`) of a world-size-free optimizer file, with divae.weights_file's one-line
    errors for a missing, foreign or damaged file."""
    fix = "rewrite it with `python -m trainer.checkpoint_tool convert <checkpoint>` (with the ranks that wrote it)"
    info = metadata_json(path, read_metadata(path, "elastic optimizer file", fix), "elastic")
    if not isinstance(info, dict):
        raise WeightsFileError(f"{path} has no `elastic` metadata: it is not a world-size-free optimizer file; {fix}")
    return info


def restore(engine, folder: Path, engine_name: str) -> dict[str, Any]:
    """Collective: load checkpoint `folder`'s state of `engine_name` into `engine`, built for any world size.
    Module weights and buffers come from DeepSpeed's (world-size-free) module file, the fp32 master weights,
    moments and scalars from the elastic file. Returns the elastic info."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors import safe_open

    path = elastic_file(folder, engine_name)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint cannot resume on another number of ranks (run "
                              f"`python -m trainer.checkpoint_tool convert {folder}` with the ranks that wrote it)")
    load_path, _ = engine.load_checkpoint(str(folder), tag=engine_name, load_module_only=True,
                                          load_optimizer_states=False, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the module of {folder / engine_name}")
    info = read_info(path)
    base = _base(engine)
    for group, lr in zip(base.param_groups, info["lr"]):
        group["lr"] = lr
        for flat in group["params"]:  # AdamW's state of this rank's flat partition, as its first step makes it
            on_device = group.get("fused") or group.get("capturable")
            base.state[flat] = {
                "step": torch.tensor(info["optimizer_step"], dtype=torch.float32,
                                     device=flat.device if on_device else "cpu"),
                **{k: torch.zeros_like(flat, memory_format=torch.preserve_format) for k in MOMENTS}}
    _link_moments(engine)
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        for name, p in _named(engine):
            missing = [f"{k}.{name}" for k in KEYS if f"{k}.{name}" not in names]
            if missing:
                raise CheckpointError(f"{path} has no {missing[0]}: was it written by another model?")
            safe_set_full_fp32_param(p, f.get_tensor(f"fp32.{name}").to(p.device))
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, f.get_tensor(f"{key}.{name}").to(p.device), key)
    if engine.lr_scheduler is not None and info["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(info["lr_scheduler"])
    engine.global_steps, engine.global_samples = info["global_steps"], info["global_samples"]
    engine.skipped_steps = info["skipped_steps"]
    return info


# -- batch, RNG, data ---------------------------------------------------------------------------------------
MAX_GLOBAL_BATCH = 1 << 24  # samples per optimizer step: far above any run, low enough that the loops below are short
MAX_LISTED_RANKS = 4096  # the rank counts listed as ways to resume


def rank_counts(global_batch: int, limit: int = MAX_LISTED_RANKS) -> list[int]:
    """The rank counts up to `limit` that divide `global_batch` (a bounded loop whatever the number)."""
    return [n for n in range(1, min(global_batch, limit) + 1) if global_batch % n == 0]


def batch_split(global_batch: int, micro: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation) that keep `global_batch` on `world_size` ranks: the largest micro-batch
    <= `micro` (what fit in memory) with global_batch = micro x accumulation x world_size. A ConfigError that
    lists the rank counts that work when there is none."""
    if not all(type(v) is int and 1 <= v <= MAX_GLOBAL_BATCH for v in (global_batch, micro, world_size)):
        raise ConfigError(f"global batch {global_batch!r}, micro-batch {micro!r} and world size {world_size!r} must "
                          f"be integers in [1, {MAX_GLOBAL_BATCH}] (a damaged or hand-edited trainer_state.json?)")
    if global_batch % world_size == 0:
        for m in range(min(micro, global_batch // world_size), 0, -1):
            if global_batch % (m * world_size) == 0:
                return m, global_batch // (m * world_size)
    ok = rank_counts(global_batch)
    works = ", ".join(map(str, ok[:12])) + (", ..." if len(ok) > 12 else "")
    raise ConfigError(f"train.batch_size={global_batch} (the run's global batch) cannot be split over {world_size} "
                      f"rank(s) (rank counts that can: {works}); relaunch with one of those, or start a new run with "
                      f"checkpoint.init_from")


def rank_seed(seed: int, step: int, rank: int, world_size: int) -> int:
    """The seed of rank `rank`'s randomness (noise, timesteps) after an elastic resume at `step`: a function of
    (seed, step, rank, world size) only, so that a resumed run on M ranks is reproducible."""
    return int(np.random.SeedSequence([seed, step, rank, world_size, 0xE1A5]).generate_state(1, np.uint64)[0])


CANONICAL_DEFAULT = {"py1s": 64, "py2s": 64}  # streaming's default: this many per physical node, else 1


def canonical_nodes(algo: str, physical_nodes: int) -> int:
    """mosaicml-streaming's default `num_canonical_nodes` for `algo` on `physical_nodes` nodes."""
    return CANONICAL_DEFAULT.get(algo, 1) * physical_nodes


def check_canonical(num_canonical: int, physical_nodes: int) -> None:
    """streaming partitions canonical nodes over physical ones: one count must divide the other."""
    if num_canonical % physical_nodes and physical_nodes % num_canonical:
        ok = sorted({d for d in range(1, num_canonical + 1) if num_canonical % d == 0})
        raise ConfigError(f"this run's data order is fixed to data.num_canonical_nodes={num_canonical}, which "
                          f"{physical_nodes} node(s) cannot split (mosaicml-streaming needs one to divide the other): "
                          f"relaunch on {', '.join(map(str, ok))} node(s) or a multiple of {num_canonical}")


def resume_batch(cfg: TrainConfig, prev: dict | None, is_elastic: bool, world_size: int) -> tuple[TrainConfig, int]:
    """(config with the run's grad_accum and per-rank data.batch_size, micro-batch). A resume keeps the
    checkpoint's micro-batch (what fit in memory) and recomputes the accumulation that keeps the global
    batch on this world size; a fresh start (or a changed train.grad_accum / train.batch_size on the same
    world size) splits train.batch_size with train.grad_accum."""
    same_request = (prev is not None and "micro_batch" in prev and prev.get("global_batch") == cfg.train.batch_size
                    and prev.get("grad_accum_config") == cfg.train.grad_accum)
    if is_elastic or same_request:
        micro, ga = batch_split(cfg.train.batch_size, prev["micro_batch"], world_size)
        if (micro, ga) != (prev["micro_batch"], prev["grad_accum"]) or ga != cfg.train.grad_accum:
            log.warning("resume on %d rank(s) (checkpoint: %d): micro-batch %d x grad_accum %d keeps the global batch "
                        "of %d (train.grad_accum=%d)", world_size, prev["world_size"], micro, ga, cfg.train.batch_size,
                        cfg.train.grad_accum)
        cfg = replace(cfg, train=replace(cfg.train, grad_accum=ga))
    else:
        micro = cfg.per_rank_batch(world_size)
    return replace(cfg, data=replace(cfg.data, batch_size=micro)), micro  # the saved config states the real value


def fix_canonical_nodes(cfg: TrainConfig, prev: dict | None, world_size: int, local_world_size: int) -> TrainConfig:
    """MDS: the data order is a function of data.num_canonical_nodes; fix it at the start of a run (streaming's
    default for the shuffle algorithm on this many nodes, or the configured value), record it, keep it on every
    resume, and check that this many nodes can split it."""
    if cfg.data.format != "mds":
        return cfg
    nodes = max(world_size // max(local_world_size, 1), 1)
    fixed = prev.get("num_canonical_nodes") if prev is not None else None
    if prev is not None and "num_canonical_nodes" not in prev:
        return cfg  # a checkpoint from before elastic resume: unchanged behaviour
    if fixed is None:
        fixed = cfg.data.num_canonical_nodes or canonical_nodes(cfg.data.shuffle_algo, nodes)
    elif cfg.data.num_canonical_nodes not in (None, fixed):
        raise ConfigError(f"data.num_canonical_nodes={cfg.data.num_canonical_nodes}, but this run's data order was "
                          f"fixed to {fixed} at its start (see its checkpoints); remove the setting to resume")
    check_canonical(fixed, nodes)
    return replace(cfg, data=replace(cfg.data, num_canonical_nodes=fixed))
