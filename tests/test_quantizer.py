"""Codebook quantizer: gradients, EMA, restarts, statistics, chunked search, and the cross-rank behaviour."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from divae.quantizer import QuantizerConfig, VectorQuantizer, kmeans, nearest_code


def _z(b=2, d=8, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, h, w, generator=g)


def _set_codes(vq: VectorQuantizer, codes: torch.Tensor) -> None:
    with torch.no_grad():
        vq.codebook.copy_(codes)
        if vq.cfg.use_ema:
            vq.ema_embed_sum.copy_(codes)
            vq.ema_cluster_size.fill_(1.0)


def _grid(vectors: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (1, d, 1, N) so that position n holds vector n."""
    return vectors.t().unsqueeze(0).unsqueeze(2).contiguous()


def test_straight_through_gradient_equals_grad_wrt_zq():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8)
    z = _z().requires_grad_(True)
    zq, _, _, _ = vq(z)
    w = torch.randn_like(zq)
    f = (zq.pow(2) * w).sum()  # non-linear in zq, so the check is not trivial
    (g_zq,) = torch.autograd.grad(f, zq, retain_graph=True)
    (g_z,) = torch.autograd.grad(f, z)
    assert torch.allclose(g_z, g_zq)
    assert torch.allclose(g_zq, 2 * zq.detach() * w)


def test_codebook_term_moves_codebook_commitment_moves_encoder():
    torch.manual_seed(0)
    beta = 0.25
    vq = VectorQuantizer(16, 8, QuantizerConfig(beta=beta))
    z = _z().requires_grad_(True)
    _, idx, loss, _ = vq(z)
    loss.backward()
    n = z.numel()
    ze = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    zq = vq.codebook.detach()[idx.reshape(-1)]
    # encoder gets only beta * d/dz_e ||z_e - sg[z_q]||^2
    expect_z = (beta * 2 * (ze - zq) / n).view(2, 4, 4, 8).permute(0, 3, 1, 2)
    assert torch.allclose(z.grad, expect_z, atol=1e-7)
    # codebook gets only d/dz_q ||sg[z_e] - z_q||^2 (weight 1), summed per code
    expect_c = torch.zeros_like(vq.codebook).index_add_(0, idx.reshape(-1), 2 * (zq - ze) / n)
    assert torch.allclose(vq.codebook.grad, expect_c, atol=1e-7)
    assert vq.codebook.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_ema_update_matches_formula():
    decay, eps = 0.9, 1e-5
    vq = VectorQuantizer(3, 2, QuantizerConfig(use_ema=True, ema_decay=decay, ema_eps=eps))
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    _set_codes(vq, codes)
    # three vectors near code 0, one near code 1, none near code 2
    x = torch.tensor([[0.1, 0.0], [-0.1, 0.2], [0.0, 0.1], [1.2, -0.2]])
    vq.train()
    _, idx, loss, stats = vq(_grid(x))
    assert idx.reshape(-1).tolist() == [0, 0, 0, 1]
    n_k = torch.tensor([3.0, 1.0, 0.0])
    s_k = torch.stack([x[:3].sum(0), x[3], torch.zeros(2)])
    size = decay * torch.ones(3) + (1 - decay) * n_k
    emb_sum = decay * codes + (1 - decay) * s_k
    smoothed = (size + eps) / (size.sum() + 3 * eps) * size.sum()
    assert torch.allclose(vq.ema_cluster_size, size)
    assert torch.allclose(vq.codebook, emb_sum / smoothed[:, None], atol=1e-6)
    # the EMA codebook is not a parameter; the loss is only the commitment term
    assert "codebook" not in dict(vq.named_parameters())
    ze, zq = x, codes[[0, 0, 0, 1]]
    assert torch.allclose(loss, 0.25 * ((ze - zq) ** 2).mean())
    assert float(stats["codebook_loss"]) == 0.0


def test_eval_mode_leaves_codebook_alone():
    vq = VectorQuantizer(3, 2, QuantizerConfig(use_ema=True, restart_after_steps=1))
    before = vq.codebook.clone()
    vq.eval()
    vq(_z(d=2))
    assert torch.equal(vq.codebook, before) and float(vq.usage_counts.sum()) == 0


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    k = 8
    vq = VectorQuantizer(k, 2, QuantizerConfig(restart_after_steps=2))
    codes = torch.zeros(k, 2)
    codes[1:] = 100.0 + torch.arange(7.0)[:, None]  # far away: never chosen
    _set_codes(vq, codes)
    x = torch.randn(16, 2) * 0.5
    vq.train()
    vq(_grid(x))
    assert torch.equal(vq.codebook.data[1:], codes[1:])  # unused for 1 step: not yet dead
    assert vq.steps_unused.tolist() == [0] + [1] * 7
    vq(_grid(x))
    revived = vq.codebook.data[1:]
    # every dead code is now one of the recent encoder outputs, and the next batch uses more than one code
    assert all(((x - r).abs().sum(1) < 1e-6).any() for r in revived)
    assert vq.steps_unused.tolist() == [0] * k
    _, idx, _, stats = vq(_grid(x))
    assert idx.unique().numel() > 1 and float(stats["usage"]) > 1 / k


