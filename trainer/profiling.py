"""Profiling of the training loop, both off by default (`logging.*`):

- `StepProfiler` (`logging.profile_every: N`, `logging.profile_steps: K`): a torch.profiler trace of optimizer
  steps N-K+1 .. N of every N (as torchtitan's `profile_freq`), each rank its own Chrome trace
  <run_dir>/profile/step_<N>_rank<r>.json (open in chrome://tracing or https://ui.perfetto.dev): CPU ops, and
  CUDA kernels on a GPU; one `ProfilerStep#<step>` span per step.
- `oom_snapshot` (`logging.memory_snapshot_on_oom: true`, CUDA only): records the CUDA caching allocator's
  history (`torch.cuda.memory._record_memory_history`) and, when the run dies of out-of-memory, writes
  <run_dir>/oom_snapshot_rank<r>.pickle (drag it into https://pytorch.org/memory_viz: every live block and the
  stack that allocated it) before the error goes on. Nothing on a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from divae.utils.logging import get_logger

log = get_logger(__name__)


class StepProfiler:
    """torch.profiler over the last `active` of every `every` optimizer steps (every = 0: does nothing).

    profiler = StepProfiler(every, active, run_dir / "profile", rank, device, start_step)
    ... after each optimizer step: profiler.step(step)   # step: completed optimizer steps
    profiler.close()
    """

    def __init__(self, every: int, active: int, folder: Path, rank: int, device: torch.device, start_step: int = 0):
        self.every, self.active, self.folder, self.rank = every, active, Path(folder), rank
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof: torch.profiler.profile | None = None
        self.span: torch.profiler.record_function | None = None  # the step being profiled
        self.traces: list[Path] = []  # written so far
        self._maybe_start(start_step)

    def _maybe_start(self, done: int) -> None:
        """Start a window when the next `active` steps end one of `every` steps."""
        if self.every and self.prof is None and (done + self.active) % self.every == 0:
            self.prof = torch.profiler.profile(activities=self.activities)
            self.prof.start()
        if self.prof is not None:
            self.span = torch.profiler.record_function(f"ProfilerStep#{done + 1}")
            self.span.__enter__()

    def step(self, done: int) -> None:
        """Call after optimizer step number `done` (1-based)."""
        if self.prof is not None:
            self.span.__exit__(None, None, None)
            if done % self.every == 0:
                self.prof.stop()
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"step_{done:08d}_rank{self.rank:05d}.json"
                self.prof.export_chrome_trace(str(path))
                self.traces.append(path)
                log.info("profiler trace of steps %d-%d: %s", done - self.active + 1, done, path)
                self.prof = None
        self._maybe_start(done)

    def close(self) -> None:
        """Stop a window left open (the run ended inside it); its trace is not written."""
        if self.prof is not None:
            self.span.__exit__(None, None, None)
            self.prof.stop()
            self.prof = None


@contextlib.contextmanager
def oom_snapshot(enabled: bool, folder: Path, rank: int, device: torch.device) -> Iterator[None]:
    """Around the training run: on CUDA with `enabled`, record allocator history and write
    <folder>/oom_snapshot_rank<r>.pickle if out-of-memory escapes (then re-raise). A no-op otherwise."""
    if not enabled or device.type != "cuda":
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        yield
    except torch.OutOfMemoryError:
        path = Path(folder) / f"oom_snapshot_rank{rank:05d}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        log.error("CUDA out of memory: allocator snapshot written to %s (open it in pytorch.org/memory_viz)", path)
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
