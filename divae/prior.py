"""Autoregressive text-to-image-token prior p(z|y) = prod_i p(z_i | z_<i, y) (DiVAE paper, section 3.2).

An encoder-decoder transformer: a bidirectional text encoder over BPE caption tokens and a causal decoder
over the flattened h x w grid of VQ indices (raster order) that cross-attends to the encoded text.
Pre-LayerNorm blocks, attention through `divae.attention.attention` (SDPA; xformers on CUDA when installed).

Decoder input at position i is embed(BOS if i == 0 else z_{i-1}) + row_emb(r_i) + col_emb(c_i), where
(r_i, c_i) is the grid cell of the token being predicted, z_i. Caption dropout during training replaces a
caption by the empty caption ([BOS][EOS], what the tokenizer gives for "") so that classifier-free guidance
works at sampling: logits = uncond + s * (cond - uncond).

Sampling (`PriorModel.sample`) caches decoder self-attention keys/values and the cross-attention keys/values
of the text, so each step costs one token's forward; `use_cache=False` recomputes the whole prefix each step
(same tokens, used to test the cache); the draw of each token is `divae.prior_sampling`. Checkpoints with the
tokenizer inside: `divae.prior_io.save_prior` / `load_prior`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from divae.attention import AttnBackend, attention
from divae.prior_sampling import make_generators, sample_next

if TYPE_CHECKING:
    pass


@dataclass
class PriorConfig:
    """Sizes of the prior. `image_vocab_size` is the VQ codebook size K; the grid is image_h x image_w."""

    text_vocab_size: int = 16384
    text_len: int = 64  # max caption tokens, including [BOS] and [EOS]
    text_pad_id: int = 0  # ids of the special tokens; `TextTokenizer` puts them at 0, 1, 2
    text_bos_id: int = 1
    text_eos_id: int = 2
    image_vocab_size: int = 16384
    image_h: int = 16
    image_w: int = 16
    dim: int = 1024
    n_heads: int = 16
    enc_layers: int = 4
    dec_layers: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    caption_dropout: float = 0.1  # probability a training caption becomes the empty caption (for CFG)
    grad_checkpointing: bool = False  # activation checkpointing of every block while training
    attn_backend: AttnBackend = "auto"

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"PriorConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"PriorConfig: caption_dropout={self.caption_dropout} must be in [0, 1)")
        specials = (self.text_pad_id, self.text_bos_id, self.text_eos_id)
        if max(specials) >= self.text_vocab_size or len(set(specials)) != 3:
            raise ValueError(f"PriorConfig: special text ids {specials} must be distinct and < text_vocab_size")
        if self.text_len < 2:
            raise ValueError("PriorConfig: text_len must be >= 2 (room for [BOS] and [EOS])")

    @property
    def num_image_tokens(self) -> int:
        return self.image_h * self.image_w


PRIOR_PRESETS: dict[str, PriorConfig] = {
    # CPU tests and demos: 8x8 grid, small vocabularies (~1.4M parameters).
    "tiny": PriorConfig(text_vocab_size=2048, image_vocab_size=1024, image_h=8, image_w=8,
                        dim=128, n_heads=4, enc_layers=2, dec_layers=2),
    # f16 tokens (16x16, K=16384), ~302M parameters.
    "base": PriorConfig(dim=1024, n_heads=16, enc_layers=4, dec_layers=12),
    # f16 tokens, ~1.0B parameters.
    "large": PriorConfig(dim=1536, n_heads=24, enc_layers=6, dec_layers=20),
}


class Attention(nn.Module):
    """Multi-head attention. Self-attention projects q, k, v from x; cross-attention takes k, v from
    `project_kv(context)` (computed once per caption when sampling)."""

    def __init__(self, dim: int, n_heads: int, backend: str) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.backend = n_heads, dim // n_heads, backend
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, dim) -> (B, heads, L, head_dim)
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, dim) -> k, v each (B, heads, L, head_dim)."""
        k, v = self.kv(x).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        q = self._split(self.q(x))
        out = attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class KVCache:
    """Decoder self-attention keys/values of one layer, (B, heads, max_len, head_dim), allocated on the first
    write with the dtype of the keys (so it follows autocast)."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, heads, L, head_dim) at positions pos..pos+L-1; return all keys/values so far."""
        if self.k is None:
            b, h, _, d = k.shape
            self.k = k.new_zeros(b, h, self.max_len, d)
            self.v = v.new_zeros(b, h, self.max_len, d)
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def _mlp(dim: int, ratio: float, dropout: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    """Pre-LN bidirectional self-attention + MLP over the caption tokens."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.attn_backend)
        self.mlp = _mlp(cfg.dim, cfg.mlp_ratio, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        k, v = self.attn.project_kv(h)
        x = x + self.drop(self.attn(h, k, v, attn_mask=key_mask))
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    """Pre-LN causal self-attention, cross-attention to the text, MLP."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.self_attn = Attention(cfg.dim, cfg.n_heads, cfg.attn_backend)
        self.cross_attn = Attention(cfg.dim, cfg.n_heads, cfg.attn_backend)
        self.mlp = _mlp(cfg.dim, cfg.mlp_ratio, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, key_mask: torch.Tensor,
                cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """x (B, L, dim): decoder inputs at positions pos..pos+L-1; ctx_k/ctx_v: text keys/values;
        key_mask (B, 1, 1, T) bool, True = real text token."""
        h = self.ln1(x)
        k, v = self.self_attn.project_kv(h)
        length = x.shape[1]
        if cache is not None:
            k, v = cache.update(k, v, pos)
        if length == 1:  # one new query sees every cached key
            a = self.self_attn(h, k, v)
        elif pos == 0:
            a = self.self_attn(h, k, v, is_causal=True)
        else:  # a chunk after a cached prefix: query i sees keys 0..pos+i
            qi = torch.arange(pos, pos + length, device=x.device)[:, None]
            mask = torch.arange(pos + length, device=x.device)[None, :] <= qi
            a = self.self_attn(h, k, v, attn_mask=mask)
        x = x + self.drop(a)
        x = x + self.drop(self.cross_attn(self.ln2(x), ctx_k, ctx_v, attn_mask=key_mask))
        return x + self.mlp(self.ln3(x))


def _guide(logits: torch.Tensor, b: int, scale: float) -> torch.Tensor:
    """Classifier-free guidance: logits (2B, K), captions then empty captions -> uncond + s * (cond - uncond),
    (B, K)."""
    cond, uncond = logits[:b], logits[b:]
    return uncond + scale * (cond - uncond)


class PriorModel(nn.Module):
    """Encoder-decoder transformer from caption tokens to VQ token logits.

    text_ids (B, T) long, text_mask (B, T) bool (True = real token), image tokens (B, h, w) or (B, h*w)
    long in [0, K). Logits are (B, h*w, K).
    """

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.text_emb = nn.Embedding(cfg.text_vocab_size, d)
        self.text_pos = nn.Parameter(torch.zeros(cfg.text_len, d))
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.enc_layers))
        self.enc_ln = nn.LayerNorm(d)
        self.image_emb = nn.Embedding(cfg.image_vocab_size + 1, d)  # last id is the image [BOS]
        self.row_emb = nn.Parameter(torch.zeros(cfg.image_h, d))
        self.col_emb = nn.Parameter(torch.zeros(cfg.image_w, d))
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.dec_layers))
        self.dec_ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.image_vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init)
        for p in (self.text_pos, self.row_emb, self.col_emb):
            nn.init.normal_(p, std=0.02)
        # GPT-2 style: scale the residual output projections by depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * (cfg.enc_layers + cfg.dec_layers)))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def bos_id(self) -> int:
        return self.cfg.image_vocab_size

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- inputs ---------------------------------------------------------------------------------------

    def null_text(self, batch: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption as the tokenizer encodes "": ([BOS][EOS] then padding), (B, text_len) each."""
        c = self.cfg
        ids = torch.full((batch, c.text_len), c.text_pad_id, dtype=torch.long, device=device)
        ids[:, 0], ids[:, 1] = c.text_bos_id, c.text_eos_id
        mask = torch.zeros(batch, c.text_len, dtype=torch.bool, device=device)
        mask[:, :2] = True
        return ids, mask

    def _check_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> None:
        c = self.cfg
        if text_ids.dim() != 2 or text_ids.shape != text_mask.shape:
            raise ValueError(f"text_ids {tuple(text_ids.shape)} and text_mask {tuple(text_mask.shape)} must both "
                             "be (B, T)")
        if text_ids.shape[1] > c.text_len:
            raise ValueError(f"captions have {text_ids.shape[1]} tokens but the prior takes at most "
                             f"text_len={c.text_len}; encode with TextTokenizer(max_length={c.text_len})")
        if text_mask.dtype != torch.bool:
            raise ValueError("text_mask must be a bool tensor (True = real token)")
        if not bool(text_mask.any(dim=1).all()):
            raise ValueError("a caption has no tokens at all (all-False text_mask); encode the empty caption "
                             "with the tokenizer (it still has [BOS][EOS]) or use PriorModel.null_text")
        if int(text_ids.min()) < 0 or int(text_ids.max()) >= c.text_vocab_size:
            raise ValueError(f"text ids must lie in [0, {c.text_vocab_size}); got [{int(text_ids.min())}, "
                             f"{int(text_ids.max())}]: the tokenizer's vocabulary is larger than text_vocab_size")

    def _flat_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if image_tokens.dim() == 3:
            if tuple(image_tokens.shape[1:]) != (c.image_h, c.image_w):
                raise ValueError(f"image tokens are {tuple(image_tokens.shape[1:])} but the prior's grid is "
                                 f"({c.image_h}, {c.image_w})")
            image_tokens = image_tokens.flatten(1)
        if image_tokens.dim() != 2 or image_tokens.shape[1] > c.num_image_tokens:
            raise ValueError(f"image tokens must be (B, {c.image_h}, {c.image_w}) or (B, <= {c.num_image_tokens})"
                             f", got {tuple(image_tokens.shape)}")
        if image_tokens.dtype not in (torch.int16, torch.int32, torch.int64):
            raise ValueError(f"image tokens must be integer VQ indices, got {image_tokens.dtype}")
        if image_tokens.numel() and (int(image_tokens.min()) < 0 or int(image_tokens.max()) >= c.image_vocab_size):
            raise ValueError(f"image tokens must lie in [0, {c.image_vocab_size}) (the VQ codebook size "
                             f"image_vocab_size); got [{int(image_tokens.min())}, {int(image_tokens.max())}]")
        return image_tokens.long()

    # ---- network --------------------------------------------------------------------------------------

    def _ckpt(self, fn, *args):
        if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and bool mask -> encoded text (B, T, dim) (after the final LayerNorm)."""
        self._check_text(text_ids, text_mask)
        x = self.drop(self.text_emb(text_ids) + self.text_pos[: text_ids.shape[1]])
        key_mask = text_mask[:, None, None, :]
        for blk in self.encoder:
            x = self._ckpt(blk, x, key_mask)
        return self.enc_ln(x)

    def _decoder_inputs(self, prev_tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """prev_tokens (B, L) ids (BOS = K) feeding positions pos..pos+L-1 -> (B, L, dim)."""
        c = self.cfg
        idx = torch.arange(pos, pos + prev_tokens.shape[1], device=prev_tokens.device)
        pe = self.row_emb[idx // c.image_w] + self.col_emb[idx % c.image_w]
        return self.drop(self.image_emb(prev_tokens) + pe)

    def _decode(self, prev_tokens: torch.Tensor, pos: int, ctx_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
                enc: torch.Tensor | None, key_mask: torch.Tensor,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        """Decoder over positions pos..pos+L-1 -> logits (B, L, K). Text keys/values come from `ctx_kv`
        (cached) or are projected from `enc` inside each block."""
        x = self._decoder_inputs(prev_tokens, pos)
        for i, blk in enumerate(self.decoder):
            if ctx_kv is not None:
                k, v = ctx_kv[i]
                x = blk(x, k, v, key_mask, caches[i] if caches else None, pos)
            else:
                def run(x, enc, blk=blk):
                    k, v = blk.cross_attn.project_kv(enc)
                    return blk(x, k, v, key_mask, None, pos)
                x = self._ckpt(run, x, enc)
        return self.head(self.dec_ln(x))

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, N, K) where row i predicts image token i from tokens < i."""
        z = self._flat_tokens(image_tokens)
        enc = self.encode_text(text_ids, text_mask)
        bos = torch.full((z.shape[0], 1), self.bos_id, dtype=torch.long, device=z.device)
        prev = torch.cat([bos, z[:, :-1]], dim=1)
        return self._decode(prev, 0, None, enc, text_mask[:, None, None, :])

    def loss(self, text_ids: torch.Tensor, text_mask: torch.Tensor,
             image_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy on the image tokens (mean over tokens, float32), with caption dropout in train mode.

        Returns (loss, metrics); metrics holds detached scalars `loss`, `token_acc` (top-1 accuracy) and
        `caption_dropped` (fraction of captions replaced by the empty caption).
        """
        z = self._flat_tokens(image_tokens)
        if z.shape[1] != self.cfg.num_image_tokens:
            raise ValueError(f"loss needs full token grids of {self.cfg.num_image_tokens} tokens, got {z.shape[1]}")
        dropped = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        if self.training and self.cfg.caption_dropout > 0:
            dropped = torch.rand(z.shape[0], device=z.device) < self.cfg.caption_dropout
            null_ids, null_mask = self.null_text(z.shape[0], z.device)
            t = text_ids.shape[1]
            if t < 2:
                raise ValueError("captions need at least 2 token slots for caption dropout")
            text_ids = torch.where(dropped[:, None], null_ids[:, :t], text_ids)
            text_mask = torch.where(dropped[:, None], null_mask[:, :t], text_mask)
        logits = self(text_ids, text_mask, z).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), z.reshape(-1))
        with torch.no_grad():
            acc = (logits.argmax(-1) == z).float().mean()
        return loss, {"loss": loss.detach(), "token_acc": acc, "caption_dropped": dropped.float().mean()}

    # ---- sampling -------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seeds: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        num_tokens: int | None = None,
        negative_ids: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample image tokens for a batch of captions.

        guidance_scale s: logits = uncond + s * (cond - uncond); s = 1 is plain conditional sampling (no
        unconditional pass), s = 0 unconditional (the empty caption). temperature <= 0 means greedy.
        top_k / top_p filter after guidance and temperature. seeds: one int per caption, each drawing from
        its own generator so a caption's tokens do not depend on the rest of the batch; else `generator`
        (or the global RNG). use_cache=False recomputes the whole prefix every step (slow; for tests and
        benchmarks). num_tokens: stop after that many tokens (default: the whole grid).
        negative_ids / negative_mask (B, T) like text_ids / text_mask: a negative caption per caption, which
        replaces the empty caption as `uncond` (logits = neg + s * (cond - neg); s = 0 samples given it alone).
        Returns (B, h, w) long, or (B, num_tokens) when num_tokens is less than the grid.
        """
        c = self.cfg
        n = self._sample_length(num_tokens, top_k, top_p)
        b, device = text_ids.shape[0], text_ids.device
        gens = make_generators(seeds, b, device)
        negative = None if negative_ids is None and negative_mask is None else (negative_ids, negative_mask)
        mode, text_ids, text_mask = self._guidance_text(text_ids, text_mask, guidance_scale, negative)
        enc = self.encode_text(text_ids, text_mask)
        key_mask = text_mask[:, None, None, :]
        ctx_kv, caches = None, None
        if use_cache:
            ctx_kv = [blk.cross_attn.project_kv(enc) for blk in self.decoder]
            caches = [KVCache(n) for _ in self.decoder]

        out = torch.empty(b, n, dtype=torch.long, device=device)
        prev = torch.full((text_ids.shape[0], 1), self.bos_id, dtype=torch.long, device=device)
        for i in range(n):
            if use_cache:
                logits = self._decode(prev[:, -1:], i, ctx_kv, None, key_mask, caches)[:, -1]
            else:
                logits = self._decode(prev, 0, None, enc, key_mask)[:, -1]
            logits = _guide(logits.float(), b, guidance_scale) if mode == "guided" else logits.float()
            tok = sample_next(logits, temperature, top_k, top_p, gens, generator)
            out[:, i] = tok
            if mode == "guided":
                tok = torch.cat([tok, tok])
            prev = torch.cat([prev, tok[:, None]], dim=1)
        return out.view(b, c.image_h, c.image_w) if n == c.num_image_tokens else out

    def _sample_length(self, num_tokens: int | None, top_k: int | None, top_p: float | None) -> int:
        """The number of tokens `sample` draws (default: the whole h * w grid), after checking its arguments."""
        c = self.cfg
        n = c.num_image_tokens if num_tokens is None else int(num_tokens)
        if not 1 <= n <= c.num_image_tokens:
            raise ValueError(f"num_tokens={num_tokens} must be in [1, {c.num_image_tokens}]")
        if top_k is not None and not 1 <= int(top_k) <= c.image_vocab_size:
            raise ValueError(f"top_k={top_k} must be in [1, {c.image_vocab_size}] or None")
        if top_p is not None and not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1] or None")
        return n

    def _guidance_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor, guidance_scale: float,
                       negative: tuple[torch.Tensor, torch.Tensor] | None = None,
                       ) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(mode, text_ids, text_mask) the decoder attends to while sampling B captions (ids/mask (B, T)):
        "cond" (s = 1) the captions; "uncond" (s = 0) B empty captions; "guided" the captions followed by B
        empty ones, (2B, T), so that one pass gives both halves of classifier-free guidance. `negative`
        (ids, mask), each (B, T): the captions that take the empty captions' place."""
        b, device = text_ids.shape[0], text_ids.device
        if negative is not None:
            neg_ids, neg_mask = negative
            if neg_ids is None or neg_mask is None or neg_ids.shape != text_ids.shape:
                got = None if neg_ids is None else tuple(neg_ids.shape)
                raise ValueError(f"negative_ids and negative_mask must both be given, shaped as text_ids "
                                 f"{tuple(text_ids.shape)}; got {got}")
        if guidance_scale == 0.0:
            return ("uncond", *(negative or self.null_text(b, device)))
        if guidance_scale == 1.0:
            return "cond", text_ids, text_mask
        if negative is None:
            null_ids, null_mask = self.null_text(b, device)
            t = text_ids.shape[1]
            neg_ids, neg_mask = null_ids[:, :t], null_mask[:, :t]
        return "guided", torch.cat([text_ids, neg_ids]), torch.cat([text_mask, neg_mask])
