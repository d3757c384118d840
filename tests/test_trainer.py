"""The trainer end to end on CPU: real DeepSpeed engines in real `torchrun --nproc_per_node 2` processes, on
real shards of scikit-image photos written by data_pipeline.

One chain of runs shares the expensive parts (module-scoped fixtures):
  VQ stage (1 process, GAN on at disc_start) -> its weights-only export ->
  decoder reference run (2 ranks, ZeRO-2, bf16, 20 steps, checkpoints at 8 and 16) ->
  the same run killed (-9 on rank 1) after step 10 and relaunched: losses after the resume == reference, bitwise.
Plus: SIGUSR1 under ZeRO-1 -> checkpoint + requeue code; a crash inside a ZeRO-3 checkpoint save leaves
`latest` at the previous checkpoint, which a relaunch resumes from.
Every subprocess runs in its own session and is killed with all its descendants on failure or timeout.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import kill_tree  # noqa: E402
from trainer_runs import (  # noqa: E402
    _rank_pids,
    common,
    metrics,
    run,
    start,
    wait,
    wait_for_step,
)

pytestmark = pytest.mark.slow

STEPS = 20


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 real photos (crops of skimage.data) as 64x64 MDS shards, through data_pipeline.prepare_folder."""
    from data_fixtures import photo_shards

    return photo_shards(tmp_path_factory.mktemp("shards"), 48, shard_size=16, out_name="tiny64")


@pytest.fixture(scope="module")
def vq_run(shards, tmp_path_factory) -> Path:
    """VQ stage, one process, 4 steps, GAN from step 2; writes runs/.../divae.safetensors."""
    run_dir = tmp_path_factory.mktemp("vq")
    log = run_dir / "log.txt"
    code = run(["--config", "configs/vq_tiny.yaml", *common(shards, run_dir), "train.steps=4", "train.batch_size=4",
                "vq_loss.disc_start=2", "checkpoint.every=0", "logging.sample_every=4"], 1, log)
    assert code == 0, log.read_text()[-4000:]
    return run_dir


DECODER = ["--config", "configs/decoder_tiny.yaml", f"train.steps={STEPS}", "train.batch_size=4",
           "checkpoint.every=8", "logging.sample_every=0", "optim.warmup_steps=5", "optim.lr=2e-3",
           "checkpoint.export_raw=true"]


@pytest.fixture(scope="module")
def decoder_ref(shards, vq_run, tmp_path_factory) -> Path:
    """The uninterrupted reference: 2 ranks, ZeRO-2, bf16, from the VQ stage's export."""
    run_dir = tmp_path_factory.mktemp("dec_ref")
    log = run_dir / "log.txt"
    code = run([*DECODER, *common(shards, run_dir), f"decoder.vq_weights={vq_run / 'divae.safetensors'}"], 2, log)
    assert code == 0, log.read_text()[-4000:]
    return run_dir


# -- tests --------------------------------------------------------------------------------------------------
def test_vq_stage_gan_switches_on_at_disc_start(vq_run):
    m = metrics(vq_run)
    assert sorted(m) == [1, 2, 3, 4]
    for s in (1, 2):  # steps 0 and 1 (0-based) < disc_start = 2: no GAN term, no discriminator step
        assert m[s]["gan_on"] == 0.0 and m[s]["g_loss"] == 0.0 and "d/d_loss" not in m[s]
    for s in (3, 4):
        assert m[s]["gan_on"] == 1.0 and m[s]["g_loss"] != 0.0 and m[s]["d_weight"] > 0
        assert m[s]["d/d_loss"] > 0
    assert all(0 < m[s]["usage"] <= 1 for s in m)
    assert (vq_run / "samples" / "step_00000004.png").stat().st_size > 1000
    from divae.model import DiVAE

    model = DiVAE.from_pretrained(vq_run / "divae.safetensors")
    assert model.unet is None and model.vq.cfg.embed_dim == 32


