"""Training checkpoints: collective, atomic, self-describing, pruned; plus auto-resume.

Layout of a run folder:

    <run_dir>/checkpoints/step_00001000/
        <engine name>/...                 DeepSpeed files of each engine (model, ZeRO optimizer shards, lr schedule)
        rank_00000.pt ...                 per rank: RNG states (python, numpy, torch), loader state, task state
        ema_<engine name>.safetensors     fp32 EMA weights (rank 0)
        trainer_state.json                step, samples seen, world size, ZeRO stage, wandb id, ...
        config.yaml                       the resolved config
        divae.safetensors                 weights-only export (EMA weights by default), `DiVAE.from_pretrained`
        manifest.json                     size and sha256 of every file above (written before `latest` moves)
    <run_dir>/checkpoints/latest          name of the newest complete checkpoint, written last
    <run_dir>/divae.safetensors           copy of the newest export (a stable path for the next stage)

Saving is collective (every rank calls `save`). Everything is written into `.tmp_step_XXXXXXXX`; rank 0
renames it to `step_XXXXXXXX` only after every rank has finished (barrier), then replaces `latest` through
a temporary file and `os.replace`, then prunes to the last `keep_last`. A crash at any point leaves the
previous checkpoint and `latest` intact; a stale `.tmp_*` is removed by the next save. A save that fails
to write (a full disk, an I/O error) raises a CheckpointError naming the folder, the cause and the free space.

Before the rename, the ranks hash the checkpoint's files (each a share) into `manifest.json`. Resuming
(`select_checkpoint`) checks the size and sha256 of every file of the checkpoint `latest` names against it
(the ranks again split the hashing); a damaged checkpoint (a truncated or altered file, e.g. after a disk
fault or a copy that stopped half-way) is passed over with a one-line warning naming the file, and the
newest intact older checkpoint is used. A missing or malformed manifest, or one naming a file outside the
folder or not a regular file, is damage too (a checkpoint written before manifests: checkpoint.verify=false).

Per-rank files are loaded with `torch.load(weights_only=True)`. DeepSpeed loads its own files with full
unpickling: resume only from run folders you wrote (share the safetensors export, not the checkpoint).

A checkpoint records the world size. Resuming with another number of ranks (elastic resume) loads the
world-size-free `elastic_<engine>.safetensors` that every ZeRO-1/2 checkpoint also holds (trainer/elastic.py:
design, what carries over); it is refused at start, with what to do instead, for ZeRO-3, webdataset shards,
a checkpoint without the elastic files, or a global batch the new rank count cannot split.

    python -m trainer.checkpoint_tool inspect RUN_DIR|CHECKPOINT [--config X.yaml [key=value ...]]
    python -m trainer.checkpoint_tool convert CHECKPOINT   # under torchrun with the ranks that wrote it
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from divae.utils.cli import one_line
from divae.utils.config import ConfigError
from divae.utils.files import sha256_file
from divae.utils.logging import get_logger
from runtime.collectives import all_gather_object, barrier, rank_and_world
from trainer import elastic, faults
from trainer.elastic import CheckpointError  # noqa: F401  (its home is elastic.py; callers import it from here)

log = get_logger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # {"files": {relative path: {"bytes", "sha256"}}} of a checkpoint folder
EXPORT_NAME = "divae.safetensors"
# Fault injection for the crash-during-save drill: every rank exits with code 13 after writing its files
# into the temporary folder of the checkpoint at this step (before it is made visible).


@dataclass
class CheckpointConfig:
    every: int = 1000  # optimizer steps between checkpoints (0: only on preemption and at the end)
    keep_last: int = 3
    resume: bool = True  # resume from <run_dir>/checkpoints/latest when present
    export: bool = True  # write divae.safetensors (weights only) with every checkpoint
    # False: a save writes only the weights-only export(s) into the run folder, no engine, optimizer or EMA
    # state (MBs instead of GBs; the run cannot resume from it). For benchmarks (bench/gpu_check.sh).
    state: bool = True
    export_ema: bool = True  # export the EMA weights (else the raw trained weights)
    export_raw: bool = False  # with an EMA export, also write the raw weights beside it (<name>.raw.safetensors)
    init_from: str = ""  # DiVAE file to initialise the trained model from when starting fresh (no checkpoint)
    verify: bool = True  # on resume, check every file's size and sha256 against the checkpoint's manifest

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise ValueError(f"need every >= 0 and keep_last >= 1, got {self.every}, {self.keep_last}")


class WorldSizeError(CheckpointError, ConfigError):
    """Resuming with another number of ranks than wrote the checkpoint (a usage error: exit 2)."""


STEP_RE = re.compile(r"step_\d{8}")  # a checkpoint folder's name (fullmatch): nothing else is pruned or resumed


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dirs(root: Path) -> list[Path]:
    """The checkpoint folders under `root`, oldest first: directories (not links) named exactly `step_XXXXXXXX`,
    so a hand-made copy such as `step_00001000_keep_this_one` is neither pruned nor resumed."""
    return sorted(p for p in Path(root).glob("step_*") if STEP_RE.fullmatch(p.name) and p.is_dir()
                  and not p.is_symlink())


# -- RNG ----------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors/plain types (loadable with weights_only=True)."""
    py = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, keys, gauss = state["python"]
    random.setstate((v, tuple(keys), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, g))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- save ---------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save(root: Path, step: int, *, rank: int, engines: dict, rank_state: dict[str, Any], meta: dict[str, Any],
         config_yaml: str, ema: dict[str, dict[str, torch.Tensor]], export_fn=None, keep_last: int = 3) -> Path:
    """Collective save of checkpoint `step` under `root` (= <run_dir>/checkpoints). Returns its path.

    engines: {name: DeepSpeed engine}; rank_state: this rank's picklable-with-tensors state;
    meta: JSON-able shared state (rank 0 writes it); ema: {engine name: EMA state dict} (rank 0 writes it);
    export_fn(folder): writes the weights-only export file(s) into the checkpoint folder (called on rank 0) and
    returns their names (e.g. divae.safetensors and the raw weights beside the EMA); each is copied to the run
    folder.
    """
    t0 = time.perf_counter()
    root = Path(root)
    name = step_name(step)
    tmp = root / f".tmp_{name}"
    final = root / name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a re-save of the same step (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        tmp.mkdir()
    barrier()
    for ename, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=ename, save_latest=False)
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    write_elastic(tmp, engines, rank)
    if rank == 0:
        for ename, state in ema.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"ema_{ename}.safetensors"))
        (tmp / "config.yaml").write_text(config_yaml)
        exported = export_fn(tmp) if export_fn is not None else []
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1))
    faults.crash_in_save(step)
    barrier()  # every rank's files are in tmp
    write_manifest(tmp, rank)
    if rank == 0:
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, name + "\n")
        for name in exported:
            shutil.copyfile(final / name, root.parent / f".{name}.tmp")
            os.replace(root.parent / f".{name}.tmp", root.parent / name)
        prune(root, keep_last)
    barrier()
    log.info("saved checkpoint %s in %.2f s", final, time.perf_counter() - t0)
    return final


