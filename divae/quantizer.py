"""Vector quantizer: nearest-code lookup with straight-through gradients (VQ-VAE / VQGAN codebook).

Options (all in `QuantizerConfig`):
- codebook loss ||sg[z_e] - z_q||^2 + beta * ||z_e - sg[z_q]||^2 (beta on the commitment term), or EMA
  codebook updates (decay, epsilon, Laplace-smoothed counts) that replace the codebook term;
- l2-normalised codes and inputs (cosine distance);
- low-dimensional lookup: project d -> codebook_dim, quantize, project back;
- k-means initialisation from the first training batch;
- dead-code restart: codes unused for `restart_after_steps` training steps are re-seeded from the current
  encoder outputs, identically on every rank;
- statistics: per-batch usage fraction and perplexity and running usage counts, summed over ranks when
  torch.distributed is initialised.

The nearest-code search runs in row chunks so that no distance matrix larger than `search_budget` elements
is built (K = 16384 codes x 32x32 positions x batch 64 would otherwise be 2^30 floats = 4 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantizerConfig:
    beta: float = 0.25  # weight of the commitment term ||z_e - sg[z_q]||^2
    use_ema: bool = False  # EMA codebook updates instead of the codebook loss term
    ema_decay: float = 0.99
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    l2_normalize: bool = False  # cosine-distance lookup on l2-normalised vectors
    codebook_dim: int | None = None  # low-dimensional lookup; None = lookup in embed_dim
    kmeans_init: bool = False  # initialise the codebook by k-means on the first training batch
    kmeans_iters: int = 10
    restart_after_steps: int = 0  # re-seed codes unused for this many training steps; 0 = off
    search_budget: int = 2**24  # max elements of one (rows x K) distance chunk


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if _dist_on():
        dist.broadcast(t, src=src)
    return t


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, budget: int = 2**24) -> torch.Tensor:
    """Index of the nearest code (squared euclidean distance) for each row.

    z: (N, c); codebook: (K, c). Returns LongTensor (N,). Works on at most `budget` distance entries at a time.

    The search always runs in float32 (float64 if either input is float64) with autocast switched off: under
    the trainer's bf16 autocast `addmm` would otherwise be recast to bf16, whose 8-bit mantissa cannot rank
    codes that differ by less than ~1% of ||c||^2. Both sides are first shifted by the codebook mean (the
    distances do not change) so that a codebook far from the origin does not lose digits to cancellation in
    ||c||^2 - 2 z.c.
    """
    n, k = z.shape[0], codebook.shape[0]
    rows = max(1, budget // max(k, 1))
    dtype = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
    out = torch.empty(n, dtype=torch.long, device=z.device)
    with torch.autocast(z.device.type, enabled=False):
        codebook = codebook.detach().to(dtype)
        center = codebook.mean(0)
        codebook = codebook - center
        z = z.detach().to(dtype) - center
        c_sq = codebook.pow(2).sum(1)  # (K,)
        for s in range(0, n, rows):
            # ||z||^2 is constant per row, so argmin(||c||^2 - 2 z.c) is the nearest code.
            d = torch.addmm(c_sq.unsqueeze(0), z[s : s + rows], codebook.t(), beta=1.0, alpha=-2.0)
            out[s : s + rows] = d.argmin(1)
    return out


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations on rows of x (N, c); returns centroids (k, c).

    With fewer rows than k, or once every row is a centroid, the remaining centroids repeat random rows.
    Empty clusters keep their centroid.
    """
    n = x.shape[0]
    cent = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(0, n, (1,), generator=generator))
    cent[0] = x[first]
    d2 = (x - cent[0]).pow(2).sum(1)
    for j in range(1, k):
        total = d2.sum()
        if total <= 0:  # every row already is a centroid
            cent[j:] = x[torch.randint(0, n, (k - j,), generator=generator).to(x.device)]
            break
        probs = (d2 / total).float()
        pick = int(torch.multinomial(probs.cpu() if generator is not None else probs, 1, generator=generator))
        cent[j] = x[pick]
        d2 = torch.minimum(d2, (x - cent[j]).pow(2).sum(1))
    for _ in range(iters):
        assign = nearest_code(x, cent)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        nonempty = counts > 0
        cent[nonempty] = sums[nonempty] / counts[nonempty, None]
    return cent


def _forget_init_seen(module: nn.Module, incompatible_keys) -> None:  # noqa: ARG001
    """load_state_dict post-hook: the loaded `initialized` buffer is read again at the next training forward."""
    module._init_seen = False


