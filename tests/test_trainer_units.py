"""Fast in-process checks of the trainer's parts: launch detection, lr schedule, configs, EMA, RNG state."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from divae.utils.config import ConfigError
from runtime.launch import detect_env
from trainer.config import TrainConfig, load_train_config
from trainer.ema import EMA, EMAConfig
from trainer.engine import DeepSpeedConfig, OptimConfig, ds_config, lr_factor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_detect_env_torchrun_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node7",
           "MASTER_PORT": "29500", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}
    out = detect_env(env)
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["MASTER_ADDR"], out["LAUNCHER"]) == \
        ("3", "8", "1", "node7", "torchrun")


def test_detect_env_srun_one_task_per_process():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_ID": "1234", "MASTER_ADDR": "nodeA"}
    out = detect_env(env)
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "nodeA", "MASTER_PORT": str(20000 + 1234), "LAUNCHER": "srun"}


def test_detect_env_srun_without_nodelist_is_a_clear_error():
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_detect_env_single_process():
    out = detect_env({})
    assert (out["RANK"], out["WORLD_SIZE"], out["LAUNCHER"]) == ("0", "1", "single")
    assert 0 < int(out["MASTER_PORT"]) < 65536


def test_lr_warmup_then_cosine():
    cfg = OptimConfig(lr=1e-4, warmup_steps=1000, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 10_000) == pytest.approx(1e-3)
    assert lr_factor(499, cfg, 10_000) == pytest.approx(0.5)
    assert lr_factor(1000, cfg, 10_000) == pytest.approx(1.0)
    assert lr_factor(5500, cfg, 10_000) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10_000, cfg, 10_000) == pytest.approx(0.1)
    const = OptimConfig(warmup_steps=10)
    assert lr_factor(50_000, const, 100) == 1.0


def test_ds_config_bf16_fp32_accumulation():
    c = ds_config(DeepSpeedConfig(zero_stage=2), micro_batch=4, grad_accum=2, world_size=8, grad_clip=1.0,
                  optim=OptimConfig(), use_cuda=False)
    assert c["train_batch_size"] == 64 and c["bf16"]["enabled"]
    assert c["data_types"]["grad_accum_dtype"] == "fp32" and c["zero_optimization"]["stage"] == 2
    assert "optimizer" not in c  # CPU: a client torch AdamW, no fused_adam JIT build
    assert "optimizer" not in ds_config(DeepSpeedConfig(), 1, 1, 1, 1.0, OptimConfig(), use_cuda=True)  # same on CUDA


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_presets_load(path):
    from trainer.tasks import TASKS

    cfg = load_train_config(path)
    assert cfg.train.stage in TASKS
    if "unet" in TASKS[cfg.train.stage].config_sections:
        assert cfg.unet.learn_sigma == cfg.diffusion.learn_sigma


def test_config_rejects_unknown_keys_and_uneven_batches():
    with pytest.raises(ConfigError, match="did you mean"):
        load_train_config(None, ["optim.lrr=1"])
    cfg = load_train_config(None, ["train.batch_size=12", "train.grad_accum=2"])
    assert cfg.train.micro_batch(3) == 2
    with pytest.raises(ValueError, match="not divisible"):
        cfg.train.micro_batch(4)
    assert isinstance(cfg, TrainConfig)


def test_ema_tracks_weights_and_copies_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, EMAConfig(decay=0.5, warmup=False))
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(1)
    sd = ema.state_dict()
    assert torch.allclose(sd["0.weight"], w0 + 0.5)
    assert torch.equal(sd["1.running_mean"], torch.full((2,), 3.0))
    assert set(sd) == set(model.state_dict())
    warm = EMA(model, EMAConfig(decay=0.9999, warmup=True))
    assert warm.decay_now() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    from trainer.checkpoint import rng_state, set_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_checkpoint_world_size_change_is_refused_with_advice(tmp_path):
    from trainer.checkpoint import CheckpointError, check_compatible

    with pytest.raises(CheckpointError, match=r"written by 4 ranks, this run has 2.*init_from"):
        check_compatible({"world_size": 4}, 2, tmp_path)
    check_compatible({"world_size": 2}, 2, tmp_path)


def test_dangling_latest_is_a_clear_error(tmp_path):
    from trainer.checkpoint import CheckpointError, read_latest

    assert read_latest(tmp_path) is None
    (tmp_path / "latest").write_text("step_00000010\n")
    with pytest.raises(CheckpointError, match="step_00000010"):
        read_latest(tmp_path)


def test_prior_stage_without_data_fails_clearly():
    from trainer.tasks import TASKS

    with pytest.raises(ValueError, match="DataConfig.path is empty"):
        TASKS["prior"](TrainConfig(), torch.device("cpu")).build_models()


def test_warmup_is_monotone():
    cfg = OptimConfig(warmup_steps=100)
    f = [lr_factor(s, cfg, 1000) for s in range(150)]
    assert all(a <= b for a, b in zip(f, f[1:])) and math.isclose(f[-1], 1.0)


def test_pre_encode_writes_the_vq_tokens(tmp_path):
    """pre_encode on real shards: the stored `tokens` decode to exactly the VQ's indices of each image."""
    import subprocess

    from data_fixtures import encode, photos, variant

    from data_pipeline.reader import ShardReader
    from data_pipeline.tokens import tokens_from_bytes
    from divae.model import DiVAE
    from divae.vq import VQ_PRESETS
    from trainer.pre_encode import main as pre_encode

    src = tmp_path / "photos"
    src.mkdir()
    for i, p in enumerate(photos()[:4]):
        (src / f"{i}.jpg").write_bytes(encode(variant(p, i, long_side=80)))
    subprocess.run([sys.executable, "-m", "data_pipeline.prepare_folder", "--source", str(src), "--out",
                    str(tmp_path / "s"), "--size", "64", "--workers", "0", "--no-progress"], check=True, cwd=ROOT,
                   capture_output=True, timeout=120)
    torch.manual_seed(0)
    DiVAE(VQ_PRESETS["tiny"]).save_pretrained(tmp_path / "vq.safetensors")
    pre_encode(["--vq", str(tmp_path / "vq.safetensors"), "--src", str(tmp_path / "s"), "--dst", str(tmp_path / "t"),
                "--batch-size", "3", "--device", "cpu"])
    reader = ShardReader(str(tmp_path / "t"))
    assert len(reader) == 4 and reader.manifest["columns"]["tokens"] == "bytes"
    samples = [reader[i] for i in range(4)]
    tokens = tokens_from_bytes([s["tokens"] for s in samples], 8)
    x = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    model = DiVAE.from_pretrained(tmp_path / "vq.safetensors")
    assert torch.equal(tokens, model.encode(x))
    with pytest.raises(ValueError, match="8x8"):
        tokens_from_bytes([b"\0" * 10], 8)


