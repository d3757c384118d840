"""Loaders: batches, seeded flips, exact resume in one process and under torchrun --nproc_per_node 2."""

import json
import os
import signal
import subprocess

import psutil
import pytest
import torch
from data_fixtures import write_shards
from helpers import free_port, torchrun

from data_pipeline.loaders import DataConfig, build_loader, flip_mask
from data_pipeline.shards import STANDARD_COLUMNS, ShardWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    return {fmt: write_shards(str(root / fmt), fmt) for fmt in ("mds", "wds")}


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_batches_and_single_process_resume(data, fmt):
    cfg = DataConfig(path=data[fmt], format=fmt, batch_size=4, num_workers=2, image_size=32, seed=1,
                     clean_stale_shm=False)
    loader = build_loader(cfg)
    keys, imgs, state = [], [], None
    for i, b in enumerate(loader):
        assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
        assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["label"].dtype == torch.long
        assert b["caption"] == [f"c{int(k[1:])}" for k in b["key"]]
        assert b["label"].tolist() == [int(k[1:]) % 7 for k in b["key"]]
        keys += b["key"]
        imgs.append(b["image"])
        if i == 5:
            state = loader.state_dict()
    assert len(keys) == len(set(keys)) == 64 and keys != sorted(keys)  # whole epoch, shuffled
    again = build_loader(cfg)
    again.load_state_dict(state)
    rest = list(again)
    assert [k for b in rest for k in b["key"]] == keys[24:]
    assert all(torch.equal(a["image"], b) for a, b in zip(rest, imgs[6:]))  # same flips after resume
    second = [k for b in loader for k in b["key"]]  # next epoch: another order
    assert sorted(second) == sorted(keys) and second != keys


def test_flip_mask_is_seeded():
    idx = torch.arange(1000)
    a, b, c = flip_mask(0, 0, idx), flip_mask(0, 0, idx), flip_mask(0, 1, idx)
    assert torch.equal(a, b) and not torch.equal(a, c) and 400 < int(a.sum()) < 600


def test_clear_errors(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        build_loader(DataConfig(path=str(tmp_path), clean_stale_shm=False))
    with pytest.raises(ValueError, match="format"):
        build_loader(DataConfig(path=data["mds"], format="wds", clean_stale_shm=False))
    with pytest.raises(ValueError, match="shards < ranks x workers"):
        build_loader(DataConfig(path=write_shards(str(tmp_path / "few"), "wds", n=16, shard_size=8), format="wds",
                                num_workers=4, batch_size=2))
    empty = str(tmp_path / "empty")
    ShardWriter(empty, dict(STANDARD_COLUMNS)).close()
    with pytest.raises(ValueError, match="empty"):
        build_loader(DataConfig(path=empty, clean_stale_shm=False))
    with pytest.raises(ValueError, match="cannot fill one batch"):
        build_loader(DataConfig(path=data["mds"], batch_size=65, clean_stale_shm=False))


def _start_torchrun(args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT}/tests")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    port = free_port()  # for the rendezvous store
    cmd = torchrun(2, os.path.join(ROOT, "tests", "data_loader_worker.py"), *args, port=port)
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish_torchrun(proc: subprocess.Popen, out: str, timeout: float) -> str:
    try:
        log, _ = proc.communicate(timeout=timeout)
    finally:  # ranks live in their own sessions: kill them by pid and by process group
        pids = [proc.pid] + [int(open(os.path.join(out, f)).read()) for f in os.listdir(out) if f.startswith("pid.")]
        for pid in pids:
            try:
                for c in psutil.Process(pid).children(recursive=True):
                    c.kill()
                os.killpg(os.getpgid(pid), signal.SIGKILL) if pid != os.getpid() and proc.poll() is None else None
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
    assert proc.returncode == 0, log[-4000:]
    return log


def _torchrun(args, out, timeout=90):
    _finish_torchrun(_start_torchrun(args), out, timeout)


@pytest.mark.slow
def test_two_jobs_on_one_node_read_one_mds_folder_at_once(data, tmp_path):
    """Two 2-rank jobs start together over the same MDS folder on this node: each registers its own streaming
    shared-memory prefix (data_pipeline.node_lock) and reads its epoch; neither joins the other's barrier."""
    outs = [str(tmp_path / f"job{j}") for j in range(2)]
    procs = []
    for out in outs:
        os.makedirs(out)
        procs.append(_start_torchrun([data["mds"], "mds", "concurrent", out, "0"]))
    for proc, out in zip(procs, outs):
        _finish_torchrun(proc, out, timeout=150)
    prefixes = [{open(os.path.join(out, f"prefix.{r}")).read() for r in range(2)} for out in outs]
    assert all(len(p) == 1 for p in prefixes), prefixes  # the ranks of a job share one prefix
    assert prefixes[0] != prefixes[1], prefixes
    for out in outs:
        keys = [k for r in range(2) for b in json.load(open(os.path.join(out, f"concurrent.{r}.json")))
                for k in b["key"]]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 64  # a whole epoch, each sample once


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_torchrun_two_ranks_disjoint_and_exact_resume(data, fmt, tmp_path):
    out = str(tmp_path)
    stop = 3
    _torchrun([data[fmt], fmt, "full", out, str(stop)], out)
    _torchrun([data[fmt], fmt, "resume", out, "0"], out)
    full = [json.load(open(os.path.join(out, f"full.{r}.json"))) for r in range(2)]
    resumed = [json.load(open(os.path.join(out, f"resume.{r}.json"))) for r in range(2)]
    k0, k1 = ({k for b in f for k in b["key"]} for f in full)
    assert not k0 & k1  # disjoint shares
    if fmt == "mds":
        assert k0 | k1 == {f"k{i:03d}" for i in range(64)}  # together they cover the epoch
    else:
        assert len(k0 | k1) >= 64 - 2 * 2 * 3  # wds drops each worker's last partial batch
    for r in range(2):
        assert resumed[r] == full[r][stop:], f"rank {r}: resumed batches differ"
        assert len(resumed[r]) > 0


def test_registration_lock_waits_for_the_other_job_and_names_its_file(tmp_path):
    import fcntl

    from data_pipeline.node_lock import registration_lock

    path = str(tmp_path / "reg.lock")
    other = os.open(path, os.O_RDWR | os.O_CREAT)  # another job, building its dataset
    fcntl.flock(other, fcntl.LOCK_EX)
    with pytest.raises(RuntimeError, match="reg.lock.*another job on this node holds it"):
        with registration_lock(path, attempt_s=0.05, timeout_s=0.3):
            pass
    os.close(other)
    entered = []
    with registration_lock(path, attempt_s=0.05, timeout_s=0.3):
        entered.append(True)
        probe = os.open(path, os.O_RDWR)
        with pytest.raises(BlockingIOError):  # held while the body runs
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
    assert entered
