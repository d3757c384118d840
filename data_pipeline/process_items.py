"""The per-item work of every `prepare_*` CLI: read an item's bytes (bounded), decode, resize and re-encode it
(`data_pipeline.images.preprocess`), on a pool of worker processes that keeps the input's order and never reads it
far ahead (`ordered_map`), so a 150 GB tar stays a stream. `data_pipeline.prepare` writes the results as shards."""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from data_pipeline.images import ImageConfig, SkipImage, preprocess
from data_pipeline.sources import TOO_LARGE, FileTooLarge, Item, read_item_bytes


class WorkerDied(RuntimeError):
    """A worker process ended abruptly (SIGKILL, e.g. from the out-of-memory killer) (exit 1)."""


_CFG: ImageConfig | None = None
_MAX_FILE_BYTES: int | None = None


def _init_worker(cfg: ImageConfig, max_file_bytes: int | None = None) -> None:
    global _CFG, _MAX_FILE_BYTES
    _CFG, _MAX_FILE_BYTES = cfg, max_file_bytes
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def process_item(item: Item, cfg: ImageConfig | None = None,
                 max_file_bytes: int | None = None) -> tuple[dict | None, dict | None]:
    """Item -> (sample dict, None) or (None, skipped entry {"key", "reason", "detail"})."""
    if cfg is None:  # in a worker process
        cfg, max_file_bytes = _CFG, _MAX_FILE_BYTES
    if item.skip is not None:
        return None, {"key": item.key, "reason": item.skip, "detail": item.detail}
    try:
        data = read_item_bytes(item, max_file_bytes)
        jpg, (w, h) = preprocess(data, cfg)
    except SkipImage as e:
        return None, {"key": item.key, "reason": e.reason, "detail": e.detail[:200]}
    except FileTooLarge as e:
        return None, {"key": item.key, "reason": TOO_LARGE, "detail": str(e)[:200]}
    except OSError as e:  # unreadable file
        return None, {"key": item.key, "reason": "unreadable file", "detail": str(e)[:200]}
    sample = {"jpg": jpg, "label": int(item.label), "caption": item.caption, "key": item.key,
              "orig_size": f"{w}x{h}"}
    sample.update(item.extra)
    return sample, None


def _tagged(tag_item: tuple[int, Item]) -> tuple[int, tuple]:
    return tag_item[0], process_item(tag_item[1])


def ordered_map(tagged: Iterable[tuple[int, Item]], cfg: ImageConfig, workers: int,
                 max_file_bytes: int | None = None) -> Iterator[tuple]:
    """(tag, item) -> (tag, process_item(item)), in order, at most workers*16 in flight (the input is
    never read further ahead than that, so a 150 GB tar stays a stream).

    A worker that dies abruptly breaks the pool (concurrent.futures notices a dead process, unlike
    multiprocessing.Pool, which waits forever for its lost task): that raises WorkerDied at once."""
    if workers <= 1:
        for tag, it in tagged:
            yield tag, process_item(it, cfg, max_file_bytes)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg, max_file_bytes))
    pending: collections.deque = collections.deque()

    def take() -> tuple:
        key, fut = pending.popleft()
        try:
            return fut.result()
        except BrokenProcessPool:
            raise WorkerDied(f"a worker process died abruptly (killed by a signal; SIGKILL usually means the "
                             f"out-of-memory killer) with input {key!r} or one shortly before it in flight. "
                             "Finished shards are kept: rerun the same command to resume (with fewer --workers, "
                             "or a lower --max-pixels / --max-file-mb if memory is short)") from None

    try:
        for ti in tagged:
            pending.append((ti[1].key, ex.submit(_tagged, ti)))
            if len(pending) >= workers * 16:
                yield take()
        while pending:
            yield take()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
