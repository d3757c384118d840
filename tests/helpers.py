"""Process and port helpers for the tests that start real subprocesses (trainer runs, torchrun evaluations, data
preparation): the torchrun command line, find a process's descendants, SIGKILL a whole process tree, pick a free TCP
port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def _parents() -> dict[int, int]:
    """{pid: parent pid} of every process, from one pass over /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended meanwhile
                continue
    return out


def children(pid: int) -> list[int]:
    """The direct children of `pid`."""
    return [c for c, p in _parents().items() if p == pid]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), parents before their children."""
    kids: dict[int, list[int]] = {}
    for c, p in _parents().items():
        kids.setdefault(p, []).append(c)
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL `proc` and all its descendants, and the rest of its process group if it leads one (started with
    `start_new_session=True`: workers whose parent already died are in it too); then reap it."""
    if proc.returncode is None:  # not reaped yet, so its pid is still its own
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # not a group leader, or its group is gone
        pass
    proc.wait(timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous store or MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TORCHRUN = str(Path(sys.executable).with_name("torchrun"))  # the venv's launcher (its command line names it)


def torchrun(nproc: int, *args: str, port: int | None = None) -> list[str]:
    """The command line of torchrun with `nproc` ranks on this machine running `args` (`-m module ...` or a
    script): a standalone rendezvous on a port torchrun picks, or a static one on `port`."""
    rendezvous = ["--standalone"] if port is None else ["--master_port", str(port)]
    return [TORCHRUN, *rendezvous, "--nproc_per_node", str(nproc), *args]
