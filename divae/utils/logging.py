"""Rank-aware logging shared by every package.

    log = get_logger(__name__)
    log.info("step %d", step)        # printed by rank 0 only
    log.warning("slow batch")        # printed by every rank, as "[rank 3] slow batch"
    log.info("...", extra={"all_ranks": True})   # an info line every rank prints

The rank comes from torch.distributed when it is initialised, else from the launcher's environment
(RANK, then SLURM_PROCID), else 0. The level is taken from DIVAE_LOG_LEVEL (default INFO).
"""

from __future__ import annotations

import logging
import os
import sys

_HANDLER_NAME = "divae-rank-aware"


def get_rank() -> int:
    """Global rank of this process: torch.distributed if initialised, else env RANK/SLURM_PROCID, else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class RankFilter(logging.Filter):
    """Drops records below WARNING on ranks other than 0 and prefixes every record with its rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = get_rank()
        record.rank_prefix = f"[rank {rank}] " if (rank != 0 or record.levelno >= logging.WARNING) else ""
        return rank == 0 or record.levelno >= logging.WARNING or getattr(record, "all_ranks", False)


def setup_logging(level: str | int | None = None) -> None:
    """Install the rank-aware handler on the root logger once (idempotent)."""
    root = logging.getLogger()
    if any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(rank_prefix)s%(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("DIVAE_LOG_LEVEL", "INFO"))


def get_logger(name: str) -> logging.Logger:
    """A logger whose records go through the rank-aware handler."""
    setup_logging()
    return logging.getLogger(name)
