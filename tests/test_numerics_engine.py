"""Numerics through the trainer's real DeepSpeed engines (one process, gloo), in the precision we train in.

- a bf16 VQ engine assigns, in its training forward, the codes that an fp32 search gives on the same vectors;
- the VQ stage's adaptive GAN weight equals torch.autograd.grad's with respect to the last layer's weight;
- the decoder stage under a bf16 engine hands x_t to the UNet's input conv in fp32, and fine-tuning the encoder
  leaves an EMA codebook untouched; its LPIPS term on x_0-hat reaches the UNet;
- the VQ stage's decoder-only mode (the fair CNN baseline) leaves the tokens' encoder and codebook untouched.
The engines are built exactly as trainer.train builds them (task.build_models -> build_engine -> task.attach).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _photo_batch(n: int = 4, size: int = 64, seed: int = 0) -> dict:
    from skimage import data

    im = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y, x = (int(v) for v in torch.randint(0, 512 - size, (2,), generator=g))
        out.append(im[:, y : y + size, x : x + size])
    return {"image": torch.stack(out)}


def _task(overrides: list[str], config: str, before_engines=None):
    from trainer.config import load_train_config
    from trainer.engine import build_engine
    from trainer.tasks import TASKS

    cfg = load_train_config(ROOT / "configs" / config, ["train.batch_size=4", "train.steps=10", *overrides])
    task = TASKS[cfg.train.stage](cfg, torch.device("cpu"))
    torch.manual_seed(0)
    models = task.build_models()
    if before_engines is not None:
        before_engines(models)
    engines = {n: build_engine(models[n], cfg.deepspeed, cfg.optim, micro_batch=4, grad_accum=1, world_size=1,
                               grad_clip=cfg.train.grad_clip, total_steps=cfg.train.steps) for n in task.phases}
    task.attach(engines)
    return task, engines


def _train_step(task, engines, batch: dict, step: int) -> dict:
    metrics = {}
    for phase in task.phases:
        out = task.loss(batch, phase, step)
        if out is None:
            continue
        loss, m = out
        engines[phase].backward(loss)
        engines[phase].step()
        metrics.update(m)
    return metrics


def test_bf16_vq_training_assigns_the_fp32_codes(single_process_group):
    def offset_codebook(models):  # codes away from the origin, as after some training
        q = models["generator"].quantizer
        g = torch.Generator().manual_seed(1)
        c0 = torch.randn(q.codebook_dim, generator=g)
        q.codebook.data.copy_(c0 + 0.05 * torch.randn(q.codebook.shape, generator=g))

    task, engines = _task(["deepspeed.precision=bf16"], "vq_tiny.yaml", offset_codebook)
    quantizer = task.inner("generator").quantizer
    assert quantizer.codebook.dtype == torch.bfloat16  # the engine trains it in bf16
    checked = []

    def compare(module, inputs, output):
        with torch.autocast("cpu", enabled=False):  # the fp32 search, outside the engine's autocast
            ref = module.encode(inputs[0].detach().float())
        checked.append((output[1] != ref).float().mean().item())

    handle = quantizer.register_forward_hook(compare)
    try:
        for step in range(3):
            _train_step(task, engines, _photo_batch(seed=step), step)
    finally:
        handle.remove()
    assert len(checked) == 3 and checked == [0.0, 0.0, 0.0], checked


def test_trained_adaptive_weight_equals_autograd_on_the_weight(single_process_group):
    from divae.vq_loss import generator_adv_loss

    task, engines = _task(["deepspeed.precision=fp32", "vq_loss.disc_start=0"], "vq_tiny.yaml")
    batch = _photo_batch()
    _train_step(task, engines, batch, 0)  # one update first: a discriminator that has seen data
    gen = copy.deepcopy(task.inner("generator"))
    disc = copy.deepcopy(task.inner("discriminator")).requires_grad_(False)
    metrics = _train_step(task, engines, batch, 1)

    x = batch["image"]
    x_hat, _, _ = gen(x)
    nll, _ = task.loss_fn.reconstruction_loss(x, x_hat)
    g = generator_adv_loss(disc(x_hat), task.cfg.vq_loss.disc_loss)
    w = gen.last_layer().weight
    ratio = torch.autograd.grad(nll, w, retain_graph=True)[0].norm() / (torch.autograd.grad(g, w)[0].norm() + 1e-4)
    expected = float(ratio.clamp(0, task.cfg.vq_loss.adaptive_weight_max)) * task.cfg.vq_loss.disc_weight
    assert metrics["gan_on"] == 1.0
    assert metrics["d_weight"] == pytest.approx(expected, rel=1e-5)


def test_bf16_decoder_keeps_x_t_fp32_and_finetuning_keeps_an_ema_codebook(single_process_group, tmp_path):
    from dataclasses import replace

    from divae.model import DiVAE
    from divae.quantizer import QuantizerConfig
    from divae.vq import VQ_PRESETS

    vq_cfg = replace(VQ_PRESETS["tiny"], quantizer=QuantizerConfig(use_ema=True, ema_decay=0.9))
    torch.manual_seed(0)
    vq_file = tmp_path / "vq.safetensors"
    DiVAE(vq_cfg).save_pretrained(vq_file)
    task, engines = _task(["deepspeed.precision=bf16", f"decoder.vq_weights={vq_file}",
                           "decoder.finetune_encoder=true", f"unet.cond_channels={vq_cfg.embed_dim}",
                           f"unet.token_grid={64 // vq_cfg.downsample_factor}"], "decoder_tiny.yaml")
    net = task.inner("model")
    q = net.vq.quantizer
    frozen = {k: v.clone() for k, v in q.state_dict().items()}
    encoder_before = net.vq.encoder.conv_in.weight.detach().float().clone()
    seen = []
    net.unet.input_blocks[0][0].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    for step in range(2):
        metrics = _train_step(task, engines, _photo_batch(seed=step), step)
    assert next(net.unet.parameters()).dtype == torch.bfloat16
    assert seen and set(seen) == {torch.float32}  # x_t reached the input conv in fp32
    for k, v in q.state_dict().items():
        assert torch.equal(v, frozen[k]), f"the frozen quantizer's {k} changed"
    assert not torch.equal(net.vq.encoder.conv_in.weight.detach().float(), encoder_before)  # the encoder trains
    assert metrics["qloss"] > 0


def test_bf16_decoder_perceptual_term_reaches_the_unet(single_process_group, tmp_path):
    """v-prediction + min-SNR + LPIPS on x_0-hat under bf16 engines: the LPIPS term has a finite, non-zero gradient
    at x_0-hat, the VGG runs in bf16 (autocast), and one optimizer step from the same start, batch and noise moves
    the UNet's output layer differently with the term than without it."""
    from divae.model import DiVAE
    from divae.vq import VQ_PRESETS

    vq_cfg = VQ_PRESETS["tiny"]
    torch.manual_seed(0)
    vq_file = tmp_path / "vq.safetensors"
    DiVAE(vq_cfg).save_pretrained(vq_file)
    common = ["deepspeed.precision=bf16", f"decoder.vq_weights={vq_file}", "diffusion.model_mean_type=v",
              "diffusion.loss_weighting=min_snr", "decoder.perceptual_images=2",
              f"unet.cond_channels={vq_cfg.embed_dim}", f"unet.token_grid={64 // vq_cfg.downsample_factor}"]
    batch = _photo_batch()
    after = {}
    for weight in (0.0, 1.0):
        task, engines = _task([*common, f"decoder.perceptual_weight={weight}"], "decoder_tiny.yaml")
        if weight:
            x0 = task.images(batch)
            t = torch.tensor([10, 500, 990, 200])
            losses = task.diffusion.training_losses(engines["model"], x0, t,
                                                    model_kwargs={"cond": task._cond(batch, x0)})
            vgg_dtypes = []
            hook = task.lpips.net[0].register_forward_hook(lambda m, a, out, seen=vgg_dtypes: seen.append(out.dtype))
            (grad,) = torch.autograd.grad(task._perceptual(x0, losses["pred_x0"], t), losses["pred_x0"])
            hook.remove()
            assert vgg_dtypes == [torch.bfloat16]
            assert torch.isfinite(grad).all() and grad[:2].abs().sum() > 0 and grad[2:].abs().sum() == 0
        torch.manual_seed(1)
        metrics = _train_step(task, engines, batch, 0)
        assert torch.isfinite(metrics["loss"])
        assert ("lpips" in metrics) == bool(weight)
        after[weight] = task.inner("model").unet.out[-1].weight.detach().float().clone()
    assert not torch.equal(after[0.0], after[1.0])


