"""The shared prepare driver: items -> parallel preprocessing -> shards + manifest, resumable.

Input item n goes to chunk n // shard_size and chunk c becomes shard c (its valid images, in input
order). After a shard is renamed into place, `.partial/chunk.NNNNN.json` records it. A rerun with the same
settings reads the input again but only decodes the chunks without a record, so a run killed at any
moment (SIGKILL included) finishes with byte-identical shards. `manifest.json` is written last, then
`.partial/` is removed.

Each chunk record also holds the sha256 of its inputs (`sources.item_fingerprint`: keys, labels, captions,
and the bytes, or size and mtime, of every input). If the source changed between the interrupted run and
the rerun (files added, removed or edited), the finished chunks whose inputs differ are redone, so the
result is the one an uninterrupted run on today's source gives. A worker process that dies (SIGKILL from
the out-of-memory killer) ends the run at once with a message; the rerun resumes. One run at a time per
`--out`: a lock (`.lock`, flock) names the holder to a second run.

Keys are unique and UTF-8: names that are not valid UTF-8 are escaped (`sources.escape_name`), and a key
already used by an earlier input gets the suffix `~2`, `~3`, ...; both are listed in the manifest's
`renamed_keys` (with `name_hex`, the original bytes, or `duplicate_of`, the key already taken).

The CLIs run through `cli()` (`divae.utils.cli`): arguments are checked before any work; a usage error prints
one line and exits 2, a runtime error one line and exits 1, and `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm

from data_pipeline.images import RESAMPLES, ImageConfig
from data_pipeline.process_items import ordered_map
from data_pipeline.shards import (
    FORMATS,
    MANIFEST,
    STANDARD_COLUMNS,
    finalize,
    write_json_atomic,
    write_shard,
)
from data_pipeline.sources import (
    DEFAULT_MAX_FILE_MB,
    Item,
    escape_name,
    item_fingerprint,
    max_bytes,
)
from divae.utils.cli import UsageError, run_cli, writable_dir
from divae.utils.files import FolderBusy, folder_lock

PARTIAL = ".partial"


class OutputBusy(FolderBusy):
    """Another run holds the lock on the output folder (exit 1)."""


def add_common_args(p: argparse.ArgumentParser, size: int = 256, shard_size: int = 2000) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (created; rerun with the same one to resume)")
    g.add_argument("--format", choices=FORMATS, default="mds", help="mds (mosaicml-streaming) or wds tars")
    g.add_argument("--shard-size", type=int, default=shard_size, help="input items per shard")
    g.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="worker processes (0 or 1: run in this process)")
    g.add_argument("--limit", type=int, default=None, help="only the first N inputs (quick subsets)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("image")
    g.add_argument("--size", type=int, default=size, help="output side in pixels (shorter side + center crop)")
    g.add_argument("--jpeg-quality", type=int, default=95)
    g.add_argument("--no-draft", action="store_true", help="always decode JPEGs at full size")
    g.add_argument("--resample", default="bicubic", choices=RESAMPLES)
    g.add_argument("--max-pixels", type=int, default=ImageConfig.max_pixels,
                   help="reject images whose header claims more pixels (decompression bombs); may exceed "
                        "PIL's own limit")
    g.add_argument("--max-file-mb", type=float, default=DEFAULT_MAX_FILE_MB,
                   help="skip (and list) files and tar members larger than this, without reading them")
    p.add_argument("--debug", action="store_true", help="print the full traceback on errors")


def _at_least(args: argparse.Namespace, name: str, low: float, high: float | None = None) -> None:
    v = getattr(args, name.lstrip("-").replace("-", "_"))
    if v is None:
        return
    if v < low or (high is not None and v > high):
        want = f"in {low}..{high}" if high is not None else f">= {low}"
        raise UsageError(f"{name} must be {want} (got {v})")


def validate_common(args: argparse.Namespace) -> None:
    """Check the options of `add_common_args` (and --min-size where present); raises UsageError."""
    _at_least(args, "--size", 8)
    _at_least(args, "--jpeg-quality", 1, 100)
    _at_least(args, "--shard-size", 1)
    _at_least(args, "--workers", 0)
    _at_least(args, "--limit", 1)
    _at_least(args, "--max-pixels", 1)
    _at_least(args, "--max-file-mb", 1e-6)
    if hasattr(args, "min_size"):
        _at_least(args, "--min-size", 0)


def check_out(out: str) -> None:
    """Create the output folder and prove it is writable (before any work); raises UsageError."""
    writable_dir(out, "--out")


def check_tar(path: str, flag: str) -> None:
    """Refuse a file that is not a tar archive (plain or compressed) before any work; raises UsageError."""
    try:
        ok = tarfile.is_tarfile(path)
    except OSError as e:
        raise UsageError(f"{flag} {path!r} cannot be read ({e.strerror or e})") from None
    if not ok:
        raise UsageError(f"{flag} {path!r} is not a tar archive")


def image_config(args: argparse.Namespace, min_size: int = 0) -> ImageConfig:
    try:
        return ImageConfig(size=args.size, jpeg_quality=args.jpeg_quality, draft=not args.no_draft,
                           resample=args.resample, max_pixels=args.max_pixels, min_size=min_size)
    except ValueError as e:
        raise UsageError(str(e)) from None


# Errors a prepare run reports in one line with exit status 1 (besides OSError): a dead worker, a busy --out,
# a tar that is damaged or cut short mid-stream. Usage errors (UsageError) exit 2; anything else is a bug and
# keeps its traceback (divae.utils.cli).
RUNTIME_ERRORS = (RuntimeError, tarfile.TarError, EOFError)


def cli(main: Callable[[list[str]], object], prog: str, argv: list[str] | None = None) -> int:
    """Run a prepare CLI's `main(argv)` at the process boundary (`divae.utils.cli.run_cli`): returns the exit
    status (0 done, 1 runtime error, 2 usage error) after printing `<prog>: error: <one line>`; `--debug`
    adds the traceback."""
    def run(args: list[str]) -> int:
        main(args)
        return 0

    return run_cli(run, argv, prog=prog, runtime=RUNTIME_ERRORS)


def out_lock(out_dir: str) -> contextlib.AbstractContextManager[None]:
    """Hold the lock on `out_dir` (`divae.utils.files.folder_lock`); a second run gets OutputBusy naming
    the first (pid, host, start time, command)."""
    return folder_lock(out_dir, lambda holder: f"{out_dir} is being written by another prepare run ({holder}): "
                       "wait for it to finish, or choose another --out", OutputBusy)


class _Keys:
    """Makes every key UTF-8 and unique, in input order (see the module docstring)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.renamed: list[dict] = []

    def assign(self, item: Item) -> Item:
        """Rename `item.key` if needed; a renaming is recorded as {"key": new key, "why", and "name_hex"
        (the original bytes, for a name that is not UTF-8) or "duplicate_of" (the key already used)}."""
        key, name_hex = escape_name(item.key)
        escaped, n = key, 1
        while key in self.seen:
            n += 1
            key = f"{escaped}~{n}"
        self.seen.add(key)
        if key != item.key:
            change: dict = {"key": key}
            if name_hex is not None:
                change["name_hex"] = name_hex
            if key != escaped:
                change["duplicate_of"] = escaped
            change["why"] = "; ".join((["name is not valid UTF-8"] if name_hex else []) +
                                      (["duplicate key"] if key != escaped else []))
            self.renamed.append(change)
            item.key = key
        return item


