"""bench/gpu_check.sh --cpu-dry-run: the GPU check's every step (gpu tests, UNet step, the 1-GPU ZeRO-2 bf16
decoder run, recon_fid) starts and writes its figures, at tiny sizes on CPU (issue 15)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "results.json"
    p = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--work",
                        str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=470)
    assert out.is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert p.returncode == 0 and r["ok"], {k: (s["rc"], s["tail"][-800:]) for k, s in r["steps"].items()}
    assert set(r["steps"]) == {"pytest_gpu", "unet_step", "train_decoder_f16", "recon_fid"}
    u = r["unet_step"]
    assert u["ms_per_image_median"] > 0 and u["flops_per_image"] > 1e9 and u["tflops"] > 0
    t = r["train"]
    assert t["step"] == 3 and t["micro_batch"] == 2 and t["images_per_s_per_gpu"] > 0 and t["mfu"] is None
    assert abs(t["tflops_per_gpu"] * 1e12 - t["flops_per_sample"] * t["images_per_s_per_gpu"]) < 1e-6 * 1e12
    assert r["recon_fid"]  # the evaluation's results.json, read back
