"""Train any DiVAE stage with DeepSpeed: `python -m trainer.train --config configs/X.yaml [key=value ...]`.

    torchrun --nproc_per_node 2 -m trainer.train --config configs/decoder_tiny.yaml train.steps=100

The loop is the same for every stage (the stage is a `trainer.tasks` object): per optimizer step, for each
micro-batch and each of the task's phases: loss -> NaN/inf guard -> backward -> step; then EMA, validation
(trainer/validation.py), logging, sample grids, the preemption check (all ranks agree), checkpoints. A run
folder with a checkpoint resumes from `latest`. Exit codes: 0 done, REQUEUE_EXIT_CODE (75) preempted (SIGUSR1) and
saved, STOP_EXIT_CODE (143) cancelled (SIGTERM) and saved, 1 error, 2 bad config.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.integrity import ShardError
from divae.utils.cli import one_line, rank_emit, report
from divae.utils.config import ConfigError, dump_config
from divae.utils.files import FolderBusy, folder_lock
from divae.utils.logging import get_logger
from runtime import signals
from runtime.collectives import all_gather_object, all_reduce_max, all_reduce_sum, barrier
from runtime.launch import DistInfo, cleanup, init_distributed
from trainer import checkpoint as ckpt
from trainer import elastic, faults
from trainer.config import TrainConfig, load_train_config
from trainer.ema import EMA
from trainer.engine import build_engine, engine_lr, grad_norm
from trainer.flops import Throughput
from trainer.metrics import RunLogger, WindowMeter, new_wandb_id, peak_memory_mb
from trainer.preflight import check_batch, check_inputs
from trainer.profiling import StepProfiler, oom_snapshot
from trainer.tasks import TASKS
from trainer.tasks.base import Task, host_means
from trainer.validation import Validator
from trainer.watchdog import PeerFailure, PeerWatchdog, peer_failure

log = get_logger("trainer")


class BadStepsError(RuntimeError):
    pass


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loader(cfg: TrainConfig, dist: DistInfo):
    """This rank's loader (cfg.data.batch_size is the per-rank micro-batch by now)."""
    from data_pipeline.loaders import build_loader as _build

    # uint8 images: 4x fewer bytes pinned and copied; Task.images converts them on the device (bitwise the same)
    return _build(replace(cfg.data, images_as="uint8"), dist.rank, dist.world_size)


class Batches:
    """Endless iterator over the loader, epoch after epoch (the loader's state covers the position)."""

    def __init__(self, loader):
        self.loader = loader
        self.it = None

    def next(self) -> dict:
        # A DataLoader draws its base seed from the global torch RNG when an epoch's iterator starts; a
        # resumed run starts one mid-epoch. Fetching is kept off the global stream (which the noise and
        # timesteps come from) so that a resume continues it exactly; data randomness has its own seeds.
        state = torch.get_rng_state()
        try:
            for _ in range(2):
                if self.it is None:
                    self.it = iter(self.loader)
                try:
                    return next(self.it)
                except StopIteration:
                    self.it = None
        finally:
            torch.set_rng_state(state)
        raise RuntimeError("the data loader yields no batch: is the dataset smaller than one global batch?")


class RunFolderBusy(FolderBusy):
    """Another training run holds train.run_dir (exit 1)."""


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, dist: DistInfo) -> Iterator[None]:
    """Rank 0 holds the lock on `run_dir` for the whole run (`divae.utils.files.folder_lock`, the lock prepare
    holds on --out), so a second run in the same folder cannot remove the first's checkpoint in progress or
    move its `latest`: every rank of the second run raises RunFolderBusy naming the holder (pid, host)."""
    with contextlib.ExitStack() as stack:
        busy = None
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                stack.enter_context(folder_lock(run_dir, lambda holder: (
                    f"{run_dir} is in use by another training run ({holder}): wait for it to end or stop it, or "
                    "choose another train.run_dir"), RunFolderBusy))
            except RunFolderBusy as e:
                busy = str(e)
        busy = next((b for b in all_gather_object(busy) if b), None)  # every rank fails, with the same line
        if busy is not None:
            raise RunFolderBusy(busy)
        yield