def test_usage_and_perplexity_on_constructed_batches():
    k = 4
    vq = VectorQuantizer(k, 3)
    codes = torch.eye(4, 3) * 3 + torch.tensor([[0.0, 0.0, 0.0]] * 3 + [[-3.0, -3.0, -3.0]])
    _set_codes(vq, codes)
    vq.train()
    _, _, _, s = vq(_grid(codes))  # every code once
    assert float(s["usage"]) == 1.0 and float(s["perplexity"]) == pytest.approx(k, rel=1e-5)
    _, _, _, s = vq(_grid(codes[[0, 0, 0, 0]]))  # one code
    assert float(s["usage"]) == 0.25 and float(s["perplexity"]) == pytest.approx(1.0)
    _, _, _, s = vq(_grid(codes[[0, 0, 0, 1]]))  # 3:1
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(s["usage"]) == 0.5 and float(s["perplexity"]) == pytest.approx(math.exp(h), rel=1e-5)
    assert vq.usage_counts.tolist() == [1 + 4 + 3, 1 + 1, 1, 1]


def test_chunked_search_equals_dense():
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(1000, 16, generator=g), torch.randn(513, 16, generator=g)
    dense = torch.cdist(z, cb).argmin(1)
    for budget in (1, 513 * 7, 10**9):
        assert torch.equal(nearest_code(z, cb, budget), dense)
    vq = VectorQuantizer(513, 16, QuantizerConfig(search_budget=513 * 3))
    _set_codes(vq, cb)
    assert torch.equal(vq.encode(_grid(z)).reshape(-1), dense)


def test_encode_embed_match_forward_and_low_dim_l2_options():
    torch.manual_seed(0)
    for cfg in (QuantizerConfig(), QuantizerConfig(l2_normalize=True), QuantizerConfig(codebook_dim=4),
                QuantizerConfig(codebook_dim=4, l2_normalize=True, use_ema=True)):
        vq = VectorQuantizer(32, 8, cfg).eval()
        z = _z()
        zq, idx, _, _ = vq(z)
        assert zq.shape == z.shape and idx.shape == (2, 4, 4)
        assert torch.equal(vq.encode(z), idx)
        assert torch.allclose(vq.embed(idx), zq, atol=1e-6)
        if cfg.l2_normalize and cfg.codebook_dim is None:
            assert torch.allclose(zq.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    vq = VectorQuantizer(32, 8, QuantizerConfig(codebook_dim=4))
    assert vq.codebook.shape == (32, 4)


def test_kmeans_init_finds_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    x = (centers.repeat(50, 1) + 0.1 * torch.randn(200, 2, generator=g))
    torch.manual_seed(1)
    assert torch.cdist(centers, kmeans(x, 4, 10)).min(1).values.max() < 0.5
    vq = VectorQuantizer(4, 2, QuantizerConfig(kmeans_init=True, kmeans_iters=10)).train()
    vq(_grid(x))
    assert bool(vq.initialized)
    # each true centre has a code close to it; a k-means result, not the uniform(-1/K, 1/K) init
    assert torch.cdist(centers, vq.codebook.data).min(1).values.max() < 0.5


def test_bad_inputs_raise():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match="expected z"):
        vq(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="indices must lie"):
        vq.embed(torch.full((1, 2, 2), 8))


# ---- two real processes in a gloo group --------------------------------------------------------------

def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different RNG on each rank: agreement must come from communication
        k = 8
        res = {}
        for ema in (False, True):
            vq = VectorQuantizer(k, 2, QuantizerConfig(use_ema=ema, restart_after_steps=1)).train()
            codes = torch.zeros(k, 2)
            codes[:, 0] = torch.arange(k) * 10.0
            _set_codes(vq, codes)
            # rank 0's vectors sit on code 0, rank 1's on code 1: each rank alone would see usage 1/8
            x = codes[rank].repeat(6, 1) + 0.01 * torch.randn(6, 2)
            _, _, _, stats = vq(_grid(x))
            res[ema] = (float(stats["usage"]), float(stats["perplexity"]), vq.codebook.detach().clone(),
                        vq.usage_counts.clone())
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_usage_allreduce_and_identical_restart():
    with tempfile.TemporaryDirectory() as d:
        # spawn, not fork: a forked child would inherit whatever the parent holds (a pytest-xdist worker's threads,
        # a process group left by an earlier test in the same process) instead of starting clean
        mp.start_processes(_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True, start_method="spawn")
        r0 = torch.load(os.path.join(d, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(d, "rank1.pt"), weights_only=True)
    for ema in (False, True):
        (u0, p0, c0, n0), (u1, p1, c1, n1) = r0[ema], r1[ema]
        assert u0 == u1 == pytest.approx(2 / 8)  # codes 0 and 1 used, counted over both ranks
        assert p0 == p1 == pytest.approx(2.0, rel=1e-5)
        assert n0.tolist() == n1.tolist() == [6, 6, 0, 0, 0, 0, 0, 0]
        assert torch.equal(c0, c1)  # restarted (and EMA-updated) codebooks identical on both ranks
        assert (c0[2:, 0] < 5).all()  # codes 2..7 (at x = 20..70) were dead and re-seeded near the data


def test_bf16_cast_keeps_ema_state_fp32_and_counts_exact():
    vq = VectorQuantizer(16, 8, QuantizerConfig(use_ema=True)).bfloat16().train()
    assert vq.codebook.dtype == vq.ema_cluster_size.dtype == vq.ema_embed_sum.dtype == torch.float32
    zq, idx, loss, _ = vq(_z().bfloat16())
    assert zq.dtype == torch.bfloat16 and loss.dtype == torch.bfloat16
    assert vq.usage_counts.dtype == torch.long and int(vq.usage_counts.sum()) == idx.numel()
    vq2 = VectorQuantizer(16, 8).bfloat16()
    assert vq2.codebook.dtype == torch.bfloat16  # a trained (non-EMA) codebook follows the model's dtype
    assert vq2(_z().bfloat16())[0].dtype == torch.bfloat16
