"""DiVAE: the VQ encoder and codebook, with the diffusion UNet (or the VQ's CNN decoder) as the decoder.

    model = DiVAE.from_pretrained("runs/decoder_f16/divae.safetensors")
    tokens = model.encode(x)                                   # (B, 3, H, W) in [-1, 1] -> (B, H/f, W/f)
    x_hat = model.decode_tokens(tokens, sampler="ddim", steps=25, seeds=range(B))
    x_hat = model.reconstruct(x, decoder="cnn")                # the VQGAN baseline
    model.save_pretrained("out.safetensors")

A saved model is one safetensors file: tensors `vq.*` and `unet.*` (the state dicts of the components) and
the metadata key `divae_config`, a JSON object {"vq": VQConfig, "unet": UNetConfig | null,
"diffusion": DiffusionConfig | null, "sampling": null | {"sampler", "timesteps", "distilled_from"},
"anchor": null | {"scale"}}; "anchor" makes the UNet a diffusion over the residual of the VQ's CNN decoder
(divae/anchor.py; a file without the key has none); "sampling"
is the decoder's own default sampler, written by the distillation stage (trainer/tasks/distill.py): a student
decodes with DDIM over the timesteps it was trained at, and `decode_tokens` uses that unless told otherwise.
A VQ-stage export has no UNet; its `decoder="diffusion"` raises.
A trainer export also names the weights it holds in the metadata key `weights` (`weights_info(path)`):
{"kind": "ema" | "raw", "step": ..., and for an EMA "decay", "warmup", "updates"}.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from divae.anchor import check_anchor, decode
from divae.diffusion import DiffusionConfig
from divae.unet import UNetConfig, UNetModel
from divae.utils.config import from_dict, rename_keys_deep, to_dict
from divae.vq import VQConfig, VQModel
from divae.weights_file import WeightsFileError, metadata_json, read_metadata

WEIGHTS_KEY = "weights"

FORMAT = "divae/1"


class DiVAE(nn.Module):
    """Holds `vq: VQModel`, `unet: UNetModel | None`, `diffusion_cfg: DiffusionConfig | None`, `sampling`
    (the decoder's default sampler, see the module docstring; None: DDPM over all T steps) and `anchor` (None, or
    {"scale": s}: the UNet samples the residual of the VQ's CNN decoder, divae/anchor.py)."""

    def __init__(self, vq_cfg: VQConfig, unet_cfg: UNetConfig | None = None,
                 diffusion_cfg: DiffusionConfig | None = None, sampling: dict | None = None,
                 anchor: dict | None = None):
        super().__init__()
        if sampling is not None:
            check_sampling(sampling, diffusion_cfg)
        if anchor is not None and unet_cfg is None:
            raise ValueError("`anchor` needs a diffusion decoder (this file has none)")
        check_anchor(anchor, unet_cfg.anchor_channels if unet_cfg is not None else 0)
        if (unet_cfg is None) != (diffusion_cfg is None):
            raise ValueError("give both unet_cfg and diffusion_cfg (a diffusion decoder) or neither (VQ only)")
        if unet_cfg is not None:
            if unet_cfg.cond_position != "none" and unet_cfg.cond_channels != vq_cfg.embed_dim:
                raise ValueError(f"unet.cond_channels ({unet_cfg.cond_channels}) must equal vq.embed_dim "
                                 f"({vq_cfg.embed_dim})")
            if unet_cfg.learn_sigma != diffusion_cfg.learn_sigma:
                raise ValueError(f"unet.learn_sigma={unet_cfg.learn_sigma} does not match the diffusion's "
                                 f"model_var_type={diffusion_cfg.model_var_type!r}")
        self.vq = VQModel(vq_cfg)
        self.unet = UNetModel(unet_cfg) if unet_cfg is not None else None
        self.diffusion_cfg = diffusion_cfg
        self.sampling = sampling
        self.anchor = anchor

    @property
    def downsample_factor(self) -> int:
        return self.vq.downsample_factor

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> token indices (B, H/f, W/f), LongTensor."""
        return self.vq.encode(x)

    @torch.no_grad()
    def decode_tokens(self, indices: torch.Tensor, sampler: str | None = None, steps: int | None = None,
                      seeds: Sequence[int] | None = None, decoder: str = "diffusion") -> torch.Tensor:
        """Token indices (B, h, w) -> images (B, 3, h*f, w*f) in [-1, 1].

        decoder "diffusion": sample the UNet conditioned on z_q with `sampler` ("ddpm" | "ddim" | "dpmpp2m")
        and `steps` (None: 1000 for ddpm, 25 for ddim, 20 for dpmpp2m); seeds[i] fixes image i's noise.
        sampler and steps both None: the file's own sampler (`self.sampling`, a distilled student's) or DDPM-1000.
        decoder "cnn": the VQ's CNN decoder (deterministic).
        """
        if indices.dim() != 3:
            raise ValueError(f"expected token indices (B, h, w), got {tuple(indices.shape)}")
        z_q = self.vq.embed(indices)
        if decoder == "cnn":
            return self.vq.decode(z_q).clamp(-1, 1)
        if decoder != "diffusion":
            raise ValueError(f"decoder must be 'diffusion' or 'cnn', got {decoder!r}")
        if self.unet is None:
            raise ValueError("this DiVAE has no diffusion decoder (it is a VQ-stage export); use decoder='cnn' or "
                             "load a decoder-stage export")
        f = self.downsample_factor
        shape = (indices.shape[0], self.unet.cfg.in_channels, indices.shape[1] * f, indices.shape[2] * f)
        return decode(self.unet, self.diffusion_cfg, self.vq, z_q, shape, self.anchor, self.unet.conditional,
                      **self.sampling_for(sampler, steps), seeds=seeds, device=z_q.device)

    def sampling_for(self, sampler: str | None, steps: int | None, fallback: str = "ddpm") -> dict:
        """The keyword arguments of `divae.diffusion.sample` for a request: the file's own sampler when neither
        is given, else `sampler` (None: the file's sampler, or `fallback`) with `steps` (None: the sampler's
        default)."""
        own = self.sampling
        if sampler is None and steps is None and own is not None:
            return {"sampler": own["sampler"], "timestep_respacing": list(own["timesteps"])}
        return {"sampler": sampler or (own["sampler"] if own else fallback), "steps": steps}

    def sampling_label(self, sampler: str | None, steps: int | None, fallback: str = "ddpm") -> str:
        """How `decode_tokens(sampler=..., steps=...)` samples, for reports: "DDIM1 (distilled)", "DPMPP2M20"."""
        how = self.sampling_for(sampler, steps, fallback)
        if "timestep_respacing" in how:
            return f"{how['sampler'].upper()}{len(how['timestep_respacing'])} (distilled)"
        return f"{how['sampler'].upper()}{how['steps'] or ''}"

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, decoder: str = "diffusion", sampler: str | None = None,
                    steps: int | None = None, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> reconstructions in [-1, 1] (see `decode_tokens`)."""
        return self.decode_tokens(self.encode(x), sampler=sampler, steps=steps, seeds=seeds, decoder=decoder)

    # -- weights-only files ---------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"vq": to_dict(self.vq.cfg), "unet": to_dict(self.unet.cfg) if self.unet is not None else None,
                "diffusion": asdict(self.diffusion_cfg) if self.diffusion_cfg is not None else None,
                "sampling": self.sampling, "anchor": self.anchor}

    def save_pretrained(self, path: str | Path, weights: dict | None = None) -> None:
        """Write one safetensors file (fp32 tensors `vq.*`, `unet.*`; configs in metadata). `weights`: which
        weights these are (`weights_info`), recorded in the metadata."""
        state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
                 for k, v in self.state_dict().items()}
        save_pretrained_state(path, state, self.config_dict(), weights)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> DiVAE:
        """Load a file written by `save_pretrained` (no pickle: safetensors only). Returns it in eval mode."""
        cfg, state = read_pretrained(path)
        def build() -> DiVAE:
            return cls(from_dict(VQConfig, cfg["vq"]),
                       from_dict(UNetConfig, cfg["unet"]) if cfg.get("unet") else None,
                       from_dict(DiffusionConfig, cfg["diffusion"]) if cfg.get("diffusion") else None,
                       cfg.get("sampling"), cfg.get("anchor"))

        check_config_size(path, build, state)  # before anything is allocated for the config
        model = build()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model.to(device).eval()


