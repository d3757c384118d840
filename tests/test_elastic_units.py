"""Elastic resume, in one process (gloo, world 1): the world-size-free optimizer state restores a ZeRO-1/2 engine
exactly (the restored engine continues bitwise like the one that wrote it), and the start-up checks refuse what
cannot resume on another world size with one line that says what works."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from divae.utils.config import ConfigError
from trainer import elastic
from trainer.checkpoint import WorldSizeError, check_compatible, write_elastic


def _engine(stage: int, seed: int):
    from trainer.engine import DeepSpeedConfig, OptimConfig, build_engine

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 3, 1))
    return build_engine(model, DeepSpeedConfig(zero_stage=stage), OptimConfig(lr=1e-2, warmup_steps=3,
                        schedule="cosine"), micro_batch=2, grad_accum=1, world_size=1, grad_clip=1.0, total_steps=20)


def _step(engine, i: int) -> float:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(2, 3, 8, 8, generator=g)
    loss = (engine(x) - x.flip(-1)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.parametrize("stage", [1, 2])
def test_restored_engine_continues_bitwise(single_process_group, tmp_path, stage):
    a = _engine(stage, seed=0)
    for i in range(3):
        _step(a, i)
    a.save_checkpoint(str(tmp_path), tag="m", save_latest=False)
    assert write_elastic(tmp_path, {"m": a}, rank=0) == ["m"]
    before, info = elastic.gather(a)
    assert info["optimizer_step"] == 3 and info["global_steps"] == 3 and info["zero_stage"] == stage

    b = _engine(stage, seed=1)  # other initial weights, no optimizer state yet
    elastic.restore(b, tmp_path, "m")
    after, info_b = elastic.gather(b)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert info_b == info
    assert any(after[k].abs().sum() > 0 for k in after if k.startswith("exp_avg_sq."))
    for pa, pb in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(pa, pb)  # the bf16 weights too
    # the run continues exactly: losses, lr, weights and moments after two more steps
    for i in range(3, 5):
        assert _step(a, i) == _step(b, i)
        assert a.get_lr() == b.get_lr()
    ta, _ = elastic.gather(a)
    tb, _ = elastic.gather(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_batch_split_keeps_the_micro_batch_and_the_global_batch():
    assert elastic.batch_split(8, 2, 2) == (2, 2)
    assert elastic.batch_split(8, 4, 1) == (4, 2)  # 2 ranks -> 1: accumulate instead of a bigger micro-batch
    assert elastic.batch_split(8, 4, 4) == (2, 1)  # more ranks than the micro-batch allows: smaller micro
    assert elastic.batch_split(12, 4, 3) == (4, 1)
    assert elastic.batch_split(12, 4, 2) == (3, 2)  # 4 does not split 6 per rank: the largest micro that does
    with pytest.raises(ConfigError, match=r"cannot be split over 3 rank\(s\) \(rank counts that can: 1, 2, 4, 8\)"):
        elastic.batch_split(8, 2, 3)


def _meta(**kw):
    meta = {"world_size": 2, "zero_stage": 2, "micro_batch": 2, "grad_accum": 1, "global_batch": 4,
            "engines": ["model"], "elastic": ["model"], "data_format": "mds", "num_canonical_nodes": 1}
    meta.update(kw)
    return meta


def test_check_compatible_says_what_resumes_and_why_not(tmp_path):
    assert check_compatible(_meta(), 2, tmp_path) is False
    assert check_compatible(_meta(), 1, tmp_path) is True
    assert check_compatible(_meta(zero_stage=0, elastic=[]), 4, tmp_path) is True
    cases = [
        (_meta(zero_stage=3), "ZeRO-3"),
        (_meta(data_format="wds"), "webdataset"),
        (_meta(elastic=[]), "trainer.checkpoint_tool convert"),
        ({"world_size": 2}, "predates elastic resume"),
        (_meta(), "cannot be split over 3 rank(s) (rank counts that can: 1, 2, 4)"),
    ]
    for meta, why in cases:
        with pytest.raises(WorldSizeError) as e:
            check_compatible(meta, 3, tmp_path)
        msg = str(e.value)
        assert why in msg and "written by 2 ranks, this run has 3" in msg and "init_from=" in msg and "\n" not in msg


def test_canonical_nodes_default_and_divisibility():
    assert elastic.canonical_nodes("py1e", 2) == 2 and elastic.canonical_nodes("py1s", 2) == 128
    elastic.check_canonical(4, 2)
    elastic.check_canonical(2, 4)
    with pytest.raises(ConfigError, match=r"num_canonical_nodes=4.*3 node\(s\).*1, 2, 4 node"):
        elastic.check_canonical(4, 3)


def test_rank_seeds_are_reproducible_and_distinct():
    seeds = {elastic.rank_seed(0, 10, r, 4) for r in range(4)}
    assert len(seeds) == 4 and elastic.rank_seed(0, 10, 1, 4) == elastic.rank_seed(0, 10, 1, 4)
    assert elastic.rank_seed(0, 10, 1, 4) != elastic.rank_seed(0, 11, 1, 4)
