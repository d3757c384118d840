"""bench/gpu_check.sh --cpu-dry-run: the GPU check's every step (set-up, gpu tests, UNet step, planner, the 1-GPU
ZeRO-2 bf16 decoder run, recon_fid) runs in the schedule's order under the schedule's limits (the same ones
the GPU run has) and writes its figures, at tiny sizes on CPU (issues 15 and 25)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def test_schedule_fits_the_outer_limit_of_the_shell_script():
    sh = (ROOT / "bench" / "gpu_check.sh").read_text()
    outer = int(re.search(r"exec timeout (\d+) ", sh).group(1))
    assert outer == gpu_check.TOTAL_LIMIT_S <= 8 * 60
    assert sum(limit for _, limit in gpu_check.SCHEDULE) + gpu_check.START_ALLOWANCE_S <= outer
    names = [n for n, _ in gpu_check.SCHEDULE]
    assert [n for n, *_ in gpu_check._steps(True, Path("/w"), "a100-80gb")] == names
    assert [n for n, *_ in gpu_check._steps(False, Path("/w"), "a100-80gb")] == names


def test_a_step_past_the_deadline_is_cut_and_the_results_are_kept(tmp_path):
    out, results = tmp_path / "r.json", {"steps": {}}
    t0 = time.time()
    ok = gpu_check.run_step("setup", [sys.executable, "-c", "import time; time.sleep(30)"], results, out,
                            deadline=time.time() + 1)
    assert not ok and time.time() - t0 < 15
    saved = json.loads(out.read_text())  # written as soon as the step ended
    assert saved["steps"]["setup"]["rc"] == 124 and saved["steps"]["setup"]["limit"] == 30


def test_gpu_check_cpu_dry_run_writes_every_figure(tmp_path):
    out, work = tmp_path / "results.json", tmp_path / "work"
    p = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--work", str(work)],
                       cwd=ROOT, capture_output=True, text=True, timeout=470)
    assert p.stdout.splitlines()[0] == gpu_check.requires_line()  # the first line: what the venv must hold
    assert out.is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert p.returncode == 0 and r["ok"] and r["finished"], \
        {k: (s["rc"], s["tail"][-800:]) for k, s in r["steps"].items()}
    # the GPU run's schedule: every step, in its order, each within its own limit
    assert r["schedule"] == [list(s) for s in gpu_check.SCHEDULE]
    assert [(k, s["limit"]) for k, s in r["steps"].items()] == list(gpu_check.SCHEDULE)
    assert all(s["seconds"] <= s["limit"] for s in r["steps"].values()), r["steps"]
    u = r["unet_step"]
    assert u["ms_per_image_median"] > 0 and u["flops_per_image"] > 1e9 and u["tflops"] > 0
    assert u["fp32_over_bf16_time"] > 0
    t = r["train"]
    assert t["step"] == 3 and t["micro_batch"] == 2 and t["images_per_s_per_gpu"] > 0 and t["mfu"] is None
    assert abs(t["tflops_per_gpu"] * 1e12 - t["flops_per_sample"] * t["images_per_s_per_gpu"]) < 1e-6 * 1e12
    assert r["memory"]["planned_peak_gib"] > 0 and r["memory"]["ratio"] > 0
    assert [Path(p).name for p in t["profile_traces"]] == ["step_00000003_rank00000.json"]  # logging.profile_every
    run = work / "decoder_run"  # small checkpoints: the weights-only export, no optimizer state
    assert (run / gpu_check.EXPORT).is_file() and not (run / "checkpoints").exists()
    assert r["recon_fid"]  # the evaluation's results.json, read back