def check_sampling(sampling: dict, diffusion_cfg: DiffusionConfig | None) -> None:
    """Refuse a `sampling` entry (from a file's metadata: untrusted) that `sample` could not run."""
    from divae.diffusion import SAMPLERS

    if diffusion_cfg is None:
        raise ValueError("`sampling` needs a diffusion decoder (this file has none)")
    ts = sampling.get("timesteps") if isinstance(sampling, dict) else None
    if (not isinstance(sampling, dict) or sampling.get("sampler") not in SAMPLERS or not isinstance(ts, list)
            or not 1 <= len(ts) <= diffusion_cfg.timesteps
            or len(set(ts)) != len(ts) or not all(isinstance(t, int) and 0 <= t < diffusion_cfg.timesteps for t in ts)):
        raise ValueError(f"sampling={str(sampling)[:200]}: expected {{'sampler': one of {SAMPLERS}, 'timesteps': "
                         f"[distinct ints in 0..{diffusion_cfg.timesteps - 1}]}}")


def save_pretrained_state(path: str | Path, state: dict[str, torch.Tensor], config: dict,
                          weights: dict | None = None) -> None:
    """Write a DiVAE file from a state dict with `vq.`/`unet.` keys and a `config_dict()`-style dict."""
    meta = {"divae_config": json.dumps(config), "format": FORMAT}
    if weights:
        meta[WEIGHTS_KEY] = json.dumps(weights)
    save_file(state, str(path), metadata=meta)


