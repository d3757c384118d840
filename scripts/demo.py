"""The whole DiVAE system end to end on one CPU box: `make demo` (or `python scripts/demo.py`).

    python scripts/demo.py                 # data -> VQ stage -> diffusion decoder -> evaluation -> report
    python scripts/demo.py --quick         # a shortened schedule (the test suite runs this)
    rm -rf runs/demo                       # start over (make demo-clean)

Steps; each runs the project's own command line as a subprocess and prints it first:
  1. data:    random crops (several scales) of scikit-image's colour photographs written as PNG files, one whole
              photo held out (its crops are the evaluation set), then `python -m data_pipeline.prepare_folder`
              into MDS shards;
  2. vq:      `torchrun --standalone --nproc_per_node 2 -m trainer.train --config configs/demo_vq.yaml`
              (DeepSpeed ZeRO-2, CPU, bf16), which exports <out>/vq/divae.safetensors;
  3. decoder: the same with configs/demo_decoder.yaml: the diffusion UNet on the frozen VQ's z_q (x_0
              prediction: the one departure from the paper's recipe, measured and explained in that file);
  4. eval:    `python -m evaluation.recon_fid` (2 ranks) on the held-out crops: the VQGAN baseline (the VQ's CNN
              decoder) beside DiVAE with DPM-Solver++ (20 steps), then DiVAE with DDPM on the first crops; and
              three floors through the same evaluation code: uniform noise, the training set's mean image, and
              the equal-bits floor (bicubic upsampling of the largest 8-bit thumbnail with no more bits than the
              tokens: what a tokenizer must beat to be worth its bits);
  5. report:  <out>/report.md (figures with their standard errors, the margins over the floors, timings, the
              commands to go further), <out>/samples.png and <out>/summary.json.
The recipe (widths, learning rates, steps) was chosen from measured learning curves: bench/demo_recipe.py and
bench/RESULTS.md ("make demo recipe").
A rerun skips what is done: complete shards are kept, finished training stages are detected (an unfinished one
resumes from its last checkpoint), evaluations of the same checkpoint are reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python scripts/demo.py` puts scripts/ first on the path, not the repository
    sys.path.insert(0, str(ROOT))

from scripts.demo_report import (  # noqa: E402
    FIGURE_KEYS,
    _f,
    _fmt_metrics,
    rel,
    write_report,
    write_samples,
    write_summary,
)

# scikit-image's colour photographs (they ship inside the wheel; no download). The held-out one is the eval set.
TRAIN_PHOTOS = ("chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "stereo_motorcycle")
EVAL_PHOTO = "astronaut"
NOISE_SEED = 1234


@dataclass
class Schedule:
    """What the demo does; `--quick` shrinks it for the test suite."""

    image_size: int = 64
    train_crops_per_photo: int = 400
    eval_crops: int = 160
    vq_steps: int = 1500
    decoder_steps: int = 1200
    batch_size: int = 16  # global images per optimizer step (ranks x micro batch)
    fast_sampler: str = "dpmpp2m"
    fast_steps: int = 20
    ddpm_steps: int = 100  # ancestral sampling on this many evenly respaced timesteps of T = 1000
    ddpm_images: int = 24  # the DDPM evaluation covers the first N eval crops
    eval_batch: int = 32  # per rank
    num_show: int = 8


QUICK = Schedule(train_crops_per_photo=12, eval_crops=16, vq_steps=4, decoder_steps=4, batch_size=4,
                 fast_steps=3, ddpm_steps=4, ddpm_images=4, eval_batch=4, num_show=4)


def say(msg: str) -> None:
    print(msg, flush=True)


def summary(step: str, msg: str) -> None:
    """The one-line summary of a step."""
    say(f"[demo] {step:<8} {msg}")


class Runner:
    """Runs the project's command lines (printed first), each in its own session so that an interrupt or a
    failure takes the whole process tree (torchrun and its ranks) down with it. Records what ran."""

    def __init__(self, nproc: int):
        self.nproc = nproc
        self.commands: list[str] = []
        torchrun = Path(sys.executable).with_name("torchrun")
        self.torchrun = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def distributed(self, module: str, *args: str) -> list[str]:
        if self.nproc == 1:
            return [sys.executable, "-m", module, *args]
        return [*self.torchrun, "--standalone", "--nproc_per_node", str(self.nproc), "-m", module, *args]

    def __call__(self, cmd: list[str]) -> None:
        shown = shlex.join(["python" if c == sys.executable else "torchrun" if c == self.torchrun[0] else c
                            for c in cmd])
        self.commands.append(shown)
        say(f"$ {shown}")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"), PYTHONPATH=_pythonpath())
        proc = subprocess.Popen(cmd, cwd=Path.cwd(), env=env, start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:  # KeyboardInterrupt included: no orphaned ranks
            _kill_group(proc)
            raise
        if code != 0:
            _kill_group(proc)
            raise SystemExit(f"[demo] command failed with exit code {code}: {shown}")


def _pythonpath() -> str:
    old = os.environ.get("PYTHONPATH")
    return str(ROOT) + (os.pathsep + old if old else "")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------------------------------------
# 1. data


def photo(name: str) -> np.ndarray:
    """A colour photograph (H, W, 3) uint8 that ships inside an installed package: a function of
    `skimage.data` (stereo_motorcycle: its left view) or "grace_hopper" (matplotlib)."""
    import skimage.data

    if name == "grace_hopper":
        from matplotlib import cbook

        im = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    else:
        im = getattr(skimage.data, name)()
        if isinstance(im, tuple):  # stereo_motorcycle: (left, right, disparity); the left view only
            im = im[0]
    if im.ndim != 3 or im.shape[2] != 3:
        raise ValueError(f"{name} is not an RGB photo (shape {im.shape})")
    return im


def random_crops(photo: np.ndarray, n: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    """n square crops of random side in [size, min(H, W) / 2] at random places, each resized to size x size
    with an antialiasing filter: several scales of one photo."""
    im = Image.fromarray(photo)
    h, w = photo.shape[:2]
    hi = max(size, min(h, w) // 2)
    out = []
    for _ in range(n):
        s = int(rng.integers(size, hi + 1))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        out.append(im.resize((size, size), Image.Resampling.BICUBIC, box=(x, y, x + s, y + s), reducing_gap=None))
    return out


def write_crops(folder: Path, sched: Schedule, seed: int = 0) -> dict[str, int]:
    """PNG crops into folder/train/<photo>/NNNNN.png and folder/eval/<photo>/; returns the counts."""
    rng = np.random.default_rng(seed)
    counts = {}
    for split, names, n in (("train", TRAIN_PHOTOS, sched.train_crops_per_photo),
                            ("eval", (EVAL_PHOTO,), sched.eval_crops)):
        for name in names:
            d = folder / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(random_crops(photo(name), n, sched.image_size, rng)):
                crop.save(d / f"{i:05d}.png")
        counts[split] = n * len(names)
    return counts


def shards_complete(path: Path, n: int) -> bool:
    m = path / "manifest.json"
    if not m.is_file():
        return False
    manifest = json.loads(m.read_text())
    if not manifest.get("complete"):
        return False
    if manifest.get("num_samples") != n:
        raise SystemExit(f"[demo] {path} holds {manifest.get('num_samples')} images but this schedule makes {n}: "
                         "it was prepared by another schedule (--quick or not). Remove the demo folder "
                         "(make demo-clean) or pass another --out.")
    return True


def step_data(out: Path, sched: Schedule, run: Runner) -> dict:
    data = out / "data"
    n = {"train": sched.train_crops_per_photo * len(TRAIN_PHOTOS), "eval": sched.eval_crops}
    photos = {"train_photos": list(TRAIN_PHOTOS), "eval_photo": EVAL_PHOTO}
    if all(shards_complete(data / s, n[s]) for s in n):
        return {"reused": True, **n, **photos}
    write_crops(data / "photos", sched)
    for split in ("train", "eval"):
        run(run.python("-m", "data_pipeline.prepare_folder", "--source", rel(data / "photos" / split),
                       "--out", rel(data / split), "--size", str(sched.image_size), "--workers", "0"))
        if not shards_complete(data / split, n[split]):
            raise SystemExit(f"[demo] prepare_folder did not complete {data / split}")
    return {"reused": False, **n, **photos}


# ----------------------------------------------------------------------------------------------------------
# 2-3. training


def stage_done(run_dir: Path, steps: int) -> bool:
    """True when the run folder holds a final checkpoint at `steps` and its weights-only export."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file() or not (run_dir / "divae.safetensors").is_file():
        return False
    state = run_dir / "checkpoints" / latest.read_text().strip() / "trainer_state.json"
    return state.is_file() and json.loads(state.read_text())["step"] >= steps


