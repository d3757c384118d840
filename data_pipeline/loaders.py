"""Shards -> training batches for one rank, with exact mid-epoch resume.

    loader = build_loader(DataConfig(path="data/imagenet256/train", batch_size=32), rank, world_size)
    for batch in loader:   # one epoch; iterate again for the next
        batch["image"]     # float32 (B, 3, H, W) in [-1, 1]
        batch["key"], batch["caption"]  # list[str]
        batch["label"], batch["index"]  # LongTensor (B,): class (-1 if none), global sample index
        # plus every extra stored column (e.g. "tokens") as a list of raw values
    ckpt["loader"] = loader.state_dict()   # same on every rank
    loader.load_state_dict(ckpt["loader"])  # in a new process, before iterating

MDS (default): mosaicml-streaming `StreamingDataset` + `StreamingDataLoader`. Each rank gets a disjoint
share; the order is a function of (seed, epoch, num_canonical_nodes), so resume is exact, and it stays
exact when the world size changes as long as the global batch stays divisible (streaming's elastic resume):
the trainer fixes num_canonical_nodes at the start of a run and keeps it (trainer/elastic.py), and any rank's
state_dict() (the same on every rank) resumes every rank of the new world. Several jobs may read on one node at
once, the same folder included: each registers its own streaming shared memory, one job at a time
(`data_pipeline.node_lock`), and no job wipes another's (`clean_stale_shm` is off unless a config asks).

webdataset: shards are shuffled per epoch with the seed and split over ranks, then DataLoader workers;
samples are shuffled in a seeded buffer per worker. Resume replays the saved epoch and skips, before
decoding, the batches each worker already delivered: exact for the same world size and num_workers
(an error otherwise: no elastic resume for webdataset), and within an epoch's first pass over all workers' streams.

Random flips happen in the main process from a hash of (seed, epoch, global sample index), so they are
identical after a resume and independent of ranks and workers.

Damaged shards: opening checks every shard's size against manifest.json (a truncated or replaced shard is
refused at once, naming it); `verify=True` also checks sha256 (each rank hashes its share). A sample that
cannot be read or decoded raises `data_pipeline.integrity.ShardError` naming the shard file and the sample's
key (`bad_samples="error"`, the default: damage after preparation means the storage is failing, and a run
should not silently train on less data), or with `bad_samples="skip"` is dropped from its batch (one sample
fewer) with a warning naming it, counted in `loader.skipped`; the loader position and resume are unchanged.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image

from data_pipeline.images import center_crop_resize
from data_pipeline.integrity import ShardError, check_shards, sample_error
from data_pipeline.node_lock import registration_lock
from data_pipeline.shards import STANDARD_COLUMNS, decode_wds_value, load_manifest
from divae.utils.logging import get_logger

log = get_logger(__name__)
BadSamples = Literal["error", "skip"]
BAD_SAMPLES = get_args(BadSamples)

_SHM_CLEANED = False


@dataclass
class DataConfig:
    """Where the shards are and how to batch them. `batch_size` is per rank."""

    path: str = ""  # a prepared shard folder (with manifest.json)
    extra_paths: list[str] = field(default_factory=list)  # more folders, concatenated after `path`
    format: Literal["mds", "wds"] = "mds"  # must match the folders' manifests
    batch_size: int = 32
    num_workers: int = 2
    shuffle: bool = True
    seed: int = 0
    image_size: int = 256  # shorter side resized + center crop if the shards hold another size
    random_flip: bool = True
    drop_last: bool = True
    decode_images: bool = True  # False: no "image" key (e.g. training the prior on stored tokens)
    prefetch_factor: int = 2
    pin_memory: bool | None = None  # None: on when CUDA is available (page-locked batches, async copies)
    # "float": batch["image"] is (B, 3, H, W) float32 in [-1, 1]; "uint8": (B, H, W, 3) uint8 (flipped already),
    # 4x fewer bytes to pin and copy; `image_to_float` on the device gives bitwise the same float batch
    images_as: Literal["float", "uint8"] = "float"
    # MDS only
    num_canonical_nodes: int | None = None  # None: streaming's default; fix it to resume on another world size
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    # Call streaming's clean_stale_shared_memory() once per process (single process, or after
    # torch.distributed is initialized). It removes ALL streaming shared memory on this machine, a running
    # job's too (a second job on the same node would lose its loaders), so it is off: turn it on only where
    # one job owns the machine and a crashed run left segments behind.
    clean_stale_shm: bool = False
    # webdataset only
    shuffle_buffer: int = 1000
    # Damaged shards (see the module docstring): sizes are always checked when the loader opens.
    verify: bool = False  # also check every shard's sha256 against the manifest when the loader opens
    bad_samples: BadSamples = "error"  # a sample that cannot be read/decoded: "error" (stop, naming it) | "skip"

    def __post_init__(self) -> None:
        if self.images_as not in ("float", "uint8"):
            raise ValueError(f"images_as must be 'float' or 'uint8', got {self.images_as!r}")
        if self.bad_samples not in BAD_SAMPLES:
            raise ValueError(f"bad_samples must be one of {BAD_SAMPLES}, got {self.bad_samples!r}")

    def pin(self) -> bool:
        """Whether the loaders pin their batches (`pin_memory`, or CUDA available when it is None)."""
        return torch.cuda.is_available() if self.pin_memory is None else self.pin_memory

    def paths(self) -> list[str]:
        out = ([self.path] if self.path else []) + list(self.extra_paths)
        if not out:
            raise ValueError("DataConfig.path is empty: point it at a folder made by data_pipeline.prepare_*")
        return out


def _decode(jpg: bytes, size: int) -> np.ndarray:
    im = Image.open(io.BytesIO(jpg))
    if im.size != (size, size):
        im.draft("RGB", (size, size))
        im = center_crop_resize(im.convert("RGB"), size)
    elif im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def _sample(raw: dict, index: int, size: int, decode: bool) -> dict:
    s = {k: v for k, v in raw.items() if k != "jpg"}
    s["index"] = index
    if decode:
        s["image"] = _decode(raw["jpg"], size)
    return s


def _checked_sample(read, index: int, cfg: DataConfig, shard: str) -> dict | None:
    """`_sample` of the raw sample `read()` returns, or, when reading or decoding fails, a ShardError naming
    the shard and the key (bad_samples="error") / None after a warning (bad_samples="skip")."""
    raw = None
    try:
        raw = read()
        return _sample(raw, index, cfg.image_size, cfg.decode_images)
    except Exception as e:  # noqa: BLE001 - any failure on stored bytes is damage: name where it is
        err = sample_error(shard, index, raw.get("key") if isinstance(raw, dict) else None, e)
        if cfg.bad_samples != "skip":
            raise err from e
        log.warning("skipped (data.bad_samples=skip): %s", str(err).split("; run `")[0])
        return None


def _collate(samples: list[dict | None]) -> dict:
    """Runs in the worker: uint8 images stay uint8 (B, H, W, 3) until the main process. Skipped samples
    (None) are dropped; "_read" (first, so that streaming's sample count, and so the resume position, still
    covers them) flags which slots were read."""
    read = [s is not None for s in samples]
    samples = [s for s in samples if s is not None]
    if not samples:
        raise ShardError(f"all {len(read)} samples of a batch are unreadable; run `python -m data_pipeline.verify` "
                         "on the data folder")
    out = {"_read": read, "key": [s["key"] for s in samples]}
    if "image" in samples[0]:
        out["image"] = torch.from_numpy(np.stack([s["image"] for s in samples]))
    out["label"] = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    out["index"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    for k in samples[0]:
        if k not in out:
            out[k] = [s[k] for s in samples]
    return out


def read_batch(reader, indices: list[int], cfg: DataConfig) -> dict:
    """Samples `indices` of `reader` (a `data_pipeline.reader.ShardReader` opened with decode_image=False) as one
    batch in the loaders' form, in that order, without flips: "image" uint8 (B, H, W, 3) at cfg.image_size (when
    cfg.decode_images), "key", "label", "index" and every stored column; cfg.bad_samples applies. For fixed,
    deterministic batches (the trainer's validation set)."""
    batch = _collate([_checked_sample(lambda i=i: reader[i], i, cfg, reader.path) for i in indices])
    batch.pop("_read")
    return batch


def image_to_float(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], contiguous, on x's device."""
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def flip_mask(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """Bool (B,): a splitmix64 hash of (seed, epoch, sample index); about half are True."""
    x = index.numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64((seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xD1B54A32D192ED03) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(63)).astype(bool))


class _Loader:
    """Common main-process part: uint8 (B,H,W,3) -> float (B,3,H,W) in [-1,1], seeded flips, epochs."""

    def __init__(self, cfg: DataConfig, num_samples: int):
        self.cfg = cfg
        self.num_samples = num_samples  # over all ranks
        self._next_epoch = 0
        self.skipped = 0  # samples dropped by bad_samples="skip" in this process's lifetime

    def _finish(self, batch: dict, epoch: int) -> dict:
        read = batch.pop("_read", ())
        self.skipped += len(read) - sum(read)
        if "image" in batch:
            x = batch["image"]  # (B, H, W, 3) uint8
            if self.cfg.random_flip:
                m = flip_mask(self.cfg.seed, epoch, batch["index"])
                x[m] = x[m].flip(2)
            batch["image"] = x if self.cfg.images_as == "uint8" else image_to_float(x)
        return batch


class MDSLoader(_Loader):
    def __init__(self, cfg: DataConfig, dataset, dataloader, num_samples: int):
        super().__init__(cfg, num_samples)
        self.dataset, self.dataloader = dataset, dataloader

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self):
        epoch = self._next_epoch
        self._next_epoch += 1
        with _worker_errors():
            for batch in self.dataloader:
                yield self._finish(batch, epoch)

    def state_dict(self) -> dict:
        return {"format": "mds", "streaming": self.dataloader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != "mds":
            raise ValueError(f"loader state is for format {state.get('format')!r}, this loader is 'mds'")
        self.dataloader.load_state_dict(state["streaming"])
        self._next_epoch = max(int(state["streaming"]["epoch"]), 0)


def _mds_dataset_class():
    from streaming import StreamingDataset

    class DecodedStreamingDataset(StreamingDataset):
        """StreamingDataset whose samples are decoded in the worker (jpg -> uint8 array)."""

        def __init__(self, *, data_cfg: DataConfig, **kwargs):
            super().__init__(**kwargs)
            self.data_cfg = data_cfg

        def get_item(self, sample_id: int, retry: int = 7) -> dict | None:
            shard = self.shards[self.spanner[sample_id][0]]
            path = os.path.join(shard.dirname, shard.split, shard.raw_data.basename)
            return _checked_sample(lambda: super(DecodedStreamingDataset, self).get_item(sample_id, retry),
                                   sample_id, self.data_cfg, path)

        def __iter__(self):
            try:
                yield from super().__iter__()
            finally:  # an epoch left early (an error, the end of training): stop streaming's download threads,
                if getattr(self, "_iterator", None) is not None:  # else a worker process cannot exit (5 s
                    self._iterator.exit()  # join timeout each)

    return DecodedStreamingDataset


def _check_world(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    env_ws = int(os.environ.get("WORLD_SIZE", "1"))
    env_rank = int(os.environ.get("RANK", "0"))
    if (env_ws, env_rank) != (world_size, rank):
        raise ValueError(f"build_loader(rank={rank}, world_size={world_size}) disagrees with the environment "
                         f"(RANK={env_rank}, WORLD_SIZE={env_ws}); launch with torchrun/srun so both agree")


def _manifests(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> list[dict]:
    """The manifests of cfg's folders, after checking every shard's size (and sha256 with cfg.verify: each
    rank hashes every world_size-th shard, so a damaged shard fails the rank that hashed it)."""
    ms = []
    for p in cfg.paths():
        m = load_manifest(p)
        if m["format"] != cfg.format:
            raise ValueError(f"{p} holds {m['format']!r} shards but DataConfig.format is {cfg.format!r}")
        check_shards(p, m, sha256=cfg.verify, hash_only=range(rank, len(m["shards"]), world_size))
        ms.append(m)
    return ms


@contextlib.contextmanager
def _worker_errors():
    """Re-raise a ShardError from a DataLoader worker as a ShardError with the worker's own message (torch
    wraps it in a multi-line text that ends with the original `ShardError: ...` line)."""
    try:
        yield
    except ShardError as e:
        lines = str(e).strip().splitlines()
        heads = ("ShardError: ", f"{ShardError.__module__}.ShardError: ")
        last = next((ln for ln in reversed(lines) if ln.startswith(heads)), None)
        if last is None:
            raise
        raise ShardError(last.split("ShardError: ", 1)[-1]) from None


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1):
    """A loader over this rank's share of the shard folder(s) in `cfg`; see the module docstring."""
    if cfg.format not in ("mds", "wds"):
        raise ValueError(f"DataConfig.format must be 'mds' or 'wds', got {cfg.format!r}")
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise ValueError("batch_size must be >= 1 and num_workers >= 0")
    _check_world(rank, world_size)
    ms = _manifests(cfg, rank, world_size)
    n = sum(m["num_samples"] for m in ms)
    if n == 0:
        raise ValueError(f"dataset {cfg.paths()} is empty (0 samples); check the prepare summary's skipped list")
    if cfg.drop_last and n < cfg.batch_size * world_size:
        raise ValueError(f"{n} samples cannot fill one batch of {cfg.batch_size} per rank on {world_size} "
                         "ranks with drop_last; lower batch_size or set drop_last=False")
    return _build_mds(cfg, n) if cfg.format == "mds" else _build_wds(cfg, ms, rank, world_size, n)


def _build_mds(cfg: DataConfig, n: int) -> MDSLoader:
    global _SHM_CLEANED
    from streaming import Stream, StreamingDataLoader
    from streaming.base.util import clean_stale_shared_memory

    dist_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    if cfg.clean_stale_shm and not _SHM_CLEANED and (dist_ready or int(os.environ.get("WORLD_SIZE", "1")) == 1):
        # Without an initialized process group, streaming would init + destroy one here and again in
        # StreamingDataset(); two such cycles back to back race on the store, so clean only when safe.
        clean_stale_shared_memory()
        _SHM_CLEANED = True
    streams = [Stream(local=os.path.abspath(p)) for p in cfg.paths()]
    with registration_lock():  # two jobs registering at once on one node can share a prefix and hang
        ds = _mds_dataset_class()(
            streams=streams, shuffle=cfg.shuffle, shuffle_seed=cfg.seed, shuffle_algo=cfg.shuffle_algo,
            shuffle_block_size=cfg.shuffle_block_size, num_canonical_nodes=cfg.num_canonical_nodes,
            batch_size=cfg.batch_size, data_cfg=cfg)
    kw = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers > 0 else {}
    dl = StreamingDataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=_collate,
                             drop_last=cfg.drop_last, pin_memory=cfg.pin(), **kw)
    return MDSLoader(cfg, ds, dl, n)


class _EpochNodeSplit:
    """webdataset nodesplitter: the shard list, shuffled with (seed, epoch), then every world_size-th."""

    def __init__(self, rank: int, world_size: int, seed: int, shuffle: bool):
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = 0

    def __call__(self, src):
        urls = list(src)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        yield from urls[self.rank::self.world_size]


class _WdsTail:
    """Per-worker: seeded shuffle buffer, skip already-delivered batches (undecoded), decode, batch."""

    def __init__(self, cfg: DataConfig, columns: dict[str, str], rank: int, offsets: list[int]):
        self.cfg, self.columns, self.rank = cfg, columns, rank
        self.epoch, self.skip_batches = 0, 0
        self.starts = offsets  # global index of each shard's first sample, by url
        self.urls: list[str] = []

    def __call__(self, src):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(hash((self.cfg.seed, self.epoch, self.rank, wid)))
        stream = self._raw(src)
        if self.cfg.shuffle and self.cfg.shuffle_buffer > 1:
            stream = _buffer_shuffle(stream, self.cfg.shuffle_buffer, rng)
        mine = max(0, (self.skip_batches - wid + nw - 1) // nw)  # batches this worker already delivered
        bs, buf, produced = self.cfg.batch_size, [], 0
        for s in stream:
            buf.append(s)
            if len(buf) == bs:
                if produced >= mine:
                    yield self._batch(buf)
                produced += 1
                buf = []
        if buf and not self.cfg.drop_last and produced >= mine:
            yield self._batch(buf)

    def _raw(self, src):
        for s in src:
            pos = int(s["__key__"].rsplit("_", 1)[1])
            url = s["__url__"]
            yield s, self.starts[url] + pos

    def _read(self, s: dict) -> dict:
        return {c: decode_wds_value(s[c], enc) for c, enc in self.columns.items() if c in s}

    def _batch(self, buf):
        return _collate([_checked_sample(lambda s=s: self._read(s), idx, self.cfg, s["__url__"]) for s, idx in buf])


def _buffer_shuffle(stream, size: int, rng: random.Random):
    buf = []
    for s in stream:
        if len(buf) < size:
            buf.append(s)
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        buf[j] = s
    rng.shuffle(buf)
    yield from buf


class WdsLoader(_Loader):
    def __init__(self, cfg, dataset, split, tail, rank, world_size, n):
        super().__init__(cfg, n)
        self.dataset, self.split, self.tail = dataset, split, tail
        self.rank, self.world_size = rank, world_size
        self._resume_batches = 0
        self._batches_done = 0
        self._epoch = -1

    def __iter__(self):
        from torch.utils.data import DataLoader

        epoch = self._next_epoch
        self._next_epoch += 1
        self.split.epoch = self.tail.epoch = self._epoch = epoch
        self.tail.skip_batches = self._resume_batches
        self._batches_done = self._resume_batches
        self._resume_batches = 0
        kw = {"prefetch_factor": self.cfg.prefetch_factor} if self.cfg.num_workers > 0 else {}
        dl = DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.num_workers,
                        pin_memory=self.cfg.pin(), **kw)
        with _worker_errors():
            for batch in dl:
                self._batches_done += 1
                yield self._finish(batch, epoch)

    def __len__(self) -> int:
        per_rank = self.num_samples / self.world_size
        return math.floor(per_rank / self.cfg.batch_size) if self.cfg.drop_last else math.ceil(
            per_rank / self.cfg.batch_size)

    def state_dict(self) -> dict:
        return {"format": "wds", "epoch": self._epoch, "batches": self._batches_done, "seed": self.cfg.seed,
                "world_size": self.world_size, "num_workers": self.cfg.num_workers}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != "wds":
            raise ValueError(f"loader state is for format {state.get('format')!r}, this loader is 'wds'")
        for k, mine in (("world_size", self.world_size), ("num_workers", self.cfg.num_workers),
                        ("seed", self.cfg.seed)):
            if state[k] != mine:
                raise ValueError(f"webdataset resume needs the same {k} (saved {state[k]}, now {mine}); "
                                 "use MDS shards for elastic resume")
        self._next_epoch = max(state["epoch"], 0)
        self._resume_batches = state["batches"] if state["epoch"] >= 0 else 0


def _build_wds(cfg: DataConfig, ms: list[dict], rank: int, world_size: int, n: int) -> WdsLoader:
    import webdataset as wds

    urls, offsets, start = [], {}, 0
    for p, m in zip(cfg.paths(), ms):
        for s in m["shards"]:
            u = os.path.join(os.path.abspath(p), s["basename"])
            urls.append(u)
            offsets[u] = start
            start += s["samples"]
    need = world_size * max(1, cfg.num_workers)
    if len(urls) < need:
        raise ValueError(f"{len(urls)} webdataset shards < ranks x workers = {world_size} x "
                         f"{max(1, cfg.num_workers)}; prepare with a smaller --shard-size, or use fewer workers")
    columns = {**STANDARD_COLUMNS, **ms[0]["columns"]}
    split = _EpochNodeSplit(rank, world_size, cfg.seed, cfg.shuffle)
    tail = _WdsTail(cfg, columns, rank, offsets)
    ds = wds.WebDataset(urls, nodesplitter=split, workersplitter=wds.split_by_worker, shardshuffle=False,
                        empty_check=False).compose(tail)
    return WdsLoader(cfg, ds, split, tail, rank, world_size, n)
