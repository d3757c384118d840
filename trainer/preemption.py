"""Preemption: SIGTERM / SIGUSR1 -> checkpoint at the next step boundary -> exit with REQUEUE_EXIT_CODE.

A signal only sets a flag (handlers must not do collective work). At every step boundary the ranks agree
with an all-reduce (MAX) of their flags, so a signal that reached any rank stops all of them at the same
step; they save a checkpoint together and exit with `REQUEUE_EXIT_CODE`.

`REQUEUE_EXIT_CODE = 75` (EX_TEMPFAIL in sysexits.h: "temporary failure, retry"). The Slurm scripts requeue
the job when a rank exits with it. Under torchrun the launcher itself exits 1 when a worker fails, so the
trainer also writes `<run_dir>/REQUEUE` (the step, one line) before exiting: a script that runs torchrun
checks for that file (and deletes it) instead of the exit code. Slurm must deliver the signal early enough
for one checkpoint (`#SBATCH --signal=B:USR1@120`, forwarded by the batch script to the ranks).
"""

from __future__ import annotations

import signal
from pathlib import Path

from trainer.launch import all_reduce_max

REQUEUE_EXIT_CODE = 75
REQUEUE_MARKER = "REQUEUE"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Installs the handlers; `should_stop()` is the collective check at a step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame) -> None:  # noqa: ARG002
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank when any rank received a signal (a collective: call it on all ranks)."""
        return all_reduce_max(1.0 if self.received is not None else 0.0) > 0

    @staticmethod
    def write_marker(run_dir: str | Path, step: int) -> None:
        (Path(run_dir) / REQUEUE_MARKER).write_text(f"{step}\n")

    @staticmethod
    def clear_marker(run_dir: str | Path) -> None:
        (Path(run_dir) / REQUEUE_MARKER).unlink(missing_ok=True)