def _settings(fmt, cfg, shard_size, source, columns, max_file_bytes) -> dict:
    return {"format": fmt, "preprocessing": cfg.describe(), "shard_size": shard_size, "source": source,
            "columns": columns, "max_file_bytes": max_file_bytes}


def _same(a: dict, b: dict) -> bool:
    return json.loads(json.dumps(a, sort_keys=True)) == json.loads(json.dumps(b, sort_keys=True))


def run_prepare(items: Iterable[Item], out_dir: str, *, fmt: str = "mds", cfg: ImageConfig,
                shard_size: int = 2000, workers: int = 1, source: dict, extra_columns: dict | None = None,
                limit: int | None = None, progress: bool = True, total: int | None = None,
                manifest_extra: dict | None = None, max_file_bytes: int | None = max_bytes(DEFAULT_MAX_FILE_MB),
                extra_json: dict[str, object] | None = None) -> dict:
    """Prepare `items` into `out_dir`; resume if a previous run with the same settings left a partial one.

    `source` describes the input (recorded; part of the resume check). `extra_columns` are additional
    {name: MDS encoding} columns filled from `Item.extra`. Files over `max_file_bytes` are skipped unread.
    `extra_json` {file name: object} are written into `out_dir` just before the manifest. Returns the
    manifest dict. Holds `out_lock(out_dir)` throughout.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if shard_size < 1:
        raise UsageError("--shard-size must be >= 1")
    os.makedirs(out_dir, exist_ok=True)
    with out_lock(out_dir):
        return _run_locked(items, out_dir, fmt=fmt, cfg=cfg, shard_size=shard_size, workers=workers,
                           source=source, extra_columns=extra_columns, limit=limit, progress=progress,
                           total=total, manifest_extra=manifest_extra, max_file_bytes=max_file_bytes,
                           extra_json=extra_json)


@dataclasses.dataclass
class _Run:
    """What one locked run writes where, and what it knows of its chunks (chunk c: inputs c * shard_size to
    (c + 1) * shard_size - 1, written as shard c)."""

    out_dir: str
    fmt: str
    columns: dict[str, str]
    done: dict[int, dict]  # chunk -> its record, from an earlier run or this one
    inputs: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # chunk -> inputs read
    fingerprints: dict[int, str] = dataclasses.field(default_factory=dict)  # chunk -> sha256 of its inputs
    keys: _Keys = dataclasses.field(default_factory=_Keys)


def _run_locked(items: Iterable[Item], out_dir: str, *, fmt: str, cfg: ImageConfig, shard_size: int,
                workers: int, source: dict, extra_columns: dict | None, limit: int | None, progress: bool,
                total: int | None, manifest_extra: dict | None, max_file_bytes: int | None,
                extra_json: dict[str, object] | None) -> dict:
    """The body of `run_prepare`, under the lock: check the folder, write the chunks not done yet, then the
    manifest. Returns the manifest dict."""
    columns = {**STANDARD_COLUMNS, **(extra_columns or {})}
    source = dict(source, limit=limit)
    settings = _settings(fmt, cfg, shard_size, source, columns, max_file_bytes)
    m = _complete_manifest(out_dir, settings)
    if m is not None:
        print(f"{out_dir}: already complete ({m['num_samples']} samples); nothing to do")
        return m
    _start_partial(out_dir, settings)
    run = _Run(out_dir, fmt, columns, done=_done_chunks(out_dir))

    t0 = time.time()
    bar = tqdm(total=total if limit is None or total is None else min(total, limit), unit="img",
               disable=not progress, smoothing=0.1, dynamic_ncols=True)
    if run.done:
        bar.write(f"resuming: {len(run.done)} shard(s) already done in {out_dir}")
    todo = _todo(run, items, shard_size, limit, bar.write)
    processed = _write_chunks(run, ordered_map(todo, cfg, workers, max_file_bytes), bar)
    bar.close()

    recs = _records(run)
    skipped = [s for r in recs for s in r["skipped"]]
    counts = _counts(recs, skipped, inputs=sum(run.inputs.values()))
    shards = [r["shard"] for r in recs]
    _remove_stale_shards(out_dir, shards)
    for name, obj in (extra_json or {}).items():
        write_json_atomic(os.path.join(out_dir, name), obj)
    m = finalize(out_dir, fmt, columns, shards, source=source, preprocessing=settings["preprocessing"],
                 shard_size=shard_size, counts=counts, skipped=skipped, renamed_keys=run.keys.renamed,
                 settings=settings, **(manifest_extra or {}))
    _remove_partial(out_dir)
    _print_done(out_dir, m, counts, time.time() - t0, processed, renamed=len(run.keys.renamed))
    return m


def _complete_manifest(out_dir: str, settings: dict) -> dict | None:
    """The manifest of a finished run with the same settings (nothing to do), or None when there is no
    manifest; raises UsageError when `out_dir` holds a dataset prepared with other settings."""
    mpath = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(mpath):
        return None
    with open(mpath) as f:
        m = json.load(f)
    if m.get("complete") and _same(m.get("settings", {}), settings):
        return m
    raise UsageError(f"{out_dir} already holds a dataset prepared with other settings; "
                     "choose a new --out (or delete that folder)")


def _start_partial(out_dir: str, settings: dict) -> None:
    """Record `settings` in `.partial/settings.json`, or check them against the interrupted run's there (raises
    UsageError when they differ: its chunks would not fit this run's); remove the temporary files of shards
    that were being written when that run died."""
    partial = os.path.join(out_dir, PARTIAL)
    os.makedirs(partial, exist_ok=True)
    cpath = os.path.join(partial, "settings.json")
    if os.path.exists(cpath):
        with open(cpath) as f:
            old = json.load(f)
        if not _same(old, settings):
            raise UsageError(f"{out_dir} holds a partial run with different settings "
                             f"(see {cpath}); rerun with the same arguments, or choose a new --out")
    else:
        write_json_atomic(cpath, settings)
    for tmp in glob.glob(os.path.join(out_dir, ".shard.*.tmp")):
        os.remove(tmp)


def _done_chunks(out_dir: str) -> dict[int, dict]:
    """{chunk: record} of the chunks an earlier run finished: a record whose shard is in place with its
    recorded size (or that has no shard: no valid image)."""
    done: dict[int, dict] = {}
    for rec_path in glob.glob(os.path.join(out_dir, PARTIAL, "chunk.*.json")):
        with open(rec_path) as f:
            rec = json.load(f)
        shard = rec["shard"]
        spath = os.path.join(out_dir, shard["basename"]) if shard["basename"] else None
        if shard["samples"] == 0 or (os.path.isfile(spath) and os.path.getsize(spath) == shard["bytes"]):
            done[rec["chunk"]] = rec
    return done


def _todo(run: _Run, items: Iterable[Item], shard_size: int, limit: int | None,
          write: Callable[[str], None]) -> Iterator[tuple[int, Item]]:
    """(chunk, item) for every input of a chunk not done yet, keys assigned and inputs counted. The inputs of
    a done chunk are held until the chunk ends; if their fingerprint differs from its record's (the source
    changed), they are processed after all and the chunk is redone. `write` prints a line (beside the bar)."""
    cur, h, held = None, None, []
    for n, item in enumerate(items):
        if limit is not None and n >= limit:
            break
        c = n // shard_size
        if c != cur:
            if cur is not None:
                yield from ((cur, it) for it in _end_chunk(run, cur, h.hexdigest(), held, write))
            cur, h, held = c, hashlib.sha256(), []
        run.inputs[c] += 1
        item = run.keys.assign(item)
        h.update(item_fingerprint(item))
        if c in run.done:
            held.append(item)
        else:
            yield c, item
    if cur is not None:
        yield from ((cur, it) for it in _end_chunk(run, cur, h.hexdigest(), held, write))


def _end_chunk(run: _Run, c: int, fp: str, held: list[Item], write: Callable[[str], None]) -> list[Item]:
    """Record chunk c's input fingerprint `fp`; returns its held inputs when the chunk must be redone (it was
    done from other inputs), else []."""
    run.fingerprints[c] = fp
    if c in run.done and run.done[c].get("inputs_sha256") != fp:
        write(f"source changed since the interrupted run: the inputs of shard {c} differ from "
              "those it was made from; redoing it")
        del run.done[c]
        return held
    return []


def _write_chunks(run: _Run, results: Iterable[tuple[int, tuple]], bar: tqdm) -> int:
    """Write each chunk's shard and record as soon as its last processed input arrives (`results`: (chunk,
    process_item result), in input order). Returns the number of inputs processed."""
    cur, samples, skipped, processed = None, [], [], 0
    for c, (sample, skip) in results:
        if cur is not None and c != cur:
            _write_chunk(run, cur, samples, skipped)
            samples, skipped = [], []
        cur = c
        (samples.append(sample) if sample is not None else skipped.append(skip))
        processed += 1
        bar.update(1)
    if cur is not None:
        _write_chunk(run, cur, samples, skipped)
    return processed


def _write_chunk(run: _Run, c: int, samples: list[dict], skipped: list[dict]) -> None:
    """Write chunk c's shard (none when it has no valid image), then its record `.partial/chunk.NNNNN.json`
    (after the rename, so a record means the shard is in place)."""
    info = write_shard(run.out_dir, c, run.fmt, samples, run.columns) if samples else \
        {"basename": None, "samples": 0, "bytes": 0, "sha256": None}
    rec = {"chunk": c, "shard": info, "skipped": skipped, "inputs_sha256": run.fingerprints[c]}
    write_json_atomic(os.path.join(run.out_dir, PARTIAL, f"chunk.{c:05d}.json"), rec)
    run.done[c] = rec


def _records(run: _Run) -> list[dict]:
    """The records of chunks 0 .. n - 1, in order."""
    n_chunks = max(run.inputs) + 1 if run.inputs else 0
    # Chunks whose items were all pre-skipped still pass through ordered_map, so every chunk has a record.
    missing = [c for c in range(n_chunks) if c not in run.done]
    if missing:
        raise RuntimeError(f"internal: chunks {missing[:5]} have no record")
    return [run.done[c] for c in range(n_chunks)]


def _counts(recs: list[dict], skipped: list[dict], inputs: int) -> dict:
    """The manifest's `counts`: inputs read, samples written, inputs skipped (in all and by reason)."""
    reasons = dict(sorted(collections.Counter(s["reason"] for s in skipped).items()))
    written = sum(r["shard"]["samples"] for r in recs)
    return {"inputs": inputs, "written": written, "skipped": len(skipped), "skipped_by_reason": reasons}


