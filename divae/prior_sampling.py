"""Drawing the prior's next image token: top-k / top-p filtering, temperature, and per-caption generators.

`divae.prior.PriorModel.sample` calls these at every step. One uniform draw per caption from the caption's own
generator (`seeds`), so a caption's tokens do not depend on the rest of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def make_generators(seeds: Sequence[int] | None, batch: int, device: torch.device) -> list[torch.Generator] | None:
    if seeds is None:
        return None
    seeds = list(seeds)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} captions; pass one seed per caption")
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability >= top_p.
    logits (B, K) float; the most likely token always survives."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, int(top_k), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        remove_sorted = before >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                 gens: list[torch.Generator] | None, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, K) float32 -> token ids (B,), by inverse-CDF sampling with one uniform draw per row."""
    if temperature <= 0:
        return filter_logits(logits, top_k, top_p).argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    b = logits.shape[0]
    if gens is not None:
        u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in gens])
    else:
        u = torch.rand(b, generator=generator, device=logits.device)
    cdf = probs.cumsum(-1)
    # 1 - u lies in (0, 1], so the first index with cdf >= x always has nonzero probability.
    x = ((1.0 - u) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, x).squeeze(1).clamp_(max=logits.shape[-1] - 1)
