"""One job at a time registers a mosaicml-streaming dataset on a node.

streaming keeps each dataset's per-node state in shared memory under a small integer prefix: every rank
computes the next free prefix, then the job's local leader registers it and the other ranks attach to it. Two
jobs that build their datasets at the same moment on one node can compute the same prefix. Over different
shard folders streaming then stops with an error; over the same folder its check passes (it compares the
folders) and the ranks of one job join the other job's shared barrier, and both jobs wait forever (seen: two
trainer runs on one node over one MDS folder, every rank in the barrier's sleep loop).

`registration_lock()` serializes dataset construction across jobs on a node. Each node's local leader takes an
exclusive `flock` on a file in this user's private lock folder (`lock_folder()`: $XDG_RUNTIME_DIR, else
`/tmp/divae-<uid>`, 0700, owner checked, the file opened with O_NOFOLLOW), so another user's job can neither
stall this one, nor lock it out with a pre-created file, nor redirect it through a planted link. Jobs of
different users are not serialized against each other: streaming's shared memory segments are created 0600, so a
prefix shared across users fails in streaming instead of joining the other user's barrier. The ranks of a job
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
import socket
import stat
import tempfile
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from streaming.base.distributed import get_local_rank

LOCK_NAME = "divae_streaming_registration.lock"


class LockFolderError(RuntimeError):
    """The per-user lock folder exists but is not this user's private folder (a runtime error: exit 1)."""


def lock_folder() -> str:
    """This user's private folder for node locks: `$XDG_RUNTIME_DIR` (per user, made by the login manager) when
    set, else `<temp folder>/divae-<uid>`, created 0700. As tmux and ssh-agent do with their /tmp folders, a
    folder that is a link, is owned by another user or is open to others is refused (one line naming the owner
    and the fix), never used: another user can neither take nor redirect this user's lock."""
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    folder = os.path.join(base, "divae") if base else os.path.join(tempfile.gettempdir(), f"divae-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        kind = "a link" if stat.S_ISLNK(st.st_mode) else "not a folder" if not stat.S_ISDIR(st.st_mode) else \
            f"a folder of mode {stat.S_IMODE(st.st_mode):o}"
        raise LockFolderError(f"{folder} (the node lock folder of uid {os.getuid()}) is {kind} owned by uid "
                              f"{st.st_uid}, not a private folder of this user: remove it, or set XDG_RUNTIME_DIR "
                              "to a folder of yours (mode 0700)")
    return folder


def default_lock_path() -> str:
    return os.path.join(lock_folder(), LOCK_NAME)


def _open(path: str) -> int:
    """The lock file, never through a link (O_NOFOLLOW), private to this user."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)


def _holder(fd: int) -> str:
    """Who holds the lock (what its holder wrote: pid, host, start time), for the timeout's message."""
    try:
        return os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "holder unknown"
    except OSError:
        return "holder unknown"


def _claim(fd: int) -> None:
    """Record this process as the holder in the lock file (read by a waiting job's timeout message)."""
    info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)


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
                if fd is not None:
                    _claim(fd)
                break
            if held and fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if not all_in_time:  # decided together, so every rank raises
                who = f" ({_holder(fd)})" if fd is not None and not held else ""
                raise RuntimeError(f"could not take {path} (the streaming dataset registration lock) within "
                                   f"{timeout_s:.0f} s: another job on this node holds it{who} (stuck building "
                                   "its dataset?); stop that job or raise the timeout")
            time.sleep(backoff.uniform(0.0, 1.0))
        yield
        if group:
            dist.barrier()
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock
