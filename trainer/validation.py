"""Held-out validation during training, and the best checkpoint by validation loss.

With `data.val_path` (a prepared shard folder) and `logging.val_every` N > 0, the loop (trainer/train.py:
`_validate`) runs `Validator.step` every N optimizer steps and at the last step, on every rank:

- The validation set: sample i of data.val_path (manifest order, `data_pipeline.reader.ShardReader`) belongs to
  micro-batch i // (micro x ranks), on rank (i // micro) % ranks; each rank takes its first `logging.val_batches`
  micro-batches (all it has when the folder holds fewer, with a warning) and reads them the same way at every
  validation: no shuffling, no flips, nothing shared with the training loader or its position. The subset thus
  depends on the micro-batch and the number of ranks: an elastic resume on another world size validates on another
  subset, and starts its best anew (with a warning).
- What is validated: the weights the run exports, so that best.safetensors holds the weights its val_loss was
  measured on: the EMA weights when the export is the EMA's (checkpoint.export_ema with an EMA; copied into the
  engines' modules in their training dtype for the validation and the trained weights restored bit for bit after;
  ZeRO <= 2, trainer.config.check_validation), else the raw trained weights.
- How: the task's `val_metrics(batch, step)` per micro-batch under torch.no_grad(), every module in eval mode (its
  flag restored after), the RNG streams (python, numpy, torch, CUDA) seeded from train.seed and the rank at every
  validation and restored after: each validation is the same computation (a diffusion loss draws the same
  timesteps and noise each time) and the training does not notice it (its losses are bitwise those of a run
  without validation; a resumed run stays bitwise equal to an uninterrupted one).
- Metrics ("val_*"): averaged over this rank's micro-batches (non-finite values left out), then over the ranks
  (`trainer.metrics.WindowMeter.means_over_ranks`); logged with the step's line in metrics.jsonl (and wandb).
- The best: a finite val_loss below the best so far makes rank 0 write `<run_dir>/best.safetensors` (the export,
  by the task's own writer, its `weights` metadata with the step and val_loss) and then `<run_dir>/best.json`
  ({"step", "val_loss", every val_* metric, "weights", "val_path", "val_samples"}), each whole (a temporary file
  and os.replace). The best so far travels in each checkpoint's trainer_state.json (`best_val`), so a resumed run
  never replaces a better best with a worse one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.loaders import read_batch
from data_pipeline.reader import ShardReader
from divae.utils.config import ConfigError
from divae.utils.logging import get_logger
from divae.weights_file import BEST_RECORD, BEST_WEIGHTS
from runtime.collectives import barrier
from trainer import checkpoint as ckpt
from trainer.metrics import WindowMeter
from trainer.tasks.base import Task, host_means

log = get_logger(__name__)

VAL_SEED_OFFSET = 7_919  # the validation's RNG seed: train.seed + VAL_SEED_OFFSET + 1000 x rank


def val_indices(n: int, micro: int, rank: int, world_size: int, batches: int, path: str) -> list[list[int]]:
    """This rank's validation micro-batches as sample indices of a folder of `n` samples: batch b holds
    [(b x world_size + rank) x micro, ... + micro); the first `batches` of them, or as many as the folder fills."""
    fit = n // (micro * world_size)
    if fit == 0:
        raise ConfigError(f"data.val_path={path} holds {n} samples, fewer than one validation batch of {micro} per "
                          f"rank on {world_size} rank(s): give a larger held-out folder")
    if fit < batches:
        log.warning("data.val_path=%s fills %d micro-batches of %d per rank on %d rank(s), fewer than "
                    "logging.val_batches=%d: validating on those %d", path, fit, micro, world_size, batches, fit)
    return [[(b * world_size + rank) * micro + j for j in range(micro)] for b in range(min(fit, batches))]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The python, numpy, torch (and current CUDA device's) RNG streams seeded with `seed` inside, restored after."""
    state = ckpt.rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


@torch.no_grad()
def swap_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy `state` ({name: full tensor}, e.g. an EMA's `state_dict()`) into `model`'s parameters and buffers of
    those names, in place and in their own dtype; returns what they held before (clones), for `swap_weights` back."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    before = {}
    for name, value in state.items():
        t = tensors.get(name)
        if t is not None:  # a tied weight's second name is the first's tensor
            before[name] = t.detach().clone()
            t.copy_(value.to(device=t.device, dtype=t.dtype))
    return before


@contextlib.contextmanager
def evaluating(task: Task, weights: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
    """Every engine's modules in eval mode and `weights` ({phase: state dict}) in place of those phases' trained
    ones, under torch.no_grad(); each module's training flag and every swapped tensor restored after."""
    modes = [(m, m.training) for e in task.engines.values() for m in e.modules()]
    swapped: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for m, _ in modes:
            m.training = False
        for phase, state in weights.items():
            swapped[phase] = swap_weights(task.inner(phase), state)
        with torch.no_grad():
            yield
    finally:
        for phase, before in swapped.items():
            swap_weights(task.inner(phase), before)
        for m, mode in modes:
            m.training = mode


def _write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` beside `path`, then os.replace: a kill leaves the previous file or the new one, whole."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


class BestCheckpoint:
    """The best val_loss of a run so far (`record`: {"step", "val_loss", the other val_* metrics, "weights",
    "val_path", "val_samples"}, or None) and its files in the run folder."""

    def __init__(self, run_dir: Path, is_main: bool, val_set: dict[str, Any], weights: str):
        self.run_dir, self.is_main, self.val_set, self.weights = Path(run_dir), is_main, val_set, weights
        self.record: dict[str, Any] | None = None

    def improves(self, metrics: dict[str, float]) -> bool:
        v = metrics["val_loss"]
        return math.isfinite(v) and (self.record is None or v < self.record["val_loss"])

    def save(self, step: int, metrics: dict[str, float], export: Callable[[Path], None]) -> None:
        """Record the new best; rank 0 writes best.safetensors by `export(path)`, then best.json (a collective)."""
        self.record = {"step": step, **metrics, "weights": self.weights, **self.val_set}
        if self.is_main:
            _write_whole(self.run_dir / BEST_WEIGHTS, export)
            record = {**self.record, "file": BEST_WEIGHTS, "time": time.time()}
            _write_whole(self.run_dir / BEST_RECORD, lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))
        barrier()

    def load(self, record: dict[str, Any] | None) -> None:
        """The best so far from a checkpoint's trainer_state.json (`best_val`); one measured on another validation
        set (another val_path, or another number of samples after an elastic resume) is dropped, with a warning."""
        if record is not None and {k: record.get(k) for k in self.val_set} != self.val_set:
            log.warning("the checkpoint's best val_loss %.5g (step %d) was measured on %s, this run validates on "
                        "%s: starting a new best", record["val_loss"], record["step"],
                        {k: record.get(k) for k in self.val_set}, self.val_set)
            record = None
        self.record = record


class Validator:
    """The held-out validation of one run (module docstring): its batches, when it is due, and the best so far."""

    def __init__(self, cfg: Any, task: Task, dist: Any, micro: int, on_ema: bool):
        self.cfg, self.task, self.dist, self.on_ema = cfg, task, dist, on_ema
        path = cfg.data.val_path
        self.reader = ShardReader(path, decode_image=False)
        self.batches = val_indices(len(self.reader), micro, dist.rank, dist.world_size, cfg.logging.val_batches, path)
        val_set = {"val_path": str(path), "val_samples": len(self.batches) * micro * dist.world_size}
        self.best = BestCheckpoint(Path(cfg.train.run_dir), dist.is_main, val_set, "ema" if on_ema else "raw")
        self.seed = cfg.train.seed + VAL_SEED_OFFSET + 1000 * dist.rank

    @classmethod
    def for_run(cls, cfg: Any, task: Task, dist: Any, micro: int, on_ema: bool) -> Validator | None:
        """The run's validator, or None when logging.val_every is 0 (a data.val_path is then unused: a warning)."""
        if not cfg.logging.val_every:
            if cfg.data.val_path:
                log.warning("data.val_path=%s is set but logging.val_every=0: no validation", cfg.data.val_path)
            return None
        return cls(cfg, task, dist, micro, on_ema)

    def due(self, step: int) -> bool:
        return step % self.cfg.logging.val_every == 0 or step == self.cfg.train.steps

    def run(self, step: int, weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
        """The val_* metrics at `step` of the weights in place (`weights`: {phase: state dict} swapped in, or {}:
        the trained ones), averaged over the batches and the ranks (a collective)."""
        micro: dict[str, list[torch.Tensor | float]] = {}
        with seeded(self.seed), evaluating(self.task, weights):
            for indices in self.batches:
                batch = read_batch(self.reader, indices, self.cfg.data)
                for k, v in self.task.val_metrics(batch, step).items():
                    micro.setdefault(k, []).append(v)
        meter = WindowMeter()
        meter.add(host_means(micro))
        metrics = meter.means_over_ranks(self.dist.device)
        if "val_loss" not in metrics:
            raise RuntimeError(f"{type(self.task).__name__}.val_metrics gave no finite val_loss at step {step} "
                               f"(keys {sorted(metrics)}): the best checkpoint is chosen by it")
        return metrics

    def step(self, step: int, emas: dict[str, Any], best_export: Callable[[dict], tuple[dict, dict]]) -> dict:
        """Validate at `step` (a collective); on a new best, write it (`best_export(ema_states)` -> ({phase: state
        dict}, weights info) of the export, `Task.export`'s arguments). Returns the val_* metrics."""
        ema_states = {n: e.state_dict() for n, e in emas.items()} if self.on_ema else {}  # a collective
        metrics = self.run(step, ema_states)
        best = self.best.record
        note = "" if best is None else f" (best {best['val_loss']:.5g} at step {best['step']})"
        log.info("step %d: %s%s", step, " ".join(f"{k}={v:.5g}" for k, v in metrics.items()), note)
        if self.best.improves(metrics):
            with seeded(self.seed):  # an export builds modules, whose init draws random numbers
                weights, info = best_export(ema_states)
                self.best.save(step, metrics, lambda p: self.task.export(str(p), weights, {
                    **info, "val_loss": metrics["val_loss"]}))
        return metrics
