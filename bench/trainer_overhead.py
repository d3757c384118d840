"""The trainer's per-step overhead over a plain torch loop on the same model, data and loss.

    python bench/trainer_overhead.py [--nproc 2] [--repeats 2] [--steps 30] [--batch 8] [--work runs/trainer_overhead]

Both sides train the decoder_tiny UNet on the same 64 px shards (made here from scikit-image's photographs),
conditioned on a randomly initialised tiny VQ's z_q, with the hybrid loss under bf16 autocast, AdamW and gradient
clipping, on `--nproc` ranks (gloo). The trainer side is `trainer.train` (DeepSpeed ZeRO-2 bf16 engine, EMA,
metrics, NaN guard, preemption check); its step time is the wall time between consecutive metrics.jsonl rows
(one every `--window` steps) over the steps between them: everything the trainer does per step. The plain side
is the loop a user would write instead, here: loader -> VQ encode -> loss -> backward (DistributedDataParallel
on several ranks) -> clip -> AdamW step, fp32 weights under autocast. Runs alternate (trainer, plain, trainer,
plain, ...: `--repeats` each); the plain side's step times are averaged over the same windows. `--batch` is per
rank (the trainer's train.batch_size is the global batch). Prints min and median ms/step of each over the windows
after `--skip` warm-up steps per run, and the overhead in percent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def plain_loop(config: Path, shards: Path, vq_file: Path, steps: int, batch: int) -> list[float]:
    """Step times (s) of a plain torch loop on the model, data and loss of the trainer's run (this rank's; under
    torchrun with DistributedDataParallel over the process group, which the caller has initialised)."""
    import torch
    import torch.distributed as dist

    from data_pipeline.loaders import DataConfig, build_loader
    from divae.diffusion import create_diffusion, create_schedule_sampler
    from divae.model import DiVAE
    from divae.unet import UNetModel
    from trainer.config import load_train_config

    cfg = load_train_config(config)
    torch.manual_seed(0)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    vq = DiVAE.from_pretrained(vq_file).vq.eval().requires_grad_(False)
    unet = UNetModel(cfg.unet).train()
    model = torch.nn.parallel.DistributedDataParallel(unet) if world > 1 else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr)
    diffusion = create_diffusion(cfg.diffusion)
    sampler = create_schedule_sampler(cfg.diffusion.schedule_sampler, diffusion.num_timesteps)
    loader = build_loader(DataConfig(path=str(shards), image_size=64, batch_size=batch, num_workers=0), rank, world)
    times, it = [], iter(loader)
    while len(times) < steps:
        t0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        x0 = b["image"].float()
        with torch.no_grad():
            z = vq.embed(vq.encode(x0))
        t, w = sampler.sample(x0.shape[0], torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (diffusion.training_losses(model, x0, t, model_kwargs={"cond": z})["loss"] * w).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ = loss.item()
        times.append(time.perf_counter() - t0)
    return times


def _launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def plain_worker(args: argparse.Namespace) -> None:
    """One rank of the plain side (run by main() under torchrun); rank 0 writes its step times to --out."""
    import torch.distributed as dist

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    times = plain_loop(Path(args.config), Path(args.shards), Path(args.vq), args.steps, args.batch)
    if not distributed or dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(times))
    if distributed:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks on each side")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps of each run left out")
    p.add_argument("--window", type=int, default=5, help="steps per timed window (the trainer's logging.every)")
    p.add_argument("--batch", type=int, default=8, help="per rank")
    p.add_argument("--work", default="runs/trainer_overhead")
    p.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--config", "--shards", "--vq", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_worker:
        return plain_worker(args)
    from gpu_check import make_shards, make_vq

    from trainer.config import load_train_config

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shards = make_shards(work / "data", 64, 64)
    vq_cfg = load_train_config(ROOT / "configs/vq_tiny.yaml").vq
    vq_file = make_vq(work / "vq.safetensors", vq_cfg)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.nproc)))
    trainer, plain = [], []
    for rep in range(args.repeats):
        run_dir = work / f"run{rep}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [*_launcher(args.nproc), "-m", "trainer.train", "--config", "configs/decoder_tiny.yaml",
               f"data.path={shards}", f"decoder.vq_weights={vq_file}", f"train.run_dir={run_dir}",
               f"train.steps={args.steps}", f"train.batch_size={args.batch * args.nproc}",
               f"logging.every={args.window}",
               "logging.sample_every=0", "logging.progress=false", "logging.wandb_mode=disabled",
               "checkpoint.every=0", "checkpoint.export=false", f"unet.cond_channels={vq_cfg.embed_dim}"]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        rows = [r for r in rows if r["step"] >= args.skip]
        trainer += [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(rows, rows[1:])]
        out = work / f"plain{rep}.json"
        subprocess.run([*_launcher(args.nproc), str(Path(__file__).resolve()), "--plain-worker",
                        "--config", str(run_dir / "config.yaml"), "--shards", str(shards), "--vq", str(vq_file),
                        "--steps", str(args.steps), "--batch", str(args.batch), "--out", str(out)],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        times = json.loads(out.read_text())
        starts = range(args.skip, len(times) - args.window + 1, args.window)
        plain += [statistics.fmean(times[i:i + args.window]) for i in starts]
    mt, mp = statistics.median(trainer), statistics.median(plain)
    print(f"decoder_tiny, batch {args.batch} per rank, {args.nproc} rank(s) (gloo), {args.repeats} alternating runs "
          f"of each side, {args.steps} steps per run, windows of {args.window} steps after {args.skip} "
          f"({len(trainer)} / {len(plain)} windows):")
    print(f"  trainer (DeepSpeed ZeRO-2 bf16): median {1000 * mt:.1f} ms/step (min {1000 * min(trainer):.1f})")
    print(f"  plain torch loop ({'DDP, ' if args.nproc > 1 else ''}autocast): median {1000 * mp:.1f} ms/step "
          f"(min {1000 * min(plain):.1f})")
    print(f"  trainer overhead: {100 * (mt / mp - 1):+.1f}% (median), {100 * (min(trainer) / min(plain) - 1):+.1f}% "
          "(min)")


if __name__ == "__main__":
    main()
