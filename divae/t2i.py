"""Caption -> image in one call: tokenizer -> prior (VQ tokens) -> a token decoder (DiVAE's diffusion decoder).

    from functools import partial
    prior, tok = load_prior("prior.safetensors", device="cuda")
    divae = DiVAE.from_pretrained("divae.safetensors").to("cuda")
    images = text_to_image(prior, tok, partial(divae.decode_tokens, sampler="ddim", steps=25),
                           ["a cat sitting on a table"], guidance_scale=3.0, top_k=512, seeds=[0])

`decode_tokens(indices (B, h, w) long, seeds=list[int] | None) -> images (B, 3, H, W) in [-1, 1]` is supplied
by the caller (called with `seeds` as a keyword), so this module does not depend on the DiVAE class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from divae.prior import PriorModel
from divae.text_tokenizer import TextTokenizer

DecodeTokens = Callable[[torch.Tensor, "list[int] | None"], torch.Tensor]


@torch.no_grad()
def text_to_image(
    prior: PriorModel,
    tokenizer: TextTokenizer,
    decode_tokens: DecodeTokens,
    captions: Sequence[str],
    *,
    guidance_scale: float = 3.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seeds: Sequence[int] | None = None,
    batch_size: int | None = None,
    return_tokens: bool = False,
    negative_caption: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Generate one image per caption.

    guidance_scale: classifier-free guidance on the prior's logits (1 = conditional only, 0 = unconditional).
    negative_caption: a caption that replaces the empty caption of guidance's unconditional branch
    (logits = neg + s * (cond - neg); at s = 0 the tokens are drawn given it alone); None: the empty caption.
    temperature / top_k / top_p: token sampling (temperature <= 0 is greedy). seeds: one int per caption;
    caption i's tokens and image depend only on seeds[i] (the token decoder gets the same seed), so a batch
    can be split or reordered without changing results. batch_size: captions per prior/decoder call
    (default: all at once). Returns images (B, 3, H, W) in [-1, 1] on the prior's device, plus the tokens
    (B, h, w) when return_tokens.
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings; wrap a single caption in a list")
    captions = list(captions)
    if not captions:
        raise ValueError("no captions given")
    if negative_caption is not None and not isinstance(negative_caption, str):
        raise TypeError(f"negative_caption must be a string or None, got {type(negative_caption).__name__}")
    if seeds is not None and len(seeds) != len(captions):
        raise ValueError(f"got {len(seeds)} seeds for {len(captions)} captions; pass one seed per caption")
    if tokenizer.max_length > prior.cfg.text_len:
        raise ValueError(f"tokenizer max_length={tokenizer.max_length} exceeds the prior's text_len="
                         f"{prior.cfg.text_len}")
    device = next(prior.parameters()).device
    bs = batch_size or len(captions)
    images, tokens = [], []
    for start in range(0, len(captions), bs):
        chunk = captions[start:start + bs]
        chunk_seeds = None if seeds is None else [int(s) for s in seeds[start:start + bs]]
        ids, mask = tokenizer.encode(chunk, device=device)
        neg = {}
        if negative_caption is not None:
            neg_ids, neg_mask = tokenizer.encode([negative_caption] * len(chunk), device=device)
            neg = {"negative_ids": neg_ids, "negative_mask": neg_mask}
        z = prior.sample(ids, mask, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                         top_p=top_p, seeds=chunk_seeds, **neg)
        x = decode_tokens(z, seeds=chunk_seeds)
        if x.dim() != 4 or x.shape[0] != len(chunk):
            raise ValueError(f"decode_tokens returned shape {tuple(x.shape)}; expected ({len(chunk)}, C, H, W)")
        images.append(x)
        tokens.append(z)
    out = torch.cat(images)
    return (out, torch.cat(tokens)) if return_tokens else out
