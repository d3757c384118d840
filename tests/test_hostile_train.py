"""`python -m trainer.train` against hostile and unlucky events (issue 17, items 13, 15 and the trainer's part of
17), with real DeepSpeed engines in real processes (`torchrun --nproc_per_node 2` where ranks matter) on real
shards of scikit-image photos (as test_trainer's `shards` fixture; process helpers from tests/helpers.py).

- 13: a truncated file in the checkpoint `latest` names -> one warning naming it, resume from the previous
  intact checkpoint (every checkpoint carries a size + sha256 manifest);
- 15: a rank killed by SIGKILL mid-run, or frozen (SIGSTOP), or failing on a damaged shard -> every rank ends
  within seconds, each with one line;
- 17: misuse (missing or empty data.path, unwritable run_dir, missing init_from, another world size) -> one
  line, exit 2, before any work; a full disk during a checkpoint -> one line, exit 1, previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trainer_runs as tt  # tests/ is on sys.path under pytest
from helpers import children, kill_tree

from trainer.train import main as train_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 real photos as 64x64 MDS shards (3 shards of 16), as tests/test_trainer.py's."""
    from data_fixtures import photo_shards

    return photo_shards(tmp_path_factory.mktemp("shards"), 48, shard_size=16, out_name="tiny64")


VQ = ["--config", "configs/vq_tiny.yaml", "train.batch_size=4", "logging.sample_every=0"]


def vq_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*VQ, *tt.common(data, run_dir), *extra]


@pytest.fixture(scope="module")
def vq_run(shards, tmp_path_factory) -> Path:
    """One process, 4 steps, checkpoints at steps 2 and 4 (each with its manifest)."""
    run_dir = tmp_path_factory.mktemp("hostile_vq") / "run"
    log = run_dir.parent / "log.txt"
    code = tt.run(vq_args(shards, run_dir, "train.steps=4", "checkpoint.every=2"), 1, log)
    assert code == 0, log.read_text()[-3000:]
    return run_dir


