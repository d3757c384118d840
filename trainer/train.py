"""Train any DiVAE stage with DeepSpeed: `python -m trainer.train --config configs/X.yaml [key=value ...]`.

    torchrun --nproc_per_node 2 -m trainer.train --config configs/decoder_tiny.yaml train.steps=100

The loop is the same for every stage (the stage is a `trainer.tasks` object): per optimizer step, for each
micro-batch and each of the task's phases: loss -> NaN/inf guard -> backward -> step; then EMA, logging,
sample grids, the preemption check (all ranks agree), checkpoints. A run folder with a checkpoint resumes
from `latest`. Exit codes: 0 done, REQUEUE_EXIT_CODE (75) preempted and saved, 1 error, 2 bad config.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from divae.utils.config import ConfigError, dump_config, to_dict
from divae.utils.logging import get_logger
from trainer import checkpoint as ckpt
from trainer.config import TrainConfig, load_train_config
from trainer.ema import EMA
from trainer.engine import build_engine, engine_lr, grad_norm
from trainer.launch import DistInfo, all_reduce_max, barrier, cleanup, init_distributed
from trainer.metrics import RunLogger, WindowMeter, new_wandb_id, peak_memory_mb
from trainer.preemption import REQUEUE_EXIT_CODE, Preemption
from trainer.tasks import TASKS

log = get_logger("trainer")


class BadStepsError(RuntimeError):
    pass


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loader(cfg: TrainConfig, dist: DistInfo, micro_batch: int):
    """This rank's loader; its per-rank batch size is set from train.batch_size (data.batch_size is ignored)."""
    from data_pipeline.loaders import build_loader as _build

    if cfg.data.batch_size != micro_batch:
        log.info("data.batch_size set to %d (train.batch_size %d / (%d ranks x %d accumulation))", micro_batch,
                 cfg.train.batch_size, dist.world_size, cfg.train.grad_accum)
    return _build(replace(cfg.data, batch_size=micro_batch), dist.rank, dist.world_size)


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


