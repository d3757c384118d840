"""`make demo` end to end with the shortened schedule (`scripts/demo.py --quick`), so that it cannot rot.

The same script as `make demo`: real prepare_folder, real `torchrun --nproc_per_node 2` DeepSpeed training of
both stages, real recon_fid with the offline Inception (and LPIPS when its weights are installed). Then a second
run must reuse everything (no command runs) and rewrite the same report.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _run_demo(out: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, str(DEMO), "--quick", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks are in this session too
        stdout, _ = proc.communicate()
        pytest.fail(f"demo did not finish in {timeout} s; output tail:\n{stdout[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    first = _run_demo(out, timeout=900)
    assert first.returncode == 0, first.stdout[-6000:]
    return out, first.stdout


def test_demo_runs_every_step_with_the_real_command_lines(demo_run):
    out, stdout = demo_run
    for step in ("data", "vq", "decoder", "eval", "report"):
        assert f"[demo] {step}" in stdout, f"no summary line for step {step}"
    commands = [ln for ln in stdout.splitlines() if ln.startswith("$ ")]
    assert sum("data_pipeline.prepare_folder" in c for c in commands) == 2
    train = [c for c in commands if "trainer.train" in c]
    assert len(train) == 2 and all("torchrun" in c and "--nproc_per_node 2" in c for c in train)
    assert "configs/demo_vq.yaml" in train[0] and "configs/demo_decoder.yaml" in train[1]
    assert sum("-m evaluation.recon_fid" in c for c in commands) == 2
    for stage in ("vq", "decoder"):
        state = json.loads((out / stage / "checkpoints" / (out / stage / "checkpoints" / "latest").read_text().strip()
                            / "trainer_state.json").read_text())
        assert state["step"] == 4 and state["world_size"] == 2
        assert (out / stage / "divae.safetensors").is_file()


def test_demo_report_figures_and_samples(demo_run):
    out, _ = demo_run
    fast = json.loads((out / "eval" / "fast" / "results.json").read_text())
    ddpm = json.loads((out / "eval" / "ddpm" / "results.json").read_text())
    floors = json.loads((out / "eval" / "floors.json").read_text())
    assert [r["protocol"]["decoder"] for r in fast] == ["cnn", "diffusion"]
    assert ddpm["protocol"]["sampler"] == "ddpm" and ddpm["num_images"] == 4
    figures = [*fast, ddpm, floors["noise"], floors["mean"], floors["thumbnail"]]
    for r in figures:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0 and math.isfinite(r["psnr"])
        assert r["psnr_sem"] > 0  # every figure carries its standard error over the crops
    assert all(r["num_images"] == 16 for r in [*fast, floors["noise"], floors["mean"], floors["thumbnail"]])
    # uniform noise against natural images: about 7-8 dB, far below the mean image's figure, itself far below a
    # thumbnail of the crop (the floors are ordered as the information they use)
    assert floors["noise"]["psnr"] < 9.0
    assert floors["noise"]["psnr"] < floors["mean"]["psnr"] < floors["thumbnail"]["psnr"]
    assert floors["thumbnail"]["lpips"] < floors["mean"]["lpips"]
    # the equal-bits floor of 16x16 tokens of K = 512: 2,304 bits -> a 9x9 RGB thumbnail (1,944 bits)
    assert fast[0]["tokens_hw"] == [16, 16] and fast[0]["protocol"]["codebook_size"] == 512
    assert (floors["thumbnail"]["side"], floors["thumbnail"]["thumbnail_bits"]) == (9, 1944)

    report = (out / "report.md").read_text()
    for needle in ("Uniform noise (floor)", "Mean training image (floor)", "Equal-bits floor: 9x9 thumbnail",
                   "VQGAN baseline (CNN decoder)",
                   "DiVAE, dpmpp2m", "DiVAE, DDPM", "![samples](samples.png)", "sbatch slurm/train_vq.sh",
                   "sbatch slurm/train_decoder.sh", "python -m evaluation.recon_fid", "torchrun"):
        assert needle in report, needle
    assert f"{fast[0]['psnr']:.2f} ± {fast[0]['psnr_sem']:.2f}" in report and f"{fast[1]['psnr']:.2f}" in report
    margin = fast[0]["psnr"] - floors["thumbnail"]["psnr"]
    assert f"{margin:+.2f} dB PSNR over it" in report

    im = Image.open(out / "samples.png")
    # 4 labelled rows (originals, VQGAN, DiVAE fast, DiVAE DDPM) of 4 images of 64 px shown at 2x
    assert im.height == 4 * (128 + 4) + 4
    assert im.width == 150 + 2 * (4 * (64 + 2) + 2)
    assert len(np.unique(np.asarray(im.convert("L")))) > 50  # real pictures, not a blank canvas


def test_demo_second_run_reuses_everything(demo_run):
    out, _ = demo_run
    before = (out / "report.md").read_text()
    again = _run_demo(out, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:]
    assert not [ln for ln in again.stdout.splitlines() if ln.startswith("$ ")], "a finished step ran again"
    for step in ("data", "vq", "decoder", "eval"):
        line = next(ln for ln in again.stdout.splitlines() if ln.startswith(f"[demo] {step}"))
        assert line.endswith("(reused)"), line
    after = (out / "report.md").read_text()
    table = [ln for ln in before.splitlines() if ln.startswith("| ") and "|" in ln[2:]][:8]
    assert table == [ln for ln in after.splitlines() if ln.startswith("| ") and "|" in ln[2:]][:8]


def test_recorded_demo_meets_its_floors_and_is_what_the_readme_shows():
    """docs/demo_results.json is the summary.json of the full `make demo` whose figures and picture the README
    shows: its tokenizer must beat the equal-bits floor by >= 1 dB PSNR, DiVAE (DPM-Solver++ 20 steps) must be
    within 1.5 dB of the CNN decoder, the run must fit in 15 minutes, and the README must quote these figures."""
    rec = json.loads((ROOT / "docs" / "demo_results.json").read_text())
    fig, checks = rec["figures"], rec["checks"]
    assert checks["vq_over_floor_db"] == pytest.approx(fig["cnn"]["psnr"] - fig["thumbnail"]["psnr"])
    assert checks["divae_vs_vq_db"] == pytest.approx(fig["fast"]["psnr"] - fig["cnn"]["psnr"])
    assert checks["vq_over_floor_db"] >= 1.0
    assert checks["divae_vs_vq_db"] >= -1.5
    assert rec["minutes"] < 15.0
    # the floors are ordered by the information they use, and the tokens carry more than the thumbnail
    assert fig["noise"]["psnr"] < fig["mean"]["psnr"] < fig["thumbnail"]["psnr"] < fig["cnn"]["psnr"]
    assert fig["thumbnail"]["thumbnail_bits"] <= fig["thumbnail"]["token_bits"]
    readme = (ROOT / "README.md").read_text()
    for key in ("thumbnail", "cnn", "fast", "ddpm"):
        assert f"{fig[key]['psnr']:.2f} ± {fig[key]['psnr_sem']:.2f}" in readme, key
        assert f"{fig[key]['lpips']:.3f}" in readme, key
    assert (ROOT / "docs" / "demo_samples.png").is_file()


def test_demo_distill_quick_trains_a_student_and_reports_it_beside_its_teacher(demo_run):
    """`make demo-distill` (scripts/demo_distill.py --quick) on the quick demo: the student's run, its export's own
    one-step sampler, the four evaluated rows; a second run reuses everything."""
    from divae.model import DiVAE

    out, _ = demo_run
    cmd = [sys.executable, str(ROOT / "scripts" / "demo_distill.py"), "--quick", "--nproc", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-6000:]
    commands = [ln for ln in first.stdout.splitlines() if ln.startswith("$ ")]
    assert "configs/demo_distill.yaml" in commands[0] and "train.stage" not in commands[0]
    assert sum("-m evaluation.recon_fid" in c for c in commands) == 3
    student = DiVAE.from_pretrained(out / "distill" / "divae.safetensors")
    assert student.sampling == {"sampler": "ddim", "timesteps": [999], "distilled_from": "dpmpp2m:2"}
    res = json.loads((out / "distill" / "eval" / "student" / "results.json").read_text())
    assert res["protocol"]["timesteps"] == [999] and res["num_images"] == 16
    report = (out / "distill" / "report.md").read_text()
    for label in ("CNN decoder", "DPM-Solver++ 20", "teacher, DDIM 1", "student, own sampler"):
        assert label in report
    assert Image.open(out / "distill" / "samples.png").size[1] > 5 * 64
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and not [ln for ln in again.stdout.splitlines() if ln.startswith("$ ")]


def test_recorded_demo_distill_is_what_the_readme_shows():
    """docs/demo_distill_results.json is the summary of the `make demo-distill --record` run docs/distillation.md
    shows: the full schedule on the 160 held-out crops, a one-step student that beats its 20-step teacher's LPIPS,
    and that page's row for each decoder."""
    rec = json.loads((ROOT / "docs" / "demo_distill_results.json").read_text())
    assert set(rec) == {"cnn", "teacher_20", "teacher_1", "student"}
    assert all(r["num_images"] == 160 for r in rec.values())
    student, teacher = rec["student"], rec["teacher_20"]
    assert student["protocol"]["timesteps"] == [999] and teacher["protocol"]["steps"] == 20
    assert student["lpips"] <= 1.05 * teacher["lpips"]
    readme = (ROOT / "docs" / "distillation.md").read_text()
    for r in rec.values():
        row = f"{r['psnr']:.2f} ± {r['psnr_sem']:.2f} | {r['lpips']:.3f} ± {r['lpips_sem']:.3f} | {r['fid']:.1f}"
        assert row in readme, row
    assert (ROOT / "docs" / "demo_distill_samples.png").is_file()
