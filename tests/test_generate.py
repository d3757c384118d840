"""`python -m divae.generate`: one PNG per caption and seed from a captions file; a rerun with the same seed
(in another batch composition) writes the same image; bad input fails with one clear line. Then the options:
--precision bf16, --grid, the PNGs' metadata, the progress output, --seed/--num-images and the random base seed,
resuming (skip what is there, refuse other settings, --overwrite), --save-tokens/--from-tokens and
--negative-prompt (also through `text_to_image`)."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from t2i_fixtures import make_models, scene

from divae.generate import cli, main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return make_models(root, [c for i in range(8) for c in scene(i)[1]])


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _common(models, *extra: str) -> list[str]:
    """The fast settings: CNN decoder, top-k 32, guidance 2."""
    prior, divae = models
    return ["--prior", str(prior), "--divae", str(divae), "--decoder", "cnn", "--top-k", "32", "--guidance-scale",
            "2", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


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
    assert cli(["--divae", str(divae), "--caption", "x", "--out", str(tmp_path)]) == 2
    assert "--prior is required" in _one_line_error(capsys)
    assert cli(_common(models, "--caption", "x", "--seeds", "1,2", "--seed", "3", "--out", str(tmp_path))) == 2
    assert "--seeds lists the seeds itself" in _one_line_error(capsys)
    assert cli(_common(models, "--caption", "x", "--seeds", "1,2", "--num-images", "3", "--out", str(tmp_path))) == 2
    assert "drop --seed/--num-images" in _one_line_error(capsys)
    assert cli(_common(models, "--from-tokens", str(tmp_path), "--caption", "x", "--out", str(tmp_path))) == 2
    assert "drop --prior, --caption" in _one_line_error(capsys)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_precision_gives_valid_images_and_is_recorded(models, tmp_path, device):
    prior, divae = models
    common = ["--prior", str(prior), "--divae", str(divae), "--steps", "1", "--top-k", "32", "--caption",
              "a blue circle on grey", "--seeds", "1", "--save-tokens", "--device", device]
    fp32 = main([*common, "--out", str(tmp_path / "fp32")])
    bf16 = main([*common, "--precision", "bf16", "--out", str(tmp_path / "bf16")])
    saved = json.loads((tmp_path / "bf16" / "index.json").read_text())
    assert saved["precision"] == "bf16" and json.loads((tmp_path / "fp32" / "index.json").read_text())[
        "precision"] == "fp32"
    changed = False
    for a, b in zip(fp32, bf16):
        img = _pixels(tmp_path / "bf16" / b["file"])
        assert img.shape == (64, 64, 3) and img.std() > 0  # an image, not a constant (NaNs become one colour)
        meta = json.loads(Image.open(tmp_path / "bf16" / b["file"]).text["divae"])
        assert meta["settings"]["precision"] == "bf16"
        za, zb = (np.load(tmp_path / d / e["tokens"]) for d, e in (("fp32", a), ("bf16", b)))
        changed |= not np.array_equal(za, zb) or not np.array_equal(img, _pixels(tmp_path / "fp32" / a["file"]))
    assert changed  # autocast did run: bf16 arithmetic moved a token or a pixel


def test_grid_tiles_captions_by_seeds(models, tmp_path):
    out = tmp_path / "g"
    index = main(_common(models, "--caption", "a red square on grey", "--caption", "one circle painted blue",
                         "--seed", "5", "--num-images", "3", "--grid", "--batch-size", "4", "--out", str(out)))
    assert [e["seed"] for e in index] == [5, 6, 7, 5, 6, 7]
    grid = _pixels(out / "grid.png")
    assert grid.shape == (2 * 64, 3 * 64, 3)  # rows: captions, columns: seeds
    for k, e in enumerate(index):
        r, c = divmod(k, 3)
        assert e["caption"] == ["a red square on grey", "one circle painted blue"][r] and e["seed"] == 5 + c
        assert np.array_equal(grid[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64], _pixels(out / e["file"]))
    assert not np.array_equal(grid[:64, :64], grid[:64, 64:128])


def test_png_metadata_reads_back(models, tmp_path):
    caption = "café ☕ un carré rouge"  # not Latin-1: an iTXt chunk
    index = main(_common(models, "--caption", caption, "--seeds", "11", "--negative-prompt", "grey",
                         "--out", str(tmp_path)))
    saved = json.loads((tmp_path / "index.json").read_text())
    im = Image.open(tmp_path / index[0]["file"])
    assert im.text["caption"] == caption and im.text["seed"] == "11"
    meta = json.loads(im.text["divae"])
    assert meta["image"] == {"caption_number": 0, "caption": caption, "seed": 11}
    assert meta["settings"] == {k: saved[k] for k in meta["settings"]}
    s = meta["settings"]
    assert (s["guidance_scale"], s["top_k"], s["decoder"], s["negative_prompt"], s["precision"]) == (
        2.0, 32, "cnn", "grey", "fp32")
    assert len(s["prior_sha256"]) == len(s["divae_sha256"]) == 64


def test_progress_lines_quiet_and_bar(models, tmp_path, capsys, monkeypatch):
    args = _common(models, "--caption", "a red square on grey", "--seeds", "0,1", "--batch-size", "1")
    main([*args, "--out", str(tmp_path / "a")])
    out = capsys.readouterr().out  # stderr is no terminal here: one line per batch
    assert "1/2 images made" in out and "2/2 images made" in out and "2 images made, 0 kept" in out
    main([*args, "--quiet", "--out", str(tmp_path / "b")])
    assert capsys.readouterr() == ("", "")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    main([*args, "--out", str(tmp_path / "c")])
    captured = capsys.readouterr()
    assert "2/2" in captured.err and "img" in captured.err and "1/2 images made" not in captured.out


def test_random_base_seed_is_recorded_and_reproduces_the_bytes(models, tmp_path, capsys):
    args = _common(models, "--caption", "a green circle on grey", "--num-images", "2")
    drawn = main([*args, "--out", str(tmp_path / "r")])
    base = json.loads((tmp_path / "r" / "index.json").read_text())["seed_base"]
    assert f"random base seed {base} (pass --seed {base}" in capsys.readouterr().out
    assert [e["seed"] for e in drawn] == [base, base + 1]
    again = main([*args, "--seed", str(base), "--out", str(tmp_path / "r2")])
    assert [e["file"] for e in again] == [e["file"] for e in drawn]
    for e in drawn:  # the same seed in another run: the same bytes, metadata included
        assert (tmp_path / "r" / e["file"]).read_bytes() == (tmp_path / "r2" / e["file"]).read_bytes()
    assert (tmp_path / "r" / drawn[0]["file"]).read_bytes() != (tmp_path / "r" / drawn[1]["file"]).read_bytes()


def test_rerun_skips_refuses_other_settings_and_overwrites(models, tmp_path, capsys):
    out = tmp_path / "o"
    args = _common(models, "--caption", "a red square on grey", "--seeds", "0,1", "--out", str(out))
    first = main([*args, "--save-tokens"])
    assert [e["generated"] for e in first] == [True, True] and all("tokens" in e for e in first)
    stamps = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in first}
    (out / first[1]["file"]).unlink()
    capsys.readouterr()
    second = main(args)
    assert "1 images made, 1 kept" in capsys.readouterr().out
    assert [e["generated"] for e in second] == [False, True]
    assert (out / first[0]["file"]).stat().st_mtime_ns == stamps[first[0]["file"]]
    assert [e["file"] for e in json.loads((out / "index.json").read_text())["images"]] == [e["file"] for e in first]

    other = [a if a != "2" else "3" for a in args]  # --guidance-scale 3
    assert cli(other) == 2
    err = _one_line_error(capsys)
    assert "exists from another run (guidance_scale 2.0 -> 3.0)" in err and "--overwrite" in err
    assert (out / first[0]["file"]).stat().st_mtime_ns == stamps[first[0]["file"]]  # refused before any work
    third = main([*other, "--overwrite"])
    assert [e["generated"] for e in third] == [True, True]
    assert not list(out.glob("*.tokens.npy")) and not any("tokens" in e for e in third)  # the old images' tokens
    assert json.loads(Image.open(out / first[0]["file"]).text["divae"])["settings"]["guidance_scale"] == 3.0
    (out / third[0]["file"]).write_bytes(b"not a png")
    assert cli(other) == 2 and "it carries no divae metadata" in _one_line_error(capsys)


def test_tokens_saved_and_decoded_again(models, tmp_path):
    from divae.generate_io import to_uint8
    from divae.model import DiVAE

    prior, divae_path = models
    gen = tmp_path / "gen"
    base = ["--divae", str(divae_path), "--steps", "1"]
    index = main(["--prior", str(prior), *base, "--top-k", "32", "--caption", "a yellow square on grey",
                  "--caption", "one circle painted red", "--seeds", "3,4", "--save-tokens", "--out", str(gen)])
    z = np.stack([np.load(gen / e["tokens"], allow_pickle=False) for e in index])
    assert z.dtype == np.int16 and z.shape == (4, 8, 8)

    cnn = main([*base, "--decoder", "cnn", "--from-tokens", str(gen), "--grid", "--out", str(tmp_path / "cnn")])
    assert [e["file"] for e in cnn] == sorted(e["file"] for e in index)
    assert [(e["caption"], e["seed"]) for e in cnn] == sorted((e["caption"], e["seed"]) for e in index)
    divae = DiVAE.from_pretrained(divae_path).eval()
    with torch.no_grad():
        direct = to_uint8(divae.decode_tokens(torch.from_numpy(z).long(), decoder="cnn"))
    by_name = {e["file"]: k for k, e in enumerate(index)}
    for e in cnn:
        assert np.array_equal(_pixels(tmp_path / "cnn" / e["file"]), direct[by_name[e["file"]]])
    assert _pixels(tmp_path / "cnn" / "grid.png").shape == (128, 128, 3)

    assert cli([*base, "--from-tokens", str(gen), "--out", str(gen)]) == 2  # would replace its PNGs

    # the same decoder and seeds as the first run: the same images (the seeds come from gen/index.json)
    same = main([*base, "--from-tokens", str(gen), "--out", str(tmp_path / "same")])
    for e in same:
        assert np.array_equal(_pixels(tmp_path / "same" / e["file"]), _pixels(gen / e["file"]))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8), np.float32), "hold integer codes, this array is float32"),
    (np.zeros((1, 8, 8), np.int16), "shaped (1, 8, 8)"),
    (np.array([{"a": 1}], dtype=object), "not a token grid"),
    (np.full((8, 8), 256, np.int32), "codebook has 256"),
])
def test_bad_token_files_are_one_line(models, tmp_path, capsys, bad, message):
    _, divae = models
    (tmp_path / "t").mkdir()
    np.save(tmp_path / "t" / "x.tokens.npy", bad, allow_pickle=True)
    assert cli(["--divae", str(divae), "--decoder", "cnn", "--from-tokens", str(tmp_path / "t"),
                "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "x.tokens.npy" in err and message in err, err
    assert not (tmp_path / "o" / "x.png").exists()


def test_negative_prompt_is_the_unconditional_branch(models, tmp_path):
    from divae.model import DiVAE
    from divae.prior_io import load_prior
    from divae.t2i import text_to_image

    prior_path, divae_path = models
    prior, tok = load_prior(prior_path)
    divae = DiVAE.from_pretrained(divae_path).eval()
    t2i = partial(text_to_image, prior, tok, partial(divae.decode_tokens, decoder="cnn"), top_k=32,
                  seeds=[3, 9], return_tokens=True)
    caps, neg = ["a red square on grey", "one circle painted blue"], "a yellow circle on grey"
    _, z_neg0 = t2i(caps, guidance_scale=0.0, negative_caption=neg)
    _, z_cond = t2i([neg, neg], guidance_scale=1.0)
    assert torch.equal(z_neg0, z_cond)  # s = 0: the tokens are drawn given the negative caption alone
    _, z_none = t2i(caps, guidance_scale=3.0)
    _, z_empty = t2i(caps, guidance_scale=3.0, negative_caption="")  # "" encodes as the empty caption
    _, z_x = t2i(caps, guidance_scale=3.0, negative_caption=neg)
    assert torch.equal(z_none, z_empty) and not torch.equal(z_none, z_x)
    ids, mask = tok.encode(caps)
    assert torch.equal(z_none, prior.sample(ids, mask, guidance_scale=3.0, top_k=32, seeds=[3, 9]))

    # the CLI: guidance 0 with --negative-prompt X draws caption X's image of guidance 1
    a = main(_common(models, "--caption", caps[0], "--seeds", "3", "--guidance-scale", "0", "--negative-prompt", neg,
                     "--out", str(tmp_path / "a")))
    b = main(_common(models, "--caption", neg, "--seeds", "3", "--guidance-scale", "1", "--out", str(tmp_path / "b")))
    assert np.array_equal(_pixels(tmp_path / "a" / a[0]["file"]), _pixels(tmp_path / "b" / b[0]["file"]))


def test_a_token_file_claiming_more_than_it_holds_is_refused_before_allocation(models, tmp_path, capsys):
    """A .npy header for a 10^5 x 10^5 int16 grid (20 GB) over 128 bytes of data: a one-line error, no allocation."""
    _, divae = models
    (tmp_path / "t").mkdir()
    with open(tmp_path / "t" / "x.tokens.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i2", "fortran_order": False, "shape": (10**5, 10**5)})
        f.write(np.zeros((8, 8), np.int16).tobytes())
    assert cli(["--divae", str(divae), "--decoder", "cnn", "--from-tokens", str(tmp_path / "t"),
                "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys)
    assert "x.tokens.npy" in err and "not a token grid" in err, err
