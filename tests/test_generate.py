"""`python -m divae.generate`: one PNG per caption and seed from a captions file; a rerun with the same seed
(in another batch composition) writes the same image; bad input fails with one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from t2i_fixtures import make_models, scene

from divae.generate import cli, main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return make_models(root, [c for i in range(8) for c in scene(i)[1]])


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_captions_file_seeds_and_rerun(models, tmp_path):
    prior, divae = models
    caps = tmp_path / "caps.txt"
    caps.write_text("a red square on grey\n\none circle painted blue\n", encoding="utf-8")
    common = ["--prior", str(prior), "--divae", str(divae), "--steps", "2", "--top-k", "32", "--guidance-scale", "2"]
    index = main([*common, "--captions", str(caps), "--seeds", "0,7", "--out", str(tmp_path / "a"),
                  "--batch-size", "3"])
    assert [(e["caption"], e["seed"]) for e in index] == [("a red square on grey", 0), ("a red square on grey", 7),
                                                          ("one circle painted blue", 0),
                                                          ("one circle painted blue", 7)]
    files = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert files == sorted(e["file"] for e in index) and len(files) == 4
    assert _pixels(tmp_path / "a" / files[0]).shape == (64, 64, 3)
    saved = json.loads((tmp_path / "a" / "index.json").read_text())
    assert saved["guidance_scale"] == 2.0 and saved["top_k"] == 32 and saved["sampler"] == "ddim"
    first = tmp_path / "a" / index[0]["file"]
    assert not np.array_equal(_pixels(first), _pixels(tmp_path / "a" / index[1]["file"]))  # seeds differ

    # the same caption and seed alone, in a batch of one: the same image
    again = main([*common, "--caption", "a red square on grey", "--seeds", "0", "--out", str(tmp_path / "b"),
                  "--batch-size", "1"])
    assert np.array_equal(_pixels(tmp_path / "b" / again[0]["file"]), _pixels(first))


def test_bad_input_is_one_line(models, tmp_path, capsys):
    prior, divae = models
    assert cli(["--prior", str(prior), "--divae", str(divae), "--out", str(tmp_path)]) == 2
    assert "no captions" in capsys.readouterr().err
    assert cli(["--prior", str(divae), "--divae", str(divae), "--caption", "x", "--out", str(tmp_path)]) == 2
    assert "--prior" in capsys.readouterr().err