def save(root: Path, step: int, **kwargs: Any) -> Path:
    """Collective save of checkpoint `step` under `root` (arguments: see `_save`). A failure to write (a full
    disk, an I/O error) becomes a CheckpointError that names the folder, the cause and the free space."""
    try:
        return _save(root, step, **kwargs)
    except Exception as e:
        if not _is_write_failure(e, root):
            raise
        raise write_error(Path(root), step, e) from e


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _is_write_failure(e: BaseException, root: Path) -> bool:
    if isinstance(e, OSError):
        return True
    free = _free_bytes(Path(root))
    text = str(e).lower()
    return (free is not None and free < 64 << 20) or any(
        w in text for w in ("iostream", "write", "no space", "i/o error", "disk quota"))


def write_error(root: Path, step: int, e: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint that could not be written."""
    free = _free_bytes(root)
    full = getattr(e, "errno", None) == 28 or (free is not None and free < 64 << 20)
    latest = root / LATEST
    prev = latest.read_text().strip() if latest.is_file() else None
    where = f"{free / 2**20:.0f} MiB free on {root}" if free is not None else f"free space on {root} unknown"
    fix = ("the disk is full: free space there or move train.run_dir to a larger disk, then relaunch"
           if full else "check the disk, then relaunch")
    kept = f"; the previous checkpoint {prev} is intact and the relaunch resumes from it" if prev else ""
    return CheckpointError(f"could not write checkpoint {root / ('.tmp_' + step_name(step))} "
                           f"({type(e).__name__}: {one_line(e)}; {where}): {fix}{kept}")



def write_elastic(folder: Path, engines: dict, rank: int) -> list[str]:
    """Collective: the world-size-free optimizer state of every ZeRO-1/2 engine (trainer/elastic.py), written
    by rank 0 into `folder`. Returns the engine names written."""
    names = []
    for ename, engine in engines.items():
        if elastic.supported(engine):
            t0 = time.perf_counter()
            tensors, info = elastic.gather(engine, keep=rank == 0)
            if rank == 0:
                elastic.write(elastic.elastic_file(folder, ename), tensors, info)
                log.info("world-size-free optimizer state of %s: %d tensors in %.2f s", ename, len(tensors),
                         time.perf_counter() - t0)
            names.append(ename)
    return names


def write_manifest(folder: Path, rank: int) -> None:
    """Collective: the ranks hash the folder's files (rank r every world-th of the sorted list) and rank 0
    writes `manifest.json` with the size and sha256 of each (needs a file system every rank sees)."""
    folder = Path(folder)
    _, world = rank_and_world()
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    mine = {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)}
            for i, n in enumerate(names) if i % world == rank}
    files: dict[str, dict] = {}
    for part in all_gather_object(mine):
        files.update(part)
    if rank == 0:
        (folder / MANIFEST).write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1))


def damaged_file(path: Path) -> str | None:
    """Collective check of checkpoint folder `path` against its manifest: None when every file has its
    recorded size and sha256, else one line naming the first problem. A missing, unreadable or malformed
    manifest is damage (nothing says what the folder should hold), and so is a manifest naming a file outside
    the folder or one that is not a regular file (a link, a device, a pipe: never opened). The ranks split the
    hashing and agree on the answer."""
    path = Path(path)
    rank, world = rank_and_world()
    files, problem = read_manifest(path)
    problems = [problem] if problem else []
    for i, (name, want) in enumerate(sorted(files.items())):
        f = path / name
        try:
            st = os.lstat(f)
        except OSError:
            problems.append(f"{f} is missing")
            continue
        if not stat.S_ISREG(st.st_mode) or not _inside(path, f):
            problems.append(f"{f} is not a regular file inside the checkpoint folder")
        elif st.st_size != want["bytes"]:
            problems.append(f"{f} has {st.st_size} bytes, the manifest says {want['bytes']}")
        elif i % world == rank and sha256_file(f) != want["sha256"]:
            problems.append(f"{f} differs from the manifest (sha256)")
    found = sorted({p for part in all_gather_object(problems) for p in part})
    return found[0] if found else None


MAX_MANIFEST_BYTES = 16 << 20  # a checkpoint's manifest lists tens to thousands of files: kilobytes


def read_manifest(path: Path) -> tuple[dict[str, dict], str | None]:
    """({name: {"bytes", "sha256"}}, None) from checkpoint folder `path`'s manifest, or ({}, one line saying
    why it cannot be used): missing, not a regular file, too large, not JSON, or malformed (see `_entry_problem`)."""
    mpath = Path(path) / MANIFEST
    try:
        st = os.lstat(mpath)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            return {}, f"{mpath} is not a regular file of at most {MAX_MANIFEST_BYTES >> 20} MiB"
        files = json.loads(mpath.read_bytes())["files"]
    except FileNotFoundError:
        return {}, (f"{mpath} is missing, so the checkpoint cannot be verified (one written before manifests "
                    "resumes with checkpoint.verify=false)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {}, f"{mpath} is unreadable ({type(e).__name__}: {one_line(e)})"
    if not isinstance(files, dict) or not files:
        return {}, f"{mpath} is malformed ('files' is {type(files).__name__}, not a mapping of file names)"
    for name, want in files.items():
        bad = _entry_problem(name, want)
        if bad:
            return {}, f"{mpath} is malformed ({bad})"
    return files, None


def _entry_problem(name: object, want: object) -> str | None:
    """Why a manifest entry cannot be checked, or None: its name must be a relative path inside the folder
    (no absolute path, no `..`, normalized), its value {"bytes": int >= 0, "sha256": 64 hex digits}."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or os.path.normpath(name) != name \
            or ".." in name.split("/") or "\x00" in name:
        return f"file name {name!r} is not a path inside the checkpoint folder"
    if not isinstance(want, dict) or type(want.get("bytes")) is not int or want["bytes"] < 0 \
            or not isinstance(want.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", want["sha256"]):
        return f"entry {name!r} is {str(want)[:80]!r}, not {{'bytes': int, 'sha256': hex}}"
    return None


def _inside(folder: Path, f: Path) -> bool:
    """Whether `f`, every link resolved, is inside `folder` (a linked sub-folder could point anywhere)."""
    return os.path.realpath(f).startswith(os.path.realpath(folder) + os.sep)


def select_checkpoint(root: Path, verify: bool = True) -> Path | None:
    """Collective: the checkpoint to resume from under `root` (= <run_dir>/checkpoints), or None when there is
    none. The one `latest` names if intact (see `damaged_file`), else the newest intact older one, after a
    one-line warning naming the damaged file; a CheckpointError when checkpoints exist and none is intact."""
    root = Path(root)
    try:
        latest = read_latest(root)
    except CheckpointError as e:
        if not verify:
            raise
        log.warning("%s", e)
        latest = None
    older = [p for p in reversed(checkpoint_dirs(root)) if (p / STATE_FILE).is_file()]
    if latest is None and not older:
        return None
    if not verify:
        return latest
    candidates = ([latest] if latest is not None else []) + [p for p in older if latest is None or p.name < latest.name]
    damaged = []
    for cand in candidates:
        bad = damaged_file(cand)
        if bad is None:
            if damaged:
                log.warning("checkpoint %s is damaged (%s): resuming from %s instead", damaged[0][0].name,
                            damaged[0][1], cand.name)
            return cand
        damaged.append((cand, bad))
    if not damaged:
        return None
    raise CheckpointError(f"no intact checkpoint in {root}: {'; '.join(f'{c.name}: {b}' for c, b in damaged)}. "
                          f"Restore the files, or start over with a new train.run_dir (or delete {root})")


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` (never the one `latest` names)."""
    latest = read_latest(root)
    done = checkpoint_dirs(root)
    for old in done[:-keep_last]:
        if latest is None or old.name != latest.name:
            shutil.rmtree(old, ignore_errors=True)


# -- load ---------------------------------------------------------------------------------------------------
def read_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none; an error if `latest` is dangling."""
    f = Path(root) / LATEST
    if not f.is_file():
        return None
    name = f.read_text()[:64].strip()
    path = Path(root) / name
    if not STEP_RE.fullmatch(name) or not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{f} names {name!r}, which is not a complete step_XXXXXXXX folder beside it (no "
                              f"{STATE_FILE}); the checkpoint folder was modified by hand. Point {f} at a complete "
                              "step_* folder or delete it.")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def _refusal(meta: dict[str, Any], world_size: int, path: Path, why: str) -> WorldSizeError:
    n = meta["world_size"]
    return WorldSizeError(
        f"checkpoint {path} was written by {n} ranks, this run has {world_size}, and {why}. Either relaunch with "
        f"{n} ranks (torchrun --nproc_per_node / --nnodes, or the Slurm node and GPU counts), or start a new run "
        f"(a new train.run_dir) from its weights with checkpoint.init_from={path / EXPORT_NAME} "
        f"(fresh optimizer state and data order).")


def check_compatible(meta: dict[str, Any], world_size: int, path: Path, global_batch: int | None = None) -> bool:
    """Whether resuming checkpoint `path` (its trainer_state `meta`) on `world_size` ranks is elastic (another
    world size: True) or plain (False); a WorldSizeError naming the reason and the ways out when it cannot
    resume here. `global_batch`: this run's train.batch_size (default: the checkpoint's)."""
    if meta["world_size"] == world_size:
        return False
    stage = meta.get("zero_stage")
    if stage is None or "micro_batch" not in meta:
        raise _refusal(meta, world_size, path, "it predates elastic resume (no world-size-free state)")
    if stage == 3:
        raise _refusal(meta, world_size, path, "ZeRO-3 partitions the weights themselves (elastic resume covers "
                                               "ZeRO 0-2)")
    if meta.get("data_format") == "wds":
        raise _refusal(meta, world_size, path, "its data position is in webdataset shards, which each rank reads "
                                               "as its own shard list and shuffle buffer (no position on another "
                                               "rank count; MDS shards resume elastically: prepare with --format mds)")
    if stage in (1, 2) and set(meta["engines"]) - set(meta.get("elastic", [])):
        convert = f"torchrun --nproc_per_node {meta['world_size']} -m trainer.checkpoint_tool convert {path}"
        raise _refusal(meta, world_size, path, f"it holds no world-size-free optimizer state; write it: `{convert}`")
    try:
        elastic.batch_split(global_batch or meta["global_batch"], meta["micro_batch"], world_size)
    except ConfigError as e:
        raise _refusal(meta, world_size, path, str(e).split(";")[0]) from None
    return True


def load(path: Path, *, rank: int, world_size: int, engines: dict) -> tuple[dict[str, Any], dict[str, Any],
                                                                          dict[str, dict[str, torch.Tensor]]]:
    """Load checkpoint `path` into `engines` (collective). Returns (meta, this rank's state, EMA states).
    On another world size than wrote it (elastic, see `check_compatible`), the engines load the world-size-free
    state and "this rank's state" is rank 0's (its loader state is the same on every rank for MDS)."""
    t0 = time.perf_counter()
    path = Path(path)
    meta = read_meta(path)
    is_elastic = check_compatible(meta, world_size, path)
    missing = set(engines) - set(meta["engines"])
    if missing:
        raise CheckpointError(f"checkpoint {path} has no state for {sorted(missing)} (it holds {meta['engines']}); "
                              "was it written by another stage?")
    for ename, engine in engines.items():
        if is_elastic and elastic.supported(engine):
            elastic.restore(engine, path, ename)
            continue
        load_path, _ = engine.load_checkpoint(str(path), tag=ename, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / ename}")
    rank_state = torch.load(path / f"rank_{0 if is_elastic else rank:05d}.pt", map_location="cpu",
                            weights_only=True)
    ema = {e: load_file(str(path / f"ema_{e}.safetensors")) for e in meta.get("ema", [])}
    how = f" on {world_size} ranks (written by {meta['world_size']}: elastic)" if is_elastic else ""
    log.info("resumed from %s (step %d)%s in %.2f s", path, meta["step"], how, time.perf_counter() - t0)
    return meta, rank_state, ema
