"""Project-wide pytest set-up.

Tests marked `gpu` exercise CUDA-only paths (SDPA flash kernels, bf16 on CUDA, nccl). On a machine without
CUDA they are deselected, and the run says so in its header; they run on the lent GPU machine.
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
    _slow_modules_first(items)
    if _cuda_available():
        return
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items:
        config.hook.pytest_deselected(items=gpu_items)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


def _slow_modules_first(items: list[pytest.Item]) -> None:
    """Modules holding a test marked `slow` run first (tests keep their order inside a module): under
    `make test`'s xdist workers the longest modules start early instead of ending the run on one worker."""
    has_slow: dict[str, bool] = {}
    for item in items:
        has_slow[item.nodeid.split("::")[0]] = has_slow.get(item.nodeid.split("::")[0], False) or bool(
            item.get_closest_marker("slow"))
    items.sort(key=lambda item: not has_slow[item.nodeid.split("::")[0]])