def last_metrics(run_dir: Path) -> dict:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return {}
    lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def train_stage(run: Runner, config: Path, run_dir: Path, steps: int, overrides: list[str]) -> dict:
    """`trainer.train` with config and overrides unless run_dir already holds the final checkpoint at `steps`
    (an unfinished run resumes from its last checkpoint)."""
    reused = stage_done(run_dir, steps)
    if not reused:
        run(run.distributed("trainer.train", "--config", rel(config), f"train.run_dir={rel(run_dir)}",
                            f"train.steps={steps}", *overrides))
        if not stage_done(run_dir, steps):
            raise SystemExit(f"[demo] {config.name} ended without its final checkpoint in {run_dir}")
    return {"reused": reused, "steps": steps, "last": last_metrics(run_dir)}


def step_train(stage: str, out: Path, sched: Schedule, run: Runner) -> dict:
    steps = sched.vq_steps if stage == "vq" else sched.decoder_steps
    args = [f"data.path={rel(out / 'data' / 'train')}", f"train.batch_size={sched.batch_size}"]
    if stage == "decoder":
        args.append(f"decoder.vq_weights={rel(out / 'vq' / 'divae.safetensors')}")
    if sched is QUICK:
        args += QUICK_OVERRIDES
    return train_stage(run, ROOT / "configs" / f"demo_{stage}.yaml", out / stage, steps, args)


