"""Stop signals: SIGUSR1 = preempted or near the time limit (checkpoint, exit 75, requeue); SIGTERM = cancelled
(checkpoint, exit 143, end for good).

submitit's convention: the time-limit / preemption signal (`#SBATCH --signal=B:USR1@120`, forwarded by the
batch script to the ranks; `scancel --signal=USR1 --full` by hand) checkpoints and requeues; a plain
`scancel JOBID` (SIGTERM to every process of the job, SIGKILL `KillWait` seconds later) is the user's way to
stop a job: the ranks still save a checkpoint at the next step boundary (cheap: one step away, the same save as
a periodic one; a SIGKILL during it leaves the previous checkpoint intact, checkpoints are renamed into place),
then end without the requeue marker and with `STOP_EXIT_CODE`, and the script does not requeue.

A signal only sets a flag (handlers must not do collective work). At every step boundary the ranks agree
with an all-reduce (MAX) of their requests, so a signal that reached any rank stops all of them at the same
step; USR1 outranks TERM (at a time limit Slurm sends USR1 first, then TERM at the limit itself).

`REQUEUE_EXIT_CODE = 75` (EX_TEMPFAIL in sysexits.h: "temporary failure, retry"). The Slurm scripts requeue
the job when a rank exits with it. Under torchrun the launcher itself exits 1 when a worker fails, so the
trainer also writes `<run_dir>/REQUEUE` (the step, one line) before exiting: a script that runs torchrun
checks for that file (and deletes it) instead of the exit code. `STOP_EXIT_CODE = 143` (128 + SIGTERM, what a
shell reports for a process ended by SIGTERM).

The trainer and the evaluation CLIs share this one record of the process's signals (handlers are
process-wide anyway). `install()` sets the handlers, remembering the ones it replaced; `trainer.train.main` and the
evaluation CLIs call it first thing, so a signal that arrives while the models are built (the batch shell may
forward USR1 at any time; torchrun's children inherit it ignored) is kept and acted on at the first boundary.
`restore()` puts the previous handlers back and forgets what was received (a CLI called in-process, by a test or a
notebook, leaves the process as it found it). `agreed_request()` is the collective check at a boundary.
"""

from __future__ import annotations

import signal
from pathlib import Path

from runtime.collectives import all_reduce_max

REQUEUE_EXIT_CODE = 75
STOP_EXIT_CODE = 128 + signal.SIGTERM
REQUEUE_MARKER = "REQUEUE"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# what each signal asks for, ordered: the all-reduce keeps the largest request of any rank
NONE, STOP, REQUEUE = 0, 1, 2
_REQUEST = {signal.SIGTERM: STOP, signal.SIGUSR1: REQUEUE}
_SIGNAL = {STOP: signal.SIGTERM, REQUEUE: signal.SIGUSR1}
_received: list[int] = []  # signals seen by this process since install(), in order
_previous: dict[int, object] = {}  # the handlers install() replaced, for restore()


def _handler(signum: int, frame) -> None:  # noqa: ARG001
    _received.append(signum)


def install() -> None:
    """Install the SIGTERM / SIGUSR1 handlers (idempotent; keeps what was already received)."""
    for sig in SIGNALS:
        previous = signal.signal(sig, _handler)
        if previous is not _handler:
            _previous[sig] = previous


def restore() -> None:
    """Put back the handlers `install()` replaced and forget the signals received."""
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _received.clear()


def received() -> int | None:
    """The last signal this process received since install(), or None."""
    return _received[-1] if _received else None


def local_request() -> int:
    """NONE, STOP or REQUEUE: the largest request among the signals this process received."""
    return max((_REQUEST[s] for s in _received), default=NONE)


def agreed_request() -> int:
    """The largest request of any rank (a collective: call it on all ranks at the same boundary): NONE, STOP (a
    SIGTERM reached some rank) or REQUEUE (a SIGUSR1 did; it outranks TERM)."""
    return int(all_reduce_max(float(local_request())))


def signal_of(request: int) -> int | None:
    """The signal that asks for `request` (SIGTERM for STOP, SIGUSR1 for REQUEUE), None for NONE."""
    return _SIGNAL.get(request)


def exit_for_signal(signum: int) -> tuple[int, bool]:
    """(exit code, requeue?) of a process that stopped after `signum`: SIGUSR1 (time limit, preemption) requeues
    with REQUEUE_EXIT_CODE; SIGTERM (a plain `scancel`) ends for good with STOP_EXIT_CODE."""
    if _REQUEST.get(signum) == REQUEUE:
        return REQUEUE_EXIT_CODE, True
    return STOP_EXIT_CODE, False


def write_marker(run_dir: str | Path, step: int) -> None:
    """`<run_dir>/REQUEUE` holding the step: the Slurm scripts requeue when they find it (torchrun hides the
    ranks' exit codes)."""
    (Path(run_dir) / REQUEUE_MARKER).write_text(f"{step}\n")


def clear_marker(run_dir: str | Path) -> None:
    (Path(run_dir) / REQUEUE_MARKER).unlink(missing_ok=True)
