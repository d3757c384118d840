"""DiVAE glue: weights-only safetensors round trip, encode/decode shapes, CNN and diffusion decoders."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from divae.diffusion import DiffusionConfig
from divae.model import DiVAE
from divae.unet import UNET_PRESETS
from divae.vq import VQ_PRESETS


@pytest.fixture(scope="module")
def model() -> DiVAE:
    torch.manual_seed(0)
    vq = VQ_PRESETS["tiny"]
    unet = replace(UNET_PRESETS["tiny"], cond_channels=vq.embed_dim, token_grid=8)
    return DiVAE(vq, unet, DiffusionConfig(timesteps=50)).eval()


def test_save_load_round_trip(model, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save_pretrained(path)
    loaded = DiVAE.from_pretrained(path)
    assert loaded.config_dict() == model.config_dict()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a.float(), b.float())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(model.encode(x), loaded.encode(x))
    a = model.reconstruct(x, sampler="ddim", steps=3, seeds=[5, 6])
    b = loaded.reconstruct(x, sampler="ddim", steps=3, seeds=[5, 6])
    assert torch.equal(a, b)  # same weights, same seeds -> the same images


def test_file_written_before_the_timesteps_rename_loads(model, tmp_path):
    """A file whose metadata says diffusion "steps" (before `timesteps`), with a distilled `sampling` entry,
    still loads: read_pretrained maps the old key, and its sampling is checked against T."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from divae.model import read_pretrained

    new = tmp_path / "new.safetensors"
    model.save_pretrained(new)
    with safe_open(str(new), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["divae_config"])
    cfg["diffusion"] = {("steps" if k == "timesteps" else k): v for k, v in cfg["diffusion"].items()}
    cfg["sampling"] = {"sampler": "ddim", "timesteps": [24, 49], "distilled_from": "teacher.safetensors"}
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata=dict(meta, divae_config=json.dumps(cfg)))
    assert cfg["diffusion"]["steps"] == 50 and "timesteps" not in cfg["diffusion"]
    assert read_pretrained(old)[0]["diffusion"]["timesteps"] == 50
    loaded = DiVAE.from_pretrained(old)
    assert loaded.diffusion_cfg == model.diffusion_cfg and loaded.sampling == cfg["sampling"]
    assert "steps" not in loaded.config_dict()["diffusion"]
    tokens = loaded.encode(torch.zeros(1, 3, 64, 64))
    assert loaded.decode_tokens(tokens, seeds=[0]).shape == (1, 3, 64, 64)  # its own 2-step sampler


def test_shapes_and_range(model):
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    tokens = model.encode(x)
    assert tokens.shape == (3, 8, 8) and tokens.dtype == torch.long
    for dec in ("cnn", "diffusion"):
        y = model.decode_tokens(tokens, sampler="ddim", steps=2, seeds=[0, 1, 2], decoder=dec)
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_vq_only_export_refuses_diffusion(tmp_path):
    m = DiVAE(VQ_PRESETS["tiny"])
    m.save_pretrained(tmp_path / "vq.safetensors")
    loaded = DiVAE.from_pretrained(tmp_path / "vq.safetensors")
    assert loaded.unet is None
    x = torch.zeros(1, 3, 64, 64)
    assert loaded.reconstruct(x, decoder="cnn").shape == x.shape
    with pytest.raises(ValueError, match="decoder='cnn'"):
        loaded.reconstruct(x)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        DiVAE.from_pretrained(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="divae_config"):
        DiVAE.from_pretrained(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="cond_channels"):
        DiVAE(VQ_PRESETS["tiny"], UNET_PRESETS["tiny"], DiffusionConfig())



