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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test's two workers share two cores: one intra-op thread each, in the processes they start too. An OpenMP
    # team of two on an oversubscribed core spins: a 10 s in-process test took 240 s that way.
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


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
    _longest_modules_first(items)
    if _cuda_available():
        return
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items:
        config.hook.pytest_deselected(items=gpu_items)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


# The longest modules (1-3 minutes each on 2 cores), started first so that under `make test`'s two xdist workers
# (one module per worker at a time) none of them is left to run alone at the end. A scheduling hint only.
LONGEST_MODULES = ("test_mini_table1.py", "test_demo.py", "test_trainer.py", "test_slurm.py", "test_elastic.py",
                   "test_hostile_train.py", "test_distill.py", "test_eval_scale.py", "test_gpu_check.py",
                   "test_t2i_demo.py", "test_data_loaders.py", "test_eval_recon.py", "test_flops.py")


def _longest_modules_first(items: list[pytest.Item]) -> None:
    """Order the modules: LONGEST_MODULES in that order, then the other modules with a test marked `slow`, then
    the rest; tests keep their order inside a module."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0].rsplit("/", 1)[-1]

    has_slow = {module(i) for i in items if i.get_closest_marker("slow")}
    rank = {name: n for n, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda i: (rank.get(module(i), len(rank)), module(i) not in has_slow))


@pytest.fixture(scope="module")
def single_process_group():
    """A one-process gloo group (world 1) for the tests of real DeepSpeed engines; one per test module."""
    from runtime.launch import cleanup, init_distributed

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
