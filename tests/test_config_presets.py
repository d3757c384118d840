"""Named presets are the one definition of each model size: the paper YAMLs name one (`_preset_`) and state
only what differs, and each resolves to exactly the config it resolved to before presets were named there."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from divae.utils.config import ConfigError, load_config
from trainer.config import PRESETS, load_train_config

ROOT = Path(__file__).resolve().parent.parent
# Each file: dump_config(load_train_config("configs/<name>.yaml")) as the YAML stood before `_preset_` (commit
# c34cbc9, where every field was spelled out). Regenerate one only for a deliberate change of that config.
RESOLVED = sorted((ROOT / "tests/fixtures/configs_resolved").glob("*.yaml"))


def test_every_paper_config_has_a_reference():
    assert {p.stem for p in RESOLVED} == {"decoder_f16", "decoder_f8", "decoder_tiny", "vq_f16", "vq_f8", "vq_tiny",
                                          "prior_base", "prior_large", "prior_tiny"}


@pytest.mark.parametrize("resolved", RESOLVED, ids=lambda p: p.stem)
def test_paper_yaml_resolves_as_before(resolved):
    assert load_train_config(ROOT / "configs" / resolved.name) == load_train_config(resolved)


@dataclass
class Inner:
    width: int = 1
    depth: int = 1


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "x"


INNER_PRESETS = {"wide": Inner(width=64, depth=2)}


def test_preset_keys_override_and_errors(tmp_path):
    presets = {Inner: INNER_PRESETS}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inner:\n  _preset_: wide\n  depth: 3\n")
    assert load_config(Outer, cfg, presets=presets).inner == Inner(width=64, depth=3)
    assert load_config(Outer, cfg, ["inner.width=8"], presets=presets).inner == Inner(width=8, depth=3)
    child = tmp_path / "child.yaml"
    child.write_text("_base_: c.yaml\ninner:\n  width: 5\n")
    assert load_config(Outer, child, presets=presets).inner == Inner(width=5, depth=3)
    with pytest.raises(ConfigError, match=r"inner._preset_: 'wde' is not a preset; did you mean 'wide'"):
        load_config(Outer, None, ["inner._preset_=wde"], presets=presets)
    with pytest.raises(ConfigError, match=r"inner._preset_: Inner has no presets"):
        load_config(Outer, cfg)


def test_train_presets_override_on_the_command_line():
    cfg = load_train_config(ROOT / "configs/decoder_f16.yaml", ["unet._preset_=decoder_f8"])
    assert cfg.unet == PRESETS[type(cfg.unet)]["decoder_f8"]
    tiny = load_train_config(ROOT / "configs/decoder_tiny.yaml")
    assert tiny.unet == replace(PRESETS[type(tiny.unet)]["tiny"], cond_channels=32)
