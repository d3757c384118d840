"""Shards damaged after preparation (issue 17, item 14): real MDS and webdataset shards on disk, one byte flipped
or a shard cut short. Sizes are checked whenever a folder is opened, sha256 on request and in
`python -m data_pipeline.verify`; every read or decode error names the shard and the sample's key; a bad
sample ends the run by default or, with bad_samples="skip", is dropped, logged and counted."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import write_shards  # tests/ is on sys.path under pytest

from data_pipeline.integrity import ShardError
from data_pipeline.loaders import DataConfig, build_loader
from data_pipeline.reader import ShardReader

ROOT = Path(__file__).resolve().parents[1]
N, VICTIM = 32, 13  # samples in the folder (shards of 8), the one whose JPEG gets a flipped byte


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hostile_data")
    return {fmt: write_shards(str(root / fmt), fmt, n=N, shard_size=8) for fmt in ("mds", "wds")}


def flipped(src: str, dst: Path, index: int = VICTIM) -> tuple[str, str]:
    """Copy the folder and flip one byte (the JPEG SOI marker's second byte) of sample `index`'s image in
    its shard. Returns (the shard's path, the sample's key)."""
    shutil.copytree(src, dst)
    sample = ShardReader(str(dst), decode_image=False)[index]
    shard = dst / f"shard.{index // 8:05d}.{'mds' if src.endswith('mds') else 'tar'}"
    data = bytearray(shard.read_bytes())
    at = data.find(sample["jpg"])
    assert at > 0 and data[at:at + 2] == b"\xff\xd8"
    data[at + 1] ^= 0x01
    shard.write_bytes(bytes(data))
    return str(shard), sample["key"]


def truncated(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    shard = sorted(p for p in dst.iterdir() if p.name.startswith("shard."))[1]
    os.truncate(shard, shard.stat().st_size // 2)
    return str(shard)


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline.verify", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def cfg(path, fmt: str, **kw) -> DataConfig:
    return DataConfig(path=str(path), format=fmt, batch_size=4, image_size=32, shuffle=False, clean_stale_shm=False,
                      **kw)


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_flipped_byte_names_shard_and_key(clean, tmp_path, fmt):
    shard, key = flipped(clean[fmt], tmp_path / "d")
    workers = 1 if fmt == "mds" else 0  # the message crosses from a DataLoader worker (one: its exit costs 5 s)
    with pytest.raises(ShardError) as e:  # default bad_samples="error"
        for _ in build_loader(cfg(tmp_path / "d", fmt, num_workers=workers)):
            pass
    msg = str(e.value)
    assert shard in msg and repr(key) in msg and "\n" not in msg, msg
    with pytest.raises(ShardError, match=rf"{shard}: sample {VICTIM} \(key '{key}'\)"):  # evaluation's reader
        ShardReader(str(tmp_path / "d"))[VICTIM]
    with pytest.raises(ShardError, match=rf"{shard}: sha256"):  # data.verify=true: found when the loader opens
        build_loader(cfg(tmp_path / "d", fmt, verify=True))

    r = verify(str(tmp_path / "d"))
    assert r.returncode == 1 and r.stdout.startswith(f"{shard}: sha256"), (r.stdout, r.stderr)
    r = verify(str(tmp_path / "d"), "--decode")  # names the bad sample too
    assert r.returncode == 1 and f"{shard}: sample {VICTIM} (key '{key}') cannot be read" in r.stdout, r.stdout
    r = verify(clean[fmt])
    assert r.returncode == 0 and f"{N} samples intact" in r.stdout, (r.stdout, r.stderr)


def test_skip_drops_logs_and_counts_the_bad_sample_and_keeps_the_resume_position(clean, tmp_path, caplog):
    shard, key = flipped(clean["mds"], tmp_path / "d")
    loader = build_loader(cfg(tmp_path / "d", "mds", num_workers=0, bad_samples="skip"))
    keys, states = [], []
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loaders"):
        for b in loader:
            keys += b["key"]
            assert b["image"].shape[0] == len(b["key"])
            states.append(loader.state_dict()["streaming"]["sample_in_epoch"])
    assert len(keys) == N - 1 and key not in keys and loader.skipped == 1
    assert states == [4 * (i + 1) for i in range(N // 4)]  # the skipped sample still counts: exact resume
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warned) == 1 and shard in warned[0] and repr(key) in warned[0]
    with pytest.raises(ValueError, match="bad_samples"):
        DataConfig(bad_samples="ignore")


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_truncated_shard_is_refused_when_opened(clean, tmp_path, fmt):
    shard = truncated(clean[fmt], tmp_path / "t")
    size = os.path.getsize(shard)
    pattern = rf"{shard}: {size} bytes, the manifest says {2 * size}\d? \(truncated\)"
    with pytest.raises(ShardError, match=pattern):
        build_loader(cfg(tmp_path / "t", fmt))  # sizes are checked even without data.verify
    with pytest.raises(ShardError, match=pattern):
        ShardReader(str(tmp_path / "t"))
    r = verify(str(tmp_path / "t"), "--quick")
    assert r.returncode == 1 and r.stdout.startswith(f"{shard}: {size} bytes"), (r.stdout, r.stderr)
    r = verify(str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such folder" in r.stderr, r.stderr
