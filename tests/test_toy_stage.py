"""A new training stage touches trainer/tasks/ (and, for a config section of its own, trainer/config.py) only: a toy
Task registered in TASKS is accepted by the config, checked by preflight, priced by the planner and counted by the
MFU log through its own class methods. trainer/flops.py, plan.py and preflight.py hold no branch per stage."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from data_fixtures import photo_shards

from divae.utils.config import ConfigError
from trainer.config import load_train_config
from trainer.flops import Throughput, trace
from trainer.plan import make_plan
from trainer.preflight import check_inputs
from trainer.tasks import TASKS
from trainer.tasks.base import COMMON_SECTIONS, Task

WIDTH = 32


class ToyTask(Task):
    """One linear layer on flattened pixels' first WIDTH values."""

    config_sections = COMMON_SECTIONS

    @classmethod
    def required_files(cls, cfg):
        return [("checkpoint.init_from", cfg.checkpoint.init_from, "the toy's weights (e.g. checkpoint.init_from=w)")]

    @classmethod
    def traced_parts(cls, cfg, checkpointing, batch):
        return (lambda: nn.Linear(WIDTH, WIDTH)), (lambda m: m(torch.randn(batch, WIDTH)).square().mean())

    @classmethod
    def sample_flops(cls, cfg, vq_cfg=None, forward=True):
        build, step = cls.traced_parts(cfg, False, 1)
        return {"train": float(trace(build, step).flops), "forward": 0.0, "tokens": 0.0}

    @classmethod
    def param_counts(cls, cfg, vq_cfg=None):
        return WIDTH * WIDTH + WIDTH, 0


@pytest.fixture
def toy(monkeypatch, tmp_path):
    monkeypatch.setitem(TASKS, "toy", ToyTask)
    photo_shards(tmp_path, 4, shard_size=4)
    return tmp_path


def test_the_config_takes_a_registered_stage_and_names_the_others(toy):
    assert load_train_config(None, ["train.stage=toy"]).train.stage == "toy"
    with pytest.raises(ConfigError, match=r"train.stage: 'toys' is not one of \['vq', 'decoder', .*'toy'\]"):
        load_train_config(None, ["train.stage=toys"])


def test_preflight_checks_the_files_the_stage_names(toy):
    base = ["train.stage=toy", f"data.path={toy / 'mds'}", f"train.run_dir={toy / 'run'}"]
    with pytest.raises(ConfigError, match="checkpoint.init_from is required: the toy's weights"):
        check_inputs(load_train_config(None, base))
    with pytest.raises(ConfigError, match="checkpoint.init_from=.*does not exist"):
        check_inputs(load_train_config(None, [*base, f"checkpoint.init_from={toy / 'missing'}"]))
    (toy / "w").write_bytes(b"toy")
    check_inputs(load_train_config(None, [*base, f"checkpoint.init_from={toy / 'w'}"]))


def test_planner_and_mfu_log_count_the_stage_through_its_own_methods(toy):
    cfg = load_train_config(None, ["train.stage=toy", "train.steps=10", "train.batch_size=8"])
    flops = 2 * 2 * WIDTH * WIDTH  # the matmul forward and its weight gradient (the input needs none), 2 per MAC
    plan = make_plan(cfg, "toy")
    assert (plan.params, plan.frozen_params, plan.flops_train) == (WIDTH * WIDTH + WIDTH, 0, flops)
    assert plan.act > 0 and plan.steps == 10 and plan.batch == 8
    tp = Throughput.for_run(cfg, ToyTask(cfg, torch.device("cpu")), torch.device("cpu"))
    assert tp.flops_per_sample == flops and tp.figures(100.0, 2)["tflops_per_gpu"] == pytest.approx(50 * flops / 1e12)