QUICK_OVERRIDES = ["checkpoint.every=2", "logging.every=2", "logging.sample_every=0", "ema.decay=0.5"]


# ----------------------------------------------------------------------------------------------------------
# 4. evaluation


def _results(path: Path, ckpt_sha: str) -> list[dict] | None:
    f = path / "results.json"
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    res = res if isinstance(res, list) else [res]
    return res if all(r["protocol"].get("checkpoint_sha256") == ckpt_sha for r in res) else None


def step_eval(out: Path, sched: Schedule, run: Runner) -> dict:
    from divae.utils.files import sha256_file

    ckpt = out / "decoder" / "divae.safetensors"
    ckpt_sha = sha256_file(ckpt)
    ev, refs = out / "eval", out / "eval" / "fid_refs"
    common = ["--checkpoint", rel(ckpt), "--data", rel(out / "data" / "eval"), "--batch-size", str(sched.eval_batch),
              "--num-show", str(sched.num_show), "--ref-stats-dir", rel(refs)]
    reused = True
    fast = _results(ev / "fast", ckpt_sha)
    if fast is None:
        reused = False
        run(run.distributed("evaluation.recon_fid", *common, "--decoder", "both", "--sampler", sched.fast_sampler,
                            "--steps", str(sched.fast_steps), "--out", rel(ev / "fast")))
        fast = _results(ev / "fast", ckpt_sha)
    ddpm = _results(ev / "ddpm", ckpt_sha)
    if ddpm is None:
        reused = False
        run(run.distributed("evaluation.recon_fid", *common, "--decoder", "diffusion", "--sampler", "ddpm",
                            "--steps", str(sched.ddpm_steps), "--num-images", str(sched.ddpm_images),
                            "--out", rel(ev / "ddpm")))
        ddpm = _results(ev / "ddpm", ckpt_sha)
    floors_file = ev / "floors.json"
    if fast is None or ddpm is None:
        raise SystemExit(f"[demo] evaluation.recon_fid wrote no results.json under {ev}")
    floors = json.loads(floors_file.read_text()) if floors_file.is_file() else None
    if floors is None or floors.get("checkpoint_sha256") != ckpt_sha:
        reused = False
        say("$ (in process) evaluation.recon_fid.evaluate_reconstructions with noise, mean-image and equal-bits "
            "thumbnail 'reconstructions'")
        floors = eval_floors(out / "data", refs, sched.eval_batch, tuple(fast[0]["tokens_hw"]),
                             int(fast[0]["protocol"]["codebook_size"]))
        floors["checkpoint_sha256"] = ckpt_sha  # the thumbnail's size follows the tokens of this checkpoint
        floors_file.write_text(json.dumps(floors, indent=2))
    return {"reused": reused, "cnn": fast[0], "fast": fast[1], "ddpm": ddpm[0], "noise": floors["noise"],
            "mean": floors["mean"], "thumbnail": floors["thumbnail"]}


