"""Sampling precision for evaluation: fp32 (the reference), bf16 (autocast) or tf32 (CUDA TF32 matmuls/convs).

    with sampling_precision("bf16", device):
        x = model.decode_tokens(tokens, sampler="ddpm", seeds=seeds)

- fp32: float32 everywhere, TF32 off (CUDA matmul and cuDNN): the exact reference, when asked for.
- bf16: `torch.autocast(device.type, torch.bfloat16)` around the decoder; the sampler's state x_t, its
  coefficients and the UNet's fp32 edges stay float32 (divae.unet), the noise is float32; on CUDA those fp32
  parts run with TF32 on (tensor cores, as in training).
- tf32: float32 tensors with TF32 tensor-core matmuls/convolutions on CUDA (no effect on a CPU).

The default (`default_precision`, what recon_fid and t2i_fid use without --precision) is bf16 on CUDA and
fp32 on a CPU. On an A100 fp32 without TF32 peaks at 19.5 TFLOP/s against 312 in bf16: the planner's cost of
the 50k-image DDPM-1000 evaluation (docs/training.md) is priced in bf16, and fp32 would cost about 16x more. On a CPU
bf16 is no faster, so fp32 stays the default there.
The previous TF32 settings are restored on exit. What bf16 moves the figures by was measured on CPU on the
demo model with the same seeds (`MEASURED_BF16_EFFECT`, bench/RESULTS.md) and is written into results.json.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "bf16", "tf32")

# bench/eval_precision.py on the `make demo` model (CPU, same seeds, same images); see bench/RESULTS.md.
MEASURED_BF16_EFFECT: dict = {
    "measured": "2026-11-29, CPU, `make demo` DiVAE (64 px, f8), 160 held-out crops, dpmpp2m 10 steps, seed 0",
    "fid_fp32": 342.2698, "fid_bf16": 342.6003, "fid_bf16_minus_fp32": 0.3306,
    "psnr_bf16_minus_fp32_db": 0.0007, "ssim_bf16_minus_fp32": 0.00006,
}


def default_precision(device: torch.device | str) -> str:
    """The evaluation precision when none is asked: "bf16" on CUDA, "fp32" elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """`precision` if given (one of PRECISIONS), else `default_precision(device)`."""
    if precision is None:
        return default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


@contextlib.contextmanager
def sampling_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the enclosed decoding in `precision` ("fp32" | "bf16" | "tf32") on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")
    try:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def measured_precision_effect() -> dict:
    """The measured bf16-vs-fp32 effect on the figures (for results.json), with where it was measured."""
    return dict(MEASURED_BF16_EFFECT)