def test_anchored_decoder_round_trip_and_hostile_anchor_entries(tmp_path):
    """An anchored DiVAE (divae/anchor.py) keeps its anchor through a file; decoding adds the CNN decoder's image to
    the sampled residual (checked against the parts); a file whose anchor entry could not decode, or disagrees with
    its UNet's input channels, is refused with the entry named."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from divae.anchor import base_image, from_residual
    from divae.diffusion import sample

    torch.manual_seed(0)
    vq = VQ_PRESETS["tiny"]
    unet = replace(UNET_PRESETS["tiny"], cond_channels=vq.embed_dim, anchor_channels=3, learn_sigma=False)
    diffusion = DiffusionConfig(timesteps=50, model_mean_type="v", model_var_type="fixed_small", loss="simple")
    model = DiVAE(vq, unet, diffusion, anchor={"scale": 0.5}).eval()
    torch.nn.init.normal_(model.unet.out[-1].weight, std=0.02)  # a decoder whose residual is not zero
    path = tmp_path / "anchored.safetensors"
    model.save_pretrained(path)
    loaded = DiVAE.from_pretrained(path)
    assert loaded.anchor == {"scale": 0.5}
    ids = torch.randint(0, vq.n_embed, (2, 8, 8))
    z_q = loaded.vq.embed(ids)
    base = base_image(loaded.vq, z_q)
    r = sample(loaded.unet, diffusion, (2, 3, 64, 64), sampler="ddim", steps=3, seeds=[5, 6], clip_denoised=False,
               model_kwargs={"cond": z_q, "anchor": base})
    x = loaded.decode_tokens(ids, sampler="ddim", steps=3, seeds=[5, 6])
    assert torch.equal(x, from_residual(r, base, 0.5).clamp(-1, 1))
    assert not torch.equal(x, loaded.decode_tokens(ids, decoder="cnn"))

    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["divae_config"])
    for bad, match in ((1e9, "anchor="), ("x", "anchor="), (float("nan"), "anchor="), ([1], "anchor=")):
        hostile = tmp_path / "hostile.safetensors"
        save_file(state, str(hostile), metadata={**meta, "divae_config": json.dumps({**cfg, "anchor": {"scale": bad}})})
        with pytest.raises(ValueError, match=match):
            DiVAE.from_pretrained(hostile)
    no_anchor = tmp_path / "no_anchor.safetensors"
    save_file(state, str(no_anchor), metadata={**meta, "divae_config": json.dumps({**cfg, "anchor": None})})
    with pytest.raises(ValueError, match="anchor_channels=3 but the decoder has no anchor"):
        DiVAE.from_pretrained(no_anchor)
    with pytest.raises(ValueError, match="needs unet.anchor_channels=3"):
        DiVAE(vq, replace(unet, anchor_channels=0), diffusion, anchor={"scale": 0.5})


def test_foreign_and_damaged_files_are_one_line_errors_from_every_loader(tmp_path):
    """divae.weights_file is the one metadata reader: a text file, a truncated header and a metadata value that is
    not JSON are one-line errors naming the file and what to do, whichever loader meets them."""
    from safetensors.torch import save_file

    from divae.model import read_pretrained, weights_info
    from divae.prior_io import load_prior
    from divae.weights_file import WeightsFileError
    from trainer.elastic import read_info

    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights\n")
    cut = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(4)}, str(cut), metadata={"divae_config": "{}"})
    cut.write_bytes(cut.read_bytes()[:12])
    bad_json = tmp_path / "bad_json.safetensors"
    save_file({"a": torch.zeros(1)}, str(bad_json), metadata={"divae_config": "{oops", "weights": "[1,"})
    loaders = {read_pretrained: "train the stage", weights_info: "train the stage", load_prior: "save_prior",
               read_info: "checkpoint_tool convert"}
    for load, fix in loaders.items():
        for path in (text, cut):
            with pytest.raises(WeightsFileError, match="is not a safetensors file or its header is damaged") as e:
                load(path)
            assert str(path) in str(e.value) and fix in str(e.value) and "\n" not in str(e.value), e.value
        with pytest.raises(FileNotFoundError, match=f"missing.safetensors not found: .*{fix}"):
            load(tmp_path / "missing.safetensors")
    for load, key in ((read_pretrained, "divae_config"), (weights_info, "weights")):
        with pytest.raises(WeightsFileError, match=f"bad_json.safetensors: metadata `{key}` is not valid JSON"):
            load(bad_json)
    with pytest.raises(WeightsFileError, match="no `elastic` metadata"):
        read_info(bad_json)


_LOAD = """
import json, sys
from divae.model import DiVAE
res = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        DiVAE.from_pretrained(path)
        res[name] = "LOADED"
    except BaseException as e:
        res[name] = f"{type(e).__name__}: {e}"
res["peak_kb"] = int([ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0])
print(json.dumps(res))
"""


def test_crafted_config_is_refused_before_any_allocation(tmp_path):
    """A 13 MB file whose metadata asks for a 2 TiB codebook, 53 TB of convolutions or a million layers."""
    import json
    import resource
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import save_file

    ok = tmp_path / "ok.safetensors"
    DiVAE(VQ_PRESETS["tiny"]).save_pretrained(ok)
    with safe_open(str(ok), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    files = {"ok": str(ok)}
    for name, change in (("codebook", {"n_embed": 2**34}), ("channels", {"ch": 2**16}),
                         ("depth", {"num_res_blocks": 10**6})):
        cfg = json.loads(meta["divae_config"])
        cfg["vq"].update(change)
        files[name] = str(tmp_path / f"{name}.safetensors")
        save_file(state, files[name], metadata=dict(meta, divae_config=json.dumps(cfg)))

    def cap():  # a safety net only: loading must never come near it
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

    r = subprocess.run([sys.executable, "-c", _LOAD, json.dumps(files)], capture_output=True, text=True,
                       timeout=300, preexec_fn=cap)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"] == "LOADED"
    for name in ("codebook", "channels", "depth"):
        assert res[name].startswith("ValueError: ") and "refusing to build it" in res[name], (name, res[name])
    assert "(17179869184, 32)" in res["codebook"] and f"{sum(v.numel() for v in state.values()):,}" in res["codebook"]
    assert "modules" in res["depth"]
    assert res["peak_kb"] < 1500 * 1024