def train(cfg: TrainConfig, dist: DistInfo) -> int:
    """Run (or resume) the configured stage, holding the run-folder lock throughout. Returns the exit code."""
    with run_folder_lock(Path(cfg.train.run_dir), dist):
        return _train(cfg, dist)


@dataclass
class _Run:
    """What one training run holds between steps: built by `_build`, restored by `_restore`, advanced by `_loop`."""

    cfg: TrainConfig  # as this run trains it: a resume's grad_accum, the per-rank data.batch_size
    dist: DistInfo
    task: Task
    engines: dict[str, Any]  # phase -> DeepSpeed engine
    emas: dict[str, EMA]  # phase -> EMA of that engine's fp32 master weights
    throughput: Throughput
    loader: Any
    micro: int  # per-rank micro-batch
    asked_ga: int  # train.grad_accum as configured (a resume on another world size runs another)
    resized: bool  # resumed on another world size than the checkpoint's (elastic)
    config_yaml: str
    wandb_id: str
    step: int = 0
    samples_seen: int = 0
    bad_in_a_row: int = 0
    sample_batch: dict | None = None  # the first batch of this session: the logged sample grids decode it
    validator: Validator | None = None  # logging.val_every (trainer/validation.py)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    @property
    def global_batch(self) -> int:
        return self.micro * self.cfg.train.grad_accum * self.dist.world_size


def _train(cfg: TrainConfig, dist: DistInfo) -> int:
    barrier()
    run, latest = _build(cfg, dist)
    if latest is not None:
        _restore(run, latest)
    elif dist.is_main:
        (run.run_dir / "config.yaml").write_text(run.config_yaml)
    if dist.is_main:
        signals.clear_marker(run.run_dir)
    signals.install()  # idempotent (main installed them first); here for a train() called directly
    return _loop(run)


def _build(cfg: TrainConfig, dist: DistInfo) -> tuple[_Run, Path | None]:
    """Pick the checkpoint to resume (the newest intact one, verified against its manifest) and the batch split on
    this world size, failing before anything is built when it cannot resume; then build the task, one engine per
    phase, the EMAs and the loader. Returns the run and the checkpoint to restore (None: a fresh start)."""
    task_cls = TASKS[cfg.train.stage]
    if cfg.deepspeed.zero_stage > task_cls.max_zero_stage:
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} is not supported by the "
                          f"{cfg.train.stage} stage (max {task_cls.max_zero_stage})")
    latest = ckpt.select_checkpoint(Path(cfg.train.run_dir) / "checkpoints", cfg.checkpoint.verify) \
        if cfg.checkpoint.resume else None
    prev = ckpt.read_meta(latest) if latest is not None else None
    resized = prev is not None and ckpt.check_compatible(prev, dist.world_size, latest, cfg.train.batch_size)
    asked_ga = cfg.train.grad_accum
    cfg, micro = elastic.resume_batch(cfg, prev, resized, dist.world_size)
    cfg = elastic.fix_canonical_nodes(cfg, prev, dist.world_size, dist.local_world_size)
    check_batch(cfg, dist.world_size, micro)

    seed_all(cfg.train.seed)  # identical initial weights on every rank
    task = task_cls(cfg, dist.device)
    models = task.build_models()
    if latest is None and cfg.checkpoint.init_from:
        task.init_from(cfg.checkpoint.init_from, models)
    engines = {name: build_engine(models[name], cfg.deepspeed, cfg.optim, micro_batch=micro,
                                  grad_accum=cfg.train.grad_accum, world_size=dist.world_size,
                                  grad_clip=cfg.train.grad_clip, total_steps=cfg.train.steps)
               for name in task.phases}
    task.attach(engines)
    emas = {n: EMA(engines[n].module.inner, cfg.ema, engine=engines[n])  # of the fp32 master weights, sharded
            for n in task.ema_phases if cfg.ema.enabled}
    throughput = Throughput.for_run(cfg, task, dist.device)  # FLOPs per sample, once (fake tensors, no memory)
    loader = build_loader(cfg, dist)
    seed_all(cfg.train.seed + 1000 * dist.rank + 1)  # per-rank randomness (noise, timesteps)
    run = _Run(cfg, dist, task, engines, emas, throughput, loader, micro, asked_ga, resized,
               dump_config(cfg.sections(task_cls.config_sections)), new_wandb_id(),
               validator=Validator.for_run(cfg, task, dist, micro, on_ema=cfg.checkpoint.export_ema and bool(emas)))
    return run, latest


