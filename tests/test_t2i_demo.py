"""scripts/demo_t2i.py: the caption-match detector on rendered scenes, and `--quick` end to end with a random tiny
DiVAE standing in for the demo's (scenes -> prepare_cc -> pre_encode -> train_tokenizer -> prior stage ->
t2i_fid -> match rates -> report), then a rerun that redoes nothing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from t2i_fixtures import make_models

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from demo_t2i import detect, match, parse_caption, rates, scene  # noqa: E402


def test_detector_reads_the_rendered_scenes():
    rng = np.random.default_rng(3)
    imgs, caps = [], []
    for _ in range(60):
        img, cap, objs = scene(rng)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)  # as stored in the shards
        imgs.append(np.asarray(Image.open(buf).convert("RGB")))
        caps.append(cap)
        assert parse_caption(cap) == objs
    assert rates(imgs, caps) == {"shapes": 1.0, "colours": 1.0, "all": 1.0}
    mirrored = [i[:, ::-1] for i in imgs]  # the objects swap halves: no colour is in its place any more
    assert rates(mirrored, caps)["colours"] == 0.0 and rates(mirrored, caps)["all"] == 0.0
    blank = np.full((64, 64, 3), 200, np.uint8)
    assert detect(blank) == [None, None] and match(blank, caps[0]) == {"shapes": False, "colours": False,
                                                                "all": False}


@pytest.mark.slow
def test_quick_demo_end_to_end_and_rerun(tmp_path):
    _, divae = make_models(tmp_path, ["a red square left of a blue circle"])
    cmd = [sys.executable, "scripts/demo_t2i.py", "--quick", "--nproc", "1", "--vq", str(divae), "--divae",
           str(divae), "--out", str(tmp_path / "demo")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for module in ("prepare_cc", "trainer.pre_encode", "train_tokenizer", "trainer.train", "evaluation.t2i_fid"):
        assert module in first.stdout, module
    assert first.stdout.count("-m evaluation.t2i_fid") == 2  # diffusion and CNN decoders
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert res["num_captions"] == 8 and res["fid"] > 0 and res["grid"] == 8 and res["codebook_size"] == 256
    assert res["detector_on_real_scenes"] == {"shapes": 1.0, "colours": 1.0, "all": 1.0}
    for dec in ("diffusion", "cnn"):
        assert res[dec]["fid"] > 0
        for k in ("generated", "random_caption_baseline", "reconstructions"):
            r = res[dec][k]
            assert 0 <= r["all"] <= min(r["colours"], r["shapes"]) <= 1
    assert "| - | the held-out scenes themselves (the detector) | 100.0% | 100.0% | 100.0% |" in \
        (tmp_path / "demo" / "report.md").read_text()
    assert Image.open(tmp_path / "demo" / "samples.png").size[1] == 4 * 66 + 2
    assert len(list((tmp_path / "demo" / "t2i_eval" / "images").glob("*.png"))) == 8
    assert len(list((tmp_path / "demo" / "t2i_eval_cnn" / "images").glob("*.png"))) == 8

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ python" not in again.stdout  # every step reused
    again_res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert again_res["fid"] == res["fid"] and again_res["timings_s"]["prior"] == res["timings_s"]["prior"]
