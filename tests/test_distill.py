"""The distillation stage (trainer/tasks/distill.py) and the distilled sampler a DiVAE file carries.

Units: the `sampling` entry of a DiVAE file (round trip, the default of `decode_tokens`, refusal of hostile
entries), the student's sampler (deterministic, batch-independent, equal to `sample` over the same timesteps),
the config's checks, and a teacher whose UNet differs from the student's config refused at build time.
End to end (real DeepSpeed engine, bf16, one process, real shards): a student trained from a teacher export with
the teacher, data and LPIPS terms; kill -9 mid-run and resume gives the uninterrupted run's losses and the same
student bitwise; `evaluation.recon_fid` on the student's export uses its one-step sampler by default and equals a
direct `decode_tokens` call. Two ranks -> one rank -> two ranks: tests/test_elastic.py's distill case.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import trainer_runs as tt
from helpers import kill_tree
from safetensors.torch import load_file

from divae.diffusion import sample
from divae.model import DiVAE
from trainer.config import load_train_config
from trainer.tasks.distill import DistillTaskConfig

STEPS = 6
ONE_STEP = {"sampler": "ddim", "timesteps": [999], "distilled_from": "ddim:2"}


def tiny_teacher(path: Path, sampling: dict | None = None, seed: int = 0) -> DiVAE:
    """A random-weights decoder export with configs/decoder_tiny.yaml's UNet and diffusion on vq_tiny's VQ."""
    cfg = load_train_config(tt.ROOT / "configs/decoder_tiny.yaml")
    vq = load_train_config(tt.ROOT / "configs/vq_tiny.yaml").vq
    torch.manual_seed(seed)
    model = DiVAE(vq, cfg.unet, cfg.diffusion, sampling=sampling)
    model.save_pretrained(path)
    return model


def test_sampling_entry_round_trips_and_is_the_default(tmp_path):
    tiny_teacher(tmp_path / "s.safetensors", ONE_STEP)
    model = DiVAE.from_pretrained(tmp_path / "s.safetensors")
    assert model.sampling == ONE_STEP
    tokens = torch.randint(0, model.vq.cfg.n_embed, (3, 8, 8))
    own = model.decode_tokens(tokens, seeds=range(3))
    cond = model.vq.embed(tokens)
    direct = sample(model.unet, model.diffusion_cfg, (3, 3, 64, 64), sampler="ddim", timestep_respacing=[999],
                    seeds=range(3), model_kwargs={"cond": cond}).clamp(-1, 1)
    assert torch.equal(own, direct)
    # batch-independent and deterministic: each image alone gives the same pixels
    alone = torch.cat([model.decode_tokens(tokens[i:i + 1], seeds=[i]) for i in range(3)])
    assert torch.equal(own, alone)
    # an explicit request still wins over the file's own sampler
    assert not torch.equal(model.decode_tokens(tokens, sampler="ddim", steps=4, seeds=range(3)), own)
    assert model.sampling_label(None, None) == "DDIM1 (distilled)"
    assert model.sampling_for("dpmpp2m", 20) == {"sampler": "dpmpp2m", "steps": 20}
    plain = tiny_teacher(tmp_path / "p.safetensors")
    assert plain.sampling is None and plain.sampling_for(None, None) == {"sampler": "ddpm", "steps": None}


@pytest.mark.parametrize("bad", [{"sampler": "euler", "timesteps": [999]}, {"sampler": "ddim", "timesteps": [1000]},
                                 {"sampler": "ddim", "timesteps": [5, 5]}, {"sampler": "ddim", "timesteps": "999"},
                                 {"sampler": "ddim", "timesteps": []}])
def test_hostile_sampling_entries_are_refused(tmp_path, bad):
    tiny_teacher(tmp_path / "ok.safetensors")
    state = load_file(tmp_path / "ok.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "ok.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["divae_config"])
    cfg["sampling"] = bad
    meta["divae_config"] = json.dumps(cfg)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="sampling="):
        DiVAE.from_pretrained(tmp_path / "bad.safetensors")


def test_config_checks():
    with pytest.raises(ValueError, match="1 to 4 timesteps"):
        DistillTaskConfig(student_timesteps=[])
    with pytest.raises(ValueError, match="distinct"):
        DistillTaskConfig(student_timesteps=[999, 999])
    with pytest.raises(ValueError, match="every loss weight is 0"):
        DistillTaskConfig(teacher_weight=0.0)
    assert DistillTaskConfig(student_timesteps=[999, 499]).sampling["timesteps"] == [499, 999]


def _args(shards: Path, teacher: Path, run_dir: Path) -> list[str]:
    return ["--config", "configs/decoder_tiny.yaml", "train.stage=distill", f"distill.teacher={teacher}",
            "distill.teacher_sampler=ddim", "distill.teacher_steps=2", "distill.student_timesteps=[499,999]",
            "distill.data_weight=0.5", "distill.perceptual_weight=0.5", "distill.perceptual_images=2",
            *tt.common(shards, run_dir), f"train.steps={STEPS}", "train.batch_size=4", "checkpoint.every=3",
            "logging.sample_every=0", "optim.lr=1e-3", "optim.warmup_steps=2", "deepspeed.zero_stage=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    tiny_teacher(path)
    return path


@pytest.fixture(scope="module")
def reference(tt_shards, teacher, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("distill_ref")
    log = run_dir / "log.txt"
    assert tt.run(_args(tt_shards, teacher, run_dir), 1, log) == 0, log.read_text()[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def tt_shards(tmp_path_factory) -> Path:
    """16 real photos as 64x64 MDS shards."""
    from data_fixtures import photo_shards

    return photo_shards(tmp_path_factory.mktemp("distill_shards"), 16, shard_size=16)


def test_student_learns_and_exports_its_sampler(reference, teacher):
    m = tt.metrics(reference)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert all(k in m[1] for k in ("teacher_mse", "data_mse", "lpips", "loss"))
    # the student starts as the teacher: its 2-step decode is near the teacher's 2-step DDIM, not equal to it
    assert 0 < m[1]["teacher_mse"] < m[1]["data_mse"]
    assert m[STEPS]["data_mse"] < m[1]["data_mse"]
    student = DiVAE.from_pretrained(reference / "divae.safetensors")
    assert student.sampling == {"sampler": "ddim", "timesteps": [499, 999], "distilled_from": "ddim:2"}
    t = DiVAE.from_pretrained(teacher)
    assert all(torch.equal(a, b) for a, b in zip(student.vq.state_dict().values(), t.vq.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(student.unet.state_dict().values(), t.unet.state_dict().values()))
    saved = (reference / "config.yaml").read_text()
    assert "distill:" in saved and "decoder:" not in saved


def test_kill9_mid_distillation_resumes_to_the_same_student(tt_shards, teacher, reference, tmp_path):
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    args = _args(tt_shards, teacher, run_dir)
    log = run_dir / "log1.txt"
    proc = tt.start(args, 1, log)
    try:
        tt.wait_for_step(proc, run_dir, 4, log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    log2 = run_dir / "log2.txt"
    assert tt.run(args, 1, log2) == 0, log2.read_text()[-4000:]
    assert "resumed from" in log2.read_text()
    ref, got = tt.metrics(reference), tt.metrics(run_dir)
    for s in range(4, STEPS + 1):
        assert got[s]["loss"] == ref[s]["loss"] and got[s]["grad_norm"] == ref[s]["grad_norm"], s
    a, b = load_file(reference / "divae.safetensors"), load_file(run_dir / "divae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recon_fid_decodes_with_the_students_own_sampler(tt_shards, reference, tmp_path):
    from data_pipeline.reader import ShardReader
    from evaluation.metrics import psnr, to_uint8
    from evaluation.recon_fid import main

    ckpt = reference / "divae.safetensors"
    (res,) = main(["--checkpoint", str(ckpt), "--data", str(tt_shards), "--out", str(tmp_path / "eval"),
                   "--num-images", "4", "--batch-size", "2", "--ref-stats-dir", "", "--no-lpips", "--no-ssim",
                   "--num-show", "0"])
    assert res["protocol"]["sampler"] == "ddim" and res["protocol"]["timesteps"] == [499, 999]
    assert "DDIM2 (distilled)" in (tmp_path / "eval" / "results.md").read_text()
    # the same figure from a direct call: decode_tokens with the file's default, image i seeded with i
    model = DiVAE.from_pretrained(ckpt)
    reader = ShardReader(str(tt_shards))
    images = torch.stack([torch.tensor(reader[i]["image"]).permute(2, 0, 1) for i in range(4)])
    x = images.float() / 127.5 - 1
    direct = to_uint8(model.decode_tokens(model.encode(x), seeds=range(4)))
    assert res["psnr"] == pytest.approx(psnr(images, direct).mean().item(), abs=1e-9)


def test_a_teacher_unlike_the_student_config_is_refused(tmp_path):
    from dataclasses import replace

    from trainer.tasks.distill import DistillTask

    cfg = load_train_config(tt.ROOT / "configs/decoder_tiny.yaml")
    vq = load_train_config(tt.ROOT / "configs/vq_tiny.yaml").vq
    DiVAE(vq, replace(cfg.unet, model_channels=cfg.unet.model_channels * 2), cfg.diffusion).save_pretrained(
        tmp_path / "wide.safetensors")
    wide = load_train_config(tt.ROOT / "configs/decoder_tiny.yaml",
                             ["train.stage=distill", f"distill.teacher={tmp_path / 'wide.safetensors'}"])
    with pytest.raises(ValueError, match="unet.model_channels=.*the student is a copy of the teacher"):
        DistillTask(wide, torch.device("cpu")).build_models()
    DiVAE(vq).save_pretrained(tmp_path / "vq_only.safetensors")
    vq_only = load_train_config(tt.ROOT / "configs/decoder_tiny.yaml",
                                ["train.stage=distill", f"distill.teacher={tmp_path / 'vq_only.safetensors'}"])
    with pytest.raises(ValueError, match="holds no UNet"):
        DistillTask(vq_only, torch.device("cpu")).build_models()
