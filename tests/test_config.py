"""The typed config system: round trip, overrides, _base_ inheritance and every error case."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from divae.utils.config import ConfigError, dump_config, from_dict, load_config, parse_override, save_config


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class ModelConfig:
    channel_mult: tuple[int, ...] = (1, 2, 4)
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.0
    checkpoint: str | None = None


@dataclass
class RunConfig:
    run_dir: str  # required
    batch_size: int = 8
    use_ema: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tags: dict[str, str] = field(default_factory=dict)


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_overrides_and_round_trip(tmp_path):
    text = "run_dir: runs/a\nbatch_size: 4\noptim:\n  lr: 2e-4\nmodel:\n  channel_mult: [1, 1, 2]\n"
    path = write(tmp_path, text)
    cfg = load_config(RunConfig, path, ["optim.schedule=cosine", "model.checkpoint=/w.pt", "tags.owner=me"])
    assert cfg.batch_size == 4
    assert cfg.optim.lr == pytest.approx(2e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.schedule == "cosine"
    assert cfg.model.channel_mult == (1, 1, 2)
    assert cfg.model.checkpoint == "/w.pt"
    assert cfg.tags == {"owner": "me"}
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(RunConfig, out) == cfg
    assert dump_config(load_config(RunConfig, out)) == dump_config(cfg)


def test_override_beats_yaml_and_parses_yaml_values(tmp_path):
    path = write(tmp_path, "run_dir: x\nbatch_size: 4\n")
    cfg = load_config(RunConfig, path, ["batch_size=64", "use_ema=false", "model.attn_resolutions=[8,16]"])
    assert (cfg.batch_size, cfg.use_ema, cfg.model.attn_resolutions) == (64, False, [8, 16])
    assert parse_override("model.checkpoint=null") == ("model.checkpoint", None)
    assert load_config(RunConfig, None, ["run_dir=y", "optim.lr=3"]).optim.lr == 3.0


def test_base_inheritance(tmp_path):
    write(tmp_path, "run_dir: base\nbatch_size: 2\noptim:\n  lr: 0.5\n  schedule: cosine\n", "base.yaml")
    child = write(tmp_path, "_base_: base.yaml\noptim:\n  lr: 0.25\n", "child.yaml")
    cfg = load_config(RunConfig, child)
    assert (cfg.run_dir, cfg.batch_size, cfg.optim.lr, cfg.optim.schedule) == ("base", 2, 0.25, "cosine")


def test_unknown_key_names_key_and_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; did you mean optim\.'lr'"):
        load_config(RunConfig, None, ["run_dir=x", "optim.lrr=1"])
    path = write(tmp_path, "run_dir: x\nbatch_szie: 3\n")
    with pytest.raises(ConfigError, match=r"batch_szie: unknown key; did you mean 'batch_size'"):
        load_config(RunConfig, path)


def test_renamed_key_is_refused_with_its_new_name(tmp_path):
    """`diffusion.steps` became `diffusion.timesteps` (DiffusionConfig.RENAMED_KEYS): the old key, in a YAML or an
    override, fails in one line naming the new one; model files map it (rename_keys, see test_model)."""
    from trainer.config import load_train_config

    path = write(tmp_path, "train: {stage: decoder}\ndiffusion:\n  steps: 1000\n")
    with pytest.raises(ConfigError, match=r"^diffusion\.steps was renamed to diffusion\.timesteps: rename") as e:
        load_train_config(path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"diffusion\.steps was renamed to diffusion\.timesteps"):
        load_train_config(None, ["train.stage=decoder", "diffusion.steps=50"])
    assert load_train_config(None, ["train.stage=decoder", "diffusion.timesteps=50"]).diffusion.timesteps == 50


def test_rename_keys_maps_old_data():
    from divae.diffusion import DiffusionConfig
    from divae.utils.config import rename_keys

    assert rename_keys(DiffusionConfig, {"steps": 50, "loss": "simple"}) == {"timesteps": 50, "loss": "simple"}
    assert rename_keys(RunConfig, {"steps": 1}) == {"steps": 1}  # no RENAMED_KEYS: unchanged
    both = {"steps": 1, "timesteps": 2}
    assert rename_keys(DiffusionConfig, both) == both  # ambiguous: left for from_dict to refuse


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("batch_size=abc", r"batch_size: expected an int, got 'abc'"),
        ("batch_size=1.5", r"batch_size: expected an int"),
        ("use_ema=3", r"use_ema: expected a bool"),
        ("optim.lr=fast", r"optim\.lr: expected a float"),
        ("optim.schedule=cosin", r"optim\.schedule: 'cosin' is not one of .*did you mean 'cosine'"),
        ("optim.betas=[0.9]", r"optim\.betas: expected 2 items, got 1"),
        ("model.channel_mult=[1,x]", r"model\.channel_mult\[1\]: expected an int"),
        ("model=3", r"model: expected a mapping for ModelConfig"),
        ("run_dir=5", r"run_dir: expected a string"),
    ],
)
def test_wrong_type_names_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(RunConfig, None, ["run_dir=x", override])


def test_missing_required_value():
    with pytest.raises(ConfigError, match=r"run_dir: required value is missing"):
        load_config(RunConfig, None, ["batch_size=2"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(RunConfig, None, ["batch_size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_post_init_validation_is_reported():
    @dataclass
    class Checked:
        n: int = 1

        def __post_init__(self):
            if self.n <= 0:
                raise ValueError("n must be positive")

    with pytest.raises(ConfigError, match="n must be positive"):
        from_dict(Checked, {"n": 0})


def test_a_run_folder_config_from_before_a_rename_still_reads(tmp_path):
    """A run's config.yaml written before `diffusion.steps` became `diffusion.timesteps`: checkpoint_tool's
    convert (load_saved_config) reads it with the new name, and its diff against today's config shows no change."""
    import yaml

    from trainer.checkpoint_tool import config_diff
    from trainer.config import load_saved_config, load_train_config

    sections = load_train_config(None, ["train.stage=decoder", "train.run_dir=r", "diffusion.timesteps=50"]).sections(
        ("train", "diffusion"))
    sections["diffusion"]["steps"] = sections["diffusion"].pop("timesteps")
    old = yaml.safe_dump(sections)
    saved = write(tmp_path, old)
    assert load_saved_config(saved).diffusion.timesteps == 50
    assert config_diff(old, None, ["train.stage=decoder", "train.run_dir=r", "diffusion.timesteps=50"]) == []
    assert config_diff(old, None, ["train.stage=decoder", "train.run_dir=r", "diffusion.timesteps=60"]) == \
        ["diffusion.timesteps: 50 -> 60"]