# What to do about a file that is not DiVAE weights (divae.weights_file's errors end with it).
DIVAE_FILE_FIX = ("train the stage that writes them (python -m trainer.train ...; <run_dir>/divae.safetensors) "
                  "or fix the path")


def weights_info(path: str | Path) -> dict:
    """Which weights a trainer export holds (metadata `weights`): e.g. {"kind": "ema", "decay": 0.9999,
    "updates": 10000, "step": 10000}; {} for a file written without it."""
    meta = read_metadata(path, "DiVAE weights", DIVAE_FILE_FIX)
    return metadata_json(path, meta, WEIGHTS_KEY, {})


def read_pretrained(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) of a DiVAE file, with a clear error for a missing or foreign file."""
    meta = read_metadata(path, "DiVAE weights", DIVAE_FILE_FIX)
    if "divae_config" not in meta:
        raise WeightsFileError(f"{path} is a safetensors file without `divae_config` metadata; it was not written "
                               "by DiVAE.save_pretrained")
    return upgrade_config(metadata_json(path, meta, "divae_config")), load_file(str(path), device="cpu")


def upgrade_config(cfg: dict) -> dict:
    """A file's `divae_config` with the keys renamed since it was written (any section's `RENAMED_KEYS`, e.g.
    diffusion "steps" -> "timesteps") mapped to their new names, so that files written before a rename still load."""
    sections = {"vq": VQConfig, "unet": UNetConfig, "diffusion": DiffusionConfig}
    return {k: rename_keys_deep(sections[k], v) if k in sections else v for k, v in cfg.items()}


def check_config_size(path: str | Path, build: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Refuse a file whose config (metadata, untrusted) describes another model than the tensors it holds,
    before any memory is allocated for that model. The one pre-build check of every model file the project
    loads (`DiVAE.from_pretrained`, `divae.prior_io.load_prior`): `build()` constructs the model from the
    file's config; it is called here on the meta device, its submodules
    counted as they are registered (at most 4 per tensor in the file, so a config asking for millions of
    layers stops at once), and its state-dict keys and shapes compared with the file's. What the file holds
    is bounded by its size (safetensors checks that), so the model built afterwards is too."""
    limit, count = 4 * len(state) + 256, 0

    def count_modules(module: nn.Module, name: str, sub: nn.Module | None) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise ValueError(f"{path}: its config describes a model of more than {limit} modules, but the file "
                             f"holds only {len(state)} tensors; refusing to build it (a crafted or damaged file)")

    handle = nn.modules.module.register_module_module_registration_hook(count_modules)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            meta = build()
    finally:
        handle.remove()
    want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        n_want = sum(math.prod(s) for s in want.values())
        raise ValueError(f"{path}: its config describes a model of {n_want:,} parameters in {len(want)} tensors, "
                         f"the file holds {sum(v.numel() for v in state.values()):,} in {len(have)} (first "
                         f"differences: {[(k, want.get(k), have.get(k)) for k in diff[:3]]}); refusing to build it")
