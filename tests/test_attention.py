"""divae.attention: SDPA default equals the textbook formula; masks, causality and backend errors."""

from __future__ import annotations

import math

import pytest
import torch

from divae.attention import attention, xformers_available


def reference(q, k, v, mask=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_matches_reference_with_bool_mask_and_causal():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), reference(q, k, v))
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    torch.testing.assert_close(attention(q, k, v, attn_mask=mask), reference(q, k, v, mask))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(attention(q, k, v, is_causal=True), reference(q, k, v, causal))


def test_cross_attention_lengths_differ():
    q = torch.randn(1, 2, 7, 4)
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    assert attention(q, k, v).shape == (1, 2, 7, 4)


def test_bad_arguments_fail_clearly():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="not one of"):
        attention(q, q, q, backend="flash9")
    with pytest.raises(ValueError, match="either is_causal"):
        attention(q, q, q, is_causal=True, attn_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="xformers"):
        attention(q, q, q, backend="xformers")  # CPU tensors: CUDA-only kernels, or not installed


@pytest.mark.gpu
def test_cuda_bf16_matches_fp32_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", generator=g) for _ in range(3))
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    torch.testing.assert_close(out.float(), reference(q, k, v), atol=2e-2, rtol=2e-2)
    if xformers_available():
        out = attention(q, k, v, backend="xformers")
        torch.testing.assert_close(out, reference(q, k, v), atol=1e-3, rtol=1e-3)
