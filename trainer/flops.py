"""FLOPs and memory of one training sample, traced without memory, and model FLOP utilization (MFU).

    fl = TASKS[cfg.train.stage].sample_flops(cfg, vq_cfg)  # {"train": FLOPs of one sample's fwd+bwd, ...}
    tp = Throughput.for_run(cfg, task, device)  # once at start; then in every log line:
    means.update(tp.figures(images_per_s_global, world_size))

Everything is traced under `FakeTensorMode` (tensors with shapes and dtypes but no storage: the paper-scale
models cost no memory and about a second) with `torch.utils.flop_counter.FlopCounterMode`, which counts the
matmuls, convolutions and attention of the forward and of the backward (2 FLOPs per multiply-add). The count is
the *model* FLOPs of one sample, PaLM/nanoGPT style: activation checkpointing's recomputation is not counted
(the trace runs with it off), so MFU compares like with like whatever the memory settings. This module holds the
tracing and the networks' (build, step) parts; each stage's Task (trainer/tasks/) says which parts its sample
costs (`Task.sample_flops`, `Task.traced_parts`):

- decoder: UNet forward + backward on (x_t, t, z_q), plus the frozen VQ encoder's forward and codebook search
  when z_q is encoded on the fly (`decoder.tokens=encode`; forward + backward with `decoder.finetune_encoder`);
- vq: encoder, codebook search (2 N K d), decoder forward + backward, LPIPS forward + input-gradient backward
  when `vq_loss.perceptual_weight > 0`, the discriminator on the reconstruction (generator phase) and on the
  real and reconstructed image (discriminator phase), forward + backward: the cost after `vq_loss.disc_start`;
- distill: the student's chained UNet calls (one per student timestep) forward + backward, and the teacher's
  sampler (`distill.teacher_steps` UNet forwards), plus the VQ encoder when the tokens are encoded on the fly;
- prior: encoder-decoder forward + backward with teacher forcing; tokens are the image tokens of a sample.

MFU = achieved FLOP/s per GPU / the card's peak dense bf16 FLOP/s (`PEAK_BF16_FLOPS`, vendor figures without
sparsity); on CPU, or a card not in the table, only the achieved FLOP/s is reported (`DIVAE_PEAK_FLOPS`, in
FLOP/s, sets the peak by hand).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from divae.utils.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Card:
    """An accelerator: peak dense bf16 tensor FLOP/s (vendor figure, no sparsity) and memory in GiB."""

    name: str
    peak_bf16: float  # FLOP/s
    memory_gib: float
    note: str = ""


CARDS: dict[str, Card] = {
    "a100-40gb": Card("NVIDIA A100 40GB", 312e12, 40),
    "a100-80gb": Card("NVIDIA A100 80GB", 312e12, 80),
    "h100-pcie": Card("NVIDIA H100 PCIe", 756e12, 80),
    "h100-sxm": Card("NVIDIA H100 SXM", 989e12, 80),
    "h200": Card("NVIDIA H200", 989e12, 141, "vendor dense figure; a matmul sweep measured 790e12 (DESIGN.md 6c)"),
    "l40s": Card("NVIDIA L40S", 362e12, 48),
}
PEAK_BF16_FLOPS: dict[str, float] = {k: c.peak_bf16 for k, c in CARDS.items()}


def card_key(device_name: str) -> str | None:
    """The `CARDS` key of a CUDA device name (`torch.cuda.get_device_name()`), None when unknown."""
    n = device_name.lower().replace(" ", "")
    if "h200" in n:
        return "h200"
    if "h100" in n:
        return "h100-pcie" if "pcie" in n else "h100-sxm"
    if "a100" in n:
        return "a100-40gb" if "40gb" in n else "a100-80gb"
    if "l40s" in n:
        return "l40s"
    return None


def device_peak(device: torch.device) -> tuple[str, float | None]:
    """(device description, peak dense bf16 FLOP/s or None): DIVAE_PEAK_FLOPS first, then the table; None on
    CPU and on cards not in the table (the log then carries achieved FLOP/s only)."""
    if os.environ.get("DIVAE_PEAK_FLOPS"):
        return "DIVAE_PEAK_FLOPS", float(os.environ["DIVAE_PEAK_FLOPS"])
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    key = card_key(name)
    return name, (CARDS[key].peak_bf16 if key else None)


# ---- tracing -----------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """One traced forward + backward: FLOPs, and the bytes of the tensors autograd saved for backward."""

    flops: int
    saved_bytes: int


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels; the trace runs on (fake) CPU tensors, where SDPA is this op
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


@contextlib.contextmanager
def _saved_bytes(seen: dict | None = None) -> Iterator[list[int]]:
    """Sum of the bytes of every tensor autograd saves for backward (each tensor object once; `seen`: ids
    already counted elsewhere, shared, e.g. the block inputs activation checkpointing keeps)."""
    total, seen = [0], ({} if seen is None else seen)

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in seen and not isinstance(t, torch.nn.Parameter):
            seen[id(t)] = t  # held, so that ids stay unique for the whole trace
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def trace(build: Callable[[], Any], step: Callable[[Any], torch.Tensor], backward: bool = True,
          bf16: bool = False) -> Trace:
    """Build a model with `build()` and run `step(model) -> loss` (+ backward) on fake tensors: no memory.
    `bf16` runs the step under bf16 autocast (the activations the trainer keeps)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build()
        with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as fc:
            with _saved_bytes() as saved:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = step(model)
            if backward:
                loss.float().backward()
    return Trace(int(fc.get_total_flops()), int(saved[0]))


