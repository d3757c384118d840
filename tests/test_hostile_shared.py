"""Hostile and shared environments, second round (issue 26): each test is the attack that was reproduced on
main 8a12682 (crafted files of a few KB, a colleague's run on the same node or folder), and the refusal or
fallback that replaces it. Real files on disk, written by the project's own writers; nothing mocked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from eval_fixtures import evaluate_blur

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# One interpreter, started once for the module, that has imported torch, streaming and the modules under test
# (most of a fresh process's cost); each script runs in a process forked from it, with its own argv, environment
# and output, as `python -c script argv...` would (it never ran torch before forking: no thread pools to lose).
# One BLAS/OpenMP thread: on a node shared with training runs, a 2048x2048 eigendecomposition (the FID) in two
# OpenBLAS threads took over a minute instead of seconds.
_PRELOADED = r"""
import json, os, sys, tempfile, traceback
import data_pipeline.node_lock, divae.prior_io  # noqa: F401
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            fd = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.clear()
            os.environ.update(job["env"])
            tempfile.tempdir = None  # gettempdir() follows the script's TMPDIR
            sys.argv = ["-c", *job["argv"]]
            exec(compile(job["code"], "<script>", "exec"), {"__name__": "__main__"})
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class _Interpreter:
    def __init__(self, tmp: Path):
        self.tmp, self.n = tmp, 0
        env = {**_env(), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.p = subprocess.Popen([PY, "-c", _PRELOADED], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env=env, cwd=ROOT, start_new_session=True)

    def run(self, code: str, *argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
        """(exit status, stdout and stderr) of `python -c code argv...` (a run past `timeout` fails the test)."""
        import select

        self.n += 1
        out = self.tmp / f"script{self.n}.out"
        self.p.stdin.write(json.dumps({"code": code, "argv": list(argv), "env": env or _env(), "out": str(out)}) + "\n")
        self.p.stdin.flush()
        if not select.select([self.p.stdout], [], [], timeout)[0]:
            self.close()
            pytest.fail(f"script still running after {timeout} s: {out.read_text()[-2000:]}")
        line = self.p.stdout.readline()
        assert line, "the preloaded interpreter died"
        return int(line), out.read_text()

    def close(self) -> None:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait()


@pytest.fixture(scope="module")
def interpreter(tmp_path_factory):
    it = _Interpreter(tmp_path_factory.mktemp("scripts"))
    yield it
    it.close()


# -- 1: a crafted prior file is refused before anything is allocated --------------------------------------
_LOAD_PRIOR = """
import sys
from divae.prior_io import load_prior
for path in sys.argv[1:]:
    try:
        load_prior(path)
        print("LOADED", flush=True)
    except Exception as e:
        print(f"{type(e).__name__}: {e}", flush=True)
"""


def test_crafted_prior_config_is_refused_before_any_allocation(tmp_path, interpreter):
    """A 30 KB prior whose config asks for dim=65536 and a 65536-token vocabulary (17 GB on main)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from divae.prior import PriorConfig, PriorModel
    from divae.prior_io import save_prior
    from divae.text_tokenizer import TextTokenizer

    tok = TextTokenizer.train(["a red cat", "a blue dog", "two cats on a mat"] * 4, vocab_size=280, max_length=8)
    cfg = PriorConfig(text_vocab_size=280, text_len=8, image_vocab_size=16, image_h=2, image_w=2, dim=16,
                      n_heads=2, enc_layers=1, dec_layers=1, attn_backend="sdpa")
    ok = tmp_path / "ok.safetensors"
    save_prior(ok, PriorModel(cfg), tok)
    with safe_open(str(ok), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    big = json.loads(meta["prior_config"]) | {"dim": 65536, "text_vocab_size": 65536}
    crafted = tmp_path / "crafted.safetensors"
    save_file(state, str(crafted), metadata=dict(meta, prior_config=json.dumps(big)))
    assert crafted.stat().st_size < 100_000

    # a safety net only (the crafted config asks for 17 GB): the refusal must come far below it
    cap = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({8 << 30}, {8 << 30}))\n"
    code, out = interpreter.run(cap + _LOAD_PRIOR, str(ok), str(crafted))
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2, out[-2000:]
    out = dict(zip(("ok", "crafted"), lines))
    assert out["ok"] == "LOADED"
    assert out["crafted"].startswith("ValueError: ") and "refusing to build it" in out["crafted"], out["crafted"]
    assert str(crafted) in out["crafted"]


# -- 2: index.json is checked against manifest.json -------------------------------------------------------
def _folder(path: Path, n: int = 8, seed: int = 0) -> Path:
    """A real MDS folder of `n` photos (standard columns), written by the project's ShardWriter."""
    import numpy as np
    from data_fixtures import encode, photos, variant
    from PIL import Image

    from data_pipeline.shards import STANDARD_COLUMNS, ShardWriter

    ps = photos()
    with ShardWriter(str(path), STANDARD_COLUMNS, shard_size=4) as w:
        for i in range(n):
            img = Image.fromarray(variant(ps[(i + seed) % len(ps)], i + seed)).resize((32, 32))
            jpg = encode(np.asarray(img))
            w.write({"jpg": jpg, "label": i, "caption": f"photo {i}", "key": f"{seed}_{i:04d}", "orig_size": "32x32"})
    return path


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("folders")
    return _folder(root / "mine"), _folder(root / "other", seed=3)


@pytest.mark.parametrize("edit", ["dotdot", "absolute", "samples", "bytes", "encoding", "dropped"])
def test_edited_index_is_refused_by_verify_and_the_loader(two_folders, tmp_path, edit, capsys):
    from data_pipeline.loaders import DataConfig, build_loader
    from data_pipeline.reader import ShardReader
    from data_pipeline.shards import ShardFolderError
    from data_pipeline.verify import cli as verify

    mine, other = two_folders
    folder = tmp_path / "data"
    shutil.copytree(mine, folder)
    idx = json.loads((folder / "index.json").read_text())
    first = idx["shards"][0]
    if edit == "dotdot":
        first["raw_data"]["basename"] = "../other/shard.00000.mds"
        shutil.copytree(other, tmp_path / "other")
    elif edit == "absolute":
        first["raw_data"]["basename"] = str(other / "shard.00000.mds")
    elif edit == "samples":
        first["samples"] += 1
    elif edit == "bytes":
        first["raw_data"]["bytes"] += 1
    elif edit == "encoding":
        first["column_encodings"][first["column_names"].index("label")] = "pkl"
    else:
        idx["shards"].pop()
    (folder / "index.json").write_text(json.dumps(idx))

    assert verify([str(folder), "--quick"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "index.json" in err and "refusing to read the folder" in err, err
    with pytest.raises(ShardFolderError, match="index.json"):
        build_loader(DataConfig(path=str(folder), batch_size=2, num_workers=0))
    with pytest.raises(ShardFolderError, match="index.json"):
        ShardReader(str(folder))
    # the folder as written passes: the check compares with what the writer records, nothing stricter
    assert verify([str(mine), "--quick"]) == 0
    assert "8 samples intact" in capsys.readouterr().out


# -- 5: a missing or malformed checkpoint manifest is damage -------------------------------------------------
def _checkpoints(root: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    """`root`/checkpoints with complete step folders (files, trainer_state.json, manifest by write_manifest)."""
    from trainer.checkpoint import LATEST, STATE_FILE, step_name, write_manifest

    ck = root / "checkpoints"
    for step in steps:
        d = ck / step_name(step)
        (d / "generator").mkdir(parents=True)
        (d / "generator" / "model.bin").write_bytes(os.urandom(256))
        (d / STATE_FILE).write_text(json.dumps({"step": step}))
        write_manifest(d, 0)
    (ck / LATEST).write_text(step_name(steps[-1]) + "\n")
    return ck


def _manifest_edits(d: Path) -> dict[str, object]:
    from divae.utils.files import sha256_file
    from trainer.checkpoint import MANIFEST

    files = json.loads((d / MANIFEST).read_text())["files"]
    (d / "zero").symlink_to("/dev/zero")
    any_entry = next(iter(files.values()))
    outside = d.parent.parent / "outside.txt"  # names outside the folder, with their true size and hash
    outside.write_text("not part of any checkpoint")
    sibling = d.parent / "step_00000002" / "trainer_state.json"

    def true(f: Path) -> dict:
        return {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return {"deleted": None, "null": {"files": None}, "empty": {"files": {}}, "list": {"files": [1, 2]},
            "not_a_dict": {"files": {**files, "generator/model.bin": 7}},
            "dev_zero": {"files": {**files, "/dev/zero": {"bytes": 0, "sha256": any_entry["sha256"]}}},
            "link_to_dev_zero": {"files": {**files, "zero": {"bytes": 0, "sha256": any_entry["sha256"]}}},
            "dotdot": {"files": {**files, "../step_00000002/trainer_state.json": true(sibling)}},
            "absolute": {"files": {**files, str(outside): true(outside)}},
            "not_json": "{not json"}



@pytest.mark.parametrize("edit", ["deleted", "null", "empty", "list", "not_a_dict", "dev_zero",
                                  "link_to_dev_zero", "dotdot", "absolute", "not_json"])
def test_damaged_checkpoint_manifest_falls_back_to_the_previous_checkpoint(tmp_path, edit):
    from trainer.checkpoint import MANIFEST, damaged_file, select_checkpoint

    ck = _checkpoints(tmp_path)
    newest = ck / "step_00000004"
    value = _manifest_edits(newest)[edit]
    if value is None:
        (newest / MANIFEST).unlink()
    else:
        (newest / MANIFEST).write_text(value if isinstance(value, str) else json.dumps(value))
    result: dict[str, object] = {}

    def check() -> None:  # in a thread: on main, /dev/zero was hashed for ever
        try:
            result["bad"], result["chosen"] = damaged_file(newest), select_checkpoint(ck)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=check, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the manifest check hangs"
    assert "error" not in result, result
    assert isinstance(result["bad"], str) and str(newest) in result["bad"], result
    assert result["chosen"] == ck / "step_00000002"
    assert damaged_file(ck / "step_00000002") is None


def test_checkpoint_without_any_intact_manifest_is_one_error_naming_the_fix(tmp_path):
    from trainer.checkpoint import MANIFEST, CheckpointError, select_checkpoint

    ck = _checkpoints(tmp_path)
    for d in ck.glob("step_*"):
        (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*is missing.*checkpoint.verify=false"):
        select_checkpoint(ck)
    assert select_checkpoint(ck, verify=False) == ck / "step_00000004"


# -- 10: pruning deletes only step_XXXXXXXX folders -----------------------------------------------------------
def test_pruning_keeps_folders_that_are_not_checkpoints(tmp_path):
    from trainer.checkpoint import CheckpointError, prune, select_checkpoint

    ck = _checkpoints(tmp_path, steps=(1000, 2000, 3000))
    keep = ck / "step_00001000_keep_this_one"
    shutil.copytree(ck / "step_00001000", keep)
    (ck / "step_00000500.bak").mkdir()
    prune(ck, keep_last=1)
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == [
        "step_00000500.bak", "step_00001000_keep_this_one", "step_00003000"]
    # nor is a hand-made folder resumed: latest named a copy -> refused, not followed
    (ck / "latest").write_text("step_00001000_keep_this_one\n")
    with pytest.raises(CheckpointError, match="not a complete step_XXXXXXXX folder"):
        select_checkpoint(ck, verify=False)


# -- 4: one training run at a time in a run folder ----------------------------------------------------------
_HOLD = """
import sys, time
from divae.utils.files import folder_lock
with folder_lock(sys.argv[1], lambda holder: holder):
    print("HELD", flush=True)
    time.sleep(120)
"""


def test_second_run_in_a_run_folder_is_refused_naming_the_first(two_folders, tmp_path, capsys, monkeypatch):
    """Run A holds train.run_dir (the lock every run takes, here held by a process standing for A, so the test
    needs no training); run B in the same folder exits 1 with one line naming A, and leaves A's checkpoint in
    progress and `latest` alone (on main B removed A's `.tmp_step_*` and moved `latest`)."""
    run_dir = tmp_path / "run"
    in_progress = run_dir / "checkpoints" / ".tmp_step_00001000"
    in_progress.mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000500\n")
    monkeypatch.chdir(ROOT)  # configs/ paths
    a = subprocess.Popen([PY, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        assert a.stdout.readline().strip() == "HELD"
        from trainer.train import main as train_main

        code = train_main(["--config", "configs/vq_tiny.yaml", "train.batch_size=4", "train.steps=2",
                           "checkpoint.every=1", "logging.sample_every=0", "logging.progress=false",
                           "logging.wandb_mode=disabled", f"data.path={two_folders[0]}", f"train.run_dir={run_dir}"])
    finally:
        a.kill()
        a.wait()
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "trainer.train: error" in ln]
    assert code == 1 and len(errors) == 1 and errors[0].startswith("trainer.train: error: "), errors
    err = errors[0]
    assert "Traceback" not in err and not (run_dir / "error_rank0.log").exists()  # nothing written into A's folder
    assert f"{run_dir} is in use by another training run (pid {a.pid} on " in err, err
    assert in_progress.is_dir() and (run_dir / "checkpoints" / "latest").read_text() == "step_00000500\n"
    assert not (run_dir / "checkpoints" / "step_00000001").exists()


# -- 6 and 11: evaluation results are of the data evaluated, and written whole ------------------------------
_FULL_EVALUATION = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from eval_fixtures import evaluate_blur
a = evaluate_blur(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps({"psnr": a["psnr"], "protocol": a["protocol"]}))
"""


def test_other_data_at_the_same_path_is_evaluated_again_and_a_torn_result_is_redone(two_folders, tmp_path,
                                                                                     interpreter):
    from evaluation.recon_fid import Preempted

    mine, other = two_folders
    data, out = tmp_path / "val", tmp_path / "eval"
    shutil.copytree(mine, data)
    # finished: results.json and samples.npz, each written whole (the one full evaluation, with its FID, runs in
    # the preloaded interpreter's single BLAS thread)
    code, log = interpreter.run(_FULL_EVALUATION, str(data), str(out), str(ROOT / "tests"))
    assert code == 0, log[-3000:]
    a = json.loads(log.strip().splitlines()[-1])
    assert json.loads((out / "results.json").read_text())["psnr"] == a["psnr"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert evaluate_blur(data, out, stop_at_once=True)["psnr"] == a["psnr"]  # the same data: reused, not redone

    # a results.json cut short (a kill mid-write on main, where every rerun then failed on it): evaluated again
    text = (out / "results.json").read_text()
    (out / "results.json").write_text(text[: len(text) // 2])
    with pytest.raises(Preempted):
        evaluate_blur(data, out, stop_at_once=True)
    (out / "results.json").write_text(text)
    shutil.rmtree(out / "partial")

    # another data set at the same path, the same output folder: main returned a's figures for it
    shutil.rmtree(data)
    shutil.copytree(other, data)
    with pytest.raises(Preempted):
        evaluate_blur(data, out, stop_at_once=True)
    saved = json.loads((out / "partial" / "rank00000-of-00001.json").read_text())["fingerprint"]
    assert json.loads(saved)["data_manifest_sha256"] != a["protocol"]["data_manifest_sha256"]


# -- 9: `python -m trainer.checkpoint_tool inspect` is bounded whatever trainer_state.json says -------------------
@pytest.mark.parametrize("global_batch", [10**10, 2 * 1000003, 1e10, -4])
def test_inspect_of_a_crafted_global_batch_ends_at_once(tmp_path, capsys, global_batch):
    from trainer.checkpoint import STATE_FILE
    from trainer.checkpoint_tool import main

    ck = _checkpoints(tmp_path, steps=(4,))
    meta = {"step": 4, "samples_seen": 16, "world_size": 2, "zero_stage": 2, "micro_batch": 4,
            "grad_accum": 1, "global_batch": global_batch, "engines": ["generator"], "elastic": ["generator"],
            "data_format": "mds"}
    (ck / "step_00000004" / STATE_FILE).write_text(json.dumps(meta))
    result: dict[str, int] = {}
    t = threading.Thread(target=lambda: result.update(code=main(["inspect", str(tmp_path)])), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "inspect loops over the global batch"
    out = capsys.readouterr().out
    assert result["code"] == 0 and "resumes on      2 ranks" in out, out
    if global_batch == 2 * 1000003:  # a real (if odd) batch: its small divisors are still listed
        assert "any rank count dividing the global batch 2000006: 1, 2 (counts above 4096 not listed)" in out, out


# -- 3: node locks: two users on one node -------------------------------------------------------------------
_NODE_LOCK = """
import os, signal, sys, time
from data_pipeline.node_lock import default_lock_path, registration_lock
# One import (most of the cost) for the three users: each is a child forked from here that becomes its user
# (the interpreter lives under /root: start as root, then switch).


def as_user(uid, body):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgid(uid)
            os.setuid(uid)
            with os.fdopen(w, "w") as out:
                body(out)
        except BaseException as e:
            print(f"CHILD {uid} {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            os._exit(0)
    os.close(w)
    return pid, os.fdopen(r)


def hold(out):  # the other user: plants a 0600 file at the old shared path, then holds its own lock
    os.open(os.path.join(os.environ["TMPDIR"], "divae_streaming_registration.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    with registration_lock(attempt_s=0.05, timeout_s=1):
        print("HELD", default_lock_path(), file=out, flush=True)
        time.sleep(120)


def take(out):
    t = time.monotonic()
    try:
        with registration_lock(attempt_s=0.05, timeout_s=1):
            print("TOOK", default_lock_path(), round(time.monotonic() - t, 2), file=out, flush=True)
    except Exception as e:
        print(f"ERR {type(e).__name__}: {e}", file=out, flush=True)


holder, held = as_user(65534, hold)
try:
    print(held.readline().strip() or "NOT HELD", flush=True)
    takers = [as_user(uid, take) for uid in (65533, 65532)]  # the two at once, while 65534 holds its lock
    for pid, r in takers:
        print(r.read().strip() or "NOTHING", flush=True)
        os.waitpid(pid, 0)
finally:
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
"""


@pytest.mark.serial  # a wall-clock bound (1 s) that separates "not stalled" from the shared lock's timeout
@pytest.mark.skipif(os.geteuid() != 0, reason="two users on one node: switching uid needs root (CI runs as root)")
def test_another_user_on_the_node_can_neither_stall_nor_redirect_the_node_lock(interpreter):
    """Users 65534 and 65533 (and 65532) on one node, /tmp shared (mode 1777). On main the lock was one file in
    /tmp: the other user's pre-created 0600 file stopped training with a PermissionError, its held lock stalled
    it, and a planted link was followed. Now each user locks in its own 0700 folder, and a folder another user
    planted under a user's name (here a link) is refused in one line, nothing created where it points."""
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="divae_two_users_"))
    try:
        shared.chmod(0o1777)
        target = shared / "target"
        target.mkdir()
        (shared / "divae-65532").symlink_to(target)
        os.lchown(shared / "divae-65532", 65534, 65534)
        os.chown(target, 65534, 65534)
        env = {**_env(), "TMPDIR": str(shared), "HOME": str(shared)}
        env.pop("XDG_RUNTIME_DIR", None)
        code, out = interpreter.run(_NODE_LOCK, env=env)
        lines = [ln for ln in out.splitlines() if ln.split()[:1] in (["HELD"], ["TOOK"], ["ERR"], ["NOTHING"])]
        assert code == 0 and len(lines) == 3, out
        held, out_me, out_sq = lines
        assert held.split()[0] == "HELD", out
        took = out_me.split()
        mine = shared / "divae-65533" / "divae_streaming_registration.lock"
        assert took[:2] == ["TOOK", str(mine)], out
        assert float(took[2]) < 1.0  # not stalled by the other user's lock (a shared one: an error after 1 s)
        st = os.lstat(shared / "divae-65533")
        assert st.st_uid == 65533 and st.st_mode & 0o777 == 0o700
        assert out_sq.startswith("ERR LockFolderError: "), out
        assert "is a link owned by uid 65534" in out_sq and "XDG_RUNTIME_DIR" in out_sq, out_sq
        assert list(target.iterdir()) == []  # nothing created through the planted link
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# -- 11: a tokenizer with another pipeline is refused; a caption that is not UTF-8 is one line ----------------
@pytest.fixture(scope="module")
def t2i_models(tmp_path_factory) -> tuple[Path, Path]:
    from t2i_fixtures import make_models

    return make_models(tmp_path_factory.mktemp("t2i"), ["a red square", "a blue circle", "two green dots"])


def test_tokenizer_with_another_pipeline_is_refused_before_it_is_compiled(t2i_models, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from divae.generate import cli
    from divae.prior_io import load_prior
    from divae.text_tokenizer import TextTokenizer

    prior, divae = t2i_models
    with safe_open(str(prior), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tok = json.loads(meta["text_tokenizer"])
    assert TextTokenizer.from_json(meta["text_tokenizer"]).vocab_size > 256  # train()'s own pipeline loads
    edits = {"regex": ("normalizer", lambda t: t["normalizer"]["normalizers"][2]["pattern"].update(Regex="(a|aa)*$")),
             "pre_tokenizer": ("pre_tokenizer", lambda t: t.update(pre_tokenizer={"type": "Whitespace"})),
             "no_normalizer": ("normalizer", lambda t: t.update(normalizer=None))}
    for name, (part, edit) in edits.items():
        crafted = json.loads(json.dumps(tok))
        edit(crafted)
        with pytest.raises(ValueError, match=f"has another {part} than the one TextTokenizer.train builds"):
            TextTokenizer.from_json(json.dumps(crafted))
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata=dict(meta, text_tokenizer=json.dumps(crafted)))
        with pytest.raises(ValueError, match=f"has another {part}"):
            load_prior(path)
    assert cli(["--prior", str(path), "--divae", str(divae), "--caption", "a cat", "--out", str(tmp_path / "o"),
                "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prior: tokenizer JSON has another normalizer" in err, err


def test_caption_that_is_not_utf8_is_one_line(t2i_models, tmp_path, capsys):
    from divae.generate import cli

    prior, divae = t2i_models
    caption = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 argv byte
    assert cli(["--prior", str(prior), "--divae", str(divae), "--caption", "a cat", "--caption", caption,
                "--out", str(tmp_path / "o"), "--device", "cpu", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--caption number 2 is not UTF-8 text (byte 0xe9" in err, err
    assert not (tmp_path / "o" / "index.json").exists()


# -- 8: read_devkit reads only what it needs, bounded -------------------------------------------------------
def test_devkit_with_a_huge_member_is_read_in_bounded_memory(tmp_path):
    import io
    import tarfile
    import tracemalloc

    from data_fixtures import WNIDS_BY_ID, make_devkit

    from data_pipeline.prepare_imagenet import MAX_DEVKIT_MEMBER_BYTES, read_devkit

    devkit = make_devkit(str(tmp_path / "devkit.tar.gz"), WNIDS_BY_ID, [1, 2, 3])
    with tarfile.open(devkit) as src:  # the real devkit members, then a member of zeros (a few KB compressed)
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    zeros = MAX_DEVKIT_MEMBER_BYTES + (16 << 20)
    big = tmp_path / "big.tar.gz"
    with tarfile.open(big, "w:gz", compresslevel=1) as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
        info = tarfile.TarInfo("ILSVRC2012_devkit_t12/data/zeros.bin")
        info.size = zeros

        class Zeros:  # streamed: never the whole member in memory while writing the test file either
            def read(self, n: int = 1 << 20) -> bytes:
                return bytes(min(n, 1 << 20))

        tf.addfile(info, Zeros())
    assert big.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        got = read_devkit(str(big))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == read_devkit(devkit)
    assert peak < 16 << 20, f"read_devkit held {peak >> 20} MiB"  # main read the whole member


# -- 7: prepare_cc holds one sample's wanted members at most -----------------------------------------------
def test_cc_tar_of_members_sharing_a_key_is_read_in_bounded_memory(tmp_path):
    import io
    import tarfile
    import tracemalloc

    from data_fixtures import encode, photos

    from data_pipeline import prepare_cc

    src = tmp_path / "cc"
    src.mkdir()
    jpg = encode(photos()[0])
    mib, n = 1 << 20, 64
    with tarfile.open(src / "00000.tar", "w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        add("000000000.jpg", jpg), add("000000000.txt", b"a red bus"), add("000000000.json", b"{}")
        for i in range(n):  # the attack: one key ("sample"), n extensions ("000000.jpg", ...), 1 MiB each
            add(f"sample.{i:06d}.jpg", bytes([i]) * mib)
        add("dup.jpg", jpg), add("dup.jpeg", b"\xff" * mib), add("dup.txt", b"two images")
        add("long.jpg", jpg), add("long.txt", b"a " * (mib // 2 + 1))  # a caption over 1 MiB
        add("000000001.jpg", jpg), add("000000001.txt", b"a cat")
    tracemalloc.start()
    try:
        items = list(prepare_cc.wds_items(str(src), 512, 256 * mib))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * mib, f"prepare_cc held {peak / mib:.0f} MiB for a tar of {n} 1 MiB members of one key"
    got = {(it.key, it.skip): it for it in items}
    assert [(it.key, it.skip) for it in items] == [
        ("000000000", None), ("sample", "missing image"), ("dup", "duplicate member"),
        ("00000.tar/long.txt", "file too large"), ("long", "empty caption"), ("000000001", None)]
    assert got["000000000", None].data == jpg and got["000000000", None].caption == "a red bus"
    assert f"{n} member(s) of other kinds passed over unread, e.g. 'sample.000000.jpg'" in \
        got["sample", "missing image"].detail
    assert "'dup.jpg' and 'dup.jpeg'" in got["dup", "duplicate member"].detail
    assert f"> {prepare_cc.MAX_CAPTION_BYTES} bytes" in got["00000.tar/long.txt", "file too large"].detail

    # What the user sees: the two good samples written, the rest listed with their reasons in manifest.json.
    m = prepare_cc.main(["--source", str(src), "--out", str(tmp_path / "out"), "--size", "32", "--workers", "0",
                         "--no-progress"])
    assert m["counts"]["written"] == 2
    assert m["counts"]["skipped_by_reason"] == {"duplicate member": 1, "empty caption": 1, "file too large": 1,
                                                "missing image": 1}