def test_vq_stage_can_train_only_the_cnn_decoder_on_frozen_tokens(single_process_group, tmp_path):
    """vq_task.train=decoder (the fair CNN baseline): after bf16 steps with L1 + LPIPS, the encoder, quant_conv
    and the EMA codebook equal the init_from file's, so the tokens are the same, and the decoder has trained."""
    from divae.model import DiVAE
    from divae.vq import VQ_PRESETS

    vq_cfg = VQ_PRESETS["tiny"]
    torch.manual_seed(0)
    vq_file = tmp_path / "vq.safetensors"
    source = DiVAE(vq_cfg)
    source.save_pretrained(vq_file)
    with pytest.raises(Exception, match="checkpoint.init_from"):
        _task(["vq_task.train=decoder"], "vq_tiny.yaml")
    overrides = ["deepspeed.precision=bf16", "vq_task.train=decoder", f"checkpoint.init_from={vq_file}",
                 "vq_loss.perceptual_weight=1.0", "vq_loss.disc_factor=0.0"]
    task, engines = _task(overrides, "vq_tiny.yaml",
                          before_engines=lambda models: task_init(models, vq_file))
    for step in range(2):
        _train_step(task, engines, _photo_batch(seed=step), step)
    vq = task.inner("generator")
    ref = source.vq.state_dict()
    trained = [n for n, v in vq.state_dict().items() if not torch.equal(v, ref[n].to(v.dtype))]
    assert trained and all(n.startswith(("decoder.", "post_quant_conv.")) for n in trained), trained
    assert "decoder.conv_out.weight" in trained