def train(cfg: TrainConfig, dist: DistInfo) -> int:
    run_dir = Path(cfg.train.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    task_cls = TASKS[cfg.train.stage]
    if cfg.deepspeed.zero_stage > task_cls.max_zero_stage:
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} is not supported by the "
                          f"{cfg.train.stage} stage (max {task_cls.max_zero_stage})")
    micro = cfg.train.micro_batch(dist.world_size)
    ga, total = cfg.train.grad_accum, cfg.train.steps

    latest = ckpt.read_latest(ckpt_root) if cfg.checkpoint.resume else None
    if latest is not None:  # fail before building anything when the world size changed
        ckpt.check_compatible(ckpt.read_meta(latest), dist.world_size, latest)

    seed_all(cfg.train.seed)  # identical initial weights on every rank
    task = task_cls(cfg, dist.device)
    models = task.build_models()
    if latest is None and cfg.checkpoint.init_from:
        task.init_from(cfg.checkpoint.init_from, models)
    engines = {name: build_engine(models[name], cfg.deepspeed, cfg.optim, micro_batch=micro, grad_accum=ga,
                                  world_size=dist.world_size, grad_clip=cfg.train.grad_clip, total_steps=total)
               for name in task.phases}
    task.attach(engines)
    emas = {n: EMA(engines[n].module.inner, cfg.ema, cfg.deepspeed.zero_stage)
            for n in task.ema_phases if cfg.ema.enabled}
    loader = build_loader(cfg, dist, micro)
    seed_all(cfg.train.seed + 1000 * dist.rank + 1)  # per-rank randomness (noise, timesteps)

    step, samples_seen, wandb_id = 0, 0, new_wandb_id()
    if latest is not None:
        meta, rank_state, ema_states = ckpt.load(latest, rank=dist.rank, world_size=dist.world_size,
                                                 engines=engines)
        step, samples_seen, wandb_id = meta["step"], meta["samples_seen"], meta["wandb_id"]
        loader.load_state_dict(rank_state["loader"])
        task.load_state_dict(rank_state["task"])
        for n, ema in emas.items():
            ema.load_state_dict(ema_states[n], meta["ema_updates"][n])
        ckpt.set_rng_state(rank_state["rng"])
    elif dist.is_main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    if dist.is_main:
        Preemption.clear_marker(run_dir)
    preempt = Preemption()
    logger = RunLogger(cfg.logging, run_dir, dist.is_main, wandb_id, total, step, to_dict(cfg))
    batches = Batches(loader)
    meter = WindowMeter()
    bad_in_a_row, sample_batch = 0, None
    global_batch = micro * ga * dist.world_size

    def save(at_step: int) -> None:
        weights = {n: e.state_dict() for n, e in emas.items()} if cfg.checkpoint.export_ema and emas else \
            {n: _gathered_state(engines[n], cfg.deepspeed.zero_stage) for n in task.ema_phases}
        meta = {"step": at_step, "samples_seen": samples_seen, "world_size": dist.world_size,
                "zero_stage": cfg.deepspeed.zero_stage, "stage": cfg.train.stage, "wandb_id": wandb_id,
                "engines": list(engines), "ema": list(emas), "ema_updates": {n: e.num_updates for n, e in emas.items()},
                "time": time.time()}
        rng = ckpt.rng_state()
        rank_state = {"rng": rng, "loader": loader.state_dict(), "task": task.state_dict()}
        ckpt.save(ckpt_root, at_step, rank=dist.rank, engines=engines, rank_state=rank_state, meta=meta,
                  config_yaml=dump_config(cfg), ema={n: e.state_dict() for n, e in emas.items()},
                  export_fn=(lambda p: task.export(str(p), weights)) if cfg.checkpoint.export else None,
                  keep_last=cfg.checkpoint.keep_last, export_name=task.export_name)
        # Saving must not move the RNG streams (the export builds modules, whose init draws random
        # numbers): the run continues from exactly the state a resume restores.
        ckpt.set_rng_state(rng)

    exit_code = 0
    while step < total:
        t_step = time.perf_counter()
        data_wait = 0.0
        step_metrics: dict[str, float] = {}
        bad_keys: list[str] = []
        for _ in range(ga):
            t_data = time.perf_counter()
            batch = batches.next()
            data_wait += time.perf_counter() - t_data
            if sample_batch is None:
                sample_batch = batch
            for phase in task.phases:
                out = task.loss(batch, phase, step)
                if out is None:
                    continue
                loss, metrics = out
                if all_reduce_max(0.0 if torch.isfinite(loss).item() else 1.0) > 0:
                    bad_keys = list(batch.get("key", []))[:16]
                    step_metrics[f"{phase}_bad"] = 1.0
                    continue  # skip backward and optimizer step of this micro-batch on every rank
                engines[phase].backward(loss)
                engines[phase].step()
                for k, v in metrics.items():
                    key = k if phase == task.phases[0] else f"{phase}/{k}" if "/" not in k else k
                    step_metrics[key] = step_metrics.get(key, 0.0) + v / ga
        step += 1
        samples_seen += global_batch
        if bad_keys:
            bad_in_a_row += 1
            log.warning("step %d: non-finite loss on some rank, step skipped (%d in a row); batch keys on this "
                        "rank: %s", step, bad_in_a_row, bad_keys)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise BadStepsError(f"{bad_in_a_row} steps in a row had a non-finite loss (last batch keys "
                                    f"{bad_keys}); lower optim.lr, check the data, or resume from an earlier "
                                    "checkpoint")
        else:
            bad_in_a_row = 0
        for ema in emas.values():
            ema.update(step)
        dt = time.perf_counter() - t_step
        first = engines[task.phases[0]]
        step_metrics.update(lr=engine_lr(first), grad_norm=grad_norm(first), step_time=dt, data_wait=data_wait,
                            images_per_s=global_batch / dt)
        meter.add(step_metrics)
        logger.progress(step, step_metrics.get("loss", float("nan")), global_batch / dt)
        if step % cfg.logging.every == 0 or step == total:
            means = meter.means()
            means["peak_mem_mb"] = peak_memory_mb(dist.device)
            means["samples_seen"] = samples_seen
            logger.log(step, means)
        if cfg.logging.sample_every and (step % cfg.logging.sample_every == 0 or step == total):
            logger.grid(step, task.sample(sample_batch))
        stop = preempt.should_stop()
        if stop or step == total or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            save(step)
        if stop:
            log.warning("preemption signal received: checkpoint at step %d saved, exiting with %d",
                        step, REQUEUE_EXIT_CODE)
            if dist.is_main:
                Preemption.write_marker(run_dir, step)
            exit_code = REQUEUE_EXIT_CODE
            break
    logger.close()
    return exit_code


def _gathered_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full state dict of an engine's model (a collective gather under ZeRO-3)."""
    model = engine.module.inner
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=64 optim.lr=2e-4")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed()
    try:
        code = train(cfg, dist)
    except ConfigError as e:
        log.error("config error: %s", e)
        code = 2
    finally:
        pass
    if code == 0:
        cleanup()
    return code


if __name__ == "__main__":
    sys.exit(main())