@pytest.mark.parametrize("override", ["vq.quantizer.kmeans_init=true", "vq.quantizer.restart_after_steps=10"])
def test_vq_stage_refuses_in_place_codebook_edits_without_ema(override):
    """DeepSpeed's master weights would undo k-means init / dead-code restart on a trained codebook."""
    from trainer.tasks import TASKS

    cfg = load_train_config("configs/vq_tiny.yaml", [override])
    with pytest.raises(ConfigError, match="use_ema=true"):
        TASKS["vq"](cfg, torch.device("cpu")).build_models()
    ok = load_train_config("configs/vq_tiny.yaml", [override, "vq.quantizer.use_ema=true"])
    assert set(TASKS["vq"](ok, torch.device("cpu")).build_models()) == {"generator", "discriminator"}


def test_watchdog_settles_only_for_a_dataloader_worker_killed_by_a_signal(monkeypatch):
    """`PeerWatchdog.settle`: before reporting a DataLoader worker killed by a signal (what the launcher's teardown
    after a peer's death looks like from this rank), the rank gives the watchdog thread three ticks to end it with
    the line that names the dead peer, riding out the DataLoader's SIGCHLD handler raising again meanwhile; any
    other error, or a rank without a running watchdog, reports at once."""
    import threading

    import trainer.watchdog as wd_mod

    slept = []

    def fake_sleep(seconds):
        slept.append(seconds)
        if len(slept) == 1:
            raise RuntimeError("DataLoader worker (pid 2) is killed by signal: Terminated.")
        clock[0] += seconds

    clock = [100.0]
    monkeypatch.setattr(wd_mod.time, "sleep", fake_sleep)
    monkeypatch.setattr(wd_mod.time, "monotonic", lambda: clock[0])
    echo = RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
    idle = wd_mod.PeerWatchdog()
    idle.settle(echo)
    assert slept == []
    wd = wd_mod.PeerWatchdog(interval=0.5)
    wd._thread = threading.current_thread()  # a running watchdog, as far as settle can tell
    wd.settle(RuntimeError("CUDA out of memory"))
    assert slept == []
    wd.settle(echo)
    assert slept[0] == 1.5 and clock[0] == 101.5  # interrupted once, then slept out the rest of the three ticks