def test_decoder_zero2_loss_goes_down(decoder_ref):
    m = metrics(decoder_ref)
    assert sorted(m) == list(range(1, STEPS + 1))
    for key, factor in (("mse", 0.8), ("loss", 1.0)):  # L_simple, and L_simple + lambda L_vlb (noisier at t ~ 0)
        losses = [m[s][key] for s in range(1, STEPS + 1)]
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < factor * first, (key, losses)
    assert any(k.startswith("loss_q") for k in m[STEPS])
    ckpts = sorted(p.name for p in (decoder_ref / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000016", "step_00000020"]  # keep_last = 2
    assert (decoder_ref / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    meta = json.loads((decoder_ref / "checkpoints" / "step_00000020" / "trainer_state.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == STEPS and meta["samples_seen"] == 4 * STEPS

    import torch

    from divae.model import DiVAE

    model = DiVAE.from_pretrained(decoder_ref / "divae.safetensors")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = model.reconstruct(x, decoder="diffusion", sampler="ddim", steps=2, seeds=[0, 1])
    assert y.shape == x.shape and y.abs().max() <= 1


def test_decoder_export_names_its_weights_and_config_holds_what_the_stage_reads(decoder_ref):
    import torch
    import yaml
    from safetensors.torch import load_file

    from divae.model import weights_info

    ema, raw = decoder_ref / "divae.safetensors", decoder_ref / "divae.raw.safetensors"
    assert weights_info(ema) == {"kind": "ema", "step": STEPS, "decay": 0.999, "warmup": True, "updates": STEPS}
    assert weights_info(raw) == {"kind": "raw", "step": STEPS}
    a, b = load_file(ema), load_file(raw)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a if k.startswith("unet."))
    assert (decoder_ref / "checkpoints" / "step_00000020" / "divae.raw.safetensors").is_file()

    saved = yaml.safe_load((decoder_ref / "config.yaml").read_text())
    assert set(saved) == {"train", "data", "optim", "deepspeed", "ema", "checkpoint", "logging", "unet", "diffusion",
                          "decoder"}  # no unused `vq:` defaults beside the real VQ file
    assert saved["data"]["batch_size"] == 2  # train.batch_size 4 over 2 ranks: what each rank really loaded


def test_logged_metrics_are_averaged_over_ranks(decoder_ref):
    """Each rank draws 2 timesteps per step: rank 0 alone can fill at most 2 of the 4 timestep quartiles."""
    m = metrics(decoder_ref)
    quartiles = [sum(k.startswith("loss_q") for k in row) for row in m.values()]
    assert max(quartiles) > 2, quartiles


def test_nan_guard_with_grad_accum_keeps_the_boundary_and_resumes_bitwise(shards, vq_run, tmp_path):
    """train.grad_accum=2 on 2 ranks, a non-finite loss injected on rank 0's first micro-batch of step 3: every
    rank gives that micro-batch a zero gradient, DeepSpeed still steps once per training step. A run whose rank 1
    is killed (SIGKILL) after step 6 ends (does not hang), and the rerun resumes from checkpoint 4 with the
    uninterrupted run's losses and gradient norms, bitwise, logging the steps after the checkpoint once."""
    from trainer.faults import NAN_LOSS

    def args(run_dir: Path) -> list[str]:
        return ["--config", "configs/decoder_tiny.yaml", *common(shards, run_dir), "train.steps=8",
                "train.batch_size=8", "train.grad_accum=2", "checkpoint.every=4", "logging.sample_every=0",
                "optim.warmup_steps=2", f"decoder.vq_weights={vq_run / 'divae.safetensors'}"]

    fault = {NAN_LOSS: "2:0:0"}  # 0-based step 2 (the third), micro-batch 0, rank 0
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    assert run(args(ref_dir), 2, ref_dir / "log.txt", **fault) == 0, (ref_dir / "log.txt").read_text()[-4000:]
    ref = metrics(ref_dir)
    assert ref[3]["model_bad"] == 1.0 and all("model_bad" not in ref[s] for s in ref if s != 3)
    assert all(math.isfinite(ref[s]["loss"]) for s in ref)
    state = json.loads((ref_dir / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["optimizer_steps"] == {"model": 8}  # one optimizer step per training step, boundary kept

    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    log = run_dir / "log1.txt"
    proc = start(args(run_dir), 2, log, **fault)
    try:
        wait_for_step(proc, run_dir, 6, log)
        ranks = _rank_pids(proc)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        code = wait(proc, log, timeout=120)  # the job must end, not hang
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert code != 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    log2 = run_dir / "log2.txt"
    assert run(args(run_dir), 2, log2, **fault) == 0, log2.read_text()[-4000:]
    assert "resumed from" in log2.read_text()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the steps after checkpoint 4 were logged once, not twice
    got = metrics(run_dir)
    for s in range(5, 9):
        assert got[s]["loss"] == ref[s]["loss"] and got[s]["grad_norm"] == ref[s]["grad_norm"], s


def test_sigusr1_checkpoints_and_exits_with_requeue_code(shards, vq_run, tmp_path):
    from runtime.signals import REQUEUE_EXIT_CODE

    run_dir = tmp_path / "dec_usr1"
    run_dir.mkdir()
    log = run_dir / "log.txt"
    proc = start(["--config", "configs/decoder_tiny.yaml", *common(shards, run_dir), "train.steps=200",
                  "train.batch_size=4", "checkpoint.every=0", "logging.sample_every=0", "deepspeed.zero_stage=1",
                  f"decoder.vq_weights={vq_run / 'divae.safetensors'}"], 2, log)
    try:
        wait_for_step(proc, run_dir, 2, log)
        for pid in _rank_pids(proc).values():
            os.kill(pid, signal.SIGUSR1)
        wait(proc, log, timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log.read_text()
    assert re.search(rf"exitcode\s*:\s*{REQUEUE_EXIT_CODE}", text), text[-3000:]
    step = int((run_dir / "REQUEUE").read_text())
    assert 2 <= step < 200
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert max(metrics(run_dir)) == step  # stopped at the step boundary right after the signal


def test_crash_during_checkpoint_save_keeps_previous_zero3(shards, vq_run, tmp_path):
    from trainer.faults import CKPT_CRASH_AT_STEP

    run_dir = tmp_path / "dec_crash"
    run_dir.mkdir()
    args = ["--config", "configs/decoder_tiny.yaml", *common(shards, run_dir), "train.batch_size=4",
            "checkpoint.every=2", "logging.sample_every=0", "deepspeed.zero_stage=3",
            f"decoder.vq_weights={vq_run / 'divae.safetensors'}"]
    log = run_dir / "log1.txt"
    code = run([*args, "train.steps=4"], 2, log, **{CKPT_CRASH_AT_STEP: "4"})
    assert code != 0
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert (ck / ".tmp_step_00000004").is_dir() and not (ck / "step_00000004").exists()

    log2 = run_dir / "log2.txt"
    assert run([*args, "train.steps=3"], 2, log2) == 0, log2.read_text()[-4000:]
    assert "resumed from" in log2.read_text() and "step_00000002" in log2.read_text()
    assert (ck / "latest").read_text().strip() == "step_00000003"
    assert not (ck / ".tmp_step_00000004").exists()
    assert 3 in metrics(run_dir)


def test_log_lines_carry_flops_and_per_gpu_throughput(decoder_ref, vq_run):
    """Issue 15: every log line has the FLOPs per image (counted once, on fake tensors), images/s per GPU and
    the achieved FLOP/s, consistent with each other; on CPU there is no peak, so no MFU."""
    from divae.model import read_pretrained
    from divae.utils.config import from_dict
    from divae.vq import VQConfig
    from trainer.config import load_train_config
    from trainer.tasks import DecoderTask

    m = metrics(decoder_ref)
    cfg = load_train_config(decoder_ref / "config.yaml")
    vq_cfg = from_dict(VQConfig, read_pretrained(vq_run / "divae.safetensors")[0]["vq"])
    expected = DecoderTask.sample_flops(cfg, vq_cfg, forward=False)["train"]
    for row in m.values():
        assert row["flops_per_sample"] == expected > 1e9
        assert row["images_per_s_per_gpu"] == pytest.approx(row["images_per_s"] / 2, rel=1e-12)
        assert row["tflops_per_gpu"] * 1e12 == pytest.approx(row["flops_per_sample"] * row["images_per_s_per_gpu"],
                                                              rel=1e-12)
        assert 0 < row["tflops_per_gpu"] < 10 and "mfu" not in row
    assert "mfu" not in metrics(vq_run)[4] and metrics(vq_run)[4]["flops_per_sample"] > 1e9