def rank_mains(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the trainer processes torchrun started (its direct children, not DataLoader workers)."""
    out = {}
    for pid in children(proc.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = pid
    return out


def rank_tracebacks(text: str) -> list[str]:
    """Traceback headers printed by the trainer ranks (torchrun's own report of the failure is not one)."""
    return [ln for ln in text.splitlines() if "Traceback" in ln and ln.startswith("[rank")]


# -- 13: damaged checkpoint ---------------------------------------------------------------------------------
def test_truncated_file_in_latest_falls_back_to_the_previous_checkpoint(shards, vq_run, tmp_path):
    from trainer.checkpoint import MANIFEST, CheckpointError, damaged_file, select_checkpoint

    run_dir = tmp_path / "run"
    shutil.copytree(vq_run, run_dir)
    ck = run_dir / "checkpoints"
    for step in ("step_00000002", "step_00000004"):
        files = json.loads((ck / step / MANIFEST).read_text())["files"]
        on_disk = {str(p.relative_to(ck / step)): p.stat().st_size for p in (ck / step).rglob("*")
                   if p.is_file() and p.name != MANIFEST}
        assert {k: v["bytes"] for k, v in files.items()} == on_disk and len(on_disk) >= 8
    victim = ck / "step_00000004" / "generator" / "mp_rank_00_model_states.pt"
    os.truncate(victim, 1000)

    log = tmp_path / "log.txt"
    code = tt.run(vq_args(shards, run_dir, "train.steps=6", "checkpoint.every=2"), 1, log)
    text = log.read_text()
    assert code == 0, text[-3000:]
    warned = [ln for ln in text.splitlines() if "is damaged" in ln]
    assert len(warned) == 1 and str(victim) in warned[0] and "resuming from step_00000002" in warned[0], warned
    assert f"resumed from {ck / 'step_00000002'}" in text
    assert (ck / "latest").read_text().strip() == "step_00000006" and {3, 4, 5, 6} <= set(tt.metrics(run_dir))

    # same size, other bytes: found by sha256; nothing intact left: one error naming every checkpoint
    rank_file = ck / "step_00000006" / "rank_00000.pt"
    data = bytearray(rank_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rank_file.write_bytes(bytes(data))
    assert damaged_file(ck / "step_00000006") == f"{rank_file} differs from the manifest (sha256)"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000004", "step_00000006"]  # keep_last = 2
    os.truncate(ck / "step_00000004" / "trainer_state.json", 3)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step_00000006: .*; step_00000004: .*"
                                              r"trainer_state.json has 3 bytes"):
        select_checkpoint(ck)


# -- 17: misuse, refused before any work --------------------------------------------------------------------
def test_misuse_is_one_line_and_exit_2_before_any_work(shards, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    ok = [*VQ, f"train.run_dir={tmp_path / 'run'}"]
    cases = [
        ([*ok, f"data.path={tmp_path / 'missing'}"], "data.path=", "does not exist"),
        ([*ok, "data.path="], "data.path is empty", "data.path=<folder>"),
        ([*ok, f"data.path={tmp_path}"], "has no manifest.json", "prepare_folder"),
        ([*VQ, f"data.path={shards}", f"train.run_dir={tmp_path / 'a_file' / 'run'}"], "train.run_dir", "not writable"),
        ([*ok, f"data.path={shards}", f"checkpoint.init_from={tmp_path / 'none.safetensors'}"],
         "checkpoint.init_from=", "does not exist"),
        ([*ok, f"data.path={shards}", "train.batch_size=64"], "holds 48 samples", "train.batch_size"),
    ]
    for argv, *expected in cases[:-1]:  # before torch.distributed starts: in this process
        assert train_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and all(e in err for e in expected) and "Traceback" not in err, err
    # the same at the process boundary, and a misuse found once the world size is known (in train())
    for argv, *expected in (cases[0], cases[-1]):
        r = subprocess.run([tt.PY, "-m", "trainer.train", *argv], cwd=tt.ROOT, env=tt._env(), capture_output=True,
                           text=True, timeout=120)
        errors = [ln for ln in r.stderr.splitlines() if "trainer.train: error:" in ln]
        assert r.returncode == 2 and len(errors) == 1 and all(e in errors[0] for e in expected), r.stderr[-2000:]
        assert "Traceback" not in r.stderr


def test_truncated_shard_is_one_line_and_exit_1(shards, tmp_path, capsys):
    bad = tmp_path / "data"
    shutil.copytree(shards, bad)
    os.truncate(bad / "shard.00001.mds", 1000)
    assert train_main([*VQ, f"data.path={bad}", f"train.run_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad / 'shard.00001.mds'}: 1000 bytes, the manifest says" in err, err


def test_other_world_size_is_refused_on_every_rank_with_exit_2(shards, vq_run, tmp_path):
    """Another world size resumes elastically (tests/test_elastic.py) unless it cannot keep the global batch:
    then every rank refuses with the rank counts that can."""
    run_dir = tmp_path / "run"
    shutil.copytree(vq_run, run_dir)
    log = tmp_path / "log.txt"
    assert tt.run(vq_args(shards, run_dir, "train.steps=8", "train.batch_size=5"), 2, log, timeout=120) != 0
    text = log.read_text()
    refused = [ln for ln in text.splitlines() if "trainer.train: error: checkpoint" in ln]
    assert sorted(ln[:8] for ln in refused) == ["[rank 0]", "[rank 1]"], text[-3000:]
    assert all("was written by 1 ranks, this run has 2" in ln and "checkpoint.init_from=" in ln
               and "rank counts that can: 1, 5" in ln for ln in refused), refused
    codes = re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", text)  # torchrun SIGTERMs a rank still exiting
    assert "2" in codes and set(codes) <= {"2", "-15"} and not rank_tracebacks(text), text[-3000:]


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(shards, vq_run, tmp_path):
    """A real full disk: the run folder on a tmpfs (in a private mount namespace) that holds the first
    checkpoint and the weights export, and not the second checkpoint."""
    first = sum(p.stat().st_size for p in (vq_run / "checkpoints" / "step_00000002").rglob("*") if p.is_file())
    size_mb = (first + (vq_run / "divae.safetensors").stat().st_size) // 2**20 + 8
    mnt = tmp_path / "disk"
    mnt.mkdir()
    run_dir = mnt / "run"
    cmd = [tt.PY, "-m", "trainer.train", *vq_args(shards, run_dir, "train.steps=4", "checkpoint.every=2")]
    script = (f"mount -t tmpfs -o size={size_mb}m tmpfs {mnt} && {' '.join(cmd)}; code=$?; "
              f"echo LATEST=$(cat {run_dir}/checkpoints/latest); exit $code")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=tt.ROOT, env=tt._env(), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-3000:])
    errors = [ln for ln in r.stderr.splitlines() if "trainer.train: error:" in ln]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "could not write checkpoint" in errors[0] and ".tmp_step_00000004" in errors[0], errors[0]
    assert "the disk is full" in errors[0] and "previous checkpoint step_00000002 is intact" in errors[0], errors[0]
    assert "LATEST=step_00000002" in r.stdout


# -- 15: a rank that dies, freezes or fails -----------------------------------------------------------------
def _start_two_ranks(shards: Path, run_dir: Path, log: Path, *extra: str, **env: str) -> subprocess.Popen:
    run_dir.mkdir(parents=True)
    proc = tt.start(vq_args(shards, run_dir, "train.steps=400", "checkpoint.every=0", *extra), 2, log, **env)
    tt.wait_for_step(proc, run_dir, 3, log)
    return proc


@pytest.mark.serial  # a wall-clock bound (4.5 s) that separates the watchdog from a hang
def test_killed_rank_ends_the_job_within_seconds(shards, tmp_path):
    """SIGKILL of one rank (the OOM killer's way) while the other computes or waits in a collective; the
    DataLoader workers are processes too (without the watchdog the job lingers > 6 s, 30 s and more on NCCL)."""
    log = tmp_path / "log.txt"
    proc = _start_two_ranks(shards, tmp_path / "run", log, "data.num_workers=2")
    try:
        ranks = rank_mains(proc)
        assert set(ranks) == {0, 1}, ranks
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        code = tt.wait(proc, log, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log.read_text()
    assert code != 0 and elapsed < 4.5, (elapsed, text[-3000:])
    ended = [ln for ln in text.splitlines() if "[rank 0]" in ln and ("ending this rank: rank 1" in ln or
                                                                     "a collective with the other ranks failed" in ln)]
    assert len(ended) == 1 and not rank_tracebacks(text), text[-3000:]


@pytest.mark.serial  # wall-clock bounds on the heartbeat timeout
def test_frozen_rank_is_found_by_its_heartbeat(shards, tmp_path):
    """SIGSTOP: the process is alive (so the same-machine check cannot see it) but silent, as a lost node's
    ranks are; its watcher ends after DIVAE_WATCHDOG_TIMEOUT, and once the frozen rank runs again it ends too."""
    log = tmp_path / "log.txt"
    proc = _start_two_ranks(shards, tmp_path / "run", log, DIVAE_WATCHDOG_TIMEOUT="2")
    try:
        ranks = rank_mains(proc)
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGSTOP)
        while Path(f"/proc/{ranks[0]}").exists() and "Z" not in Path(f"/proc/{ranks[0]}/stat").read_text().split()[2]:
            assert time.monotonic() - t0 < 20, log.read_text()[-3000:]
            time.sleep(0.1)
        watcher_ended = time.monotonic() - t0
        os.kill(ranks[1], signal.SIGCONT)
        t1 = time.monotonic()
        code = tt.wait(proc, log, timeout=60)
        rest = time.monotonic() - t1
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log.read_text()
    assert code != 0 and 1 <= watcher_ended < 6 and rest < 5, (watcher_ended, rest, text[-3000:])
    assert re.search(r"\[rank 0\].*ending this rank: rank 1 stopped responding \(no heartbeat for 2\.\d s\)", text)
    assert not rank_tracebacks(text), text[-3000:]


def test_rank_failing_on_a_damaged_shard_names_it_and_ends_the_job(shards, tmp_path):
    from data_pipeline.reader import ShardReader

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    sample = ShardReader(str(data), decode_image=False)[20]
    shard = data / "shard.00001.mds"
    raw = bytearray(shard.read_bytes())
    at = raw.find(sample["jpg"])
    raw[at + 1] ^= 0x01  # the JPEG's SOI marker: the image cannot be decoded
    shard.write_bytes(bytes(raw))
    log = tmp_path / "log.txt"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    t0 = time.monotonic()
    code = tt.run(vq_args(data, run_dir, "train.steps=40", "checkpoint.every=0"), 2, log, timeout=120)
    text = log.read_text()
    assert code != 0, text[-3000:]
    lines = text.splitlines()
    named = [ln for ln in lines if "trainer.train: error:" in ln and "cannot be read" in ln]
    assert len(named) == 1 and f"{shard}: sample 20 (key '{sample['key']}') cannot be read" in named[0], text[-3000:]
    other = "[rank 1]" if named[0].startswith("[rank 0]") else "[rank 0]"
    assert [ln for ln in lines if other in ln and ("ending this rank: rank" in ln or
                                                   "a collective with the other ranks failed" in ln)], text[-3000:]
    assert not rank_tracebacks(text) and max(tt.metrics(run_dir), default=0) < 12, text[-3000:]
    assert time.monotonic() - t0 < 90
