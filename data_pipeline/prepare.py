"""The shared prepare driver: items -> parallel preprocessing -> shards + manifest, resumable.

Input item n goes to chunk n // shard_size and chunk c becomes shard c (its valid images, in input
order). After a shard is renamed into place, `.partial/chunk.NNNNN.json` records it. A rerun with the same
settings reads the input again but only decodes the chunks without a record, so a run killed at any
moment (SIGKILL included) finishes with byte-identical shards. `manifest.json` is written last, then
`.partial/` is removed.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from data_pipeline.images import ImageConfig, SkipImage, preprocess
from data_pipeline.shards import (
    FORMATS,
    MANIFEST,
    STANDARD_COLUMNS,
    finalize,
    write_json_atomic,
    write_shard,
)
from data_pipeline.sources import Item, read_item_bytes

PARTIAL = ".partial"


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
    g.add_argument("--resample", default="bicubic", choices=["bicubic", "lanczos", "bilinear"])
    g.add_argument("--max-pixels", type=int, default=ImageConfig.max_pixels,
                   help="reject images whose header claims more pixels (decompression bombs)")


def image_config(args: argparse.Namespace, min_size: int = 0) -> ImageConfig:
    return ImageConfig(size=args.size, jpeg_quality=args.jpeg_quality, draft=not args.no_draft,
                       resample=args.resample, max_pixels=args.max_pixels, min_size=min_size)


_CFG: ImageConfig | None = None


def _init_worker(cfg: ImageConfig) -> None:
    global _CFG
    _CFG = cfg
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def process_item(item: Item, cfg: ImageConfig | None = None) -> tuple[dict | None, dict | None]:
    """Item -> (sample dict, None) or (None, skipped entry {"key", "reason", "detail"})."""
    cfg = cfg or _CFG
    if item.skip is not None:
        return None, {"key": item.key, "reason": item.skip, "detail": item.detail}
    try:
        data = read_item_bytes(item)
        jpg, (w, h) = preprocess(data, cfg)
    except SkipImage as e:
        return None, {"key": item.key, "reason": e.reason, "detail": e.detail[:200]}
    except OSError as e:  # unreadable file
        return None, {"key": item.key, "reason": "unreadable file", "detail": str(e)[:200]}
    sample = {"jpg": jpg, "label": int(item.label), "caption": item.caption, "key": item.key,
              "orig_size": f"{w}x{h}"}
    sample.update(item.extra)
    return sample, None


def _tagged(tag_item: tuple[int, Item]) -> tuple[int, tuple]:
    return tag_item[0], process_item(tag_item[1])


def _ordered_map(tagged: Iterable[tuple[int, Item]], cfg: ImageConfig, workers: int) -> Iterator[tuple]:
    """(tag, item) -> (tag, process_item(item)), in order, at most workers*16 in flight (the input is
    never read further ahead than that, so a 150 GB tar stays a stream)."""
    if workers <= 1:
        for tag, it in tagged:
            yield tag, process_item(it, cfg)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        pending: collections.deque = collections.deque()
        for ti in tagged:
            pending.append(pool.apply_async(_tagged, (ti,)))
            if len(pending) >= workers * 16:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _settings(fmt, cfg, shard_size, source, columns) -> dict:
    return {"format": fmt, "preprocessing": cfg.describe(), "shard_size": shard_size, "source": source,
            "columns": columns}


def _same(a: dict, b: dict) -> bool:
    return json.loads(json.dumps(a, sort_keys=True)) == json.loads(json.dumps(b, sort_keys=True))


def run_prepare(items: Iterable[Item], out_dir: str, *, fmt: str = "mds", cfg: ImageConfig,
                shard_size: int = 2000, workers: int = 1, source: dict, extra_columns: dict | None = None,
                limit: int | None = None, progress: bool = True, total: int | None = None,
                manifest_extra: dict | None = None) -> dict:
    """Prepare `items` into `out_dir`; resume if a previous run with the same settings left a partial one.

    `source` describes the input (recorded; part of the resume check). `extra_columns` are additional
    {name: MDS encoding} columns filled from `Item.extra`. Returns the manifest dict.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if shard_size < 1:
        raise ValueError("--shard-size must be >= 1")
    columns = {**STANDARD_COLUMNS, **(extra_columns or {})}
    source = dict(source, limit=limit)
    settings = _settings(fmt, cfg, shard_size, source, columns)
    partial = os.path.join(out_dir, PARTIAL)
    mpath = os.path.join(out_dir, MANIFEST)
    if os.path.exists(mpath):
        with open(mpath) as f:
            m = json.load(f)
        if m.get("complete") and _same(m.get("settings", {}), settings):
            print(f"{out_dir}: already complete ({m['num_samples']} samples); nothing to do")
            return m
        raise SystemExit(f"error: {out_dir} already holds a dataset prepared with other settings; "
                         "choose a new --out (or delete that folder)")
    os.makedirs(partial, exist_ok=True)
    cpath = os.path.join(partial, "settings.json")
    if os.path.exists(cpath):
        with open(cpath) as f:
            old = json.load(f)
        if not _same(old, settings):
            raise SystemExit(f"error: {out_dir} holds a partial run with different settings "
                             f"(see {cpath}); rerun with the same arguments, or choose a new --out")
    else:
        write_json_atomic(cpath, settings)
    for tmp in glob.glob(os.path.join(out_dir, ".shard.*.tmp")):
        os.remove(tmp)

    done: dict[int, dict] = {}
    for rec_path in glob.glob(os.path.join(partial, "chunk.*.json")):
        with open(rec_path) as f:
            rec = json.load(f)
        shard = rec["shard"]
        spath = os.path.join(out_dir, shard["basename"])
        if shard["samples"] == 0 or (os.path.isfile(spath) and os.path.getsize(spath) == shard["bytes"]):
            done[rec["chunk"]] = rec

    t0 = time.time()
    stats = {"processed": 0}
    chunk_inputs: dict[int, int] = collections.Counter()

    def todo() -> Iterator[tuple[int, Item]]:
        for n, item in enumerate(items):
            if limit is not None and n >= limit:
                return
            c = n // shard_size
            chunk_inputs[c] += 1
            if c not in done:
                yield c, item

    bar = tqdm(total=total if limit is None or total is None else min(total, limit), unit="img",
               disable=not progress, smoothing=0.1, dynamic_ncols=True)
    if done:
        bar.write(f"resuming: {len(done)} shard(s) already done in {out_dir}")

    def flush(c: int, samples: list[dict], skipped: list[dict]) -> None:
        info = write_shard(out_dir, c, fmt, samples, columns) if samples else \
            {"basename": None, "samples": 0, "bytes": 0, "sha256": None}
        rec = {"chunk": c, "shard": info, "skipped": skipped}
        write_json_atomic(os.path.join(partial, f"chunk.{c:05d}.json"), rec)
        done[c] = rec

    cur, samples, skipped = None, [], []
    for c, (sample, skip) in _ordered_map(todo(), cfg, workers):
        if cur is not None and c != cur:
            flush(cur, samples, skipped)
            samples, skipped = [], []
        cur = c
        (samples.append(sample) if sample is not None else skipped.append(skip))
        stats["processed"] += 1
        bar.update(1)
    if cur is not None:
        flush(cur, samples, skipped)
    bar.close()

    n_chunks = max(chunk_inputs) + 1 if chunk_inputs else 0
    # Chunks whose items were all pre-skipped still pass through _ordered_map, so every chunk has a record.
    missing = [c for c in range(n_chunks) if c not in done]
    if missing:
        raise RuntimeError(f"internal: chunks {missing[:5]} have no record")
    recs = [done[c] for c in range(n_chunks)]
    skipped_all = [s for r in recs for s in r["skipped"]]
    reasons = dict(sorted(collections.Counter(s["reason"] for s in skipped_all).items()))
    written = sum(r["shard"]["samples"] for r in recs)
    inputs = sum(chunk_inputs.values())
    counts = {"inputs": inputs, "written": written, "skipped": len(skipped_all), "skipped_by_reason": reasons}
    shards = [r["shard"] for r in recs]
    m = finalize(out_dir, fmt, columns, shards, source=source, preprocessing=settings["preprocessing"],
                 shard_size=shard_size, counts=counts, skipped=skipped_all, settings=settings,
                 **(manifest_extra or {}))
    for f in glob.glob(os.path.join(partial, "*")):
        os.remove(f)
    os.rmdir(partial)
    dt = time.time() - t0
    nbytes = sum(s["bytes"] for s in m["shards"])
    print(f"done: {out_dir}: {written} written, {len(skipped_all)} skipped {reasons}, "
          f"{len(m['shards'])} shards, {nbytes / 1e6:.1f} MB, {dt:.1f} s "
          f"({stats['processed'] / max(dt, 1e-9):.1f} images/s processed this run)")
    return m
