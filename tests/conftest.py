"""Project-wide pytest set-up.

Tests marked `gpu` exercise CUDA-only paths (SDPA flash kernels, bf16 on CUDA, nccl). On a machine without
CUDA they are deselected, and the run says so in its header; they run on the lent GPU machine.

Shared fixtures: `single_process_group` (a one-process gloo group, the environment restored afterwards). Other
shared pieces are plain modules here (tests/ is on sys.path): helpers.py (processes and ports), data_fixtures.py,
eval_fixtures.py, model_fixtures.py, trainer_runs.py; no test module imports another.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_report_header(config: pytest.Config) -> str:
    if _cuda_available():
        return "CUDA available: tests marked `gpu` run"
    return "no CUDA device: tests marked `gpu` are deselected (they run on the lent GPU machine)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items:
        config.hook.pytest_deselected(items=gpu_items)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture(scope="module")
def single_process_group():
    """A one-process gloo group (world 1) for the tests of real DeepSpeed engines; one per test module."""
    from trainer.launch import cleanup, init_distributed

    # init_distributed exports RANK, MASTER_PORT, ... into os.environ: restore the environment exactly, or every
    # later subprocess would inherit this process's rendezvous variables.
    saved = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        os.environ.pop(k, None)
    try:
        yield init_distributed()
    finally:
        cleanup()
        os.environ.clear()
        os.environ.update(saved)
