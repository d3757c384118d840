"""Prior: causality, text masking, KV cache vs full recompute, guidance, seeds, filtering, checkpointing."""

import pytest
import torch

from divae.prior import PRIOR_PRESETS, PriorConfig, PriorModel
from divae.prior_sampling import filter_logits

CFG = PriorConfig(text_vocab_size=64, text_len=12, image_vocab_size=48, image_h=4, image_w=5,
                  dim=32, n_heads=4, enc_layers=1, dec_layers=2, attn_backend="sdpa")


def make_model(seed: int = 0, **kw) -> PriorModel:
    torch.manual_seed(seed)
    m = PriorModel(PriorConfig(**{**CFG.__dict__, **kw}))
    with torch.no_grad():  # sharper distributions than the 0.02 init, so sampling choices are not near-ties
        m.head.weight.mul_(40)
    return m.eval()


def captions(b: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CFG.text_vocab_size, (b, CFG.text_len), generator=g)
    lengths = torch.randint(3, CFG.text_len + 1, (b,), generator=g)
    mask = torch.arange(CFG.text_len)[None] < lengths[:, None]
    ids[:, 0] = 1
    ids[torch.arange(b), lengths - 1] = 2
    ids[~mask] = 0
    return ids, mask


def tokens(b: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.image_vocab_size, (b, CFG.image_h, CFG.image_w), generator=g)


def test_preset_sizes():
    counts = {}
    for name, cfg in PRIOR_PRESETS.items():
        with torch.device("meta"):
            counts[name] = PriorModel(cfg).num_params()
    assert counts["tiny"] < 3e6
    assert 2.8e8 < counts["base"] < 3.3e8
    assert 0.95e9 < counts["large"] < 1.1e9


def test_causality():
    m = make_model()
    ids, mask = captions(2)
    z = tokens(2).flatten(1)
    base = m(ids, mask, z)
    assert base.shape == (2, CFG.num_image_tokens, CFG.image_vocab_size)
    for j in (0, 7, CFG.num_image_tokens - 1):
        z2 = z.clone()
        z2[:, j] = (z2[:, j] + 1) % CFG.image_vocab_size
        out = m(ids, mask, z2)
        # row i predicts token i from tokens < i: rows 0..j must not see token j
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-6)
        if j + 1 < CFG.num_image_tokens:
            assert (out[:, j + 1:] - base[:, j + 1:]).abs().max() > 1e-4


def test_padding_text_is_ignored_and_text_matters():
    m = make_model()
    ids, mask = captions(3)
    z = tokens(3)
    base = m(ids, mask, z)
    ids2 = ids.clone()
    ids2[~mask] = 17  # change only padded positions
    torch.testing.assert_close(m(ids2, mask, z), base, rtol=0, atol=1e-6)
    ids3 = ids.clone()
    ids3[:, 1] = (ids3[:, 1] + 5) % CFG.text_vocab_size  # change a real token
    assert (m(ids3, mask, z) - base).abs().max() > 1e-4


@pytest.mark.parametrize("guidance", [1.0, 0.0, 2.5])
def test_kv_cache_matches_full_recompute(guidance):
    m = make_model()
    ids, mask = captions(3)
    kw = dict(guidance_scale=guidance, temperature=1.0, top_k=20, top_p=0.95, seeds=[3, 4, 5])
    cached = m.sample(ids, mask, **kw)
    full = m.sample(ids, mask, use_cache=False, **kw)
    assert cached.shape == (3, CFG.image_h, CFG.image_w)
    assert torch.equal(cached, full)
    greedy = dict(guidance_scale=guidance, temperature=0.0)
    assert torch.equal(m.sample(ids, mask, **greedy), m.sample(ids, mask, use_cache=False, **greedy))


def test_cached_logits_match_teacher_forcing():
    m = make_model()
    ids, mask = captions(2)
    z = m.sample(ids, mask, temperature=0.0).flatten(1)
    logits = m(ids, mask, z)
    # greedy sampling with the cache must pick the argmax of the teacher-forced logits at every position
    assert torch.equal(logits.argmax(-1), z)


def test_guidance_scale_one_and_zero():
    m = make_model()
    ids, mask = captions(3)
    null_ids, null_mask = m.null_text(3)
    z_c = m.sample(ids, mask, guidance_scale=1.0, temperature=0.0).flatten(1)
    z_u = m.sample(ids, mask, guidance_scale=0.0, temperature=0.0).flatten(1)
    # s=1 is the conditional model, s=0 the model given the empty caption (checked by teacher forcing)
    assert torch.equal(m(ids, mask, z_c).argmax(-1), z_c)
    assert torch.equal(m(null_ids, null_mask, z_u).argmax(-1), z_u)
    assert not torch.equal(z_c, z_u)
    # the guided two-branch path at s ~ 1 and s ~ 0 agrees with the plain paths
    for s, ref in ((1.0 + 1e-6, z_c), (1e-6, z_u)):
        assert torch.equal(m.sample(ids, mask, guidance_scale=s, temperature=0.0).flatten(1), ref)
    seeded = dict(temperature=1.0, seeds=[7, 8, 9])
    assert torch.equal(m.sample(ids, mask, guidance_scale=1.0 + 1e-6, **seeded),
                       m.sample(ids, mask, guidance_scale=1.0, **seeded))
    assert torch.equal(m.sample(ids, mask, guidance_scale=1e-6, **seeded),
                       m.sample(null_ids, null_mask, guidance_scale=1.0, **seeded))


