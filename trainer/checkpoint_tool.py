"""`python -m trainer.checkpoint_tool inspect|convert`: what a checkpoint holds, and its world-size-free form.

    python -m trainer.checkpoint_tool inspect runs/decoder_f16                       # the checkpoint `latest` names
    python -m trainer.checkpoint_tool inspect runs/x/checkpoints/step_00001000 --config configs/x.yaml [k=v ...]
    torchrun --nproc_per_node N -m trainer.checkpoint_tool convert runs/x/checkpoints/step_00001000

`inspect` prints the step, samples seen, world size, ZeRO stage, batch split, data position, the files and
their sizes, the engines' parameter counts and optimizer steps, which rank counts it can resume on (and why
not others), and with --config the settings that differ between the checkpoint's config and that YAML.
`convert` adds the world-size-free optimizer state (trainer/elastic.py) to a checkpoint written without it:
it rebuilds the engines from the checkpoint's own config on the N ranks that wrote it, loads it and writes
`elastic_<engine>.safetensors` and an updated manifest. Reads only JSON, YAML and safetensors in `inspect`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from divae.utils.cli import report
from divae.utils.config import ConfigError, to_dict
from divae.weights_file import WeightsFileError
from trainer import checkpoint as ckpt
from trainer import elastic

DERIVED = {"data.batch_size", "data.num_canonical_nodes", "train.grad_accum"}  # set by the trainer on resume


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, a checkpoints folder (their `latest`) or a step_* folder."""
    p = Path(path)
    for cand in (p, p / "checkpoints"):
        if (cand / ckpt.STATE_FILE).is_file():
            return cand
        if (cand / ckpt.LATEST).is_file():
            latest = ckpt.read_latest(cand)
            if latest is not None:
                return latest
    raise ConfigError(f"{path} is not a checkpoint (no {ckpt.STATE_FILE}), a checkpoints folder or a run folder "
                      "with checkpoints/latest")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_diff(saved_yaml: str, config: str, overrides: list[str]) -> list[str]:
    """`key: checkpoint value -> config value` for each setting (of the sections the checkpoint saved) that
    differs; the values the trainer derives on resume are left out."""
    from trainer.config import load_train_config, saved_config_dict

    saved = saved_config_dict(saved_yaml)
    cfg = to_dict(load_train_config(config, overrides))
    mine, theirs = _flat(saved), _flat({k: v for k, v in cfg.items() if k in saved})
    diff = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, list) or isinstance(b, list):
            a, b = list(a or []), list(b or [])
        if a != b and key not in DERIVED:
            diff.append(f"{key}: {mine.get(key)!r} -> {theirs.get(key)!r}")
    return diff


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def _resumes_on(meta: dict[str, Any], path: Path) -> str:
    n = meta["world_size"]
    try:
        ckpt.check_compatible(meta, n + 1 if n > 1 else 2, path)
    except ckpt.WorldSizeError as e:
        why = str(e).split(", and ", 1)[-1].split(". Either")[0]
        if "cannot be split" not in why:
            return f"{n} ranks only ({why})"
    return f"{n} ranks as written, or elastically {_rank_counts(meta['global_batch'])}"


def _rank_counts(gb: Any) -> str:
    """The rank counts that divide the global batch `gb` (read from trainer_state.json, so bounded whatever it
    says: 1e10 used to be a loop until killed)."""
    if type(gb) is not int or not 1 <= gb <= elastic.MAX_GLOBAL_BATCH:
        return f"no other rank count (the global batch {gb!r} in {ckpt.STATE_FILE} is not a plausible batch size)"
    more = f" (counts above {elastic.MAX_LISTED_RANKS} not listed)" if gb > elastic.MAX_LISTED_RANKS else ""
    return f"any rank count dividing the global batch {gb}: {', '.join(map(str, elastic.rank_counts(gb)))}{more}"


