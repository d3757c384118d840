"""trainer.flops and trainer.plan (issue 15): the FLOP count against an independent per-layer count, MFU
arithmetic, the card table, and the planner on every paper preset."""

from __future__ import annotations

import math

import pytest
import torch

from divae.unet import UNET_PRESETS, UNetModel
from trainer.config import load_train_config
from trainer.flops import CARDS, Throughput, card_key, device_peak, trace
from trainer.tasks import TASKS


def _unet_forward_flops_by_hand(model: UNetModel, image_size: int, token_grid: int) -> int:
    """Independent count (fvcore-style arithmetic, 2 FLOPs per multiply-add): every Conv2d and Linear from
    its weight shape and the spatial size its output has (recorded by forward hooks on a real forward at
    the spatial sizes, batch 1), plus attention's two matmuls (QK^T and AV: 2 * 2 * L^2 * C per layer) read off
    the attention modules' input shapes."""
    total = 0
    hooks = []

    def conv_hook(mod, inp, out):
        nonlocal total
        k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]  # c_in/groups * kh * kw
        total += 2 * out.numel() * k

    def linear_hook(mod, inp, out):
        nonlocal total
        total += 2 * out.numel() * mod.in_features

    def attn_hook(mod, inp, out):
        nonlocal total
        x = inp[0]
        length = x.shape[2] * x.shape[3] if x.dim() == 4 else x.shape[1]
        total += 2 * 2 * x.shape[0] * length * length * x.shape[1]

    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook))
        elif type(mod).__name__ == "AttentionBlock":
            hooks.append(mod.register_forward_hook(attn_hook))
    with torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size), torch.zeros(1, dtype=torch.long),
              torch.randn(1, model.cfg.cond_channels, token_grid, token_grid))
    for h in hooks:
        h.remove()
    return total


def test_tiny_unet_flops_match_an_independent_per_layer_count():
    train_cfg = load_train_config("configs/decoder_tiny.yaml")  # the tiny preset, with the tiny VQ's cond width
    cfg = train_cfg.unet
    assert cfg.model_channels == UNET_PRESETS["tiny"].model_channels
    torch.manual_seed(0)
    model = UNetModel(cfg).eval()
    assert any(type(m).__name__ == "AttentionBlock" for m in model.modules())
    by_hand = _unet_forward_flops_by_hand(model, cfg.image_size, cfg.token_grid)
    counted = TASKS["decoder"].sample_flops(train_cfg)  # no vq_cfg: the UNet alone
    assert counted["forward"] == pytest.approx(by_hand, rel=0.02)
    # backward ~ 2 x forward (the first conv needs no input gradient; attention backward recomputes its scores)
    assert 2.8 * counted["forward"] < counted["train"] < 3.1 * counted["forward"]


def test_trace_counts_a_linear_exactly_and_uses_no_memory():
    t = trace(lambda: torch.nn.Linear(4096, 4096, bias=False), lambda m: m(torch.randn(8192, 4096)).sum())
    assert t.flops == 2 * 2 * 8192 * 4096 * 4096  # forward and weight gradient (the input needs no gradient)
    assert t.saved_bytes == 8192 * 4096 * 4  # the input, saved for the weight gradient


def test_throughput_figures_and_mfu_arithmetic(monkeypatch):
    tp = Throughput(flops_per_sample=2e12, peak=1e15)
    f = tp.figures(samples_per_s=160.0, world_size=8)
    assert f["images_per_s_per_gpu"] == 20.0 and f["tflops_per_gpu"] == pytest.approx(40.0)
    assert f["mfu"] == pytest.approx(0.04)
    prior = Throughput(flops_per_sample=1e9, tokens_per_sample=256).figures(10.0, 2)
    assert prior["tokens_per_s_per_gpu"] == 5.0 * 256 and "mfu" not in prior
    monkeypatch.setenv("DIVAE_PEAK_FLOPS", "123e12")
    assert device_peak(torch.device("cpu")) == ("DIVAE_PEAK_FLOPS", 123e12)
    monkeypatch.delenv("DIVAE_PEAK_FLOPS")
    assert device_peak(torch.device("cpu")) == ("cpu", None)


@pytest.mark.parametrize("name,key", [("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-PCIE-40GB", "a100-40gb"),
                                      ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
                                      ("NVIDIA H200", "h200"), ("Tesla V100-SXM2-16GB", None)])
def test_card_names(name, key):
    assert card_key(name) == key


def test_card_table_holds_the_vendor_figures():
    assert CARDS["a100-80gb"].peak_bf16 == 312e12 and CARDS["h100-sxm"].peak_bf16 == 989e12
    assert CARDS["h200"].peak_bf16 == 989e12 and "790" in CARDS["h200"].note
    assert all(math.isfinite(c.peak_bf16) and c.memory_gib > 0 for c in CARDS.values())