def _restore(run: _Run, latest: Path) -> None:
    """The checkpoint's engines, EMAs, loader position, task state and this rank's RNG streams (derived from the
    step on a resize: the rank's stream did not exist in the N-rank run)."""
    dist = run.dist
    meta, rank_state, ema_states = ckpt.load(latest, rank=dist.rank, world_size=dist.world_size, engines=run.engines)
    run.step, run.samples_seen, run.wandb_id = meta["step"], meta["samples_seen"], meta["wandb_id"]
    run.loader.load_state_dict(rank_state["loader"])
    run.task.load_state_dict(rank_state["task"])
    for n, ema in run.emas.items():
        ema.load_state_dict(ema_states[n], meta["ema_updates"][n])
    if run.validator is not None:
        run.validator.best.load(meta.get("best_val"))
    if run.resized:
        seed_all(elastic.rank_seed(run.cfg.train.seed, run.step, dist.rank, dist.world_size))
        faults.dump_elastic(run.engines, dist.rank)
    else:
        ckpt.set_rng_state(rank_state["rng"])


def _loop(run: _Run) -> int:
    """Optimizer steps until train.steps or an agreed stop signal; returns the exit code."""
    cfg, dist = run.cfg, run.dist
    logger = RunLogger(cfg.logging, run.run_dir, dist.is_main, run.wandb_id, cfg.train.steps, run.step,
                       cfg.sections(run.task.config_sections))
    batches, meter = Batches(run.loader), WindowMeter()
    profiler = StepProfiler(cfg.logging.profile_every, cfg.logging.profile_steps, run.run_dir / "profile", dist.rank,
                            dist.device, run.step)
    nan_fault, trace = faults.nan_loss_at(), faults.sample_tracer(dist.rank)  # test probes (trainer/faults.py)
    exit_code = 0
    while run.step < cfg.train.steps:
        t_step = time.perf_counter()
        step_metrics, bad_keys, data_wait = _accumulate(run, batches, nan_fault, trace)
        run.step += 1
        profiler.step(run.step)
        run.samples_seen += run.global_batch
        _count_bad_step(run, bad_keys)
        for ema in run.emas.values():
            ema.update(run.step)
        dt = time.perf_counter() - t_step
        first = run.engines[run.task.phases[0]]
        step_metrics.update(lr=engine_lr(first), grad_norm=grad_norm(first), step_time=dt, data_wait=data_wait,
                            images_per_s=run.global_batch / dt)
        _report(run, logger, meter, step_metrics, _validate(run))
        request = signals.agreed_request()
        if request or run.step == cfg.train.steps or (cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0):
            _save(run)
        if request:
            exit_code = _stop(run, request)
            break
    profiler.close()
    logger.close()
    return exit_code