def eval_floors(data: Path, refs_dir: Path, batch_size: int, tokens_hw: tuple[int, int], codebook_size: int,
                floors: tuple[str, ...] = ("noise", "mean", "thumbnail")) -> dict:
    """PSNR/SSIM/LPIPS/FID of three trivial 'reconstructions' through the same evaluation code, as floors:
    uniform noise (seeded), the per-pixel mean of the training images (one image for every input), and the
    equal-bits floor (`evaluation.floors`): bicubic upsampling of the largest 8-bit RGB thumbnail with no more
    bits than the tokens carry. data holds train/ and eval/ shards; refs_dir the originals' cached statistics."""
    from data_pipeline.reader import ShardReader
    from evaluation.floors import equal_bits_side, token_bits
    from evaluation.inception import load_inception
    from evaluation.recon_fid import ReconEvalConfig, evaluate_reconstructions

    train, dataset = ShardReader(str(data / "train")), ShardReader(str(data / "eval"))
    bits = token_bits(tokens_hw, codebook_size)
    side = equal_bits_side(bits)
    fns = _floor_fns(train, side)
    extractor = _memo_features(load_inception(None, "cpu"))
    lpips = _lpips()
    ref = _cached_ref_stats(refs_dir, len(dataset))
    cfg = ReconEvalConfig(batch_size=batch_size, save_every=0, num_show=0)
    res = {}
    for name in floors:
        fn = fns[name]
        r = evaluate_reconstructions(dataset, fn, extractor=extractor, cfg=cfg, lpips=lpips,
                                     ref_stats_path=ref, label=name)
        res[name] = {k: v for k, v in r.items() if k in FIGURE_KEYS}
    if "thumbnail" in res:
        res["thumbnail"].update(side=side, thumbnail_bits=24 * side * side, token_bits=bits)
    return res


