"""One job at a time registers a mosaicml-streaming dataset on a node.

streaming keeps each dataset's per-node state in shared memory under a small integer prefix: every rank
computes the next free prefix, then the job's local leader registers it and the other ranks attach to it. Two
jobs that build their datasets at the same moment on one node can compute the same prefix. Over different
shard folders streaming then stops with an error; over the same folder its check passes (it compares the
folders) and the ranks of one job join the other job's shared barrier, and both jobs wait forever (seen: two
trainer runs on one node over one MDS folder, every rank in the barrier's sleep loop).

`registration_lock()` serializes dataset construction across jobs on a node. Each node's local leader takes an
exclusive `flock` on a file in the temp folder (where streaming keeps its own lock files). The ranks of a job
agree, with an all-reduce, that every node's leader holds its lock before any of them builds its dataset; a job
that could not take every node's lock within `attempt_s` releases what it holds and retries after a random
back-off, so two multi-node jobs that share nodes cannot deadlock each other. The lock is released after every
rank of the job has built its dataset (a barrier), when the registration is visible to the next job.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import tempfile
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from streaming.base.distributed import get_local_rank

LOCK_NAME = "divae_streaming_registration.lock"


def default_lock_path() -> str:
    return os.path.join(tempfile.gettempdir(), LOCK_NAME)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # created by another user's job: a shared lock file is still lockable read-only
        return os.open(path, os.O_RDONLY)


def _try_lock(fd: int, within_s: float, poll_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)


def _all_ranks(*flags: bool) -> list[bool]:
    """Each flag ANDed over every rank (a collective)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


@contextlib.contextmanager
def registration_lock(path: str | None = None, *, attempt_s: float = 5.0, poll_s: float = 0.05,
                      timeout_s: float = 900.0) -> Iterator[None]:
    """Hold the node's streaming registration lock (every node of this job) while the body builds datasets.

    A collective when a process group is initialized: every rank must enter it. Raises RuntimeError naming the
    lock file when the lock could not be taken within `timeout_s` seconds (another job holds it that long)."""
    path = path or default_lock_path()
    group = dist.is_available() and dist.is_initialized()
    # Only each node's local leader locks, by streaming's own rule for its leader. Without a process group
    # (streaming will make one inside the dataset) the ranks cannot agree first: the leader still serializes its
    # own registration, best effort.
    fd = _open(path) if get_local_rank() == 0 else None
    backoff = random.Random(os.getpid() ^ time.time_ns())  # timing only: never touches the data order
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            held = fd is None or _try_lock(fd, attempt_s, poll_s)
            in_time = time.monotonic() < deadline
            all_held, all_in_time = _all_ranks(held, in_time) if group else (held, in_time)
            if all_held:
                break
            if held and fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if not all_in_time:  # decided together, so every rank raises
                raise RuntimeError(f"could not take {path} (the streaming dataset registration lock) within "
                                   f"{timeout_s:.0f} s: another job on this node holds it (stuck building its "
                                   "dataset?); stop that job or raise the timeout")
            time.sleep(backoff.uniform(0.0, 1.0))
        yield
        if group:
            dist.barrier()
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock
