"""Rank-aware logging: info from rank 0 only, warnings from every rank with their rank."""

from __future__ import annotations

import subprocess
import sys


def run_as_rank(rank: int) -> str:
    code = (
        "from divae.utils.logging import get_logger\n"
        "log = get_logger('t')\n"
        "log.info('hello info')\n"
        "log.warning('hello warn')\n"
        "log.info('every rank', extra={'all_ranks': True})\n"
    )
    env = {"RANK": str(rank), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stderr


def test_rank0_prints_info_and_warning():
    err = run_as_rank(0)
    assert "hello info" in err and "hello warn" in err
    assert "[rank 0] t: hello warn" in err
    assert "[rank" not in err.splitlines()[0]  # info lines of rank 0 carry no prefix


def test_other_ranks_print_only_warnings_with_rank():
    err = run_as_rank(3)
    assert "hello info" not in err
    assert "[rank 3] t: hello warn" in err
    assert "[rank 3] t: every rank" in err


def test_training_grid_is_the_evaluation_grid(tmp_path):
    """RunLogger.grid writes through data_pipeline.images.save_grid: [-1, 1] rows -> uint8 (nearest), one row
    per entry, num_samples columns, white 2-px padding."""
    import numpy as np
    import torch
    from PIL import Image

    from trainer.metrics import LoggingConfig, RunLogger

    g = torch.Generator().manual_seed(0)
    rows = {"input": torch.rand(5, 3, 8, 8, generator=g) * 2.4 - 1.2,  # past [-1, 1]: clamped
            "out": torch.rand(5, 3, 8, 8, generator=g) * 2 - 1}
    logger = RunLogger(LoggingConfig(num_samples=3, wandb_mode="disabled", progress=False), tmp_path, True, "x", 1, 0,
                       {})
    png = np.array(Image.open(logger.grid(7, rows)))
    logger.close()
    assert png.shape == (2 * 10 + 2, 3 * 10 + 2, 3) and (png[:2] == 255).all()
    for r, x in enumerate(rows.values()):
        for c in range(3):
            want = ((x[c].clamp(-1, 1) + 1) / 2 * 255 + 0.5).floor().to(torch.uint8).permute(1, 2, 0).numpy()
            assert (png[2 + 10 * r:10 + 10 * r, 2 + 10 * c:10 + 10 * c] == want).all(), (r, c)