def test_guided_logits_formula():
    m = make_model()
    ids, mask = captions(2)
    s = 3.0
    z = m.sample(ids, mask, guidance_scale=s, temperature=0.0).flatten(1)
    null_ids, null_mask = m.null_text(2)
    cond, uncond = m(ids, mask, z), m(null_ids, null_mask, z)
    assert torch.equal((uncond + s * (cond - uncond)).argmax(-1), z)



def test_negative_caption_takes_the_empty_captions_place():
    m = make_model()
    ids, mask = captions(2)
    neg_ids, neg_mask = captions(2, seed=5)
    s = 3.0
    z = m.sample(ids, mask, guidance_scale=s, temperature=0.0, negative_ids=neg_ids, negative_mask=neg_mask)
    cond, neg = m(ids, mask, z), m(neg_ids, neg_mask, z)
    assert torch.equal((neg + s * (cond - neg)).argmax(-1), z.flatten(1))
    assert not torch.equal(z, m.sample(ids, mask, guidance_scale=s, temperature=0.0))
    seeded = dict(temperature=1.0, seeds=[4, 6])
    assert torch.equal(m.sample(ids, mask, guidance_scale=0.0, negative_ids=neg_ids, negative_mask=neg_mask, **seeded),
                       m.sample(neg_ids, neg_mask, guidance_scale=1.0, **seeded))
    null_ids, null_mask = m.null_text(2)  # the empty caption as the negative: the default path's tokens
    assert torch.equal(m.sample(ids, mask, guidance_scale=s, negative_ids=null_ids[:, :CFG.text_len],
                                negative_mask=null_mask[:, :CFG.text_len], **seeded),
                       m.sample(ids, mask, guidance_scale=s, **seeded))
    with pytest.raises(ValueError, match="shaped as text_ids"):
        m.sample(ids, mask, guidance_scale=s, negative_ids=neg_ids[:1], negative_mask=neg_mask[:1])
    with pytest.raises(ValueError, match="must both be given"):
        m.sample(ids, mask, guidance_scale=s, negative_ids=neg_ids)

def test_per_sample_seeds():
    m = make_model()
    ids, mask = captions(3)
    kw = dict(guidance_scale=2.0, temperature=1.0, top_p=0.9)
    batch = m.sample(ids, mask, seeds=[10, 11, 12], **kw)
    single = m.sample(ids[1:2], mask[1:2], seeds=[11], **kw)
    assert torch.equal(batch[1:2], single)  # a caption's tokens do not depend on its batch mates
    assert torch.equal(batch, m.sample(ids, mask, seeds=[10, 11, 12], **kw))
    assert not torch.equal(batch, m.sample(ids, mask, seeds=[20, 21, 22], **kw))
    with pytest.raises(ValueError, match="one seed per caption"):
        m.sample(ids, mask, seeds=[1, 2])


def test_filter_logits_and_top_k_one_is_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, None, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 >= 0.7
    assert torch.isfinite(filter_logits(logits, None, 0.4)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, 3, None)).tolist() == [[True, True, True, False]]
    m = make_model()
    ids, mask = captions(2)
    assert torch.equal(m.sample(ids, mask, top_k=1, seeds=[1, 2]), m.sample(ids, mask, temperature=0.0))


def test_partial_sampling_and_bad_inputs():
    m = make_model()
    ids, mask = captions(2)
    part = m.sample(ids, mask, temperature=0.0, num_tokens=6)
    assert torch.equal(part, m.sample(ids, mask, temperature=0.0).flatten(1)[:, :6])
    with pytest.raises(ValueError, match="grid"):
        m(ids, mask, torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook"):
        m(ids, mask, torch.full((2, 4, 5), CFG.image_vocab_size))
    with pytest.raises(ValueError, match="text_len"):
        m(torch.ones(2, CFG.text_len + 1, dtype=torch.long), torch.ones(2, CFG.text_len + 1, dtype=torch.bool),
          tokens(2))
    with pytest.raises(ValueError, match="empty caption"):
        m(ids, torch.zeros_like(mask), tokens(2))
    with pytest.raises(ValueError, match="top_p"):
        m.sample(ids, mask, top_p=0.0)


def test_loss_caption_dropout_and_checkpointing_grads():
    ids, mask = captions(4)
    z = tokens(4)
    m = make_model().train()
    loss, metrics = m.loss(ids, mask, z)
    assert set(metrics) >= {"loss", "token_acc", "caption_dropped"}
    assert 0.0 <= float(metrics["token_acc"]) <= 1.0
    # caption dropout: with p close to 1 every caption becomes the empty one
    md = make_model(caption_dropout=0.999).train()
    torch.manual_seed(0)
    loss_d, met_d = md.loss(ids, mask, z)
    null_ids, null_mask = md.null_text(4)
    assert float(met_d["caption_dropped"]) == 1.0
    torch.testing.assert_close(loss_d, torch.nn.functional.cross_entropy(
        md(null_ids, null_mask, z).flatten(0, 1).float(), z.flatten()))
    # activation checkpointing gives the same gradients
    grads = []
    for ckpt in (False, True):
        mm = make_model(caption_dropout=0.0, grad_checkpointing=ckpt).train()
        mm.zero_grad()
        mm.loss(ids, mask, z)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in mm.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
