"""Checks of a run's inputs before any work: every path the config names, each failure one line naming the key.

    check_inputs(cfg)      # in trainer.train.main, on every rank, before torch.distributed starts

Raises `ConfigError` (exit 2) for a missing or empty `data.path`, a folder that is not a prepared dataset (also
`data.val_path`, when set), an unwritable `train.run_dir`, a missing `checkpoint.init_from` (when the run starts
fresh), a missing `decoder.vq_weights` (decoder stage) or `distill.teacher` (distill stage), `prior_task.tokenizer` or
`prior_task.divae_weights` (when set), a resume with another number of ranks than wrote the checkpoint
(`WorldSizeError`, a ConfigError);
`data_pipeline.integrity.ShardError` (exit 1) for a shard whose size differs from its manifest (damage).
Each check is a stat or a small read, identical on every rank of a shared file system, so every rank
reaches the same verdict without a collective.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.integrity import check_shards
from data_pipeline.shards import MANIFEST, load_manifest
from divae.utils.cli import writable_dir
from divae.utils.config import ConfigError
from runtime.launch import detect_env
from trainer.checkpoint import LATEST, CheckpointError, check_compatible, read_latest, read_meta
from trainer.config import TrainConfig
from trainer.tasks import TASKS

PREPARE_HINT = "python -m data_pipeline.prepare_folder|prepare_imagenet|prepare_cc|prepare_coco"


def check_data(cfg: TrainConfig) -> None:
    """data.path (and data.extra_paths, data.val_path): prepared shard folders in data.format, not empty, shards
    whole."""
    d = cfg.data
    if not d.path and not d.extra_paths:
        raise ConfigError(f"data.path is empty: set data.path=<folder> to a folder made by `{PREPARE_HINT}`")
    named = [("data.path", d.path)] * bool(d.path) + [("data.extra_paths", p) for p in d.extra_paths]
    for key, p in named + [("data.val_path", d.val_path)] * bool(d.val_path):
        if not os.path.isdir(p):
            what = "is a file, not a folder" if os.path.exists(p) else "does not exist"
            raise ConfigError(f"{key}={p} {what}: point it at a folder made by `{PREPARE_HINT}`")
        if not os.path.isfile(os.path.join(p, MANIFEST)):
            raise ConfigError(f"{key}={p} has no {MANIFEST}: not a prepared dataset (or its preparation did not "
                              f"finish: rerun it); make one with `{PREPARE_HINT}`")
        try:
            m = load_manifest(p)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}={p}: {e}") from None
        if m.get("format") != d.format:
            raise ConfigError(f"{key}={p} holds {m.get('format')!r} shards but data.format is {d.format!r}")
        if not m.get("num_samples"):
            raise ConfigError(f"{key}={p} holds no samples (0 written: every input was skipped; see the "
                              f"'skipped' list in {os.path.join(p, MANIFEST)})")
        check_shards(p, m)  # sizes: a truncated or replaced shard fails now, not hours into the run


def _must_exist(key: str, value: str) -> None:
    if not Path(value).is_file():
        what = "is a folder, not a file" if Path(value).is_dir() else "does not exist"
        raise ConfigError(f"{key}={value} {what}")


def check_inputs(cfg: TrainConfig) -> None:
    """Every check of the module docstring, in the order a user would fix them."""
    check_data(cfg)
    run_dir = writable_dir(cfg.train.run_dir, "train.run_dir")
    resuming = cfg.checkpoint.resume and (run_dir / "checkpoints" / LATEST).is_file()
    if resuming:
        try:
            latest = read_latest(run_dir / "checkpoints")
            meta = read_meta(latest) if latest is not None else None
        except (CheckpointError, OSError, ValueError):
            meta = None  # dangling or damaged: trainer.checkpoint.select_checkpoint deals with it at resume
        if meta is not None:  # the same refusal as at resume, before the ranks start anything
            check_compatible(meta, int(detect_env()["WORLD_SIZE"]), latest)
    if cfg.checkpoint.init_from and not resuming:
        _must_exist("checkpoint.init_from", cfg.checkpoint.init_from)
    task = TASKS[cfg.train.stage]
    task.check_required(cfg)
    for key, value, _ in task.required_files(cfg):
        if value:
            _must_exist(key, value)

def check_batch(cfg: TrainConfig, world_size: int, micro_batch: int) -> None:
    """The data must fill one global batch (micro_batch per rank on world_size ranks), with data.drop_last."""
    n = sum(load_manifest(p)["num_samples"] for p in cfg.data.paths())
    if cfg.data.drop_last and n < micro_batch * world_size:
        raise ConfigError(f"data.path holds {n} samples, fewer than one batch of {micro_batch} per rank on "
                          f"{world_size} rank(s): lower train.batch_size to at most {n - n % world_size or world_size}")
