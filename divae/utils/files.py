"""File helpers shared by every package (torch-free): hashing, write-then-rename, and the one lock on a folder
a run writes."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO

LOCK = ".lock"  # the lock file of a folder that one run at a time writes (see `folder_lock`)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks (constant memory for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write-then-rename: the body writes into a temporary file beside `path`, which replaces `path` (flushed
    and fsynced) only when the body ends without error. A kill at any moment leaves the old file or the new
    one, never a part of one; a failed body leaves no temporary file."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class FolderBusy(RuntimeError):
    """Another run holds the lock on a folder (a runtime error: exit 1); the message names the holder."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, busy: Callable[[str], str],
                exc: type[FolderBusy] = FolderBusy) -> Iterator[None]:
    """Hold an exclusive lock on `folder` for the body: flock on `folder/.lock`, as git's index.lock or
    Composer's run-folder lock, but released by the kernel even after SIGKILL. A second holder gets `exc`:
    `busy(holder)`, the holder being the first run's pid, host, start time and command. The lock
    file is opened with O_NOFOLLOW (a planted link is not followed) and removed on release; a holder re-checks
    after locking that the file it locked is still the one at the path, so removal cannot let two runs in."""
    path = os.path.join(folder, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown holder"
            finally:
                os.close(fd)
            raise exc(busy(holder)) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed that file as we locked it: lock the new one
    try:
        info = (f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)[:300]}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode("utf-8", "replace"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)
