"""Run logging on rank 0: wandb (offline by default), `metrics.jsonl`, a tqdm progress bar, PNG sample grids.

    logger = RunLogger(cfg.logging, run_dir, is_main, wandb_id, total_steps, start_step, config_dict)
    logger.log(step, {"loss": ..., "lr": ...})       # every logging.every steps
    logger.grid(step, {"input": x, "diffusion": y})  # rows of images in [-1, 1] -> samples/step_XXXXXXXX.png

The wandb run id is created once and stored in every checkpoint, so a resumed run continues the same wandb
run (`resume="allow"`). `metrics.jsonl` holds one JSON object per logged step (floats at full precision).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from data_pipeline.images import save_grid
from divae.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class LoggingConfig:
    every: int = 10  # optimizer steps between metric lines
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "divae"
    run_name: str = ""  # wandb run name; "" = the run folder's name
    progress: bool = True  # tqdm bar on rank 0
    sample_every: int = 1000  # steps between PNG sample grids (0: never)
    num_samples: int = 8  # images per grid row (per rank batch is the upper bound)
    # torch.profiler Chrome trace of the last `profile_steps` optimizer steps of every `profile_every` (0: off),
    # per rank, in <run_dir>/profile/ (trainer.profiling.StepProfiler)
    profile_every: int = 0
    profile_steps: int = 2
    # CUDA only: record the allocator's history and write <run_dir>/oom_snapshot_rank<r>.pickle on out-of-memory
    # (open it in https://pytorch.org/memory_viz; trainer.profiling.oom_snapshot); recording costs a little speed
    memory_snapshot_on_oom: bool = False
    # held-out validation (trainer/validation.py): every `val_every` optimizer steps (0: off) and at the last step,
    # `val_batches` micro-batches per rank of data.val_path; logged as val_*, the best val_loss -> best.safetensors
    val_every: int = 0
    val_batches: int = 8

    def __post_init__(self) -> None:
        if self.val_every < 0 or self.val_batches < 1:
            raise ValueError(f"need val_every >= 0 (0: off) and val_batches >= 1, got {self.val_every} and "
                             f"{self.val_batches}")
        if self.profile_every < 0 or self.profile_steps < 1 or (self.profile_every and
                                                                self.profile_every <= self.profile_steps):
            raise ValueError(f"need profile_every 0 (off) or > profile_steps >= 1, got {self.profile_every} and "
                             f"{self.profile_steps}")


def new_wandb_id() -> str:
    import secrets

    return secrets.token_hex(4)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return kb / 1024


def drop_rows_after(jsonl: Path, step: int) -> int:
    """Remove the lines of `jsonl` whose "step" is above `step`, and a line torn by a kill (atomically);
    returns how many were dropped."""
    if not jsonl.is_file():
        return 0

    def kept(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:
            return False

    lines = jsonl.read_text().splitlines(keepends=True)
    keep = [ln if ln.endswith("\n") else ln + "\n" for ln in lines if kept(ln)]
    if len(keep) != len(lines):
        tmp = jsonl.with_name(jsonl.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(jsonl)
    return len(lines) - len(keep)


class RunLogger:
    def __init__(self, cfg: LoggingConfig, run_dir: Path, is_main: bool, wandb_id: str, total_steps: int,
                 start_step: int, config: dict[str, Any]):
        self.cfg, self.run_dir, self.is_main = cfg, Path(run_dir), is_main
        self.wandb = None
        self.bar = None
        if not is_main:
            return
        jsonl = self.run_dir / "metrics.jsonl"
        if start_step > 0:
            drop_rows_after(jsonl, start_step)  # logged after the checkpoint we resume from: they run again
        self.jsonl = open(jsonl, "a")
        if cfg.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name or self.run_dir.name, id=wandb_id,
                                    resume="allow", mode=cfg.wandb_mode, dir=str(self.run_dir), config=config)
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stderr,
                            mininterval=1.0, desc="train")

    def progress(self, step: int, loss: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}", refresh=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.bar is None:
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def grid(self, step: int, rows: dict[str, torch.Tensor]) -> Path | None:
        """Save rows (each (B, 3, H, W) in [-1, 1]) as one PNG, a row per entry, in the given order."""
        if not self.is_main:
            return None
        n = min(self.cfg.num_samples, *(r.shape[0] for r in rows.values()))
        path = self.run_dir / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid([to_uint8(r[:n]) for r in rows.values()], path)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Image(str(path), caption=" / ".join(rows))}, step=step)
        return path

    def close(self) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any float dtype, any device) -> uint8 (B, 3, H, W) on the CPU, rounded to nearest."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


class WindowMeter:
    """Means of metrics over the steps since the last log (keys may come and go, e.g. timestep quartiles)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        """Means of this rank's window; the window starts anew."""
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums.clear()
        self.counts.clear()
        return out

    def means_over_ranks(self, device: torch.device) -> dict[str, float]:
        """Means of the window over every rank (a collective: all ranks call it at the same step). Keys may
        differ between ranks (a timestep quartile that only one rank drew): each key is averaged over the
        ranks and steps that have it. The window starts anew."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.means()
        gathered: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(self.sums))
        keys = sorted(set().union(*gathered))
        t = torch.tensor([[self.sums.get(k, 0.0), float(self.counts.get(k, 0))] for k in keys], dtype=torch.float64,
                         device=device)
        dist.all_reduce(t)
        self.sums.clear()
        self.counts.clear()
        return {k: s / c for k, (s, c) in zip(keys, t.tolist()) if c > 0}
