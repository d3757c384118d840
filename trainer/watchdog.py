"""Peer watchdog: when one rank dies or fails, every rank ends within seconds.

Without it, a rank killed by SIGKILL (the out-of-memory killer, a lost node) or one that raises leaves the
others blocked in their next collective: NCCL waits out the process-group timeout (30 min), gloo waits until
the dead process's sockets close, and the exit path then joins DataLoader workers; torchrun's SIGTERM to
the survivors is taken for a stop request (runtime.signals), so they end only when torchrun
escalates to SIGKILL after its shutdown timeout (30 s; 100 s under slurm/).

    wd = PeerWatchdog.start()   # after init_distributed, on every rank (a collective; a no-op for 1 rank)
    ...                         # on an error: wd.fail("rank 3: <one line>") then wd.exit(code)
    wd.stop()                   # every rank, once it finished or was preempted and saved (a collective)

How it works: a daemon thread per rank, ticking every `interval` seconds, on a second client connection to
the rendezvous store (MASTER_ADDR:MASTER_PORT, the store torch.distributed itself uses: torchrun's agent, or
rank 0 for srun and single launches):
- ranks on the same machine (same boot id and PID namespace) watch each other's processes directly: a peer
  whose process is gone, a zombie, or another process under its PID is dead, found within one tick;
- for whole machines that vanish, every rank writes a heartbeat (a counter) to the store, and rank r
  watches rank r+1 (mod W): a heartbeat unchanged for `timeout` seconds by the watcher's clock (no clock
  sync needed) means that rank is gone. The ring keeps it at three store operations per rank per tick, and
  any set of dead ranks short of all of them has a live watcher;
- a watcher that finds a dead rank publishes an abort record naming it; a rank that fails publishes the
  abort record itself (`fail`);
- every thread reads the abort record each interval and, when it is there, logs one line and ends its
  process at once (`os._exit(1)`): from a thread, because the main thread may be blocked in a collective;
- `stop` marks the rank done (a done rank's silent heartbeat is not a death) and, after a barrier, ends the
  thread, so the end of a run or a preemption (SIGUSR1 -> checkpoint -> exit 75) is never taken for a death.

A heartbeat thread keeps beating while the main thread computes or writes checkpoints (torch, numpy and
file I/O release the GIL), so only a process that is gone, stopped or frozen misses `timeout`. Settings:
DIVAE_WATCHDOG_TIMEOUT (seconds, default 5; 0 turns the watchdog off), DIVAE_WATCHDOG_INTERVAL (0.5).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from datetime import timedelta

import torch

from divae.utils.cli import one_line
from divae.utils.logging import get_logger
from runtime.collectives import all_gather_object, barrier, rank_and_world

log = get_logger(__name__)

TIMEOUT_ENV, INTERVAL_ENV = "DIVAE_WATCHDOG_TIMEOUT", "DIVAE_WATCHDOG_INTERVAL"
FIRST_BEAT_GRACE = 60.0  # seconds a watched rank may take to write its first heartbeat


class PeerFailure(RuntimeError):
    """A collective failed because another rank died or failed (that rank's own message says why)."""


def peer_failure(e: BaseException) -> BaseException:
    """`e` as a PeerFailure when it is a failed collective (a gloo or NCCL error), else `e` itself."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e)
    if isinstance(e, dist_error) or (isinstance(e, RuntimeError) and any(
            w in text for w in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer"))):
        out = PeerFailure("a collective with the other ranks failed: another rank died or failed first (see its "
                          f"message above): {one_line(e)}")
        out.__cause__ = e
        return out.with_traceback(e.__traceback__)
    return e


class PeerWatchdog:
    """See the module docstring. `PeerWatchdog.start()` returns an inactive watchdog for one rank, when
    DIVAE_WATCHDOG_TIMEOUT=0, or when the store cannot be reached (with a warning)."""

    def __init__(self, store=None, rank: int = 0, world_size: int = 1, prefix: str = "", interval: float = 0.5,
                 timeout: float = 5.0, local_peers: dict[int, tuple[int, str]] | None = None):
        self.store, self.rank, self.world_size, self.prefix = store, rank, world_size, prefix
        self.interval, self.timeout = interval, timeout
        self.local_peers = local_peers or {}  # rank -> (pid, process start time) of ranks on this machine
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one of `fail` (the main thread) and `_end` (the thread) reports
        self._thread: threading.Thread | None = None
        self._beats = 0

    @property
    def active(self) -> bool:
        return self._thread is not None

    # -- set-up --------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, interval: float | None = None, timeout: float | None = None) -> PeerWatchdog:
        """Collective: start the watchdog on every rank of the initialised process group."""
        rank, world = rank_and_world()
        timeout = float(os.environ.get(TIMEOUT_ENV, "5")) if timeout is None else timeout
        interval = float(os.environ.get(INTERVAL_ENV, "0.5")) if interval is None else interval
        if world < 2 or timeout <= 0:
            return cls()
        token = all_gather_object(uuid.uuid4().hex if rank == 0 else None)[0]  # fresh keys for every run
        store = None
        try:
            store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                               is_master=False, timeout=timedelta(seconds=max(10.0, timeout)),
                                               wait_for_workers=False)
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            log.warning("peer watchdog off (cannot reach the rendezvous store: %s); a rank that dies may leave "
                        "the others waiting in a collective", e)
        me = (store is not None, _machine_key(), os.getpid(), _proc_start(os.getpid()))
        everyone = all_gather_object(me)
        if not all(ok for ok, *_ in everyone):
            return cls()
        local = {r: (pid, start) for r, (_, key, pid, start) in enumerate(everyone)
                 if r != rank and key is not None and key == me[1] and start is not None}
        wd = cls(store, rank, world, f"divae_watchdog/{token}/", max(0.05, interval), max(timeout, 2 * interval),
                 local)
        wd._beat()  # the first heartbeat before the thread starts
        wd._thread = threading.Thread(target=wd._run, name="divae-peer-watchdog", daemon=True)
        wd._thread.start()
        return wd

    # -- API -----------------------------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """Publish that this rank failed (`reason`: one line), so that every other rank ends now. Call it before
        reporting the error: from then on the thread stays silent (this rank reports and exits itself)."""
        if self.store is None:
            return
        with self._lock:  # waits for a thread that is already ending the process
            self._stop.set()
        self._publish(reason)

    def settle(self, e: BaseException) -> None:
        """Before this rank reports `e`: when `e` may be the echo of a peer's death rather than a fault of its own
        (a DataLoader worker killed by a signal: the launcher tears the job down when a rank dies, its SIGTERM can
        reach this rank's workers before this thread's next tick), give the thread up to three ticks to find the
        dead peer and end this rank with the line that names it. Returns at once for any other error, or when
        no peer is dead (then this rank reports `e` itself)."""
        if self._thread is None or not ("DataLoader worker" in str(e) and "killed by signal" in str(e)):
            return
        deadline = time.monotonic() + 3 * self.interval
        while (left := deadline - time.monotonic()) > 0:
            try:
                time.sleep(left)
            except RuntimeError:  # the DataLoader's SIGCHLD handler, raising for the next worker that died
                pass

    def _publish(self, reason: str) -> None:
        try:
            if not self.store.check([self._key("abort")]):
                self.store.set(self._key("abort"), reason)
        except (RuntimeError, OSError):
            pass

    def exit(self, code: int) -> None:
        """End this process now with `code` when it has peers (no cleanup that could block on a dead peer)."""
        if self.world_size > 1:
            self._flush()
            os._exit(code)

    def stop(self) -> None:
        """Collective, at a normal end (done or preempted): mark this rank done, wait for all, stop the thread."""
        if self._thread is None:
            return
        try:
            self.store.set(self._key(f"done/{self.rank}"), "1")
        except (RuntimeError, OSError):
            pass
        barrier()
        self._stop.set()
        self._thread.join(timeout=5 * self.interval + 1)
        self._thread = None

    # -- thread --------------------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return self.prefix + name

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(self._key(f"hb/{self.rank}"), str(self._beats))

    def _run(self) -> None:
        peer = (self.rank + 1) % self.world_size
        last_value, last_change = None, time.monotonic()
        seen = False
        store_down_since = None
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            for r, (pid, start) in self.local_peers.items():
                if not _proc_alive(pid, start) and not self._done(r):
                    self._end(self._abort_reason() or f"rank {r} (pid {pid}, on this machine) died")
            try:
                self._beat()
                if self.store.check([self._key("abort")]):
                    # A peer failed. This rank may be failing too (the same bad config on every rank): one tick
                    # for its main thread to report its own error (`fail` sets _stop) before ending it here.
                    reason = self.store.get(self._key("abort")).decode(errors="replace")
                    if self._stop.wait(self.interval):
                        return
                    self._end(reason)
                hb = self._key(f"hb/{peer}")
                value = self.store.get(hb) if self.store.check([hb]) else None
                store_down_since = None
            except (RuntimeError, OSError) as e:  # the store is gone (its host died) or unreachable
                if self._stop.is_set():
                    return
                store_down_since = store_down_since or now
                if now - store_down_since > self.timeout:
                    self._end(f"the rendezvous store {os.environ.get('MASTER_ADDR')}:"
                              f"{os.environ.get('MASTER_PORT')} stopped answering ({e}); its host has probably "
                              "died", publish=False)
                continue
            if value != last_value:
                last_value, last_change, seen = value, now, seen or value is not None
                continue
            silent = now - last_change
            if silent > (self.timeout if seen else FIRST_BEAT_GRACE) and not self._done(peer):
                self._end(f"rank {peer} stopped responding (no heartbeat for {silent:.1f} s): it died or froze")

    def _abort_reason(self) -> str | None:
        try:
            key = self._key("abort")
            return self.store.get(key).decode(errors="replace") if self.store.check([key]) else None
        except (RuntimeError, OSError):
            return None

    def _done(self, rank: int) -> bool:
        try:
            return bool(self.store.check([self._key(f"done/{rank}")]))
        except (RuntimeError, OSError):
            return False

    def _end(self, reason: str, publish: bool = True) -> None:
        with self._lock:  # held until the process ends: `fail` on the main thread cannot print after this
            if self._stop.is_set():
                return
            if publish:
                self._publish(reason)
            log.error("ending this rank: %s", reason)
            self._flush()
            os._exit(1)

    @staticmethod
    def _flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def _machine_key() -> str | None:
    """Boot id and PID namespace: equal for two processes exactly when their PIDs are comparable."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of process `pid`, None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _proc_alive(pid: int, start: str) -> bool:
    """False when process `pid` started at `start` is gone: no such process, a zombie, or another process
    under the PID. True when it runs (stopped counts as alive) or when /proc cannot tell (never a guess)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True
    return fields[0] not in ("Z", "X", "x") and fields[19] == start
