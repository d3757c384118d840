"""Fault injection and test probes: all of them live here, each switched on by one `DIVAE_PROBE_*` variable.

Production runs never set these; the tests do, to drive the trainer into the failures it must survive and to
record what it did. Unset, each probe costs one environment lookup.

- `DIVAE_PROBE_CKPT_CRASH_AT_STEP=STEP`: every rank exits (code 13) in the middle of that step's checkpoint save.
- `DIVAE_PROBE_NAN_LOSS=STEP:MICRO:RANK`: that micro-batch's loss is non-finite (0-based completed step; the
  NaN-guard drill).
- `DIVAE_PROBE_TRACE_SAMPLES=FOLDER`: each rank appends `{"step", "rank", "index"}` per micro-batch to
  `FOLDER/samples_rank<r>.jsonl` (which samples each optimizer step used).
- `DIVAE_PROBE_ELASTIC_DUMP=FOLDER`: after an elastic resume, rank 0 writes each engine's state, gathered back from
  the new partitions, to `FOLDER/<engine>.safetensors`.
- `DIVAE_PROBE_KILL_AFTER_SHARD=K`: `trainer.pre_encode` SIGKILLs itself between writing shard K and its receipt.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

from divae.utils.logging import get_logger

CKPT_CRASH_AT_STEP = "DIVAE_PROBE_CKPT_CRASH_AT_STEP"
NAN_LOSS = "DIVAE_PROBE_NAN_LOSS"
TRACE_SAMPLES = "DIVAE_PROBE_TRACE_SAMPLES"
ELASTIC_DUMP = "DIVAE_PROBE_ELASTIC_DUMP"
KILL_AFTER_SHARD = "DIVAE_PROBE_KILL_AFTER_SHARD"
CRASH_EXIT_CODE = 13

log = get_logger("trainer")


def crash_in_save(step: int) -> None:
    """Exit this rank at once (no cleanup, like a node failure) when the save of `step` is the one asked for."""
    if os.environ.get(CKPT_CRASH_AT_STEP) == str(step):
        log.error("fault injection (%s=%d): exiting in the middle of a checkpoint save", CKPT_CRASH_AT_STEP, step)
        os._exit(CRASH_EXIT_CODE)


def nan_loss_at() -> tuple[int, int, int] | None:
    """(completed step, micro-batch index, rank) whose loss is to be made non-finite, or None."""
    v = os.environ.get(NAN_LOSS)
    return tuple(int(x) for x in v.split(":")) if v else None


def sample_tracer(rank: int) -> Callable[[int, dict], None] | None:
    """A function recording which sample indices each micro-batch of `step` used, or None when not asked for."""
    d = os.environ.get(TRACE_SAMPLES)
    if not d:
        return None
    Path(d).mkdir(parents=True, exist_ok=True)
    path = Path(d) / f"samples_rank{rank}.jsonl"

    def trace(step: int, batch: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "index": batch["index"].tolist()}) + "\n")

    return trace


def dump_elastic(engines: dict, rank: int) -> None:
    """Write each engine's optimizer state as the world-size-free file would hold it (a collective: every rank)."""
    d = os.environ.get(ELASTIC_DUMP)
    if not d:
        return
    from trainer import elastic

    Path(d).mkdir(parents=True, exist_ok=True)
    for name, engine in engines.items():
        if elastic.supported(engine):
            tensors, info = elastic.gather(engine, keep=rank == 0)
            if rank == 0:
                elastic.write(Path(d) / f"{name}.safetensors", tensors, info)


def kill_after_shard(k: int) -> None:
    """SIGKILL this process (and its DataLoader workers when it leads its own process group, as `kill -9` of a
    Slurm step kills every process of the step) right after shard `k` was written."""
    if os.environ.get(KILL_AFTER_SHARD) == str(k):
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
