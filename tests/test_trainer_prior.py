"""The trainer's `prior` stage on CPU, from captioned photos to a prior file that `load_prior` reads.

Chain (module fixture `data`, all real commands called in-process): scikit-image photos with captions ->
`data_pipeline.prepare_cc --tsv` (64 px MDS shards) -> a tiny DiVAE file (the vq_tiny VQ and the
decoder_tiny UNet, randomly initialised with a fixed seed: the prior only needs a fixed image -> tokens
map and a decoder for the grids) -> `trainer.pre_encode` (the `tokens` column) ->
`data_pipeline.train_tokenizer` (tokenizer.json beside the shards). Then real DeepSpeed runs in
subprocesses: 40 steps in one process (ZeRO-2, bf16, grids decoded by the diffusion decoder, DDIM 2 steps)
and 4 steps under `torchrun --nproc_per_node 2` with ZeRO-3 (token grids, no DiVAE file). Held-out validation
(trainer/validation.py): 8 steps with `data.val_path` (16 other crops, pre-encoded alike) and `logging.val_every=2`
beside the same 8 steps without it (bitwise-equal training losses), a resume from its step-4 checkpoint, and the run
folder as `--prior` of divae.generate and evaluation.t2i_fid.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from trainer_runs import common, metrics, run  # noqa: E402

from divae.utils.config import ConfigError  # noqa: E402
from trainer.config import load_train_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["an astronaut in a white space suit in front of a flag", "a ginger cat lying down and looking up",
            "a cup of coffee on a saucer on a wooden table", "a white rocket on the launch pad",
            "a microscope image of tissue stained brown and blue"]
STEPS = 30


def _captioned_shards(root: Path, name: str, crops: range) -> Path:
    """`prepare_cc` shards (64 px) of the photos' crops numbered `crops`, each captioned with its photo's caption."""
    from data_fixtures import encode, photos, variant

    from data_pipeline import prepare_cc

    (root / name).mkdir()
    ps, lines = photos(), []
    for i in crops:
        (root / name / f"{i:03d}.jpg").write_bytes(encode(variant(ps[i % len(ps)], i, long_side=80)))
        lines.append(f"{CAPTIONS[i % len(ps)]}, crop {i // len(ps)}\t{name}/{i:03d}.jpg")
    (root / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    shards = root / f"{name}64"
    prepare_cc.main(["--tsv", str(root / f"{name}.tsv"), "--out", str(shards), "--size", "64", "--workers", "0",
                     "--shard-size", "16", "--no-progress"])
    return shards


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from data_pipeline import train_tokenizer
    from divae.model import DiVAE
    from trainer import pre_encode

    root = tmp_path_factory.mktemp("prior_data")
    shards = _captioned_shards(root, "img", range(32))

    dec = load_train_config(ROOT / "configs/decoder_tiny.yaml")
    vq = load_train_config(ROOT / "configs/vq_tiny.yaml").vq
    torch.manual_seed(0)
    divae_file = root / "divae.safetensors"
    DiVAE(vq, dec.unet, dec.diffusion).save_pretrained(divae_file)

    tok_shards = root / "cap64_tok"
    pre_encode.main(["--vq", str(divae_file), "--src", str(shards), "--dst", str(tok_shards), "--device", "cpu"])
    train_tokenizer.main(["--shards", str(tok_shards), "--vocab-size", "400", "--min-frequency", "1"])
    return {"shards": shards, "tok_shards": tok_shards, "divae": divae_file, "tokenizer": tok_shards / "tokenizer.json"}


def _task(data: dict, *overrides: str):
    from trainer.tasks.prior import PriorTask

    cfg = load_train_config(ROOT / "configs/prior_tiny.yaml",
                            [f"data.path={data['tok_shards']}", f"prior_task.divae_weights={data['divae']}",
                             *overrides])
    return PriorTask(cfg, torch.device("cpu"))


# -- build-time checks and the token column (in-process, no DeepSpeed) ----------------------------------------
def test_build_checks_the_inputs_with_clear_errors(data):
    task = _task(data)
    models = task.build_models()
    assert task.decode_mode == "diffusion" and task.tokenizer.vocab_size <= 400
    assert models["model"].prior.cfg.image_vocab_size == 256
    vocab = task.tokenizer.vocab_size
    cases = [
        ((f"data.path={data['shards']}", f"prior_task.tokenizer={data['tokenizer']}"), "trainer.pre_encode"),
        ((f"data.path={data['shards']}",), f"--shards {data['shards']}"),  # no tokenizer.json there
        (("prior_task.tokenizer=/nonexistent/tokenizer.json",), "data_pipeline.train_tokenizer"),
        (("prior.image_h=4", "prior.image_w=4"), "bytes per image"),
        (("prior.image_vocab_size=40000",), "bytes per image"),  # int32 tokens expected, int16 stored
        (("prior.image_vocab_size=512",), "n_embed=256"),  # shards fit, the DiVAE file's codebook does not
        ((f"prior.text_vocab_size={vocab - 1}",), f"prior.text_vocab_size={vocab}"),
        (("prior.text_len=32",), "prior.text_len=64"),
        (("prior_task.divae_weights=/nonexistent.safetensors",), "does not exist"),
    ]
    for overrides, needle in cases:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            _task(data, *overrides).build_models()
    cnn = _task(data, "prior_task.decoder=cnn")
    cnn.build_models()
    assert cnn.decode_mode == "cnn"


def test_token_column_matches_the_vq_encoding(data):
    from data_pipeline.reader import ShardReader
    from data_pipeline.tokens import tokens_from_bytes as tokens_from_column
    from divae.model import DiVAE

    model = DiVAE.from_pretrained(data["divae"])
    reader = ShardReader(str(data["tok_shards"]))
    samples = [reader[i] for i in (0, 7, 31)]
    x = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = tokens_from_column([s["tokens"] for s in samples], 8, 8, np.dtype(np.int16))
    assert torch.equal(z, model.encode(x))
    assert z.unique().numel() > 8  # the tiny VQ spreads the photos over many codes
    with pytest.raises(ValueError, match="bytes"):
        tokens_from_column([samples[0]["tokens"][:-2]], 8, 8, np.dtype(np.int16))


def test_token_palette_is_fixed_per_code():
    from trainer.tasks.prior import token_palette_images

    z = torch.tensor([[[0, 1], [1, 0]], [[5, 5], [0, 1]]])
    img = token_palette_images(z, 8, min_side=8)
    assert img.shape == (2, 3, 8, 8) and img.min() >= -1 and img.max() <= 1
    assert torch.equal(img[0, :, 0, 0], img[1, :, 4, 0])  # code 0 has one colour everywhere
    assert not torch.equal(img[0, :, 0, 0], img[0, :, 0, 4])  # codes 0 and 1 differ


# -- DeepSpeed runs ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prior_run(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("prior_run")
    log = run_dir / "log.txt"
    code = run(["--config", "configs/prior_tiny.yaml", *common(data["tok_shards"], run_dir), f"train.steps={STEPS}",
                "train.batch_size=8", "checkpoint.every=0", f"logging.sample_every={STEPS}", "optim.lr=2e-3",
                "optim.warmup_steps=5", f"prior_task.divae_weights={data['divae']}", "prior_task.sample_steps=2"],
               1, log, timeout=180)
    assert code == 0, log.read_text()[-4000:]
    return run_dir


@pytest.mark.slow
def test_prior_stage_learns_and_logs_token_accuracy(prior_run):
    m = metrics(prior_run)
    assert sorted(m) == list(range(1, STEPS + 1))
    loss = [m[s]["loss"] for s in range(1, STEPS + 1)]
    acc = [m[s]["token_acc"] for s in range(1, STEPS + 1)]
    assert np.mean(loss[-5:]) < 0.75 * np.mean(loss[:5]), loss
    assert all(0.0 <= a <= 1.0 for a in acc) and np.mean(acc[-5:]) > np.mean(acc[:5]) + 0.05, acc
    assert all("caption_dropped" in m[s] for s in m)

    png = prior_run / "samples" / f"step_{STEPS:08d}.png"
    assert png.stat().st_size > 1000
    from PIL import Image

    assert Image.open(png).size[1] > 2 * 64  # two rows (data, prior) of 64 px images
    rec = json.loads((prior_run / "samples" / f"step_{STEPS:08d}_tokens.json").read_text())
    z = torch.tensor(rec["prior_tokens"])
    assert rec["step"] == STEPS and len(rec["captions"]) == z.shape[0] == 8  # logging.num_samples of the micro batch
    assert z.shape[1:] == (8, 8) and 0 <= int(z.min()) and int(z.max()) < 256
    assert all(c.split(", crop")[0] in CAPTIONS for c in rec["captions"])


@pytest.mark.slow
def test_prior_export_round_trips_with_its_tokenizer(prior_run, data):
    from data_pipeline.reader import ShardReader
    from data_pipeline.tokens import tokens_from_bytes as tokens_from_column
    from divae.prior_io import load_prior
    from divae.text_tokenizer import TextTokenizer

    assert not (prior_run / "divae.safetensors").exists()
    assert (prior_run / "checkpoints" / f"step_{STEPS:08d}" / "prior.safetensors").is_file()
    model, tok = load_prior(prior_run / "prior.safetensors")
    ref = TextTokenizer.load(data["tokenizer"])
    assert tok.to_json() == ref.to_json()
    assert torch.equal(tok.encode(CAPTIONS)[0], ref.encode(CAPTIONS)[0])

    reader = ShardReader(str(data["tok_shards"]), decode_image=False)
    rows = [reader[i] for i in range(len(reader))]
    ids, mask = tok.encode([r["caption"] for r in rows])
    z = tokens_from_column([r["tokens"] for r in rows], 8, 8, np.dtype(np.int16))
    with torch.no_grad():
        loss, _ = model.loss(ids, mask, z)
    first = np.mean([metrics(prior_run)[s]["loss"] for s in (1, 2, 3)])
    assert float(loss) < 0.8 * first, (float(loss), first)  # the exported (EMA) weights are the trained ones
    out = model.sample(ids[:2], mask[:2], guidance_scale=2.0, seeds=[0, 1])
    assert out.shape == (2, 8, 8)

    task = _task(data)  # checkpoint.init_from: a new run starts from the exported weights
    models = task.build_models()
    task.init_from(str(prior_run / "prior.safetensors"), models)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in models["model"].prior.state_dict().items())
    with pytest.raises(ConfigError, match="dec_layers"):
        other = _task(data, "prior.dec_layers=3")
        other.init_from(str(prior_run / "prior.safetensors"), other.build_models())


@pytest.mark.slow
def test_prior_two_ranks_zero3(data, tmp_path):
    run_dir = tmp_path / "prior_zero3"
    run_dir.mkdir()
    log = run_dir / "log.txt"
    code = run(["--config", "configs/prior_tiny.yaml", *common(data["tok_shards"], run_dir), "train.steps=4",
                "train.batch_size=8", "checkpoint.every=0", "logging.sample_every=4", "deepspeed.zero_stage=3",
                "prior_task.divae_weights=", "optim.warmup_steps=1"], 2, log, timeout=180)
    assert code == 0, log.read_text()[-4000:]
    m = metrics(run_dir)
    assert sorted(m) == [1, 2, 3, 4] and all(np.isfinite(m[s]["loss"]) and "token_acc" in m[s] for s in m)
    assert (run_dir / "samples" / "step_00000004.png").stat().st_size > 500
    rec = json.loads((run_dir / "samples" / "step_00000004_tokens.json").read_text())
    assert np.array(rec["prior_tokens"]).shape == (4, 8, 8) and np.array(rec["data_tokens"]).shape == (4, 8, 8)
    from divae.prior_io import load_prior

    model, _ = load_prior(run_dir / "prior.safetensors")
    assert model.num_params() > 1e6


def test_prior_f8_preset_trains_on_f8_shaped_tokens(data, tmp_path):
    """configs/prior_f8.yaml, the paper's text-to-image setting (32x32 tokens, K = 8192), with tiny widths: 3 steps on
    shards pre-encoded by a VQ of that token grid and codebook (a random f2 VQ at 64 px stands in for vq_f8 at
    256 px: the prior sees only the tokens), then its export loads with the f8 shape; the commands in
    docs/text_to_image.md name this config and the f8 VQ whose grid and codebook it matches."""
    from dataclasses import replace

    from divae.model import DiVAE
    from divae.prior_io import load_prior
    from divae.vq import VQ_PRESETS
    from trainer import pre_encode

    cfg = load_train_config(ROOT / "configs/prior_f8.yaml")
    vq_f8 = VQ_PRESETS["vq_f8"]
    grid = vq_f8.resolution // vq_f8.downsample_factor
    assert (cfg.prior.image_h, cfg.prior.image_w, cfg.prior.image_vocab_size) == (grid, grid, vq_f8.n_embed)
    assert (grid, vq_f8.n_embed) == (32, 8192) and cfg.prior_task.divae_weights.endswith("decoder_f8/divae.safetensors")
    readme = (ROOT / "docs" / "text_to_image.md").read_text()
    assert "-m trainer.train --config configs/prior_f8.yaml" in readme and "--vq runs/vq_f8/divae.safetensors" in readme

    stand_in = replace(VQ_PRESETS["tiny"], ch=16, ch_mult=(1, 2), attn_resolutions=(), n_embed=8192, embed_dim=8)
    torch.manual_seed(0)
    DiVAE(stand_in).save_pretrained(tmp_path / "vq32.safetensors")
    tokens = tmp_path / "cap64_f8tok"
    pre_encode.main(["--vq", str(tmp_path / "vq32.safetensors"), "--src", str(data["shards"]), "--dst", str(tokens),
                     "--device", "cpu"])
    run_dir = tmp_path / "run"
    log = tmp_path / "log.txt"
    code = run(["--config", "configs/prior_f8.yaml", *common(tokens, run_dir), "train.steps=3", "train.batch_size=4",
                "checkpoint.every=0", "logging.sample_every=0", "data.num_workers=0", "data.image_size=64",
                f"prior_task.tokenizer={data['tokenizer']}", "prior_task.divae_weights=", "prior.dim=32",
                "prior.n_heads=2", "prior.enc_layers=1", "prior.dec_layers=1"], 1, log, timeout=240)
    assert code == 0, log.read_text()[-4000:]
    m = metrics(run_dir)
    assert sorted(m) == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in m.values())
    model, _ = load_prior(run_dir / "prior.safetensors")
    assert (model.cfg.image_h, model.cfg.image_w, model.cfg.image_vocab_size) == (32, 32, 8192)


# -- held-out validation and the best checkpoint (trainer/validation.py) ----------------------------------------
VAL_STEPS = 8


@pytest.fixture(scope="module")
def val_data(data, tmp_path_factory) -> Path:
    """16 held-out captioned crops (not among the 32 training ones), pre-encoded by the same VQ."""
    from trainer import pre_encode

    root = tmp_path_factory.mktemp("prior_val_data")
    shards = _captioned_shards(root, "val", range(100, 116))
    pre_encode.main(["--vq", str(data["divae"]), "--src", str(shards), "--dst", str(root / "val_tok"), "--device",
                     "cpu"])
    return root / "val_tok"


def _val_args(data: dict, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", "configs/prior_tiny.yaml", *common(data["tok_shards"], run_dir), f"train.steps={VAL_STEPS}",
            "train.batch_size=8", "optim.lr=2e-3", "optim.warmup_steps=2", "logging.sample_every=0",
            "prior_task.divae_weights=", "checkpoint.every=4", "checkpoint.keep_last=2", *extra]


def _val_on(val_data: Path) -> list[str]:
    return [f"data.val_path={val_data}", "logging.val_every=2", "logging.val_batches=2"]


@pytest.fixture(scope="module")
def val_runs(data, val_data, tmp_path_factory) -> tuple[Path, Path]:
    """The same VAL_STEPS-step run (same seed) with validation every 2 steps (2 micro-batches of 8 held-out
    captions, the EMA weights: prior_tiny exports the EMA) and without."""
    root = tmp_path_factory.mktemp("prior_val")
    runs = (root / "val", root / "plain")
    for run_dir, extra in zip(runs, (_val_on(val_data), [])):
        run_dir.mkdir()
        code = run(_val_args(data, run_dir, *extra), 1, run_dir / "log.txt", timeout=180)
        assert code == 0, (run_dir / "log.txt").read_text()[-4000:]
    return runs


def _held_out_loss(prior_file: Path, val_data: Path) -> tuple[float, float]:
    """(cross-entropy, token accuracy) of a prior file on all 16 held-out samples, fp32, computed here."""
    from data_pipeline.reader import ShardReader
    from data_pipeline.tokens import tokens_from_bytes
    from divae.prior_io import load_prior

    model, tok = load_prior(prior_file)
    rows = [r for r in ShardReader(str(val_data), decode_image=False)]
    ids, mask = tok.encode([r["caption"] for r in rows])
    with torch.no_grad():
        loss, m = model.loss(ids, mask, tokens_from_bytes([r["tokens"] for r in rows], 8, 8, np.dtype(np.int16)))
    return float(loss), float(m["token_acc"])


@pytest.mark.slow
def test_validation_logs_held_out_metrics_and_keeps_the_best(val_runs, val_data):
    from safetensors import safe_open

    with_val, plain = val_runs
    m, p = metrics(with_val), metrics(plain)
    assert sorted(m) == sorted(p) == list(range(1, VAL_STEPS + 1))
    assert [s for s in m if "val_loss" in m[s]] == [2, 4, 6, 8] and not any("val_loss" in r for r in p.values())
    val = {s: m[s]["val_loss"] for s in (2, 4, 6, 8)}
    assert all(np.isfinite(v) and v > 0 and 0 <= m[s]["val_token_acc"] <= 1 for s, v in val.items()), m
    # validation changes nothing of the training: the same losses, bit for bit, as the run without it
    assert [m[s]["loss"] for s in m] == [p[s]["loss"] for s in p]
    assert [m[s]["token_acc"] for s in m] == [p[s]["token_acc"] for s in p]

    best = min(val, key=val.get)
    rec = json.loads((with_val / "best.json").read_text())
    assert (rec["step"], rec["val_loss"], rec["val_token_acc"]) == (best, val[best], m[best]["val_token_acc"])
    assert rec["weights"] == "ema" and rec["val_samples"] == 16 and rec["file"] == "best.safetensors"
    with safe_open(str(with_val / "best.safetensors"), framework="pt") as f:
        info = json.loads(f.metadata()["weights"])
    assert (info["kind"], info["step"], info["val_loss"]) == ("ema", best, val[best])
    # the logged figure is the held-out loss of the file's weights (measured here in fp32; the run in bf16)
    loss, acc = _held_out_loss(with_val / "best.safetensors", val_data)
    assert loss == pytest.approx(val[best], rel=2e-3) and acc == pytest.approx(m[best]["val_token_acc"], abs=0.05)
    # each checkpoint carries the best so far
    state = json.loads((with_val / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())["best_val"]
    early = min((2, 4), key=val.get)
    assert (state["step"], state["val_loss"]) == (early, val[early])
    assert not (plain / "best.json").exists() and not (plain / "best.safetensors").exists()


@pytest.mark.slow
def test_resumed_run_keeps_the_checkpoint_best(val_runs, data, val_data, tmp_path):
    """Resumed from step 4 with a best of val_loss 0 in the checkpoint (set by hand, unbeatable): the run re-logs
    the uninterrupted run's metrics bit for bit and writes no best, since none of its validations beats 0."""
    import shutil

    with_val, _ = val_runs
    run_dir = tmp_path / "resumed"
    shutil.copytree(with_val, run_dir)
    for name in ("best.json", "best.safetensors"):
        (run_dir / name).unlink()
    (run_dir / "checkpoints" / "latest").write_text("step_00000004\n")
    state_file = run_dir / "checkpoints" / "step_00000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["best_val"]["val_loss"] = 0.0
    state_file.write_text(json.dumps(state))  # the manifest's sha256 no longer matches: checkpoint.verify=false
    log = run_dir / "resume_log.txt"
    code = run(_val_args(data, run_dir, *_val_on(val_data), "checkpoint.verify=false"), 1, log, timeout=180)
    assert code == 0, log.read_text()[-4000:]
    assert "resumed from" in log.read_text()
    again, first = metrics(run_dir), metrics(with_val)
    keys = ("loss", "token_acc", "grad_norm", "lr", "val_loss", "val_token_acc")
    assert sorted(again) == sorted(first)
    assert all(again[s].get(k) == first[s].get(k) for s in first for k in keys), (again, first)
    assert not (run_dir / "best.json").exists() and not (run_dir / "best.safetensors").exists()
    final = json.loads((run_dir / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())["best_val"]
    assert final["val_loss"] == 0.0 and final["step"] == state["best_val"]["step"]


@pytest.mark.slow
def test_generate_and_t2i_fid_take_the_run_folder(val_runs, data, tmp_path):
    import argparse

    from divae.generate import main as generate
    from evaluation.t2i_fid import _resolve_prior

    with_val, plain = val_runs
    index = generate(["--prior", str(with_val), "--divae", str(data["divae"]), "--caption", CAPTIONS[1], "--steps",
                      "2", "--out", str(tmp_path / "gen")])
    assert len(index) == 1 and (tmp_path / "gen" / index[0]["file"]).is_file()
    rec = json.loads((tmp_path / "gen" / "index.json").read_text())
    step = json.loads((with_val / "best.json").read_text())["step"]
    assert rec["prior"] == str(with_val / "best.safetensors") and f"at step {step}" in rec["prior_choice"]
    for folder, chosen in ((with_val, "best.safetensors"), (plain, "prior.safetensors")):
        args = argparse.Namespace(prior=str(folder))
        _resolve_prior(args)
        assert args.prior == str(folder / chosen) and chosen in args.prior_choice