class _FlashAttention(torch.overrides.TorchFunctionMode):
    """SDPA without a mask as the flash kernel, which an A100/H100 runs for bf16 (a fake CUDA device cannot
    choose: it would take the math path, which saves the whole attention matrix)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) == 3 \
                and not kwargs.get("dropout_p"):
            q, k, v = (a.to(torch.bfloat16) for a in args)
            return torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, bool(kwargs.get("is_causal", False)), scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_bf16_autocast() -> Iterator[None]:
    """CUDA's bf16 autocast without a GPU, for fake CUDA tensors: the "cuda" autocast state is set directly
    (torch.autocast refuses without CUDA), so CUDA's own op lists apply (convolutions and matmuls in bf16;
    group_norm, layer_norm, softmax and the losses in float32), and mask-free SDPA runs the flash kernel."""
    saved = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        with _FlashAttention():
            yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", saved[0])
        torch.set_autocast_dtype("cuda", saved[1])


def cuda_saved_bytes(build: Callable[[], Any], step: Callable[[Any], torch.Tensor], bf16: bool,
                     seen: dict | None = None) -> int:
    """Bytes autograd saves for backward in `step(build())` as a CUDA device runs it, traced on fake CUDA
    tensors (no GPU, no memory): with `bf16`, the trained parameters in bf16 (DeepSpeed's module copy; frozen
    ones stay float32) under `cuda_bf16_autocast`. `seen`: see `_saved_bytes`."""
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"):
        models = build()
        if bf16:
            for m in models if isinstance(models, tuple) else (models,):
                for p in (m.parameters() if m is not None else ()):
                    if p.requires_grad:
                        p.data = p.data.to(torch.bfloat16)
        with _saved_bytes(seen) as saved, cuda_bf16_autocast() if bf16 else contextlib.nullcontext():
            step(models)
    return int(saved[0])


# ---- per-stage steps ---------------------------------------------------------------------------------------
def unet_parts(unet_cfg, batch: int, calls: int = 1):
    """(build, step) of the UNet; `calls` chained UNet calls in one step (the distillation student's unrolled
    sampler: each call's activations are kept for the one backward)."""
    from divae.unet import UNetModel

    def build():
        return UNetModel(unet_cfg).train()

    def step(m):
        s, g, c = unet_cfg.image_size, unet_cfg.token_grid, unet_cfg.in_channels
        x = torch.randn(batch, c, s, s)
        t = torch.zeros(batch, dtype=torch.long)
        cond = torch.randn(batch, unet_cfg.cond_channels, g, g) if unet_cfg.cond_position != "none" else None
        anchor = torch.randn(batch, unet_cfg.anchor_channels, s, s) if unet_cfg.anchor_channels else None
        for _ in range(calls):
            x = m(x, t, cond, anchor).float()[:, :c]
        return x.square().mean()

    return build, step


def vq_forward(vq, x: torch.Tensor) -> torch.Tensor:
    """Encoder, codebook search as the matmul it is (the quantizer's statistics use data-dependent shapes that
    fake tensors cannot trace) and decoder; z_q takes z_e's place (the straight-through gradient path)."""
    z = vq.encode_pre_quant(x)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    codebook = torch.zeros(vq.cfg.n_embed, z.shape[1])
    _ = flat.float() @ codebook.t()  # distances: 2 N K d FLOPs
    return vq.decode(z)


def vq_encode_flops(vq_cfg, image_size: int, backward: bool) -> int:
    from divae.vq import VQModel

    def step(vq):
        x = torch.randn(1, 3, image_size, image_size)
        z = vq.encode_pre_quant(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        _ = flat.float() @ torch.zeros(vq_cfg.n_embed, z.shape[1]).t()
        return z.float().square().mean()

    return trace(lambda: VQModel(vq_cfg), step, backward=backward).flops


def vq_decode_flops(vq_cfg, token_grid: int) -> int:
    """Forward FLOPs of the VQ's CNN decoder on one (token_grid x token_grid) z_q (an anchored decoder's base)."""
    from divae.vq import VQModel

    def step(vq):
        return vq.decode(torch.randn(1, vq_cfg.embed_dim, token_grid, token_grid)).float().square().mean()

    return trace(lambda: VQModel(vq_cfg), step, backward=False).flops


def vq_parts(cfg, batch: int):
    from divae.lpips import LPIPS
    from divae.vq import VQModel
    from divae.vq_loss import PatchDiscriminator

    lc, vcfg = cfg.vq_loss, cfg.vq

    def build():
        lp = LPIPS(pretrained=False) if lc.perceptual_weight > 0 else None
        disc = PatchDiscriminator(lc.disc_in_channels, lc.disc_ndf, lc.disc_n_layers, lc.disc_norm)
        return VQModel(vcfg).train(), lp, disc

    def step(models):
        vq, lp, disc = models
        x = torch.randn(batch, 3, vcfg.resolution, vcfg.resolution)
        x_hat = vq_forward(vq, x)
        loss = (x - x_hat).abs().mean()
        if lp is not None:
            loss = loss + lp(x, x_hat).mean()
        loss = loss - disc(x_hat).mean()  # generator phase: GAN term through the discriminator
        d = disc(x).mean() + disc(x_hat.detach()).mean()  # discriminator phase on real and reconstruction
        return loss + d

    return build, step


def vq_train_flops(cfg) -> int:
    build, step = vq_parts(cfg, 1)
    return trace(build, step).flops


def prior_parts(pcfg, batch: int):
    from divae.prior import PriorModel

    def build():
        return PriorModel(pcfg).train()

    def step(m):
        ids = torch.zeros(batch, pcfg.text_len, dtype=torch.long)
        mask = torch.ones(batch, pcfg.text_len, dtype=torch.bool)
        n = pcfg.image_h * pcfg.image_w
        prev = torch.zeros(batch, n, dtype=torch.long)
        m._check_text = lambda *a: None  # value checks (data-dependent: fake tensors have no values)
        enc = m.encode_text(ids, mask)
        logits = m._decode(prev, 0, None, enc, mask[:, None, None, :])
        return F.cross_entropy(logits.float().flatten(0, 1), torch.zeros(batch * n, dtype=torch.long))

    return build, step


# ---- the training log --------------------------------------------------------------------------------------
@dataclass
class Throughput:
    """Figures added to every log line: per-GPU samples/s (images, or tokens for the prior), achieved FLOP/s
    and, where the card's peak is known, MFU."""

    flops_per_sample: float  # FLOPs of one sample's forward + backward
    tokens_per_sample: float = 0.0  # prior: image tokens per sample
    peak: float | None = None  # FLOP/s of one device (dense bf16), None on CPU / unknown cards
    device_name: str = "cpu"

    @classmethod
    def for_run(cls, cfg, task, device: torch.device) -> Throughput:
        """Count the stage's FLOPs once at start (`task.sample_flops`: fake tensors, no memory, ~1 s)."""
        fl = task.sample_flops(cfg, task.vq_cfg, forward=False)
        name, peak = device_peak(device)
        log.info("%s stage: %.4g GFLOPs per %s (forward + backward); device %s, peak %s", cfg.train.stage,
                 fl["train"] / 1e9, "sample" if fl["tokens"] else "image", name,
                 f"{peak / 1e12:.0f} TFLOP/s bf16" if peak else "unknown (achieved FLOP/s only)")
        return cls(fl["train"], fl["tokens"], peak, name)

    def figures(self, samples_per_s: float, world_size: int) -> dict[str, float]:
        """From the global samples/s: per-GPU throughput, achieved TFLOP/s per GPU and MFU (when known)."""
        per_gpu = samples_per_s / max(world_size, 1)
        achieved = self.flops_per_sample * per_gpu
        unit = "samples" if self.tokens_per_sample else "images"
        out = {f"{unit}_per_s_per_gpu": per_gpu, "flops_per_sample": self.flops_per_sample,
               "tflops_per_gpu": achieved / 1e12}
        if self.tokens_per_sample:
            out["tokens_per_s_per_gpu"] = per_gpu * self.tokens_per_sample
        if self.peak:
            out["mfu"] = achieved / self.peak
        return out