class VectorQuantizer(nn.Module):
    """Codebook of `n_embed` codes for inputs with `embed_dim` channels.

    forward(z_e (B, d, h, w)) -> (z_q (B, d, h, w), indices (B, h, w), loss (scalar), stats dict of scalars).
    z_q carries straight-through gradients to z_e. In eval mode the codebook and its statistics buffers are
    not changed.
    """

    def __init__(self, n_embed: int, embed_dim: int, cfg: QuantizerConfig | None = None):
        super().__init__()
        cfg = cfg or QuantizerConfig()
        if n_embed < 1 or embed_dim < 1:
            raise ValueError(f"n_embed and embed_dim must be positive, got {n_embed}, {embed_dim}")
        if not 0.0 < cfg.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {cfg.ema_decay}")
        self.cfg = cfg
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        cdim = cfg.codebook_dim or embed_dim
        self.codebook_dim = cdim
        if cdim != embed_dim:
            self.in_proj = nn.Linear(embed_dim, cdim)
            self.out_proj = nn.Linear(cdim, embed_dim)
        else:
            self.in_proj = self.out_proj = None

        init = torch.empty(n_embed, cdim).uniform_(-1.0 / n_embed, 1.0 / n_embed)
        if cfg.use_ema:
            # Updated by the EMA rule, not by the optimizer: a buffer keeps it out of every optimizer.
            self.register_buffer("codebook", init)
            # start as if each code had been seen once: with zero counts, Laplace smoothing would blow the
            # unused codes up to init / eps on the first update
            self.register_buffer("ema_cluster_size", torch.ones(n_embed))
            self.register_buffer("ema_embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(not cfg.kmeans_init))
        # Python mirror of `initialized`, so that a training forward reads the buffer (a host sync on CUDA) only
        # until it is seen True: once per load, never per step. A state-dict load re-arms the one read.
        self._init_seen = not cfg.kmeans_init
        self.register_load_state_dict_post_hook(_forget_init_seen)
        self.register_buffer("usage_counts", torch.zeros(n_embed, dtype=torch.long))
        self.register_buffer("steps_unused", torch.zeros(n_embed, dtype=torch.long))

    def _apply(self, fn, recurse=True):
        # Keep the EMA state in float32 when the model is cast (e.g. .bfloat16() under a bf16 engine):
        # decay 0.99 updates vanish in bf16's 8-bit mantissa.
        out = super()._apply(fn, recurse)
        for name in ("codebook", "ema_cluster_size", "ema_embed_sum"):
            b = self._buffers.get(name)
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                self._buffers[name] = b.float()
        return out

    # ---- lookup helpers -------------------------------------------------------------------------------
    def _lookup_codebook(self) -> torch.Tensor:
        cb = self.codebook
        return F.normalize(cb, dim=1) if self.cfg.l2_normalize else cb

    def _to_lookup(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(N, d) encoder vectors -> (N, codebook_dim) vectors in the lookup space."""
        if self.in_proj is not None:
            z_flat = self.in_proj(z_flat)
        return F.normalize(z_flat, dim=1) if self.cfg.l2_normalize else z_flat

    def _from_lookup(self, q: torch.Tensor) -> torch.Tensor:
        return self.out_proj(q) if self.out_proj is not None else q

    @staticmethod
    def _flatten(z: torch.Tensor) -> torch.Tensor:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])

    def _check(self, z: torch.Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"expected z of shape (B, {self.embed_dim}, h, w), got {tuple(z.shape)}")

    # ---- public API -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, d, h, w) -> code indices (B, h, w)."""
        self._check(z)
        b, _, h, w = z.shape
        zl = self._to_lookup(self._flatten(z))
        return nearest_code(zl, self._lookup_codebook(), self.cfg.search_budget).view(b, h, w)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> quantized vectors z_q (B, d, h, w)."""
        if indices.dim() != 3:
            raise ValueError(f"expected indices of shape (B, h, w), got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.n_embed):
            raise ValueError(f"indices must lie in [0, {self.n_embed}), got [{int(indices.min())}, "
                             f"{int(indices.max())}]")
        cb = self._lookup_codebook()
        if self.out_proj is not None:
            cb = cb.to(self.out_proj.weight.dtype)
        q = self._from_lookup(F.embedding(indices.long(), cb))
        return q.permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        self._check(z)
        b, _, h, w = z.shape
        ze = self._to_lookup(self._flatten(z))  # (N, c)
        if self.training and not self._init_seen:
            self._init_seen = bool(self.initialized)
            if not self._init_seen:
                self._kmeans_init(ze.detach())
        cb = self._lookup_codebook()
        idx = nearest_code(ze, cb, self.cfg.search_budget)  # float32 whatever the training precision
        zq = F.embedding(idx, cb).to(ze.dtype)  # (N, c), carries the codebook gradient

        commit = F.mse_loss(ze, zq.detach())
        if self.cfg.use_ema:
            codebook_loss = torch.zeros((), device=z.device, dtype=ze.dtype)
            loss = self.cfg.beta * commit
        else:
            codebook_loss = F.mse_loss(zq, ze.detach())
            loss = codebook_loss + self.cfg.beta * commit
        zq_st = ze + (zq - ze).detach()  # straight-through: forward is zq, gradient flows to ze

        counts = torch.bincount(idx, minlength=self.n_embed)
        counts = _all_reduce_sum(counts)  # global counts: identical on every rank from here on
        stats = self._stats(counts, commit, codebook_loss)
        if self.training:
            self._update(ze.detach(), idx, counts)

        out = self._from_lookup(zq_st).view(b, h, w, self.embed_dim).permute(0, 3, 1, 2).contiguous()
        return out, idx.view(b, h, w), loss, stats

    # ---- statistics and codebook maintenance ----------------------------------------------------------
    def _stats(self, counts: torch.Tensor, commit: torch.Tensor, codebook_loss: torch.Tensor) -> dict:
        counts = counts.double()
        p = counts / counts.sum().clamp_min(1.0)
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())
        return {
            "usage": (counts > 0).double().mean().float(),
            "perplexity": perplexity.float(),
            "commit_loss": commit.detach(),
            "codebook_loss": codebook_loss.detach(),
        }

    @torch.no_grad()
    def _kmeans_init(self, ze: torch.Tensor) -> None:
        """k-means on rank 0's batch (in the lookup space), broadcast so every rank starts identical."""
        cent = kmeans(ze.float(), self.n_embed, self.cfg.kmeans_iters).to(self.codebook.dtype).contiguous()
        cent = _broadcast(cent)
        self.codebook.data.copy_(cent)
        if self.cfg.use_ema:
            self.ema_embed_sum.copy_(cent)
            self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(True)
        self._init_seen = True

    @torch.no_grad()
    def _update(self, ze: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        self.usage_counts += counts
        if self.cfg.use_ema:
            sums = torch.zeros(self.n_embed, ze.shape[1], device=ze.device, dtype=torch.float32)
            sums.index_add_(0, idx, ze.float())
            sums = _all_reduce_sum(sums)
            self.ema_update(counts.float(), sums)
        if self.cfg.restart_after_steps > 0:
            self.steps_unused += 1
            self.steps_unused[counts > 0] = 0
            dead = (self.steps_unused >= self.cfg.restart_after_steps).nonzero().squeeze(1)
            if dead.numel():
                self._restart(dead, ze)

    @torch.no_grad()
    def ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """One EMA step from global per-code counts (K,) and sums of assigned vectors (K, c).

        N_k <- decay N_k + (1 - decay) n_k ; m_k <- decay m_k + (1 - decay) s_k ;
        e_k = m_k / N~_k with Laplace-smoothed N~_k = (N_k + eps) / (sum N + K eps) * sum N.
        """
        d, eps, k = self.cfg.ema_decay, self.cfg.ema_eps, self.n_embed
        self.ema_cluster_size.mul_(d).add_(counts.to(self.ema_cluster_size.dtype), alpha=1 - d)
        self.ema_embed_sum.mul_(d).add_(sums.to(self.ema_embed_sum.dtype), alpha=1 - d)
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + eps) / (n + k * eps) * n
        self.codebook.data.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor, ze: torch.Tensor) -> None:
        """Re-seed dead codes with random current encoder outputs chosen on rank 0 and broadcast."""
        pick = torch.randint(0, ze.shape[0], (dead.numel(),), device=ze.device)
        new = ze[pick].to(self.codebook.dtype).contiguous()
        new = _broadcast(new)
        self.codebook.data[dead] = new
        if self.cfg.use_ema:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new
        self.steps_unused[dead] = 0

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"n_embed={self.n_embed}, embed_dim={self.embed_dim}, codebook_dim={self.codebook_dim}, "
                f"beta={c.beta}, ema={c.use_ema}, l2={c.l2_normalize}")