def _accumulate(run: _Run, batches: Batches, nan_fault: tuple | None, trace) -> tuple[dict, list[str], float]:
    """One optimizer step's micro-batches through every phase. Returns (the step's metrics, averaged over its
    micro-batches; the keys of a batch with a non-finite loss on this rank, or []; seconds waited for data)."""
    micro_metrics: dict[str, list[torch.Tensor | float]] = {}  # device tensors: read once per step
    bad_keys: list[str] = []
    data_wait = 0.0
    for micro_idx in range(run.cfg.train.grad_accum):
        t_data = time.perf_counter()
        batch = batches.next()
        data_wait += time.perf_counter() - t_data
        if trace is not None:
            trace(run.step + 1, batch)
        if run.sample_batch is None:
            run.sample_batch = batch
        for phase in run.task.phases:
            poison = nan_fault == (run.step, micro_idx, run.dist.rank) and phase == run.task.phases[0]
            if _micro_step(run, batch, phase, poison, micro_metrics):
                bad_keys = list(batch.get("key", []))[:16]
    return host_means(micro_metrics), bad_keys, data_wait


def _micro_step(run: _Run, batch: dict, phase: str, poison: bool, micro_metrics: dict[str, list]) -> bool:
    """Loss, backward and (at the accumulation boundary, DeepSpeed's count) the optimizer step of one phase on one
    micro-batch, its metrics appended to `micro_metrics`. Returns True when some rank's loss was not finite."""
    out = run.task.loss(batch, phase, run.step)
    if out is None:
        return False
    loss, metrics = out
    if poison:
        loss = loss * float("nan")
    # The one host sync per micro-batch that stays: every rank must know before backward whether any rank's
    # loss is bad (backward under ZeRO starts collectives that all ranks must join alike).
    bad = all_reduce_max(0.0 if torch.isfinite(loss).item() else 1.0) > 0
    if bad:
        micro_metrics.setdefault(f"{phase}_bad", []).append(1.0)
        if run.cfg.train.grad_accum == 1:
            return True  # nothing accumulated: skip backward and optimizer step on every rank
        # DeepSpeed counts backward/step calls to find the accumulation boundary: skipping one would shift it for
        # the rest of the run. The bad micro-batch contributes a zero gradient instead.
        loss, metrics = _zero_loss(run.task.inner(phase)), {}
    run.engines[phase].backward(loss)
    run.engines[phase].step()
    for k, v in metrics.items():
        key = k if phase == run.task.phases[0] else f"{phase}/{k}" if "/" not in k else k
        micro_metrics.setdefault(key, []).append(v)
    return bad


def _count_bad_step(run: _Run, bad_keys: list[str]) -> None:
    """Warn about a step with a non-finite loss; raise BadStepsError after train.max_bad_steps in a row."""
    if not bad_keys:
        run.bad_in_a_row = 0
        return
    run.bad_in_a_row += 1
    log.warning("step %d: non-finite loss on some rank, %s (%d in a row); batch keys on this rank: %s", run.step,
                "step skipped" if run.cfg.train.grad_accum == 1 else "its micro-batch gave a zero gradient",
                run.bad_in_a_row, bad_keys)
    if run.bad_in_a_row >= run.cfg.train.max_bad_steps:
        raise BadStepsError(f"{run.bad_in_a_row} steps in a row had a non-finite loss (last batch keys {bad_keys}); "
                            "lower optim.lr, check the data, or resume from an earlier checkpoint")


def _validate(run: _Run) -> dict[str, float]:
    """The held-out val_* metrics when logging.val_every is due, a new best written (trainer/validation.py); {}
    otherwise. A collective; the RNG streams are left as they were."""
    if run.validator is None or not run.validator.due(run.step):
        return {}
    return run.validator.step(run.step, run.emas, partial(_best_export, run))


def _best_export(run: _Run, ema_states: dict) -> tuple[dict, dict]:
    """({phase: state dict}, weights info) of best.safetensors: the EMA export's, else the raw weights (a
    collective gather under ZeRO-3)."""
    if ema_states:
        return _exports(run, ema_states)[0][1:]
    return ({n: _gathered_state(run.engines[n], run.cfg.deepspeed.zero_stage) for n in run.task.ema_phases},
            {"kind": "raw", "step": run.step})


