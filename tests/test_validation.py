"""trainer/validation.py in-process (no DeepSpeed): the validation set's split over ranks, the weight swap and the
RNG it must leave as they were, the best checkpoint's bookkeeping, the config refusals, and the prior resolver of
divae.generate / evaluation.t2i_fid. The real runs (metrics.jsonl, best.safetensors, resume, bitwise-equal training
losses) are in tests/test_trainer_prior.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from divae.utils.cli import UsageError
from divae.utils.config import ConfigError
from trainer.config import load_train_config
from trainer.tasks.base import Task
from trainer.validation import BestCheckpoint, evaluating, seeded, val_indices

ROOT = Path(__file__).resolve().parents[1]


def test_val_indices_split_the_folder_across_ranks(caplog):
    per_rank = [val_indices(100, 4, r, 3, 2, "v") for r in range(3)]
    flat = [i for rank in per_rank for batch in rank for i in batch]
    assert sorted(flat) == list(range(24))  # 2 batches x 4 x 3 ranks: the folder's first 24, each once
    assert per_rank[1] == [[4, 5, 6, 7], [16, 17, 18, 19]]
    assert val_indices(100, 4, 1, 3, 2, "v") == per_rank[1]  # the same every time
    assert len(val_indices(30, 4, 0, 3, 8, "v")) == 2 and "fewer than logging.val_batches=8" in caplog.text
    with pytest.raises(ConfigError, match="data.val_path=v holds 11 samples"):
        val_indices(11, 4, 0, 3, 1, "v")


class _Engine(nn.Module):
    """Stands in for a DeepSpeed engine: engine.module.inner is the model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.module = nn.Module()
        self.module.inner = inner


def test_evaluating_swaps_the_weights_in_and_restores_them_bitwise():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    inner[2].eval()  # a module kept in eval mode on purpose stays so
    task = Task(None, torch.device("cpu"))
    task.attach({"model": _Engine(inner)})
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    ema = {k: v + 1 for k, v in before.items()}
    with evaluating(task, {"model": ema}):
        assert not any(m.training for m in task.engines["model"].modules())
        assert not torch.is_grad_enabled()
        assert all(torch.equal(v, ema[k].to(v.dtype)) for k, v in inner.state_dict().items())
        inner[0].weight.add_(1)  # whatever happens inside
    assert all(torch.equal(v, before[k]) for k, v in inner.state_dict().items())
    assert inner.training and inner[0].training and not inner[2].training and torch.is_grad_enabled()


def test_seeded_leaves_the_rng_streams_as_they_were():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    draws = []
    for _ in range(2):
        with seeded(7):
            draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])  # the same draws at every validation
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_best_is_the_lowest_val_loss_and_reloads(tmp_path):
    val_set = {"val_path": "v", "val_samples": 16}
    best = BestCheckpoint(tmp_path, True, val_set, "ema")
    written = []
    for step, v in ((2, 3.0), (4, 2.0), (6, 2.5), (8, float("nan")), (10, 1.9), (12, 1.9)):
        metrics = {"val_loss": v, "val_token_acc": 0.1 * step}
        if best.improves(metrics):
            best.save(step, metrics, lambda p, s=step: p.write_text(f"weights of step {s}"))
            written.append(step)
    assert written == [2, 4, 10]
    assert (tmp_path / "best.safetensors").read_text() == "weights of step 10"
    rec = json.loads((tmp_path / "best.json").read_text())
    assert (rec["step"], rec["val_loss"], rec["val_token_acc"], rec["weights"]) == (10, 1.9, 1.0, "ema")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.safetensors"]  # no temporary left

    resumed = BestCheckpoint(tmp_path, True, val_set, "ema")
    resumed.load(json.loads(json.dumps(best.record)))  # through trainer_state.json
    assert resumed.record == best.record and not resumed.improves({"val_loss": 2.0})
    other = BestCheckpoint(tmp_path, True, {"val_path": "v", "val_samples": 32}, "ema")  # another world size
    other.load(best.record)
    assert other.record is None and other.improves({"val_loss": 2.0})


def test_default_val_metrics_are_the_first_phase_loss_metrics():
    class Toy(Task):
        phases = ("a", "b")

        def loss(self, batch, phase, step):
            return torch.tensor(2.0), {"loss": torch.tensor(2.0 + step), "mse": 0.5, "phase_" + phase: 1.0}

    assert Toy(None, torch.device("cpu")).val_metrics({}, 3) == {"val_loss": torch.tensor(5.0), "val_mse": 0.5,
                                                                 "val_phase_a": 1.0}


def test_config_refuses_a_validation_it_cannot_do():
    tiny = ROOT / "configs" / "prior_tiny.yaml"
    with pytest.raises(ConfigError, match=r"logging.val_every=5 needs data.val_path="):
        load_train_config(tiny, ["logging.val_every=5"])
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_train_config(tiny, ["logging.val_every=5", "data.val_path=v", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match="val_batches >= 1"):
        load_train_config(tiny, ["logging.val_batches=0"])
    cfg = load_train_config(tiny, ["logging.val_every=5", "data.val_path=v", "deepspeed.zero_stage=3",
                                   "checkpoint.export_ema=false"])  # the raw weights: fine under ZeRO-3
    assert (cfg.logging.val_every, cfg.logging.val_batches, cfg.data.val_path) == (5, 8, "v")


def test_resolve_prior_path_prefers_the_best_of_a_run_folder(tmp_path):
    from divae.generate import resolve_prior
    from divae.prior_io import resolve_prior_path

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="neither best.safetensors nor prior.safetensors"):
        resolve_prior_path(run)
    with pytest.raises(UsageError, match="--prior .* holds neither"):
        resolve_prior(str(run), quiet=True)
    (run / "prior.safetensors").write_bytes(b"x")
    path, why = resolve_prior_path(run)
    assert path == run / "prior.safetensors" and "last export" in why
    (run / "best.safetensors").write_bytes(b"x")
    path, why = resolve_prior_path(run)
    assert path == run / "best.safetensors" and "best.json missing" in why
    (run / "best.json").write_text(json.dumps({"step": 40, "val_loss": 3.25}))
    path, why = resolve_prior_path(str(run))
    assert path == run / "best.safetensors" and "val_loss 3.25 at step 40" in why
    assert resolve_prior_path(run / "prior.safetensors")[0] == run / "prior.safetensors"  # a file: itself
