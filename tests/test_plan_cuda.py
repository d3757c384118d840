"""The planner's activation memory as a CUDA device holds it (issue 25, item 5), without a GPU: CUDA's own
autocast op lists applied to fake CUDA tensors (trainer.flops.cuda_bf16_autocast), bf16 trained weights as
DeepSpeed's module copy, and under activation checkpointing each saved tensor counted once."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.flops import cuda_saved_bytes

B, C, H, G = 2, 64, 16, 8
N = B * C * H * H  # elements of every feature map of the toy block


def _block():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.GroupNorm(G, C), nn.SiLU(), nn.Conv2d(C, C, 3, padding=1))


def _step(m):
    return m(torch.randn(B, C, H, H)).float().square().mean()


def test_cuda_rules_keep_group_norm_and_silu_in_fp32():
    # CUDA: conv1 saves its bf16 input, group_norm (fp32 list) fp32 copies of its input and of its bf16 weight
    # and fp32 mean/rstd, SiLU its fp32 input, conv2 its bf16 input, the loss the fp32 output (square); the
    # convolutions' weights are bf16 parameters (not activations)
    cuda = cuda_saved_bytes(_block, _step, bf16=True)
    assert cuda == N * 2 + (N * 4 + C * 4 + 2 * B * G * 4) + N * 4 + N * 2 + N * 4, cuda
    assert cuda_saved_bytes(_block, _step, bf16=False) == 5 * N * 4 + 2 * B * G * 4  # fp32 run: all float32


def test_attention_is_traced_as_the_flash_kernel_saves_it():
    def build():
        return nn.Linear(64, 64)

    def step(m):
        q = m(torch.randn(2, 4, 256, 64))
        return F.scaled_dot_product_attention(q, q, q).float().sum()

    saved = cuda_saved_bytes(build, step, bf16=True)
    q_bytes = 2 * 4 * 256 * 64 * 2
    # linear's bf16 input, flash's q (= k = v) and output in bf16, its fp32 log-sum-exp and RNG state; never the
    # 256 x 256 attention matrix that the math kernel saves
    assert q_bytes * 3 <= saved < q_bytes * 3 + 2 * 4 * 256 * 4 + 64, saved


def test_decoder_plan_with_checkpointing_counts_each_tensor_once():
    from divae.unet import UNetConfig
    from trainer.config import load_train_config
    from trainer.plan import activation_bytes

    cfg = load_train_config("configs/decoder_tiny.yaml", ["deepspeed.precision=bf16"])
    small = UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(16,), num_head_channels=32, cond_channels=8, token_grid=8)
    cfg = replace(cfg, unet=small)
    act, _ = activation_bytes(cfg, False)
    act_ckpt, _ = activation_bytes(cfg, True)
    assert 0 < act_ckpt < act
    from trainer import plan

    separate = {}  # the accounting before: block inputs and saved tensors counted apart
    orig = plan.cuda_saved_bytes
    try:
        plan.cuda_saved_bytes = lambda build, step, bf16, seen: orig(build, step, bf16, separate)
        double, _ = activation_bytes(cfg, True)
    finally:
        plan.cuda_saved_bytes = orig
    assert act_ckpt < double, (act_ckpt, double)  # shared ids: a block input saved outside is counted once