def test_planner_on_every_paper_preset_prints_the_recipe_and_the_presets_fit(tmp_path, capsys):
    """`python -m trainer.plan --recipe` traces every paper preset (VQ f16/f8, decoder f16/f8, prior base) and
    prior_large; on the default Slurm allocation (16 x A100 80GB) each preset's micro-batch fits."""
    import json

    from trainer.plan import main

    out = tmp_path / "plan.json"
    assert main(["--config", "configs/prior_large.yaml", "--gpus", "16", "--gpu", "a100-80gb", "--recipe",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| ZeRO |" in text and "The paper's recipe" in text and "DOES NOT FIT" not in text
    r = json.loads(out.read_text())
    assert r["mfu"] == 0.35 and len(r["recipe"]) == 7  # 5 training stages + 2 evaluations
    for row in r["recipe"][:5]:
        assert row["micro_batch"] <= row["max_micro_batch"], row
        assert row["gpu_hours"] > 0 and row["tflop_per_sample"] > 0.1
    dec16 = next(x for x in r["recipe"] if x["stage"] == "decoder f16")
    assert dec16["micro_batch"] == 8 and 6 < dec16["tflop_per_sample"] < 8  # 256 / (16 GPUs x grad_accum 2)
    ev = r["recipe"][5]
    assert ev["samples"] == 50_000 and ev["tflop_per_sample"] > 1000  # 1000 UNet forwards per image
    by_nfe = {row["nfe"]: row for row in r["eval_nfe"]}  # the same evaluation at 1000, 20, 2 and 1 UNet calls
    assert sorted(by_nfe) == [1, 2, 20, 1000] and "distilled student, 1 step" in text
    assert by_nfe[1000]["gpu_hours_f16"] == pytest.approx(ev["gpu_hours"])
    assert by_nfe[2]["gpu_hours_f8"] == pytest.approx(by_nfe[1000]["gpu_hours_f8"] / 500)
    plan = r["plan"]
    assert plan["params"] > 9e8 and plan["checkpointing"] and plan["act_ckpt"] < plan["act"]
    assert plan["state_gib"][0] > plan["state_gib"][1] > plan["state_gib"][2] > plan["state_gib"][3]
    # ZeRO-0, bf16: 2 + 4 + 12 + 4 bytes per parameter
    assert plan["state_gib"][0] * 2**30 == pytest.approx(plan["params"] * 22)


def test_planner_refuses_a_bad_config(tmp_path, capsys):
    from trainer.plan import main

    assert main(["--config", "configs/decoder_f16.yaml", "optim.lrr=1"]) == 2
    assert "lrr" in capsys.readouterr().err


def test_distillation_costs_the_students_unrolled_steps_and_the_teachers_sampler():
    """configs/distill_f16.yaml: per image, 2 chained student calls (forward + backward) and 20 teacher forwards;
    its activations are those of 2 UNet calls."""
    from trainer.plan import activation_bytes

    dec = load_train_config("configs/decoder_f16_v2.yaml")
    dist = load_train_config("configs/distill_f16.yaml")
    fd, fs = TASKS["decoder"].sample_flops(dec), TASKS["distill"].sample_flops(dist)
    assert fs["forward"] == fd["forward"] > 1e12
    assert fs["train"] - 20 * fs["forward"] == pytest.approx(2 * fd["train"], rel=0.01)
    assert activation_bytes(dist, False)[0] == pytest.approx(2 * activation_bytes(dec, False)[0], rel=0.02)


def test_an_anchored_decoder_costs_its_cnn_base_and_three_input_channels():
    """decoder.anchor: per image the frozen CNN decoder's forward (in training and in decoding) on top of the UNet,
    whose input conv takes the base image's 3 channels beside x_t."""
    from trainer.flops import vq_decode_flops

    plain = load_train_config("configs/demo_decoder.yaml")
    anchored = load_train_config("configs/demo_decoder_anchored.yaml")
    vq = load_train_config("configs/demo_vq.yaml").vq
    fp, fa = TASKS["decoder"].sample_flops(plain, vq), TASKS["decoder"].sample_flops(anchored, vq)
    base = vq_decode_flops(vq, plain.unet.token_grid)
    conv_in = 2 * 3 * 9 * plain.unet.model_channels * plain.unet.image_size ** 2  # the 3 extra input channels
    assert base > 1e6
    assert fa["forward"] - fp["forward"] == pytest.approx(base + conv_in, rel=1e-6)
    assert fa["train"] - fp["train"] > base + conv_in
