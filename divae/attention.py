"""One attention call for every model in `divae`.

PyTorch's `scaled_dot_product_attention` (SDPA) is the default, and the only backend "auto" picks: on CUDA
it chooses the flash or memory-efficient kernel by itself, on CPU it runs the math kernel. xformers is used
only when a config asks for it by name (`attn_backend: xformers`, CUDA only): an installed xformers never
changes which kernel runs. It is not a pip extra of this project either: xformers wheels pin one exact torch,
and `pip install divae[xformers]` would replace the user's CUDA torch (docs/training.md, "Installation").

Shapes: q (B, heads, Lq, head_dim), k and v (B, heads, Lk, head_dim) -> (B, heads, Lq, head_dim).
"""

from __future__ import annotations

import importlib.util
from typing import Literal, get_args

import torch
import torch.nn.functional as F

AttnBackend = Literal["auto", "sdpa", "xformers"]  # the config field of every model with attention
BACKENDS: tuple[str, ...] = get_args(AttnBackend)
_HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def xformers_available() -> bool:
    """True when the optional `xformers` package is importable."""
    return _HAS_XFORMERS


def resolve_backend(backend: str) -> str:
    """The backend that runs for a configured one: "auto" is SDPA whatever is installed."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    return "xformers" if backend == "xformers" else "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention softmax(q k^T / sqrt(head_dim)) v.

    attn_mask: bool (True = attend) or additive float mask broadcastable to (B, heads, Lq, Lk).
    is_causal: query i attends to keys <= i (top-left aligned, as in SDPA); not combinable with attn_mask.
    backend: "auto" or "sdpa" (SDPA), or "xformers" (only when asked for by name).
    """
    if is_causal and attn_mask is not None:
        raise ValueError("pass either is_causal=True or attn_mask, not both (fold causality into the mask)")
    if resolve_backend(backend) == "xformers":
        return _xformers_attention(q, k, v, is_causal=is_causal, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def _xformers_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    if not _HAS_XFORMERS:
        raise RuntimeError("attention backend 'xformers' requested but xformers is not installed: install an "
                           "xformers build made for your torch (see docs/training.md, Installation) or use "
                           "backend='sdpa'")
    if not q.is_cuda:
        raise RuntimeError("xformers kernels are CUDA-only; use backend='sdpa' on CPU")
    import xformers.ops as xops

    bias = None
    if is_causal:
        bias = xops.LowerTriangularMask()
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
        bias = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).to(q.dtype)
    # xformers wants (B, L, heads, head_dim)
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )
    return out.transpose(1, 2)
