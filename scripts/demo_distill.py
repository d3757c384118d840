"""`make demo-distill`: a one-step student of the demo's diffusion decoder, trained and evaluated beside its teacher.

Run `make demo` first (it writes the teacher, runs/demo/decoder/divae.safetensors, and the held-out crops). Then:
  1. distillation: `trainer.train --config configs/demo_distill.yaml` on 2 ranks (trainer/tasks/distill.py),
     writing runs/demo/distill/divae.safetensors, whose default sampler is the student's one step;
  2. evaluation (`evaluation.recon_fid` on the demo's 160 held-out crops, image i's noise seeded with i for every
     row): the student with its own sampler (1 UNet evaluation), the teacher at the same single evaluation (DDIM 1,
     what the student must beat to be worth training), the teacher at DPM-Solver++ 20 (the target, 20 evaluations)
     and the CNN decoder of the same tokens; PSNR, LPIPS and FID with standard errors over crops, and the decoder's
     images per second on this machine;
  3. report: runs/demo/distill/report.md and samples.png (originals, CNN, teacher 20 steps, teacher 1 step,
     student 1 step); `--record` copies them, with summary.json, to docs/demo_distill.md, demo_distill_samples.png
     and demo_distill_results.json.
A finished step is reused when its outputs belong to the same checkpoints (sha256), so a rerun only redoes what
changed. `--quick` runs every step at toy sizes (the test suite's schedule).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from divae.utils.files import sha256_file  # noqa: E402
from scripts.demo import Runner, say, train_stage  # noqa: E402
from scripts.demo_report import grid_rows, labelled_rows, pm, rel  # noqa: E402


@dataclass
class Schedule:
    steps: int = 200  # configs/demo_distill.yaml's
    batch_size: int = 16
    eval_batch: int = 32
    num_show: int = 8
    image_size: int = 64


QUICK = Schedule(steps=4, batch_size=4, eval_batch=4, num_show=4)
QUICK_OVERRIDES = ["checkpoint.every=2", "logging.every=2", "logging.sample_every=0", "distill.teacher_steps=2",
                   "ema.decay=0.5"]

# name -> (checkpoint: teacher | student, recon_fid arguments, label)
ROWS = {
    "student": ("student", ["--decoder", "diffusion"], "student, own sampler (1 UNet evaluation)"),
    "teacher_1": ("teacher", ["--decoder", "diffusion", "--sampler", "ddim", "--steps", "1"],
                  "teacher, DDIM 1 (1 UNet evaluation)"),
    "teacher_20": ("teacher", ["--decoder", "both", "--sampler", "dpmpp2m", "--steps", "20"],
                   "teacher, DPM-Solver++ 20 (20 UNet evaluations)"),
}


def _as_list(res: dict | list) -> list[dict]:
    return res if isinstance(res, list) else [res]  # recon_fid writes a list for --decoder both


def evaluate(run: Runner, demo: Path, sched: Schedule, ckpts: dict[str, Path]) -> dict[str, dict]:
    """recon_fid for each of ROWS (reused when its results belong to the same checkpoint); name -> result."""
    out, results = demo / "distill" / "eval", {}
    for name, (which, args, _) in ROWS.items():
        sha = sha256_file(ckpts[which])
        f = out / name / "results.json"
        old = _as_list(json.loads(f.read_text())) if f.is_file() else None
        if old is None or any(r["protocol"]["checkpoint_sha256"] != sha for r in old):
            run(run.distributed("evaluation.recon_fid", "--checkpoint", rel(ckpts[which]), "--data",
                                rel(demo / "data" / "eval"), "--batch-size", str(sched.eval_batch), "--num-show",
                                str(sched.num_show), "--ref-stats-dir", rel(demo / "eval" / "fid_refs"), *args,
                                "--out", rel(out / name)))
        res = _as_list(json.loads(f.read_text()))
        if name == "teacher_20":
            results["cnn"], results[name] = res
        else:
            results[name] = res[0]
    return results


def report(demo: Path, results: dict[str, dict], sched: Schedule, minutes: float, nproc: int) -> str:
    out = demo / "distill"
    labels = {"cnn": "CNN decoder of the same tokens (the VQ's)", **{k: v[2] for k, v in ROWS.items()}}
    lines = ["# The demo's decoder distilled to one step (`make demo-distill`)", "",
             f"{results['student']['num_images']} held-out crops; mean ± standard error over crops; FID on so few "
             f"images is only comparable between rows. Decoder images/s: this machine, {nproc} rank(s).", "",
             "| decoder | PSNR (dB) | LPIPS | FID | images/s |", "|---|---|---|---|---|"]
    for key in ("cnn", "teacher_20", "teacher_1", "student"):
        r = results[key]
        ips = r.get("reconstruct_images_per_s")
        lines.append(f"| {labels[key]} | {pm(r, 'psnr', 2)} | {pm(r, 'lpips', 4)} | {r['fid']:.1f} | "
                     f"{f'{ips:.1f}' if ips else '-'} |")
    s, t = results["student"], results["teacher_20"]
    lines += ["", f"Student LPIPS / teacher-20 LPIPS: {s['lpips'] / t['lpips']:.3f} (within 5% of the teacher: "
              "<= 1.05); "
              f"the student's LPIPS minus the CNN decoder's: {s['lpips'] - results['cnn']['lpips']:+.4f}.",
              f"Distillation: {sched.steps} steps; this run took {minutes:.1f} min.", "", "![samples](samples.png)"]
    rows = [grid_rows(out / "eval" / n / "samples.png", sched.image_size) for n in ("teacher_20", "teacher_1",
                                                                                     "student")]
    labelled_rows([rows[0][0], rows[0][1], rows[0][2], rows[1][1], rows[2][1]],
                  ["original", "CNN decoder", "teacher\nDPM-Solver++ 20", "teacher\nDDIM 1", "student\n1 step"],
                  out / "samples.png", sched.image_size)
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="the demo's folder (make demo's output)")
    p.add_argument("--quick", action="store_true", help="toy sizes (the test suite's schedule)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--record", action="store_true", help="copy the report and picture into docs/")
    args = p.parse_args(argv)
    t0 = time.time()
    demo, sched = Path(args.out), QUICK if args.quick else Schedule()
    teacher = demo / "decoder" / "divae.safetensors"
    if not teacher.is_file() or not (demo / "data" / "eval" / "manifest.json").is_file():
        raise SystemExit(f"[demo-distill] {teacher} or {demo / 'data' / 'eval'} is missing: run `make demo` first")
    run = Runner(args.nproc)
    overrides = [f"distill.teacher={rel(teacher)}", f"data.path={rel(demo / 'data' / 'train')}",
                 f"train.batch_size={sched.batch_size}", *(QUICK_OVERRIDES if args.quick else [])]
    trained = train_stage(run, ROOT / "configs" / "demo_distill.yaml", demo / "distill", sched.steps, overrides)
    say(f"[demo-distill] student: {sched.steps} steps, last {trained['last'].get('loss')}")
    results = evaluate(run, demo, sched, {"teacher": teacher, "student": demo / "distill" / "divae.safetensors"})
    text = report(demo, results, sched, (time.time() - t0) / 60, args.nproc)
    print(text)
    (demo / "distill" / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    if args.record:
        (ROOT / "docs" / "demo_distill.md").write_text(text.replace("(samples.png)", "(demo_distill_samples.png)"))
        shutil.copy(demo / "distill" / "samples.png", ROOT / "docs" / "demo_distill_samples.png")
        shutil.copy(demo / "distill" / "summary.json", ROOT / "docs" / "demo_distill_results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