def task_init(models, path):
    """What trainer.train does between build_models and the engines when checkpoint.init_from is set."""
    from divae.model import read_pretrained

    _, state = read_pretrained(path)
    models["generator"].load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("vq.")})


def test_bf16_anchored_decoder_learns_the_cnn_residual(single_process_group, tmp_path):
    """decoder.anchor (divae/anchor.py) under bf16 engines: before training, the export of an x_0-predicting
    anchored decoder decodes exactly the CNN decoder's image (its output layer starts at zero); the diffusion's
    target is the residual in units of anchor_scale (the first step's MSE equals its mean square); the LPIPS term
    on base + residual-hat trains the UNet; the trained export decodes something else than the CNN, through the
    file's anchor. Configs that cannot work are one-line errors."""
    from divae.model import DiVAE
    from divae.vq import VQ_PRESETS

    vq_cfg = VQ_PRESETS["tiny"]
    torch.manual_seed(0)
    vq_file = tmp_path / "vq.safetensors"
    DiVAE(vq_cfg).save_pretrained(vq_file)
    common = ["deepspeed.precision=bf16", f"decoder.vq_weights={vq_file}", "diffusion.model_mean_type=x0",
              "diffusion.model_var_type=fixed_small", "diffusion.loss=simple", "unet.learn_sigma=false",
              f"unet.cond_channels={vq_cfg.embed_dim}", f"unet.token_grid={64 // vq_cfg.downsample_factor}"]
    with pytest.raises(ValueError, match="unet.anchor_channels=3"):
        _task([*common, "decoder.anchor=true"], "decoder_tiny.yaml")[0].build_models()
    with pytest.raises(ValueError, match="decoder.finetune_encoder=false"):
        _task([*common, "decoder.anchor=true", "unet.anchor_channels=3", "decoder.finetune_encoder=true"],
              "decoder_tiny.yaml")
    scale = 0.2
    task, engines = _task([*common, "decoder.anchor=true", "unet.anchor_channels=3", f"decoder.anchor_scale={scale}",
                           "decoder.perceptual_weight=1.0", "decoder.perceptual_images=2"], "decoder_tiny.yaml")
    batch = _photo_batch()
    ids = task.frozen_vq.encode(task.images(batch))

    def export(name: str) -> DiVAE:
        task.export(str(tmp_path / name), {"model": task.inner("model").state_dict()})
        return DiVAE.from_pretrained(tmp_path / name)

    before = export("before.safetensors")
    assert before.anchor == {"scale": scale}
    cnn = before.decode_tokens(ids, decoder="cnn")
    assert torch.equal(before.decode_tokens(ids, sampler="dpmpp2m", steps=3, seeds=range(4)), cnn)
    x0 = task.images(batch)
    base = task.frozen_vq.decode(task.frozen_vq.embed(ids)).float().clamp(-1, 1)
    metrics = _train_step(task, engines, batch, 0)
    assert torch.isfinite(metrics["loss"]) and "lpips" in metrics
    assert metrics["mse"].item() == pytest.approx((((x0 - base) / scale) ** 2).mean().item(), rel=1e-5)
    for step in range(1, 3):
        _train_step(task, engines, batch, step)
    after = export("after.safetensors")
    assert not torch.equal(after.decode_tokens(ids, sampler="dpmpp2m", steps=3, seeds=range(4)), cnn)
