"""`scripts/mini_table1.py` shortened (`--quick --rates f8 --cells 1`): the real stages end to end, so it cannot rot.

Real prepare_folder on crops of several packaged photos, real training (one rank) of a VQ, a decoder and the
paper-recipe decoder, real `evaluation.recon_fid` runs (the CNN decoder, DPM-Solver++, DDIM, and DDPM respaced to
4 steps where the full plan runs all T = 1000) and one cell of the injection ablation; then the table's figures are
checked against their sources and a rerun must reuse everything. A second test checks the recorded full run
(docs/mini_table1_results.json) against its plan, its floors and the table in docs/mini_table1.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mini_table1.py"


def _run(out: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    # one rank: the script's own steps are what this checks (make demo's test runs them on 2 ranks)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--quick", "--rates", "f8", "--cells", "1", "--nproc", "1",
                             "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail(f"mini_table1 did not finish in {timeout} s; output tail:\n{stdout[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_mini_table1_quick_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "mt1"
    first = _run(out, 900)
    assert first.returncode == 0, first.stdout[-6000:]
    res = json.loads((out / "results.json").read_text())
    rows = res["rates"]["f8"]
    # held-out crops of two photos, neither of them a training photo
    assert rows["cnn"]["num_images"] == 2 * 4
    assert rows["cnn"]["tokens_hw"] == [8, 8] and rows["cnn"]["protocol"]["codebook_size"] == 512
    # the equal-bits floor of 8x8 tokens of 9 bits: 576 bits -> a 4x4 RGB thumbnail (384 bits)
    assert (rows["thumbnail"]["side"], rows["thumbnail"]["thumbnail_bits"]) == (4, 384)
    # the quick plan respaces the DDPM row to 4 steps (all 1000 cost a minute of the suite); the full plan runs 1000
    assert rows["ddpm1000"][0]["protocol"]["steps"] == 4 and rows["ddpm1000"][0]["num_images"] == 2
    for r in (rows["cnn"], rows["dpmpp2m2"][0], rows["ddim2"][0], rows["thumbnail"]):
        assert r["psnr_sem"] > 0 and r["lpips_sem"] >= 0
    assert list(res["ablation"]) == ["encoder/concat"]
    paper = rows["paper_dpmpp2m20"][0]["protocol"]
    assert paper["sampler"] == "dpmpp2m" and paper["steps"] == 20
    md = (out / "results.md").read_text()
    assert f"{rows['cnn']['psnr']:.2f} ± {rows['cnn']['psnr_sem']:.2f}" in md
    assert f"{rows['thumbnail']['psnr']:.2f}" in md and "encoder/concat" in md
    assert sum("-m trainer.train" in ln for ln in first.stdout.splitlines() if ln.startswith("$ ")) == 4
    # samples.png: the originals, then the CNN decoder, DiVAE and the paper recipe of the one rate, 2x upscaled
    with Image.open(out / "samples.png") as im:
        assert im.height == 4 * (2 * 64 + 4) + 4 and im.width > 8 * 2 * 64

    again = _run(out, 300)
    assert again.returncode == 0, again.stdout[-4000:]
    assert not [ln for ln in again.stdout.splitlines() if ln.startswith("$ ")], "a finished step ran again"
    assert (out / "results.md").read_text() == md


def test_recorded_mini_table1_is_the_full_plan_and_what_the_readme_shows():
    """docs/mini_table1_results.json is the results.json of the full `make mini-table1` whose table
    docs/mini_table1.md and bench/RESULTS.md show: the full plan (not a shortened run), both rates, >= 1,000
    held-out crops per main row, every fast-sampler row over two seeds, six ablation cells, tokenizers above the
    equal-bits floor by >= 1 dB, and that page's table must be the one the script renders from these figures."""
    sys.path.insert(0, str(ROOT))
    from scripts.mini_table1 import ABLATION, Plan, table

    rec = json.loads((ROOT / "docs" / "mini_table1_results.json").read_text())
    plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec["plan"].items()})
    assert plan == Plan()
    assert list(rec["rates"]) == ["f4", "f8"]
    for rate, rows in rec["rates"].items():
        th, cnn = rows["thumbnail"], rows["cnn"]
        assert th["thumbnail_bits"] <= th["token_bits"]
        assert cnn["psnr"] - th["psnr"] >= 1.0, rate
        assert th["num_images"] == cnn["num_images"] >= 1000
        for key in [*(f"dpmpp2m{s}" for s in plan.fast_steps), f"ddim{plan.ddim_steps}"]:
            assert len(rows[key]) == len(plan.seeds) >= 2, (rate, key)
            assert {r["protocol"]["seed"] for r in rows[key]} == set(plan.seeds), (rate, key)
            assert all(r["num_images"] == cnn["num_images"] for r in rows[key]), (rate, key)
        assert rows["ddpm1000"][0]["num_images"] == plan.ddpm_images
    assert list(rec["ablation"]) == [f"{p}/{m}" for p, m in ABLATION] and len(ABLATION) == 6
    assert all(r["num_images"] == plan.ablation_images for r in rec["ablation"].values())
    readme = (ROOT / "docs" / "mini_table1.md").read_text()
    for line in table(rec, plan).splitlines():
        if line.startswith("| "):
            assert line in readme, line
    assert (ROOT / "docs" / "mini_table1_samples.png").is_file()
