"""Trainer figures on this machine: step time of the tiny presets, checkpoint save/load time and size.

    python bench/trainer_bench.py --data data/tiny64 [--nproc 2] [--steps 20]

Runs the VQ stage (1 process) and then the decoder stage (`--nproc` ranks, ZeRO-2, bf16) from the VQ's
export, with real shards, and prints: median step time and images/s after the first 3 steps, the
"saved checkpoint ... in X s" and "resumed from ... in X s" times the trainer logs, and the size of one
checkpoint folder and of the weights-only export.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def launch(args: list[str], nproc: int) -> str:
    py = sys.executable
    cmd = [py, "-m", "trainer.train", *args] if nproc == 1 else \
        [str(Path(py).with_name("torchrun")), "--nproc_per_node", str(nproc), "-m", "trainer.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    return out.stdout + out.stderr


def report(name: str, run_dir: Path, log: str, batch: int) -> None:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in rows[3:]] or [r["step_time"] for r in rows]
    med = statistics.median(times)
    saves = [float(x) for x in re.findall(r"saved checkpoint \S+ in ([\d.]+) s", log)]
    loads = [float(x) for x in re.findall(r"resumed from \S+ \(step \d+\) in ([\d.]+) s", log)]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    print(f"{name}: step time median {med * 1000:.0f} ms ({batch / med:.1f} images/s, global batch {batch}); "
          f"checkpoint save {statistics.median(saves):.2f} s" + (f", load {loads[0]:.2f} s" if loads else "") +
          f"; checkpoint size {du(run_dir / 'checkpoints' / latest) / 2**20:.1f} MiB; "
          f"export {(run_dir / 'divae.safetensors').stat().st_size / 2**20:.2f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="64x64 shard folder (data_pipeline.prepare_folder --size 64)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"data.path={os.path.abspath(a.data)}", "logging.every=1", "logging.progress=false",
                  "logging.wandb_mode=disabled", "logging.sample_every=0", f"train.steps={a.steps}",
                  f"train.batch_size={a.batch_size}", f"checkpoint.every={a.steps // 2}"]
        vq = Path(tmp) / "vq"
        log = launch(["--config", "configs/vq_tiny.yaml", f"train.run_dir={vq}", "vq_loss.disc_start=0", *common], 1)
        report("vq_tiny (1 process, GAN on)", vq, log, a.batch_size)
        dec = Path(tmp) / "dec"
        args = ["--config", "configs/decoder_tiny.yaml", f"train.run_dir={dec}",
                f"decoder.vq_weights={vq / 'divae.safetensors'}", *common]
        log = launch(args, a.nproc)
        log += launch([*args, f"train.steps={a.steps + 2}"], a.nproc)  # resume: measures the load
        report(f"decoder_tiny ({a.nproc} ranks, ZeRO-2, bf16)", dec, log, a.batch_size)


if __name__ == "__main__":
    main()
