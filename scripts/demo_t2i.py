"""Text-to-image end to end on one CPU box: `make demo-t2i` (or `python scripts/demo_t2i.py`), after `make demo`.

    python scripts/demo.py && python scripts/demo_t2i.py          # the demo's VQ and DiVAE, then this
    python scripts/demo_t2i.py --quick --vq V --divae D --out O    # a few steps of everything (the test's schedule)

Steps; each runs the project's own command line as a subprocess and prints it first:
  1. data:   rendered 64x64 scenes of two objects with compositional captions ("a red square left of a blue
             circle", or the same scene as "a blue circle right of a red square"), made on the spot (no download);
             training scenes and held-out scenes (other random draws) -> `python -m data_pipeline.prepare_cc --tsv`;
  2. tokens: `python -m trainer.pre_encode` (2 ranks) with the demo's VQ (--vq), `data_pipeline.train_tokenizer`;
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
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

if TYPE_CHECKING:
    from data_pipeline.reader import ShardReader

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
    prior_steps: int = 600
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
    there). Object pixels: those more than 40 levels from the background (the image's median colour) in some
    channel; per half the largest connected blob of them is the object. Colour: the palette colour nearest to its
    median; shape: square when it fills > SQUARE_FILL of its bounding box."""
    x = img.astype(np.int32)
    bg = np.median(x.reshape(-1, 3), axis=0)
    obj = np.abs(x - bg).max(-1) > 40
    pal = np.array(list(PALETTE.values()))
    names = list(PALETTE)
    w = img.shape[1]
    out = []
    for half in (slice(0, w // 2), slice(w // 2, w)):
        m = obj[:, half]
        if m.sum() < 12:
            out.append(None)
            continue
        labels, n = ndimage.label(m)
        m = labels == 1 + int(np.argmax(ndimage.sum(m, labels, range(1, n + 1))))  # the largest blob
        colour = np.median(x[:, half][m], axis=0)
        k = int(((pal - colour) ** 2).sum(-1).argmin())
        ys, xs = np.nonzero(m)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        out.append((names[k], "square" if m.sum() / box > SQUARE_FILL else "circle"))
    return out


KINDS = ("shapes", "colours", "all")


def match(img: np.ndarray, caption: str) -> dict[str, bool]:
    """Does the image show its caption: the named shapes in their halves; the colours; both."""
    want, got = parse_caption(caption), detect(img)
    shapes = all(g is not None and g[1] == w[1] for g, w in zip(got, want))
    colours = all(g is not None and g[0] == w[0] for g, w in zip(got, want))
    return {"shapes": shapes, "colours": colours, "all": shapes and colours}


def rates(images: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    ms = [match(i, c) for i, c in zip(images, captions)]
    return {k: sum(m[k] for m in ms) / len(ms) for k in KINDS}


def reconstructions(divae: str, images: list[np.ndarray], decoder: str, sampler: str,
                    steps: int) -> list[np.ndarray]:
    """The DiVAE's reconstructions (encode -> tokens -> `decoder`; image i's noise seeded with i) of uint8 images:
    what the best possible prior, one that predicts each scene's own tokens, would give."""
    import torch

    from divae.model import DiVAE

    model = DiVAE.from_pretrained(divae).eval()
    out = []
    for s in range(0, len(images), 16):
        x = torch.from_numpy(np.stack(images[s:s + 16])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            y = model.decode_tokens(model.encode(x), sampler=sampler, steps=steps, seeds=list(range(s, s + len(x))),
                                    decoder=decoder)
        out += list(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return out


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
    args = _parse_args(argv)
    sched = QUICK if args.quick else Schedule()
    if args.prior_steps:
        sched.prior_steps = args.prior_steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(args.nproc)
    grid, k, size = _vq_info(Path(args.vq))
    # seconds of each step when it ran (a rerun that reuses a step keeps the time it took)
    timings: dict[str, float] = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() \
        else {}
    data = out / "data"

    with _timed(run, timings, "data"):
        _make_data(run, data, sched, size)
    say(f"[demo-t2i] data    {sched.train_scenes} training and {sched.heldout_scenes} held-out captioned scenes")
    with _timed(run, timings, "tokens"):
        tok_dir = _make_tokens(run, args.vq, data)
    with _timed(run, timings, "prior"):
        prior_file = _train_prior(run, out / "prior", tok_dir, sched, grid, k)

    # 4. text-to-image FID of the held-out captions: DiVAE's diffusion decoder, and the VQ's CNN decoder (VQGAN)
    from data_pipeline.reader import ShardReader

    real = ShardReader(str(data / "heldout"))
    prior_sha = _sha(prior_file)
    evals = {}
    for dec in ("diffusion", "cnn"):
        with _timed(run, timings, f"eval_{dec}"):
            evals[dec] = _evaluate(run, out, dec, prior_file, prior_sha, args.divae, sched)

    figures = _caption_match(evals, real, args.divae, sched, grid, k)
    _write_results(out, figures, timings, sched, run.commands, evals["diffusion"][0])
    _print_summary(out, figures, timings)
    return figures


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; exits with a message when the demo's VQ or DiVAE file is missing."""
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
    return args


@contextlib.contextmanager
def _timed(run: Runner, timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the seconds of the step in the block as timings[name] when it ran a command (a step that reuses
    an earlier run's output keeps the time it took then)."""
    t0, n_cmds = time.perf_counter(), len(run.commands)
    yield
    if n_cmds < len(run.commands):
        timings[name] = time.perf_counter() - t0


def _make_data(run: Runner, data: Path, sched: Schedule, size: int) -> None:
    """1. The training and held-out scenes as shards in data/train and data/heldout."""
    for name, n, seed in (("train", sched.train_scenes, 0), ("heldout", sched.heldout_scenes, 1)):
        if not _complete(data / name):
            tsv = write_scenes(data / f"{name}_png", n, seed)
            run("data_pipeline.prepare_cc", "--tsv", str(tsv), "--out", str(data / name), "--size", str(size),
                "--workers", "0", "--shard-size", "500", "--no-progress")


def _make_tokens(run: Runner, vq: str, data: Path) -> Path:
    """2. The training shards with the VQ's tokens, and the caption tokenizer beside them; returns that folder."""
    tok_dir = data / "train_tok"
    if not _complete(tok_dir):
        run("trainer.pre_encode", "--vq", vq, "--src", str(data / "train"), "--dst", str(tok_dir),
            "--batch-size", "64", "--workers", "0", "--precision", "fp32", distributed=True)
    if not (tok_dir / "tokenizer.json").is_file():
        run("data_pipeline.train_tokenizer", "--shards", str(tok_dir), "--vocab-size", "320", "--min-frequency",
            "1", "--max-length", "16")
    return tok_dir


def _train_prior(run: Runner, prior_dir: Path, tok_dir: Path, sched: Schedule, grid: int, k: int) -> Path:
    """3. The prior (grid x grid tokens of K = k codes), unless a run of the same steps finished; returns its
    weights file."""
    prior_file = prior_dir / "prior.safetensors"
    if not (prior_file.is_file() and (prior_dir / "checkpoints" / f"step_{sched.prior_steps:08d}").is_dir()):
        run("trainer.train", "--config", str(ROOT / "configs" / "prior_tiny.yaml"), f"train.run_dir={prior_dir}",
            f"data.path={tok_dir}", f"train.steps={sched.prior_steps}", f"train.batch_size={sched.batch_size}",
            f"prior.image_vocab_size={k}", f"prior.image_h={grid}", f"prior.image_w={grid}",
            "prior.text_vocab_size=320", "prior.text_len=16", "prior_task.divae_weights=", f"optim.lr={sched.lr}",
            f"optim.warmup_steps={min(50, sched.prior_steps)}", f"checkpoint.every={sched.prior_steps}",
            "checkpoint.keep_last=1", f"logging.every={max(1, sched.prior_steps // 20)}", "logging.sample_every=0",
            "logging.progress=false", "logging.wandb_mode=disabled", "ema.decay=0.99", distributed=True)
    return prior_file


def _evaluate(run: Runner, out: Path, dec: str, prior_file: Path, prior_sha: str, divae: str,
              sched: Schedule) -> tuple[Path, dict]:
    """4. Text-to-image FID of the held-out captions through decoder `dec`, unless an evaluation of the same
    prior is there; returns (its folder, its results)."""
    data = out / "data"
    ev = out / ("t2i_eval" if dec == "diffusion" else "t2i_eval_cnn")
    if not (ev / "results.json").is_file() or \
            json.loads((ev / "results.json").read_text())["protocol"]["prior_sha256"] != prior_sha:
        run("evaluation.t2i_fid", "--prior", str(prior_file), "--divae", divae, "--data",
            str(data / "heldout"), "--out", str(ev), "--num-captions", str(sched.heldout_scenes), "--decoder", dec,
            *(["--sampler", sched.sampler, "--steps", str(sched.steps)] if dec == "diffusion" else []),
            "--guidance-scale", str(sched.guidance_scale), "--batch-size", str(sched.eval_batch), "--num-show",
            str(sched.num_show), "--save-images", str(ev / "images"), "--ref-stats-dir", str(out / "fid_ref"),
            *(["--top-k", str(sched.top_k)] if sched.top_k else []), distributed=True)
    return ev, json.loads((ev / "results.json").read_text())


def _other_captions(caps: list[str]) -> list[str]:
    """The random-caption baseline: another held-out caption for each image (image order[i] is checked
    against caption order[i+1], a seeded permutation)."""
    order = np.random.default_rng(7).permutation(len(caps))
    other = [""] * len(caps)
    for i, j in enumerate(order):
        other[j] = caps[order[(i + 1) % len(caps)]]
    return other


def _caption_match(evals: dict[str, tuple[Path, dict]], real: ShardReader, divae: str, sched: Schedule, grid: int,
                   k: int) -> dict:
    """5. The figures: per decoder its FID and the caption-match rates of the generated images, of the same
    images against other captions, and of reconstructions of the real scenes; the detector's rate on the real
    scenes (`real`: the held-out shards)."""
    ev, res = evals["diffusion"]
    caps = [c["caption"] for c in json.loads((ev / "captions.json").read_text())]
    real_imgs = [real[i]["image"] for i in res["draw"]["indices"]]
    other = _other_captions(caps)
    n_rec = min(len(caps), 64)
    figures = {"num_captions": len(caps), "detector_on_real_scenes": rates(real_imgs, caps),
               "num_reconstructions": n_rec, "prior_steps": sched.prior_steps, "grid": grid, "codebook_size": k,
               "sampler": f"{sched.sampler} {sched.steps}", "guidance_scale": sched.guidance_scale}
    for dec, (ev, r) in evals.items():
        gen = [np.asarray(Image.open(ev / "images" / f"{j:05d}.png").convert("RGB")) for j in range(len(caps))]
        rec = reconstructions(divae, real_imgs[:n_rec], dec, sched.sampler, sched.steps)
        figures[dec] = {"fid": r["fid"], "generated": rates(gen, caps), "random_caption_baseline": rates(gen, other),
                        "reconstructions": rates(rec, caps[:n_rec])}
    figures["fid"] = figures["diffusion"]["fid"]
    return figures


def _write_results(out: Path, figures: dict, timings: dict[str, float], sched: Schedule, commands: list[str],
                   diffusion_eval: Path) -> None:
    """6. timings.json, results.json, report.md and samples.png (the diffusion evaluation's) in `out`."""
    timings["total"] = sum(v for k_, v in timings.items() if k_ != "total")
    figures["timings_s"] = {k_: round(v, 1) for k_, v in timings.items()}
    figures["schedule"] = asdict(sched)
    (out / "timings.json").write_text(json.dumps(timings))
    (out / "results.json").write_text(json.dumps(figures, indent=1))
    write_report(out, figures, commands)
    if (diffusion_eval / "samples.png").is_file():
        (out / "samples.png").write_bytes((diffusion_eval / "samples.png").read_bytes())


def _print_summary(out: Path, figures: dict, timings: dict[str, float]) -> None:
    for dec in ("diffusion", "cnn"):
        g, b, r = (figures[dec][x] for x in ("generated", "random_caption_baseline", "reconstructions"))
        say(f"[demo-t2i] {dec} decoder: FID {figures[dec]['fid']:.1f} on {figures['num_captions']} held-out "
            f"captions; caption match (shapes / colours / both): generated {g['shapes']:.0%} / {g['colours']:.0%} / "
            f"{g['all']:.0%}, random-caption baseline {b['shapes']:.0%} / {b['colours']:.0%} / {b['all']:.0%}, "
            f"reconstructions of the scenes {r['shapes']:.0%} / {r['colours']:.0%} / {r['all']:.0%}")
    say(f"[demo-t2i] {timings['total'] / 60:.1f} min of work (this run and the runs it reused); report "
        f"{out / 'report.md'}")


def _sha(path: Path) -> str:
    from evaluation.inception import sha256_file

    return sha256_file(path)


def write_report(out: Path, f: dict, commands: list[str]) -> None:
    t = f["timings_s"]

    def row(name: str, r: dict) -> str:
        return f"| {name} | {r['shapes']:.1%} | {r['colours']:.1%} | {r['all']:.1%} |"

    lines = [
        "# Text-to-image demo", "",
        f"Prior ({f['prior_steps']} steps, {f['grid']}x{f['grid']} tokens of the demo VQ, K={f['codebook_size']}, "
        f"guidance {f['guidance_scale']}) on {f['num_captions']} held-out captions, decoded by the demo DiVAE "
        f"(diffusion, {f['sampler']}) and by the same VQ's CNN decoder (the VQGAN baseline).", "",
        "Caption match: how often the object in each half has the shape / the colour its caption puts there "
        "(`detect` in scripts/demo_t2i.py).", "",
        "| decoder | images checked against captions | shapes in place | colours in place | both |",
        "|---|---|---|---|---|"]
    for dec in ("diffusion", "cnn"):
        r = f[dec]
        lines += [f"| {dec} " + row("generated images vs their captions", r["generated"]),
                  f"| {dec} " + row("generated images vs another held-out caption (random-caption baseline)",
                                    r["random_caption_baseline"]),
                  f"| {dec} " + row(f"reconstructions of the first {f['num_reconstructions']} held-out scenes "
                                    "(what a perfect prior would give)", r["reconstructions"])]
    lines += ["| - " + row("the held-out scenes themselves (the detector)", f["detector_on_real_scenes"]), "",
              f"Text-to-image FID against the {f['num_captions']} held-out scenes: diffusion decoder "
              f"{f['diffusion']['fid']:.2f}, CNN decoder {f['cnn']['fid']:.2f}.", "",
              "Time (s): " + ", ".join(f"{k} {v}" for k, v in t.items()), "", "Commands:", "",
              *[f"    {c}" for c in commands], ""]
    (out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
    sys.exit(0)