def _remove_stale_shards(out_dir: str, shards: list[dict]) -> None:
    """Remove the shards not in `shards`: those of an earlier, interrupted run on a source that has since
    shrunk, or redone as empty."""
    keep = {s["basename"] for s in shards if s["basename"]}
    for f in os.listdir(out_dir):
        if f.startswith("shard.") and f not in keep:
            os.remove(os.path.join(out_dir, f))


def _remove_partial(out_dir: str) -> None:
    partial = os.path.join(out_dir, PARTIAL)
    for f in glob.glob(os.path.join(partial, "*")):
        os.remove(f)
    os.rmdir(partial)


def _print_done(out_dir: str, m: dict, counts: dict, dt: float, processed: int, renamed: int) -> None:
    """The run's summary line (`dt` seconds; `processed` inputs decoded by this run), and a note on renamed keys."""
    nbytes = sum(s["bytes"] for s in m["shards"])
    print(f"done: {out_dir}: {counts['written']} written, {counts['skipped']} skipped {counts['skipped_by_reason']}, "
          f"{len(m['shards'])} shards, {nbytes / 1e6:.1f} MB, {dt:.1f} s "
          f"({processed / max(dt, 1e-9):.1f} images/s processed this run)")
    if renamed:
        print(f"note: {renamed} key(s) renamed (not valid UTF-8, or a duplicate); see renamed_keys in "
              f"{MANIFEST}")
