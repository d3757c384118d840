"""Elastic resume end to end: real `torchrun` runs (gloo, CPU, bf16) on real MDS shards, killed and resumed on
another number of ranks: 2 ranks -> crash -> 1 rank -> crash -> 2 ranks, over exactly one epoch.

Each crash is the trainer's own fault injection (every rank exits in the middle of a checkpoint save, so the
steps since the previous checkpoint are lost and redone). Checked after each change of world size:
- the optimizer state gathered from the new partitions right after the resume equals, bitwise, the
  world-size-free state the old ranks wrote (and its fp32 weights equal DeepSpeed's own reconstruction from
  the old ZeRO shards, `zero_to_fp32`);
- the sample indices of the epoch, gathered from every rank of the three segments (the steps each segment
  kept), are each seen exactly once;
- the learning rate follows the uninterrupted schedule, the decoder's loss continues (no jump back), step,
  samples seen, EMA and optimizer steps add up; a resumed segment on 1 rank is reproducible bitwise.
Cases: the tiny diffusion decoder under ZeRO-2 and the VQ stage (generator + discriminator engines) under ZeRO-1.
The distillation stage carries its state through the same stage-agnostic one-engine path as the decoder (its own
kill -9 resume is in tests/test_distill.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import trainer_runs as tt
from helpers import free_port, torchrun
from safetensors.torch import load_file

from trainer import faults
from trainer.engine import OptimConfig, lr_factor

pytestmark = pytest.mark.slow

N, BATCH = 24, 4  # samples in the epoch, global batch: 6 steps
STEPS = N // BATCH
LR, WARMUP = 2e-3, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """24 real photos as 64x64 MDS shards (3 shards) and a random-weights VQ file for the decoder stage."""
    sys.path.insert(0, str(Path(__file__).parent))
    from data_fixtures import photo_shards

    from divae.model import DiVAE
    from trainer.config import load_train_config

    root = tmp_path_factory.mktemp("elastic_data")
    photo_shards(root, N, shard_size=8)
    vq = load_train_config(tt.ROOT / "configs/vq_tiny.yaml").vq
    DiVAE(vq).save_pretrained(root / "vq.safetensors")
    dec = load_train_config(tt.ROOT / "configs/decoder_tiny.yaml")
    DiVAE(vq, dec.unet, dec.diffusion).save_pretrained(root / "teacher.safetensors")
    return {"mds": root / "mds", "vq": root / "vq.safetensors", "teacher": root / "teacher.safetensors"}


CASES = {  # name: (stage args, engines, loss key of the continuation check)
    "decoder-zero2": (["--config", "configs/decoder_tiny.yaml", "deepspeed.zero_stage=2"], ["model"], "mse"),
    # ZeRO-1 (DeepSpeed's BF16_Optimizer partitions) and two engines in one chain. Over 6 steps of 4 images with a
    # GAN from step 0 the VQ's l1 is noise (0.55, 0.43, 0.57, 0.49, ...): its continuation is checked through the
    # carried state and the schedule only
    "vq-zero1": (["--config", "configs/vq_tiny.yaml", "deepspeed.zero_stage=1", "vq_loss.disc_start=0"],
                 ["generator", "discriminator"], None),
}


def _args(case: str, data: dict[str, Path], run_dir: Path) -> list[str]:
    base, _, _ = CASES[case]
    extra = {"decoder": [f"decoder.vq_weights={data['vq']}"], "distill": [f"distill.teacher={data['teacher']}"]}
    extra = extra.get(case.split("-")[0], [])
    return [*base, *extra, *tt.common(data["mds"], run_dir), f"train.steps={STEPS}", f"train.batch_size={BATCH}",
            "checkpoint.every=1", "checkpoint.keep_last=10", "logging.sample_every=0", f"optim.lr={LR}",
            f"optim.warmup_steps={WARMUP}", "data.num_workers=0"]


def _segment(case, data, run_dir: Path, nproc: int, name: str, crash_at: int | None) -> Path:
    """One launch on `nproc` ranks; with `crash_at`, every rank dies inside the save of that step. Returns the
    folder of its sample trace and post-resume dump."""
    probe = run_dir.parent / f"probe_{name}"
    env = {faults.TRACE_SAMPLES: str(probe), faults.ELASTIC_DUMP: str(probe / "dump")}
    if crash_at is not None:
        env[faults.CKPT_CRASH_AT_STEP] = str(crash_at)
    log = run_dir.parent / f"log_{name}.txt"
    code = tt.run(_args(case, data, run_dir), nproc, log, timeout=240, **env)
    assert code == (0 if crash_at is None else 1 if nproc > 1 else 13), log.read_text()[-4000:]
    return probe


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _assert_moments_carried(run_dir: Path, ckpt_step: int, probe: Path, engines: list[str], from_shards: bool):
    folder = run_dir / "checkpoints" / f"step_{ckpt_step:08d}"
    for e in engines:
        before = load_file(folder / f"elastic_{e}.safetensors")
        after = load_file(probe / "dump" / f"{e}.safetensors")
        assert before.keys() == after.keys() and len(before) > 3
        assert all(torch.equal(before[k], after[k]) for k in before), e  # fp32 master, exp_avg, exp_avg_sq
        assert any(before[k].abs().sum() > 0 for k in before if k.startswith("exp_avg_sq."))
        if from_shards:  # the world-size-free file agrees with DeepSpeed's own merge of the old ZeRO shards
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            ds = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=e)
            mine = {k[5:]: v for k, v in before.items() if k.startswith("fp32.")}  # ds also holds the buffers
            assert mine.keys() <= ds.keys() and all(torch.equal(ds[k].float(), mine[k]) for k in mine)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_one_rank_two_ranks(case, data, tmp_path):
    _, engines, loss_key = CASES[case]
    run_dir = tmp_path / "run"
    kept = {}  # segment -> the optimizer steps it kept (the ones after its last checkpoint are redone)

    a = _segment(case, data, run_dir, 2, "a", crash_at=3)
    assert _latest(run_dir) == "step_00000002"
    kept[a] = (1, 2)
    if case == "decoder-zero2":
        shutil.copytree(run_dir, tmp_path / "run_copy")
    b = _segment(case, data, run_dir, 1, "b", crash_at=5)
    assert _latest(run_dir) == "step_00000004"
    kept[b] = (3, 4)
    # written by 2 ranks, loaded on 1; zero_to_fp32 reads ZeRO-2 shards (not the BF16_Optimizer's of ZeRO-1)
    _assert_moments_carried(run_dir, 2, b, engines, from_shards="zero1" not in case)
    c = _segment(case, data, run_dir, 2, "c", crash_at=None)
    assert _latest(run_dir) == f"step_{STEPS:08d}"
    kept[c] = (5, STEPS)
    _assert_moments_carried(run_dir, 4, c, engines, from_shards=False)  # written by 1 rank, loaded on 2

    # every sample of the epoch exactly once over the steps the three segments kept, gathered from all ranks
    seen = Counter()
    for probe, (lo, hi) in kept.items():
        ranks = sorted(probe.glob("samples_rank*.jsonl"))
        assert len(ranks) == (1 if probe == b else 2), ranks
        for f in ranks:
            for line in f.read_text().splitlines():
                r = json.loads(line)
                if lo <= r["step"] <= hi:
                    seen.update(r["index"])
    assert sorted(seen) == list(range(N)) and set(seen.values()) == {1}, seen

    # the schedule and the loss continue; the counters add up
    m = tt.metrics(run_dir)
    assert sorted(m) == list(range(1, STEPS + 1))
    opt = OptimConfig(lr=LR, warmup_steps=WARMUP)
    for s in m:
        assert m[s]["lr"] == pytest.approx(LR * lr_factor(s, opt, STEPS), rel=1e-6), s
        assert m[s]["samples_seen"] == BATCH * s
    if loss_key:  # the diffusion loss keeps falling across both changes: no jump back to the first steps' values
        first = (m[1][loss_key] + m[2][loss_key]) / 2
        for resumed_at in (2, 4):
            assert m[resumed_at + 1][loss_key] < first, [m[s][loss_key] for s in m]
    meta = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())
    assert meta["step"] == STEPS and meta["samples_seen"] == N and meta["world_size"] == 2
    assert meta["micro_batch"] == 2 and meta["grad_accum"] == 1 and meta["num_canonical_nodes"] == 1
    assert all(v == STEPS for v in meta["ema_updates"].values())
    assert meta["optimizer_steps"] == {e: STEPS for e in engines}
    b_meta = json.loads((run_dir / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert b_meta["world_size"] == 1 and b_meta["micro_batch"] == 2 and b_meta["grad_accum"] == 2

    if case == "decoder-zero2":  # the 1-rank segment again, from the same checkpoint: bitwise the same run
        copy = tmp_path / "run_copy"
        _segment(case, data, copy, 1, "b2", crash_at=5)
        again = tt.metrics(copy)
        for s in (3, 4):
            assert again[s]["loss"] == m[s]["loss"] and again[s]["grad_norm"] == m[s]["grad_norm"], s
        _assert_convert_rebuilds_the_elastic_file(run_dir / "checkpoints" / "step_00000002", tmp_path / "old")


def _assert_convert_rebuilds_the_elastic_file(written: Path, tmp: Path) -> None:
    """A checkpoint as written before elastic resume (no elastic file, no batch split in its state) is refused
    on another world size; `convert` on the 2 ranks that wrote it adds the file, bitwise the one the run wrote,
    and a manifest that verifies; then it resumes elastically."""
    from trainer.checkpoint import STATE_FILE, WorldSizeError, check_compatible, damaged_file, read_meta

    old = tmp / "checkpoints" / written.name
    shutil.copytree(written, old)
    (old.parent / "latest").write_text(old.name + "\n")
    (old / "elastic_model.safetensors").unlink()
    meta = read_meta(old)
    for k in ("micro_batch", "grad_accum", "grad_accum_config", "global_batch", "data_format", "elastic"):
        meta.pop(k)
    (old / STATE_FILE).write_text(json.dumps(meta))
    with pytest.raises(WorldSizeError, match="predates elastic resume"):
        check_compatible(read_meta(old), 1, old)
    log = tmp / "convert.txt"
    cmd = torchrun(2, "-m", "trainer.checkpoint_tool", "convert", str(old), port=free_port())
    r = subprocess.run(cmd, cwd=tt.ROOT, env=tt._env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=240)
    assert r.returncode == 0, log.read_text()[-4000:]
    a, b = load_file(written / "elastic_model.safetensors"), load_file(old / "elastic_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert damaged_file(old) is None and check_compatible(read_meta(old), 1, old) is True
    r = subprocess.run([tt.PY, "-m", "trainer.checkpoint_tool", "inspect", str(tmp)], cwd=tt.ROOT, env=tt._env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "world size      2   ZeRO stage 2" in r.stdout, r.stderr[-2000:]
    assert "elastically any rank count dividing the global batch 4: 1, 2, 4" in r.stdout, r.stdout