def _report(run: _Run, logger: RunLogger, meter: WindowMeter, step_metrics: dict, val: dict) -> None:
    """The progress bar every step; every logging.every steps the window's means over all ranks (with peak
    memory, skipped samples, MFU); the step's `val` metrics in the same metrics line (alone on a step that logs
    nothing else); every logging.sample_every steps a sample grid."""
    cfg, step = run.cfg, run.step
    meter.add(step_metrics)
    logger.progress(step, step_metrics.get("loss", float("nan")), step_metrics["images_per_s"])
    if step % cfg.logging.every == 0 or step == cfg.train.steps:
        means = meter.means_over_ranks(run.dist.device)  # averaged over every rank, not rank 0's alone
        means["peak_mem_mb"] = all_reduce_max(peak_memory_mb(run.dist.device))
        means["skipped_samples"] = all_reduce_sum(getattr(run.loader, "skipped", 0))  # data.bad_samples=skip
        means["samples_seen"] = run.samples_seen
        means.update(run.throughput.figures(means.get("images_per_s", 0.0), run.dist.world_size))  # MFU, FLOP/s
        logger.log(step, {**means, **val})
    elif val:
        logger.log(step, val)
    if cfg.logging.sample_every and (step % cfg.logging.sample_every == 0 or step == cfg.train.steps):
        logger.grid(step, run.task.sample(run.sample_batch))


def _stop(run: _Run, request: int) -> int:
    """The exit code after an agreed stop signal (the checkpoint is saved): SIGUSR1 requeues (rank 0 leaves the
    requeue marker for the Slurm script), SIGTERM ends for good."""
    if request == signals.REQUEUE:
        log.warning("preemption signal received: checkpoint at step %d saved, exiting with %d",
                    run.step, signals.REQUEUE_EXIT_CODE)
        if run.dist.is_main:
            signals.write_marker(run.run_dir, run.step)
        return signals.REQUEUE_EXIT_CODE
    log.warning("stop signal (SIGTERM) received: checkpoint at step %d saved, exiting with %d (not requeueing)",
                run.step, signals.STOP_EXIT_CODE)
    return signals.STOP_EXIT_CODE


def _save(run: _Run) -> None:
    """A checkpoint of the run at its current step (or, with checkpoint.state false, only the exported weights
    in the run folder). Saving does not move the RNG streams: the export builds modules, whose init draws random
    numbers, and the run must continue from exactly the state a resume restores."""
    cfg = run.cfg
    ema_states = {n: e.state_dict() for n, e in run.emas.items()}  # a collective (the EMA is sharded): once
    exports = _exports(run, ema_states)

    def export_fn(folder: Path) -> list[str]:
        for name, weights, info in exports:
            run.task.export(str(folder / name), weights, info)
        return [name for name, _, _ in exports]

    rng = ckpt.rng_state()
    if cfg.checkpoint.state:
        rank_state = {"rng": rng, "loader": run.loader.state_dict(), "task": run.task.state_dict()}
        ckpt.save(run.run_dir / "checkpoints", run.step, rank=run.dist.rank, engines=run.engines,
                  rank_state=rank_state, meta=_checkpoint_meta(run), config_yaml=run.config_yaml, ema=ema_states,
                  export_fn=export_fn if cfg.checkpoint.export else None, keep_last=cfg.checkpoint.keep_last)
    else:  # weights only, into the run folder (no resumable state)
        if run.dist.is_main and cfg.checkpoint.export:
            tmp = run.run_dir / ".export_tmp"
            tmp.mkdir(exist_ok=True)
            for name in export_fn(tmp):  # whole files only: a kill mid-write leaves the previous export
                os.replace(tmp / name, run.run_dir / name)
        barrier()
    ckpt.set_rng_state(rng)