def inspect(path: str | Path, config: str | None = None, overrides: list[str] | None = None) -> str:
    folder = resolve(path)
    meta = ckpt.read_meta(folder)
    lines = [f"checkpoint      {folder}",
             f"step            {meta['step']}   samples seen {meta.get('samples_seen')}   stage {meta.get('stage')}",
             f"world size      {meta['world_size']}   ZeRO stage {meta.get('zero_stage')}"]
    if "micro_batch" in meta:
        lines.append(f"batch           global {meta['global_batch']} = micro {meta['micro_batch']} x grad_accum "
                     f"{meta['grad_accum']} x {meta['world_size']} ranks")
        lines.append(f"data            {meta.get('data_format')}, num_canonical_nodes "
                     f"{meta.get('num_canonical_nodes')}")
    try:
        rank0 = __import__("torch").load(folder / "rank_00000.pt", map_location="cpu", weights_only=True)
        lines.append(f"data position   {rank0.get('loader')}")
    except (OSError, RuntimeError):
        pass
    lines.append(f"resumes on      {_resumes_on(meta, folder)}")
    for e in meta.get("engines", []):
        ef = elastic.elastic_file(folder, e)
        files = [p for p in (folder / e).rglob("*") if p.is_file()]
        text = f"engine {e:<9} DeepSpeed files {_size(sum(p.stat().st_size for p in files))} ({len(files)})"
        text += f", optimizer steps {meta.get('optimizer_steps', {}).get(e)}"
        if ef.is_file():
            from safetensors import safe_open

            info = elastic.read_info(ef)  # first: a foreign or damaged file is one line (divae.weights_file)
            with safe_open(str(ef), "pt") as f:
                numel = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("fp32."))
            text += (f", world-size-free {ef.name} {_size(ef.stat().st_size)}: {numel:,} parameters, AdamW step "
                     f"{info['optimizer_step']:g}, lr {info['lr'][0]:.3g}")
        lines.append(text)
    for e in meta.get("ema", []):
        lines.append(f"EMA {e:<12} {meta.get('ema_updates', {}).get(e)} updates")
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    manifest = "yes" if (folder / ckpt.MANIFEST).is_file() else "no"
    lines.append(f"files           {_size(total)} in all; manifest {manifest}")
    if config:
        diff = config_diff((folder / "config.yaml").read_text(), config, overrides or [])
        lines.append(f"config diff     checkpoint -> {config}{' ' + ' '.join(overrides) if overrides else ''}: "
                     f"{len(diff) or 'none'}")
        lines += [f"  {d}" for d in diff]
    return "\n".join(lines)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def convert(path: str | Path) -> Path:
    """Collective (torchrun with the ranks that wrote the checkpoint): add the world-size-free optimizer state."""
    from runtime.collectives import barrier
    from runtime.launch import init_distributed
    from trainer.config import load_saved_config
    from trainer.engine import build_engine
    from trainer.tasks import TASKS

    folder = resolve(path)
    meta = ckpt.read_meta(folder)
    dist = init_distributed()
    if dist.world_size != meta["world_size"]:
        raise ConfigError(f"{folder} was written by {meta['world_size']} ranks: run convert with "
                          f"torchrun --nproc_per_node {meta['world_size']} (this has {dist.world_size})")
    cfg = load_saved_config(folder / "config.yaml")
    micro = cfg.data.batch_size or cfg.per_rank_batch(dist.world_size)
    task = TASKS[cfg.train.stage](replace(cfg, data=replace(cfg.data, batch_size=micro)), dist.device)
    models = task.build_models()
    engines = {n: build_engine(models[n], cfg.deepspeed, cfg.optim, micro_batch=micro,
                               grad_accum=cfg.train.grad_accum, world_size=dist.world_size,
                               grad_clip=cfg.train.grad_clip, total_steps=cfg.train.steps) for n in task.phases}
    for name, engine in engines.items():
        if engine.load_checkpoint(str(folder), tag=name)[0] is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load {folder / name}")
    written = ckpt.write_elastic(folder, engines, dist.rank)
    if dist.rank == 0:
        meta.update(elastic=written, micro_batch=micro, grad_accum=cfg.train.grad_accum,
                    grad_accum_config=cfg.train.grad_accum, global_batch=cfg.train.batch_size,
                    data_format=cfg.data.format)
        (folder / ckpt.STATE_FILE).write_text(json.dumps(meta, indent=1))
    barrier()
    ckpt.write_manifest(folder, dist.rank)  # the new file and trainer_state.json
    barrier()
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.checkpoint_tool", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="print what a checkpoint holds")
    i.add_argument("path", help="run folder, checkpoints folder or step_* folder")
    i.add_argument("--config", help="YAML to diff the checkpoint's config against")
    i.add_argument("overrides", nargs="*", help="dotted overrides applied to --config")
    c = sub.add_parser("convert", help="add the world-size-free optimizer state (under torchrun, N ranks)")
    c.add_argument("path")
    p.add_argument("--debug", action="store_true")
    args, extra = p.parse_known_args(argv)  # key=value after --config X land in `extra`
    bad = [e for e in extra if args.cmd != "inspect" or e.startswith("-") or "=" not in e]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    overrides = [*getattr(args, "overrides", []), *extra]
    try:
        if args.cmd == "inspect":
            print(inspect(args.path, args.config, overrides))
        else:
            folder = convert(args.path)
            from runtime.collectives import rank_and_world

            if rank_and_world()[0] == 0:
                print(f"wrote the world-size-free state into {folder}")
    except Exception as e:  # noqa: BLE001 - the CLI boundary
        return report(e, "trainer.checkpoint_tool", debug=args.debug,
                      runtime=(ckpt.CheckpointError, WeightsFileError))
    return 0


if __name__ == "__main__":
    sys.exit(main())