def _floor_fns(train, side: int) -> dict:
    """{"noise", "mean", "thumbnail"}: (uint8 images (B, 3, H, W), their indices (B,)) -> the floor's uint8
    'reconstructions' (B, 3, H, W); `train` is the training ShardReader (for the mean image), `side` the
    equal-bits thumbnail's side."""
    import torch

    from evaluation.floors import thumbnail_reconstruction

    mean = np.zeros(train[0]["image"].shape, np.float64)
    for i in range(len(train)):
        mean += train[i]["image"]
    mean_img = torch.from_numpy(np.round(mean / len(train)).astype(np.uint8)).permute(2, 0, 1)

    def noise(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g = [torch.Generator().manual_seed(NOISE_SEED + int(i)) for i in idx]
        return torch.stack([torch.randint(0, 256, images.shape[1:], generator=gi, dtype=torch.uint8) for gi in g])

    def mean_image(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return mean_img.expand_as(images).contiguous()

    def thumbnail(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return thumbnail_reconstruction(images, side)

    return {"noise": noise, "mean": mean_image, "thumbnail": thumbnail}


def _memo_features(inner):
    """`inner` (the Inception feature extractor) with a cache keyed by image bytes: the mean-image floor shows
    one image N times."""
    import torch

    class MemoFeatures(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner, self.cache = inner, {}
            self.weights_sha256 = inner.weights_sha256

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            keys = [hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in images.cpu()]
            todo = [i for i, k in enumerate(keys) if k not in self.cache]
            if todo:
                for i, f in zip(todo, self.inner(images[todo])):
                    self.cache[keys[i]] = f
            return torch.stack([self.cache[k] for k in keys])

    return MemoFeatures(inner)


def _cached_ref_stats(refs_dir: Path, num_images: int) -> Path | None:
    """The originals' statistics that recon_fid cached for all the `num_images` eval crops, or None (then they
    are computed again)."""
    from evaluation.fid import load_stats

    refs = [p for p in sorted(refs_dir.glob("fid_ref_*.npz")) if load_stats(p)[2] == num_images]
    return refs[0] if refs else None


def _lpips():
    """LPIPS distance (B,) of [-1, 1] images, or None (with a note) when its weights are not installed."""
    from divae.lpips import LPIPS

    try:
        model = LPIPS().eval().requires_grad_(False)
    except FileNotFoundError as e:
        say(f"[demo] LPIPS skipped for the floors: {e}")
        return None
    return lambda x, y: model(x, y).reshape(x.shape[0])




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="demo folder (data, runs, evaluation, report)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (the test suite's schedule)")
    p.add_argument("--nproc", type=int, default=2, help="ranks for training and evaluation (torchrun)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SystemExit: the running step's process group goes too
    sched = QUICK if args.quick else Schedule()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(args.nproc)
    timings_file = out / "timings.json"
    old = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    timings: dict[str, dict] = {}
    info: dict[str, dict] = {}
    t_all = time.perf_counter()

    def timed(name: str, fn, *a) -> dict:
        t0 = time.perf_counter()
        res = fn(*a)
        dt = time.perf_counter() - t0
        # a reused step keeps the time it took when it ran
        timings[name] = dict(old[name], reused=True) if res.get("reused") and name in old else \
            {"seconds": dt, "reused": bool(res.get("reused"))}
        timings_file.write_text(json.dumps(timings | {k: v for k, v in old.items() if k not in timings}, indent=2))
        info[name] = res
        return res

    say(f"[demo] DiVAE end to end in {rel(out)} ({'quick' if args.quick else 'full'} schedule, {args.nproc} ranks)")
    r = timed("data", step_data, out, sched, run)
    summary("data", f"{r['train']} training and {r['eval']} held-out {sched.image_size}px crops in MDS shards under "
                    f"{rel(out / 'data')}{' (reused)' if r['reused'] else ''}")
    for stage in ("vq", "decoder"):
        r = timed(stage, step_train, stage, out, sched, run)
        keys = ("l1", "usage", "perplexity") if stage == "vq" else ("loss", "mse")
        summary(stage, f"{r['steps']} steps, {_fmt_metrics(r['last'], keys)} -> "
                       f"{rel(out / stage / 'divae.safetensors')}{' (reused)' if r['reused'] else ''}")
    r = timed("eval", step_eval, out, sched, run)
    summary("eval", "PSNR/LPIPS/FID  " + "  ".join(
        f"{n} {_f(r[k]['psnr'])}/{_f(r[k]['lpips'], 3)}/{_f(r[k]['fid'], 1)}"
        for n, k in (("VQGAN", "cnn"), ("DiVAE", "fast"), ("DDPM", "ddpm"), ("thumbnail", "thumbnail"),
                                     ("noise", "noise"), ("mean", "mean")))
        + (" (reused)" if r["reused"] else ""))
    t0 = time.perf_counter()
    samples = write_samples(out, sched, ["originals", "VQGAN\n(CNN decoder)",
                                         f"DiVAE\n{sched.fast_sampler} {sched.fast_steps}",
                                         f"DiVAE\nDDPM {sched.ddpm_steps}"])
    timings["report"] = {"seconds": time.perf_counter() - t0, "reused": False}
    commands_file = out / "commands.json"
    commands = json.loads(commands_file.read_text()) if commands_file.is_file() else []
    commands += [c for c in run.commands if c not in commands]
    commands_file.write_text(json.dumps(commands, indent=2))
    report = write_report(out, sched, info, timings, commands)
    write_summary(out, info["eval"], timings)
    (out / "schedule.json").write_text(json.dumps(asdict(sched), indent=2))
    summary("report", f"{rel(report)} and {rel(samples)} ({(time.perf_counter() - t_all) / 60:.1f} min this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
