"""Text-to-image end to end on one CPU box: `make demo-t2i` (or `python scripts/demo_t2i.py`), after `make demo`.

    python scripts/demo.py && python scripts/demo_t2i.py          # the demo's VQ and DiVAE, then this
    python scripts/demo_t2i.py --quick --vq V --divae D --out O    # a few steps of everything (the test's schedule)

Steps; each runs the project's own command line as a subprocess and prints it first:
  1. data:   rendered 64x64 scenes of two objects with compositional captions ("a red square left of a blue
             circle", or the same scene as "a blue circle right of a red square"), made on the spot (no download);
             training scenes and held-out scenes (other random draws) -> `python -m data_pipeline.prepare_cc --tsv`;
  2. tokens: `python -m trainer.pre_encode` with the demo's VQ (--vq) and `python -m data_pipeline.train_tokenizer`;
  3. prior:  `torchrun --nproc_per_node 2 -m trainer.train --config configs/prior_tiny.yaml` (the prior stage;
             the grid, K and text sizes from the VQ and the tokenizer);
  4. eval:   `python -m evaluation.t2i_fid` (2 ranks) on the held-out captions with the demo's DiVAE (--divae),
             saving the generated images;
  5. match:  how often a generated image shows what its caption says, by pixel analysis (per half of the image:
             the object's colour = the nearest palette colour of its saturated pixels, its shape = square when it
             fills > 88% of its bounding box), against the rate of the same images checked against another
             held-out caption (the random-caption baseline); the detector's own rate on the real held-out scenes;
  6. report: <out>/report.md and <out>/samples.png (caption | held-out scene | generated image).
A rerun skips what is done (complete shards, a finished prior run, an evaluation of the same prior).
"""

from __future__ import annotations

import argparse
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
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 70, 220), "yellow": (235, 200, 40)}
SHAPES = ("square", "circle")
SQUARE_FILL = 0.88  # fraction of its bounding box a detected object fills above which it is a square (circle: 0.785)


@dataclass
class Schedule:
    train_scenes: int = 4000
    heldout_scenes: int = 200
    prior_steps: int = 1500
    batch_size: int = 32  # global captions per optimizer step
    lr: float = 2e-3
    sampler: str = "dpmpp2m"
    steps: int = 10
    guidance_scale: float = 3.0
    top_k: int | None = None
    eval_batch: int = 25  # per rank
    num_show: int = 8


QUICK = Schedule(train_scenes=48, heldout_scenes=8, prior_steps=4, batch_size=8, sampler="ddim", steps=2,
                 eval_batch=2, num_show=4)


