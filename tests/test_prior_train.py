"""Prior end to end on CPU: overfit caption -> tokens pairs, checkpoint round trip with the tokenizer, t2i."""

import pytest
import torch

from divae.prior import PriorConfig, PriorModel
from divae.prior_io import load_prior, save_prior
from divae.t2i import text_to_image
from divae.text_tokenizer import TextTokenizer

CAPTIONS = ["a cat sitting on a table", "two dogs playing in the snow",
            "a red bus driving down a city street", "a bowl of fruit on a wooden counter"]


@pytest.fixture(scope="module")
def trained():
    """A tiny prior trained to memorise four caption -> 8x8 token grids (shared by the tests below)."""
    tok = TextTokenizer.train(CAPTIONS * 3, vocab_size=300, max_length=16)
    cfg = PriorConfig(text_vocab_size=300, text_len=16, image_vocab_size=128, image_h=4, image_w=6, dim=64,
                      n_heads=4, enc_layers=1, dec_layers=2, attn_backend="sdpa")  # caption_dropout 0.1
    torch.manual_seed(0)
    model = PriorModel(cfg)
    g = torch.Generator().manual_seed(1)
    z = torch.randint(0, cfg.image_vocab_size, (len(CAPTIONS), cfg.image_h, cfg.image_w), generator=g)
    ids, mask = tok.encode(CAPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(120):
        loss, metrics = model.loss(ids, mask, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final_loss, final_metrics = model.loss(ids, mask, z)  # eval mode: no caption dropout
    return model, tok, z, float(final_loss), final_metrics


def test_overfit_and_greedy_reproduces(trained):
    model, tok, z, loss, metrics = trained
    assert loss < 0.05, loss
    assert float(metrics["token_acc"]) == 1.0
    ids, mask = tok.encode(CAPTIONS)
    assert torch.equal(model.sample(ids, mask, temperature=0.0), z)
    # guided, stochastic sampling from a memorised prior also lands on the targets
    assert torch.equal(model.sample(ids, mask, guidance_scale=3.0, top_k=50, seeds=[0, 1, 2, 3]), z)


def test_checkpoint_round_trip(trained, tmp_path):
    model, tok, z, _, _ = trained
    path = tmp_path / "prior.safetensors"
    save_prior(path, model, tok)
    model2, tok2 = load_prior(path)
    assert model2.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert tok2.to_json() == tok.to_json() and tok2.max_length == 16
    ids, mask = tok2.encode(CAPTIONS)
    assert torch.equal(ids, tok.encode(CAPTIONS)[0])
    assert torch.equal(model2.sample(ids, mask, temperature=0.0), z)
    m3, _ = load_prior(path, grad_checkpointing=True)
    assert m3.cfg.grad_checkpointing
    with pytest.raises(FileNotFoundError, match="save_prior"):
        load_prior(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a prior checkpoint"):
        load_prior(tmp_path / "other.safetensors")


def test_text_to_image(trained):
    model, tok, z, _, _ = trained
    table = torch.linspace(-1, 1, model.cfg.image_vocab_size * 3).view(-1, 3)
    seen_seeds = []

    def decode_tokens(indices, seeds):  # a fixed token -> colour renderer standing in for DiVAE's decoder
        seen_seeds.append(seeds)
        img = table[indices].permute(0, 3, 1, 2)
        return torch.nn.functional.interpolate(img, scale_factor=4)

    imgs, toks = text_to_image(model, tok, decode_tokens, CAPTIONS, guidance_scale=2.0, temperature=0.0,
                               seeds=[5, 6, 7, 8], batch_size=3, return_tokens=True)
    assert imgs.shape == (4, 3, 16, 24)
    assert torch.equal(toks, z)
    assert seen_seeds == [[5, 6, 7], [8]]
    torch.testing.assert_close(imgs[2], decode_tokens(z[2:3], None)[0])
    with pytest.raises(ValueError, match="one seed per caption"):
        text_to_image(model, tok, decode_tokens, CAPTIONS, seeds=[1])