def _exports(run: _Run, ema_states: dict) -> list[tuple[str, dict, dict]]:
    """(file name, {phase: state dict}, weights info) of each weights file a save writes: the EMA weights under
    the task's export name when checkpoint.export_ema, the raw weights (beside them with checkpoint.export_raw)."""
    cfg, step = run.cfg, run.step
    export_ema = cfg.checkpoint.export_ema and bool(run.emas)
    exports = []
    if export_ema:
        exports.append((run.task.export_name, ema_states,
                        {"kind": "ema", "step": step, "decay": cfg.ema.decay, "warmup": cfg.ema.warmup,
                         "updates": next(iter(run.emas.values())).num_updates}))
    if cfg.checkpoint.export and (not export_ema or cfg.checkpoint.export_raw):  # a collective under ZeRO-3
        raw = {n: _gathered_state(run.engines[n], cfg.deepspeed.zero_stage) for n in run.task.ema_phases}
        name = run.task.export_name if not export_ema else run.task.export_name.replace(".safetensors",
                                                                                        ".raw.safetensors")
        exports.append((name, raw, {"kind": "raw", "step": step}))
    return exports


def _checkpoint_meta(run: _Run) -> dict:
    """meta.json of a checkpoint: what a resume (on any world size) and `trainer.checkpoint_tool` read."""
    cfg, engines = run.cfg, run.engines
    return {"step": run.step, "samples_seen": run.samples_seen, "world_size": run.dist.world_size,
            "zero_stage": cfg.deepspeed.zero_stage, "stage": cfg.train.stage, "wandb_id": run.wandb_id,
            "engines": list(engines), "optimizer_steps": {n: int(e.global_steps) for n, e in engines.items()},
            "ema": list(run.emas), "ema_updates": {n: e.num_updates for n, e in run.emas.items()},
            "micro_batch": run.micro, "grad_accum": cfg.train.grad_accum, "grad_accum_config": run.asked_ga,
            "global_batch": run.global_batch, "data_format": cfg.data.format,
            "num_canonical_nodes": cfg.data.num_canonical_nodes,
            "elastic": [n for n, e in engines.items() if elastic.supported(e)], "time": time.time(),
            "best_val": run.validator.best.record if run.validator is not None else None}


def _zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss whose gradient is exactly zero for every trainable parameter of `model` (finite even where a
    parameter is not)."""
    return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)


def _gathered_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full state dict of an engine's model (a collective gather under ZeRO-3)."""
    model = engine.module.inner
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=64 optim.lr=2e-4")
    p.add_argument("--debug", action="store_true", help="print the traceback of expected errors too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The CLI boundary: expected errors print one line (exit 2 usage/config, 1 runtime), bugs a traceback.
    With several ranks, a failing rank tells the others (trainer.watchdog) and every rank ends at once."""
    signals.install()  # first: a USR1/TERM that arrives while the models are built is kept
    args = parse_args(argv)
    fail = partial(report, prog="trainer.train", debug=args.debug, emit=rank_emit,
                   runtime=(ckpt.CheckpointError, ShardError, BadStepsError, PeerFailure, FolderBusy))
    try:
        cfg = load_train_config(args.config, args.overrides)
        check_inputs(cfg)  # paths, before any work
    except Exception as e:  # noqa: BLE001 - the CLI boundary
        return fail(e)
    dist = init_distributed()
    watchdog = PeerWatchdog.start()
    try:
        with oom_snapshot(cfg.logging.memory_snapshot_on_oom, Path(cfg.train.run_dir), dist.rank, dist.device):
            code = train(cfg, dist)
    except Exception as e:  # noqa: BLE001 - the CLI boundary
        watchdog.settle(e)  # a DataLoader worker killed by the launcher's teardown after a peer died
        e = peer_failure(e)  # a collective broken by another rank's death or failure
        watchdog.fail(f"rank {dist.rank} failed: {one_line(e)}")  # the other ranks end now
        own = not isinstance(e, FolderBusy)  # a busy run folder is another run's: write nothing into it
        code = fail(e, traceback_file=Path(cfg.train.run_dir) / f"error_rank{dist.rank}.log" if own else None)
        watchdog.exit(code)
        return code
    watchdog.stop()
    if code == 0:
        cleanup()
    return code


if __name__ == "__main__":
    sys.exit(main())