def say(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------
# 1. scenes and captions


def scene(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str, tuple]:
    """A light background with two objects, one in each half; returns (image, caption, (left, right)) where left
    and right are (colour, shape). The two colours differ so that a caption names where each colour is."""
    grey = int(rng.integers(185, 225))
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    d = ImageDraw.Draw(img)
    colours = rng.choice(list(PALETTE), size=2, replace=False)
    objs = []
    for half, colour in enumerate(colours):
        shape = SHAPES[int(rng.integers(2))]
        r = int(rng.integers(size // 9, size // 6 + 1))  # half-side: 7..10 px at 64
        cx = int(rng.integers(r + 2, size // 2 - r - 1)) + half * size // 2
        cy = int(rng.integers(r + 2, size - r - 2))
        (d.rectangle if shape == "square" else d.ellipse)((cx - r, cy - r, cx + r, cy + r), fill=PALETTE[colour])
        objs.append((str(colour), shape))
    (c1, s1), (c2, s2) = objs
    caption = f"a {c1} {s1} left of a {c2} {s2}" if rng.random() < 0.5 else f"a {c2} {s2} right of a {c1} {s1}"
    return img, caption, tuple(objs)


def parse_caption(caption: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """"a C1 S1 left of a C2 S2" / "a C2 S2 right of a C1 S1" -> ((C1, S1), (C2, S2)) (left, right)."""
    w = caption.split()
    a, b = (w[1], w[2]), (w[6], w[7])
    return (a, b) if w[3] == "left" else (b, a)


def detect(img: np.ndarray) -> list[tuple[str, str] | None]:
    """(colour, shape) of the object in the left and the right half of a uint8 (H, W, 3) image (None: nothing
    saturated there). Colour: the palette colour nearest to the median of the saturated pixels; shape: square when
    the pixels of that colour fill > SQUARE_FILL of their bounding box."""
    x = img.astype(np.int32)
    sat = (x.max(-1) - x.min(-1)) > 60
    pal = np.array(list(PALETTE.values()))
    names = list(PALETTE)
    w = img.shape[1]
    out = []
    for half in (slice(0, w // 2), slice(w // 2, w)):
        px, m = x[:, half], sat[:, half]
        if m.sum() < 12:
            out.append(None)
            continue
        near = ((px[..., None, :] - pal) ** 2).sum(-1).argmin(-1)  # (H, W/2) palette index per pixel
        k = int(np.bincount(near[m], minlength=len(pal)).argmax())
        mask = m & (near == k)
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        out.append((names[k], "square" if mask.sum() / box > SQUARE_FILL else "circle"))
    return out


def match(img: np.ndarray, caption: str) -> dict[str, bool]:
    """Does the image show its caption: colours in the right halves; colours and shapes."""
    want, got = parse_caption(caption), detect(img)
    colours = all(g is not None and g[0] == w[0] for g, w in zip(got, want))
    return {"colours": colours, "all": colours and all(g[1] == w[1] for g, w in zip(got, want))}


def rates(images: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    ms = [match(i, c) for i, c in zip(images, captions)]
    return {k: sum(m[k] for m in ms) / len(ms) for k in ("colours", "all")}


def write_scenes(folder: Path, n: int, seed: int) -> Path:
    """n scenes as PNG files plus captions.tsv (caption<TAB>file) in `folder`; returns the TSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        img, cap, _ = scene(rng)
        img.save(folder / f"{i:06d}.png")
        lines.append(f"{cap}\t{i:06d}.png")
    tsv = folder / "captions.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv


# ----------------------------------------------------------------------------------------------------------
# The runner


class Runner:
    def __init__(self, nproc: int):
        self.nproc, self.commands = nproc, []

    def __call__(self, module: str, *args: str, distributed: bool = False) -> None:
        if distributed and self.nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(self.nproc), "-m", module, *args]
        else:
            cmd = [sys.executable, "-m", module, *args]
        shown = shlex.join(["python" if c == sys.executable else c for c in cmd])
        self.commands.append(shown)
        say(f"$ {shown}")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   WANDB_MODE=os.environ.get("WANDB_MODE", "disabled"),
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        if code != 0:
            raise SystemExit(f"[demo-t2i] command failed with exit code {code}: {shown}")


def _complete(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _vq_info(path: Path) -> tuple[int, int, int]:
    """(token grid side at 64 px, codebook size K, image size) of a DiVAE file."""
    from safetensors import safe_open

    from divae.utils.config import from_dict
    from divae.vq import VQConfig

    with safe_open(str(path), framework="pt") as f:
        cfg = json.loads((f.metadata() or {})["divae_config"])
    vq = from_dict(VQConfig, cfg["vq"])
    return 64 // vq.downsample_factor, vq.n_embed, 64


# ----------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python scripts/demo_t2i.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo_t2i")
    p.add_argument("--vq", default="runs/demo/vq/divae.safetensors", help="the demo VQ (make demo)")
    p.add_argument("--divae", default="runs/demo/decoder/divae.safetensors", help="the demo DiVAE (make demo)")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (the test suite's schedule)")
    p.add_argument("--nproc", type=int, default=2, help="ranks for the prior training and the evaluation")
    p.add_argument("--prior-steps", type=int, default=None, help="override the schedule's prior steps")
    args = p.parse_args(argv)
    for flag, path in (("--vq", args.vq), ("--divae", args.divae)):
        if not Path(path).is_file():
            raise SystemExit(f"[demo-t2i] {flag} {path} does not exist: run `make demo` (python scripts/demo.py) "
                             f"first, or pass {flag}")
    sched = QUICK if args.quick else Schedule()
    if args.prior_steps:
        sched.prior_steps = args.prior_steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(args.nproc)
    grid, k, size = _vq_info(Path(args.vq))
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. data
    t0 = time.perf_counter()
    data = out / "data"
    for name, n, seed in (("train", sched.train_scenes, 0), ("heldout", sched.heldout_scenes, 1)):
        if not _complete(data / name):
            tsv = write_scenes(data / f"{name}_png", n, seed)
            run("data_pipeline.prepare_cc", "--tsv", str(tsv), "--out", str(data / name), "--size", str(size),
                "--workers", "0", "--shard-size", "1000", "--no-progress")
    timings["data"] = time.perf_counter() - t0
    say(f"[demo-t2i] data    {sched.train_scenes} training and {sched.heldout_scenes} held-out captioned scenes")

    # 2. tokens and tokenizer
    t0 = time.perf_counter()
    tok_dir = data / "train_tok"
    if not _complete(tok_dir):
        run("trainer.pre_encode", "--vq", args.vq, "--src", str(data / "train"), "--dst", str(tok_dir),
            "--batch-size", "64", "--workers", "0", "--precision", "fp32")
    if not (tok_dir / "tokenizer.json").is_file():
        run("data_pipeline.train_tokenizer", "--shards", str(tok_dir), "--vocab-size", "320", "--min-frequency",
            "1", "--max-length", "16")
    timings["tokens"] = time.perf_counter() - t0

    # 3. prior
    t0 = time.perf_counter()
    prior_dir = out / "prior"
    prior_file = prior_dir / "prior.safetensors"
    if not (prior_file.is_file() and (prior_dir / "checkpoints" / f"step_{sched.prior_steps:08d}").is_dir()):
        run("trainer.train", "--config", str(ROOT / "configs" / "prior_tiny.yaml"), f"train.run_dir={prior_dir}",
            f"data.path={tok_dir}", f"train.steps={sched.prior_steps}", f"train.batch_size={sched.batch_size}",
            f"prior.image_vocab_size={k}", f"prior.image_h={grid}", f"prior.image_w={grid}",
            "prior.text_vocab_size=320", "prior.text_len=16", "prior_task.divae_weights=", f"optim.lr={sched.lr}",
            f"optim.warmup_steps={min(50, sched.prior_steps)}", f"checkpoint.every={sched.prior_steps}",
            "checkpoint.keep_last=1", f"logging.every={max(1, sched.prior_steps // 20)}", "logging.sample_every=0",
            "logging.progress=false", "logging.wandb_mode=disabled", "ema.decay=0.99", distributed=True)
    timings["prior"] = time.perf_counter() - t0

    # 4. text-to-image FID of the held-out captions
    t0 = time.perf_counter()
    ev, images = out / "t2i_eval", out / "t2i_eval" / "images"
    if not (ev / "results.json").is_file() or \
            json.loads((ev / "results.json").read_text())["protocol"]["prior_sha256"] != _sha(prior_file):
        run("evaluation.t2i_fid", "--prior", str(prior_file), "--divae", args.divae, "--data", str(data / "heldout"),
            "--out", str(ev), "--num-captions", str(sched.heldout_scenes), "--sampler", sched.sampler, "--steps",
            str(sched.steps), "--guidance-scale", str(sched.guidance_scale), "--batch-size", str(sched.eval_batch),
            "--num-show", str(sched.num_show), "--save-images", str(images), "--ref-stats-dir", str(ev / "ref"),
            *(["--top-k", str(sched.top_k)] if sched.top_k else []), distributed=True)
    res = json.loads((ev / "results.json").read_text())
    timings["eval"] = time.perf_counter() - t0

    # 5. caption match
    caps = [c["caption"] for c in json.loads((ev / "captions.json").read_text())]
    gen = [np.asarray(Image.open(images / f"{j:05d}.png").convert("RGB")) for j in range(len(caps))]
    from data_pipeline.reader import ShardReader

    real = ShardReader(str(data / "heldout"))
    real_imgs = [real[i]["image"] for i in res["draw"]["indices"]]
    order = np.random.default_rng(7).permutation(len(caps))  # image order[i] is checked against caption order[i+1]
    other = [""] * len(caps)
    for i, j in enumerate(order):
        other[j] = caps[order[(i + 1) % len(caps)]]
    figures = {"fid": res["fid"], "num_captions": len(caps), "generated": rates(gen, caps),
               "random_caption_baseline": rates(gen, other), "detector_on_real_scenes": rates(real_imgs, caps),
               "prior_steps": sched.prior_steps, "grid": grid, "codebook_size": k,
               "sampler": f"{sched.sampler} {sched.steps}", "guidance_scale": sched.guidance_scale}
    timings["total"] = time.perf_counter() - t_all
    figures["timings_s"] = {k_: round(v, 1) for k_, v in timings.items()}
    figures["schedule"] = asdict(sched)
    (out / "results.json").write_text(json.dumps(figures, indent=1))
    write_report(out, figures, run.commands)
    if (ev / "samples.png").is_file():
        (out / "samples.png").write_bytes((ev / "samples.png").read_bytes())
    g, b, d = figures["generated"], figures["random_caption_baseline"], figures["detector_on_real_scenes"]
    say(f"[demo-t2i] FID {res['fid']:.1f} on {len(caps)} held-out captions; caption match (colours in place / "
        f"colours+shapes): generated {g['colours']:.0%} / {g['all']:.0%}, random-caption baseline "
        f"{b['colours']:.0%} / {b['all']:.0%}, detector on the real scenes {d['colours']:.0%} / {d['all']:.0%}; "
        f"{timings['total'] / 60:.1f} min; report {out / 'report.md'}")
    return figures


def _sha(path: Path) -> str:
    from evaluation.inception import sha256_file

    return sha256_file(path)


def write_report(out: Path, f: dict, commands: list[str]) -> None:
    g, b, d, t = f["generated"], f["random_caption_baseline"], f["detector_on_real_scenes"], f["timings_s"]
    lines = [
        "# Text-to-image demo", "",
        f"Prior ({f['prior_steps']} steps, {f['grid']}x{f['grid']} tokens of the demo VQ, K={f['codebook_size']}) -> "
        f"demo DiVAE ({f['sampler']}), guidance {f['guidance_scale']}, on {f['num_captions']} held-out captions.", "",
        "| | colours in place | colours and shapes |", "|---|---|---|",
        f"| generated images vs their captions | {g['colours']:.1%} | {g['all']:.1%} |",
        f"| generated images vs a random held-out caption | {b['colours']:.1%} | {b['all']:.1%} |",
        f"| real held-out scenes vs their captions (the detector) | {d['colours']:.1%} | {d['all']:.1%} |", "",
        f"Text-to-image FID (held-out scenes as the reference, {f['num_captions']} images): {f['fid']:.2f}", "",
        "Time (s): " + ", ".join(f"{k} {v}" for k, v in t.items()), "", "Commands:", "",
        *[f"    {c}" for c in commands], ""]
    (out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
    sys.exit(0)
