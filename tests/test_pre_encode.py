"""Conceptual Captions at scale, on a fixture shaped like img2dataset's output (webdataset tars with jpg/txt/json,
a failed download, an empty caption, a truncated JPEG, the parquet/stats files beside the tars):
prepare_cc -> trainer.pre_encode (bf16 encoder, fp32 codebook search) in one process, under torchrun with two
ranks, and SIGKILLed between a shard and its receipt then rerun: byte-identical folders -> train_tokenizer (the
caption column only) -> 3 steps of the prior stage."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from data_fixtures import encode, photos, variant
from helpers import torchrun

from trainer import faults

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_img2dataset(folder: Path, n: int = 14) -> dict[str, int]:
    """Two tars of img2dataset samples `{shard:05d}{i:04d}.{jpg,txt,json}`; returns the expected skip counts."""
    folder.mkdir()
    ps = photos()
    words = ["a photo of", "an image showing", "a close-up of"]
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tf:
            for i in range(n // 2):
                key = f"{shard:05d}{i:04d}"
                k = shard * (n // 2) + i
                caption = f"{words[k % 3]} thing {k} in the sun"
                status = "success"
                if k == 3:  # img2dataset writes failed downloads without an image
                    status = "failed_to_download"
                elif k == 5:
                    caption = "  \n "
                if status == "success":
                    jpg = encode(variant(ps[k % len(ps)], k, long_side=80))
                    _add(tf, f"{key}.jpg", jpg[: len(jpg) // 3] if k == 8 else jpg)  # k == 8: truncated
                _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps({"key": key, "caption": caption, "status": status,
                                                    "url": f"http://example.invalid/{k}.jpg"}).encode())
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n // 2}))
    return {"missing image": 1, "empty caption": 1}


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def pre_encode(src: Path, dst: Path, vq: Path, nproc: int = 1, **env: str) -> subprocess.CompletedProcess:
    args = ["-m", "trainer.pre_encode", "--vq", str(vq), "--src", str(src), "--dst", str(dst), "--batch-size", "3",
            "--workers", "1", "--precision", "bf16"]
    cmd = [sys.executable, *args] if nproc == 1 else torchrun(nproc, *args)
    # its own session: the kill hook SIGKILLs its process group (the process and its DataLoader worker)
    return subprocess.run(cmd, cwd=ROOT, env={**_env(), **env}, capture_output=True, text=True, timeout=300,
                          start_new_session=True)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_img2dataset_to_prior(tmp_path):
    from trainer_runs import common, metrics, run

    from data_pipeline import prepare_cc, train_tokenizer
    from data_pipeline.reader import ShardReader
    from data_pipeline.tokens import tokens_from_bytes
    from divae.model import DiVAE
    from trainer.config import load_train_config

    expected_skips = make_img2dataset(tmp_path / "cc")
    m = prepare_cc.main(["--source", str(tmp_path / "cc"), "--out", str(tmp_path / "cc64"), "--size", "64",
                         "--workers", "0", "--shard-size", "3", "--no-progress"])
    reasons = {}
    for s in m["skipped"]:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    assert {k: reasons.get(k) for k in expected_skips} == expected_skips and sum(reasons.values()) == 3, reasons
    assert m["num_samples"] == 11 and len(m["shards"]) >= 4

    vq = load_train_config(ROOT / "configs/vq_tiny.yaml").vq
    dec = load_train_config(ROOT / "configs/decoder_tiny.yaml")
    torch.manual_seed(0)
    DiVAE(vq, dec.unet, dec.diffusion).save_pretrained(tmp_path / "divae.safetensors")
    src, divae = tmp_path / "cc64", tmp_path / "divae.safetensors"

    one = pre_encode(src, tmp_path / "one", divae)
    assert one.returncode == 0, one.stderr[-3000:]
    two = pre_encode(src, tmp_path / "two", divae, nproc=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    killed = pre_encode(src, tmp_path / "killed", divae, **{faults.KILL_AFTER_SHARD: "1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "killed" / "shard.00001.mds").is_file()  # killed after the shard, before its receipt
    assert not (tmp_path / "killed" / "manifest.json").exists()
    rerun = pre_encode(src, tmp_path / "killed", divae)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    t1 = tree(tmp_path / "one")
    assert "manifest.json" in t1 and "index.json" in t1
    assert tree(tmp_path / "two") == t1
    assert tree(tmp_path / "killed") == t1

    reader = ShardReader(str(tmp_path / "one"))
    assert len(reader) == 11 and reader.manifest["derived_from"]["precision"] == "bf16"
    tokens = tokens_from_bytes([reader[i]["tokens"] for i in range(11)], 8)
    assert tokens.min() >= 0 and tokens.max() < vq.n_embed
    assert [reader[i]["caption"] for i in range(11)] == [ShardReader(str(src))[i]["caption"] for i in range(11)]
    again = pre_encode(src, tmp_path / "one", divae)  # a finished folder: nothing to redo
    assert again.returncode == 0 and "nothing to do" in again.stdout and tree(tmp_path / "one") == t1
    other = pre_encode(src, tmp_path / "killed2", divae, **{faults.KILL_AFTER_SHARD: "0"})
    assert other.returncode == -9
    bad = subprocess.run([sys.executable, "-m", "trainer.pre_encode", "--vq", str(divae), "--src", str(src), "--dst",
                          str(tmp_path / "killed2"), "--batch-size", "5", "--precision", "bf16"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "batch_size" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    tok = train_tokenizer.main(["--shards", str(tmp_path / "one"), "--vocab-size", "300", "--min-frequency", "1"])
    assert tok == tmp_path / "one" / "tokenizer.json"

    run_dir = tmp_path / "prior_run"
    run_dir.mkdir()
    log = run_dir / "log.txt"
    code = run(["--config", "configs/prior_tiny.yaml", *common(tmp_path / "one", run_dir), "train.steps=3",
                "train.batch_size=4", "checkpoint.every=0", "logging.sample_every=0", "prior_task.divae_weights=",
                "optim.warmup_steps=1"], 1, log, timeout=240)
    assert code == 0, log.read_text()[-4000:]
    assert sorted(metrics(run_dir)) == [1, 2, 3] and (run_dir / "prior.safetensors").is_file()


def test_train_tokenizer_reads_only_the_caption_bytes(tmp_path, monkeypatch):
    """Spy on the mapped shard: the bytes train_tokenizer reads are the size headers and captions, not the 40 KB
    image of each sample."""
    import mmap

    import numpy as np

    from data_pipeline import train_tokenizer
    from data_pipeline.shards import STANDARD_COLUMNS, ShardWriter

    rng = np.random.default_rng(0)
    caps = [f"a small dog number {i} runs on the beach" for i in range(12)]
    folder = tmp_path / "shards"
    with ShardWriter(str(folder), columns=STANDARD_COLUMNS, shard_size=5) as w:
        for i, c in enumerate(caps):
            w.write({"jpg": rng.bytes(40_000), "label": -1, "caption": c, "key": f"{i:09d}", "orig_size": "1x1"})
    read, real_mmap = [], mmap.mmap

    class Spy:
        def __init__(self, *a, **kw):
            self.m = real_mmap(*a, **kw)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.m.close()

        def __len__(self):
            return len(self.m)

        def __getitem__(self, key):
            out = self.m[key]
            read.append(len(out) if isinstance(out, bytes) else 1)
            return out

    monkeypatch.setattr(train_tokenizer.mmap, "mmap", Spy)
    assert list(train_tokenizer.iter_shard_captions(tmp_path)) == caps
    assert 0 < sum(read) < 12 * 200, sum(read)  # ~60 bytes of header + caption per sample; images are 40 KB
