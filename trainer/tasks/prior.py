"""Prior stage: the text-to-image-token prior p(z|y) (divae/prior.py) learns from (caption, VQ tokens) pairs.

Data: shards with a `tokens` column, written by `python -m trainer.pre_encode` (the VQ's indices of each
image, int16/int32 bytes, row-major), and a `caption` column. Set `data.decode_images=false`: the images are
not needed. Captions are tokenized on the fly by the BPE of `prior_task.tokenizer` (default
`<data.path>/tokenizer.json`, written by `python -m data_pipeline.train_tokenizer --shards <data.path>`).

Logged: loss (cross-entropy on image tokens), token_acc (top-1), caption_dropped; with `data.val_path` and
`logging.val_every`, val_loss and val_token_acc on the held-out shards (`val_metrics`). Sample grids, for the
fixed `prior_task.captions` (default: the first batch's captions, with their dataset tokens as a reference
row): the prior's tokens decoded by the DiVAE file `prior_task.divae_weights` (diffusion decoder with a fast
sampler, or the VQ's CNN decoder for a VQ-only file); without a DiVAE file the token grids are drawn in a
fixed false-colour palette. Sampled tokens and captions also go to `samples/step_XXXXXXXX_tokens.json`.
The export is `prior.safetensors` (`divae.prior_io.save_prior`: weights, config and the tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from data_pipeline.tokens import tokens_dtype, tokens_from_bytes
from divae.prior import PriorConfig, PriorModel
from divae.prior_io import PRIOR_EXPORT, load_prior, save_prior
from divae.t2i import text_to_image
from divae.text_tokenizer import TextTokenizer
from divae.utils.config import ConfigError, from_dict
from divae.utils.logging import get_logger
from divae.utils.params import count_parameters, sub_state
from trainer.flops import prior_parts, trace
from trainer.tasks.base import COMMON_SECTIONS, Task, detached

log = get_logger(__name__)

# PriorConfig fields that do not change the weights' shapes or meaning.
_RUNTIME_FIELDS = {"dropout", "caption_dropout", "grad_checkpointing", "attn_backend"}


@dataclass
class PriorTaskConfig:
    tokenizer: str = ""  # tokenizer.json (data_pipeline.train_tokenizer); "" = <data.path>/tokenizer.json
    divae_weights: str = ""  # DiVAE file that renders the sample grids; "" = draw the token grids only
    decoder: Literal["auto", "diffusion", "cnn"] = "auto"  # auto: the diffusion decoder when the file has one
    sampler: Literal["ddpm", "ddim", "dpmpp2m"] = "ddim"  # diffusion sampler for the grids
    sample_steps: int = 10
    captions: list[str] = field(default_factory=list)  # fixed grid captions; [] = the first batch's captions
    guidance_scale: float = 3.0  # classifier-free guidance of the grid samples
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


class PriorNet(nn.Module):
    """The trained module: forward(text_ids (B, T), text_mask (B, T), image_tokens (B, h, w)) -> the
    (loss, metrics) of `PriorModel.loss`, so that the engine's forward (casts, ZeRO hooks) runs the loss."""

    def __init__(self, prior: PriorModel):
        super().__init__()
        self.prior = prior

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor):
        return self.prior.loss(text_ids, text_mask, image_tokens)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def token_palette_images(tokens: torch.Tensor, vocab_size: int, min_side: int = 64) -> torch.Tensor:
    """Token grids (B, h, w) -> false-colour images (B, 3, h*s, w*s) in [-1, 1], one fixed random colour per
    code (the same colours in every grid of a run), nearest-upsampled to at least `min_side` pixels."""
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(vocab_size, 3, generator=g) * 2 - 1
    img = colours[tokens.cpu()].permute(0, 3, 1, 2)
    s = max(1, -(-min_side // max(tokens.shape[1:])))
    return img.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)


class PriorTask(Task):
    config_sections = (*COMMON_SECTIONS, "prior", "prior_task")
    phases = ("model",)
    ema_phases = ("model",)
    export_name = PRIOR_EXPORT

    @classmethod
    def required_files(cls, cfg) -> list[tuple[str, str, str]]:
        t = cfg.prior_task
        return [("prior_task.tokenizer", t.tokenizer, ""), ("prior_task.divae_weights", t.divae_weights, "")]

    @classmethod
    def sample_flops(cls, cfg, vq_cfg=None, forward: bool = True) -> dict[str, float]:
        build, step = prior_parts(replace(cfg.prior, grad_checkpointing=False), 1)
        fwd = trace(build, step, backward=False).flops if forward else 0
        return {"train": float(trace(build, step).flops), "forward": float(fwd),
                "tokens": float(cfg.prior.image_h * cfg.prior.image_w)}

    @classmethod
    def traced_parts(cls, cfg, checkpointing: bool, batch: int):
        return prior_parts(replace(cfg.prior, grad_checkpointing=checkpointing), batch)

    @classmethod
    def param_counts(cls, cfg, vq_cfg=None) -> tuple[int, int]:
        return count_parameters(PriorModel(cfg.prior)), 0

    def build_models(self) -> dict[str, nn.Module]:
        cfg, tcfg = self.cfg, self.cfg.prior_task
        pcfg = cfg.prior
        if cfg.deepspeed.activation_checkpointing:
            pcfg = replace(pcfg, grad_checkpointing=True)
        self.prior_cfg = pcfg
        self.tok_dtype = tokens_dtype(pcfg.image_vocab_size)
        self.tokenizer = self._load_tokenizer(pcfg)
        self._check_shards(pcfg)
        self.decode_mode = self._check_divae(tcfg.divae_weights, pcfg) if tcfg.divae_weights else None
        if cfg.data.decode_images:
            log.info("data.decode_images=true: the prior stage does not use the images; set it to false to "
                     "skip decoding them")
        self._step = 0
        self._divae = None
        self._sampler_model: PriorModel | None = None
        model = PriorModel(pcfg)
        log.info("prior: %.2fM parameters (dim %d, %d encoder + %d decoder layers), %dx%d tokens, K=%d, text "
                 "vocab %d (tokenizer %d), text_len %d", model.num_params() / 1e6, pcfg.dim, pcfg.enc_layers,
                 pcfg.dec_layers, pcfg.image_h, pcfg.image_w, pcfg.image_vocab_size, pcfg.text_vocab_size,
                 self.tokenizer.vocab_size, pcfg.text_len)
        return {"model": PriorNet(model)}

    # -- build-time checks ------------------------------------------------------------------------------
    def _load_tokenizer(self, pcfg: PriorConfig) -> TextTokenizer:
        path = Path(self.cfg.prior_task.tokenizer or Path(self.cfg.data.paths()[0]) / "tokenizer.json")
        if not path.is_file():
            raise ConfigError(f"prior_task.tokenizer: {path} does not exist. Train the caption tokenizer first: "
                              f"`python -m data_pipeline.train_tokenizer --shards {self.cfg.data.paths()[0]} "
                              f"--vocab-size {pcfg.text_vocab_size}` (writes tokenizer.json there), or set "
                              "prior_task.tokenizer=<path>")
        tok = TextTokenizer.load(path)
        if tok.vocab_size > pcfg.text_vocab_size:
            raise ConfigError(f"the tokenizer {path} has {tok.vocab_size} tokens but prior.text_vocab_size="
                              f"{pcfg.text_vocab_size}: set prior.text_vocab_size={tok.vocab_size} (or more)")
        if tok.max_length > pcfg.text_len:
            raise ConfigError(f"the tokenizer {path} pads captions to {tok.max_length} tokens but prior.text_len="
                              f"{pcfg.text_len}: set prior.text_len={tok.max_length} or retrain the tokenizer "
                              f"with --max-length {pcfg.text_len}")
        return tok

    def _check_shards(self, pcfg: PriorConfig) -> None:
        from data_pipeline.reader import ShardReader

        need = pcfg.num_image_tokens * self.tok_dtype.itemsize
        for path in [*self.cfg.data.paths(), *[self.cfg.data.val_path] * bool(self.cfg.data.val_path)]:
            reader = ShardReader(path, decode_image=False)
            if "tokens" not in reader.columns:
                raise ConfigError(f"data: {path} has no `tokens` column (columns {sorted(reader.columns)}). "
                                  f"Pre-encode it with the VQ: `python -m trainer.pre_encode --vq <VQ-stage "
                                  f"divae.safetensors> --src {path} --dst <new folder>` and point data.path there")
            if "caption" not in reader.columns:
                raise ConfigError(f"data: {path} has no `caption` column; the prior needs captioned shards "
                                  "(e.g. python -m data_pipeline.prepare_cc or prepare_coco)")
            if len(reader) == 0:
                raise ConfigError(f"data: {path} holds no samples")
            raw = reader[0]["tokens"]
            if len(raw) != need:
                n16, n32 = len(raw) // 2, len(raw) // 4
                raise ConfigError(
                    f"data: the `tokens` in {path} have {len(raw)} bytes per image ({n16} int16 or {n32} int32 "
                    f"indices; pre_encode writes int16 when K <= 32768), but prior.image_h x image_w = "
                    f"{pcfg.image_h}x{pcfg.image_w} with image_vocab_size={pcfg.image_vocab_size} "
                    f"({self.tok_dtype.name}) needs {need}. Set prior.image_h/image_w to the VQ's token grid "
                    "(image size / f) and prior.image_vocab_size to its codebook size (vq.n_embed)")
            top = int(np.frombuffer(raw, dtype=self.tok_dtype).max())
            if top >= pcfg.image_vocab_size:
                raise ConfigError(f"data: {path} holds token index {top} but prior.image_vocab_size="
                                  f"{pcfg.image_vocab_size}: set it to the VQ's codebook size (vq.n_embed)")

    def _check_divae(self, path: str, pcfg: PriorConfig) -> str:
        """Check the DiVAE file's codebook and token grid against the prior; returns the decoder to use."""
        from safetensors import safe_open

        from divae.vq import VQConfig

        if not Path(path).is_file():
            raise ConfigError(f"prior_task.divae_weights: {path} does not exist; give the DiVAE file of the "
                              "decoder stage (<run_dir>/divae.safetensors), or leave it empty to draw token grids")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "divae_config" not in meta:
            raise ConfigError(f"prior_task.divae_weights: {path} is not a DiVAE file (no divae_config metadata)")
        dcfg = json.loads(meta["divae_config"])
        vq = from_dict(VQConfig, dcfg["vq"])
        if vq.n_embed != pcfg.image_vocab_size:
            raise ConfigError(f"prior.image_vocab_size={pcfg.image_vocab_size} but the VQ in {path} has "
                              f"n_embed={vq.n_embed} codes: they must match")
        unet = dcfg.get("unet")
        mode = self.cfg.prior_task.decoder
        if mode == "auto":
            mode = "diffusion" if unet else "cnn"
        if mode == "diffusion":
            if not unet:
                raise ConfigError(f"prior_task.decoder=diffusion but {path} is a VQ-only file: use "
                                  "prior_task.decoder=cnn or a decoder-stage export")
            grid = (unet["token_grid"], unet["token_grid"])
        else:
            grid = (vq.resolution // vq.downsample_factor,) * 2
        if grid != (pcfg.image_h, pcfg.image_w):
            raise ConfigError(f"prior.image_h x image_w = {pcfg.image_h}x{pcfg.image_w} but {path} decodes "
                              f"{grid[0]}x{grid[1]} token grids: set them to {grid[0]}")
        return mode

    # -- training -----------------------------------------------------------------------------------------
    def tokens(self, batch: dict) -> torch.Tensor:
        if "tokens" not in batch:
            raise KeyError("the batch has no 'tokens': point data at shards written by `python -m trainer.pre_encode`")
        c = self.prior_cfg
        tokens = tokens_from_bytes(batch["tokens"], c.image_h, c.image_w, self.tok_dtype)
        return tokens.to(self.device, non_blocking=True)

    def loss(self, batch: dict, phase: str, step: int):
        self._step = step
        ids, mask = self.tokenizer.encode(batch["caption"], device=self.device)
        loss, metrics = self.engines["model"](ids, mask, self.tokens(batch))
        return loss, detached(metrics)  # on the device: the loop reads them once per step

    def val_metrics(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Teacher-forced held-out metrics (eval mode: no dropout, no caption dropout): "val_loss", the mean
        cross-entropy over the image tokens (nats), and "val_token_acc", the fraction of image tokens whose argmax
        equals the target; 0-d tensors on the device."""
        ids, mask = self.tokenizer.encode(batch["caption"], device=self.device)
        _, metrics = self.engines["model"](ids, mask, self.tokens(batch))
        return {"val_loss": metrics["loss"].detach().float(), "val_token_acc": metrics["token_acc"].detach()}

    # -- sample grids -------------------------------------------------------------------------------------
    def _full_state(self) -> dict[str, torch.Tensor]:
        """The prior's full weights in fp32 on rank 0, {} elsewhere (under ZeRO-3 a gather that every rank
        must join)."""
        prior = self.inner("model").prior
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(prior.parameters()), modifier_rank=None):
                return {k: v.detach().float().clone() for k, v in prior.state_dict().items()} if _is_main() else {}
        return {k: v.detach().float() for k, v in prior.state_dict().items()} if _is_main() else {}

    def _sampling_model(self, state: dict[str, torch.Tensor]) -> PriorModel:
        """An fp32 eval copy of the live weights (kept between grids), on rank 0 only."""
        if self._sampler_model is None:
            with torch.device("meta"):
                m = PriorModel(replace(self.prior_cfg, grad_checkpointing=False))
            m.load_state_dict({k: v.to(self.device, copy=True) for k, v in state.items()}, assign=True)
            self._sampler_model = m.eval()
        else:
            self._sampler_model.load_state_dict(state)
        return self._sampler_model

    def _decode_fn(self):
        tcfg = self.cfg.prior_task
        return partial(self._divae.decode_tokens, sampler=tcfg.sampler, steps=tcfg.sample_steps,
                       decoder=self.decode_mode)

    def _render(self, tokens: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Token grids (B, h, w) -> images: decoded by the DiVAE file, else the false-colour palette."""
        if self.decode_mode is None:
            return token_palette_images(tokens, self.prior_cfg.image_vocab_size)
        return self._decode_fn()(tokens, seeds=seeds)

    @torch.no_grad()
    def sample(self, batch: dict) -> dict[str, torch.Tensor]:
        """Rank 0: {"data": the batch's own tokens (when captions come from it), "prior": sampled} as images."""
        state = self._full_state()
        if not _is_main():
            return {}  # only rank 0 writes grids
        tcfg = self.cfg.prior_task
        captions = list(tcfg.captions) or list(batch["caption"])[: self.cfg.logging.num_samples]
        seeds = list(range(len(captions)))
        model = self._sampling_model(state)
        kw = dict(guidance_scale=tcfg.guidance_scale, temperature=tcfg.temperature, top_k=tcfg.top_k,
                  top_p=tcfg.top_p, seeds=seeds)
        if self.decode_mode is None:
            ids, mask = self.tokenizer.encode(captions, device=self.device)
            z = model.sample(ids, mask, **kw)
            images = token_palette_images(z, self.prior_cfg.image_vocab_size)
        else:
            if self._divae is None:
                from divae.model import DiVAE

                self._divae = DiVAE.from_pretrained(tcfg.divae_weights, device=self.device)
            images, z = text_to_image(model, self.tokenizer, self._decode_fn(), captions, return_tokens=True, **kw)
        rows, record = {}, {"step": self._step + 1, "captions": captions, "prior_tokens": z.tolist()}
        if not tcfg.captions:
            data_z = self.tokens(batch)[: len(captions)]
            rows["data"] = self._render(data_z, seeds)
            record["data_tokens"] = data_z.tolist()
        rows["prior"] = images
        out = Path(self.cfg.train.run_dir) / "samples" / f"step_{self._step + 1:08d}_tokens.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record))
        return rows

    # -- files --------------------------------------------------------------------------------------------
    def _export_model(self, state: dict[str, torch.Tensor]) -> PriorModel:
        with torch.device("meta"):  # no random init of weights that are overwritten at once
            model = PriorModel(replace(self.prior_cfg, grad_checkpointing=False))
        model.load_state_dict({k: v.float().cpu() for k, v in state.items()}, assign=True)
        return model

    def export(self, path: str, weights: dict[str, dict[str, torch.Tensor]], info: dict | None = None) -> None:
        w = weights["model"]
        save_prior(path, self._export_model(sub_state(w, "prior")),
                   self.tokenizer, info)

    def init_from(self, path: str, models: dict[str, nn.Module]) -> None:
        model, tok = load_prior(path)
        mine, theirs = self.prior_cfg, model.cfg
        diff = [f.name for f in fields(PriorConfig) if f.name not in _RUNTIME_FIELDS
                and getattr(mine, f.name) != getattr(theirs, f.name)]
        if diff:
            raise ConfigError(f"checkpoint.init_from={path}: its prior differs in {', '.join(diff)} "
                              f"({', '.join(f'{n}={getattr(theirs, n)!r}' for n in diff)})")
        if tok.to_json() != self.tokenizer.to_json():
            raise ConfigError(f"checkpoint.init_from={path} was trained with another caption tokenizer than "
                              "prior_task.tokenizer; the text ids would not mean the same")
        models["model"].prior.load_state_dict(model.state_dict())
