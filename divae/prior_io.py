"""Prior checkpoints: one safetensors file with the weights, the config and the text tokenizer.

    save_prior("prior.safetensors", model, tokenizer)
    model, tokenizer = load_prior("prior.safetensors", device="cuda")
    path, why = resolve_prior_path("runs/prior")   # a run folder: its best.safetensors, else prior.safetensors
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from divae.model import check_config_size
from divae.prior import PriorConfig, PriorModel
from divae.utils.config import from_dict, to_dict
from divae.weights_file import BEST_RECORD, BEST_WEIGHTS, WeightsFileError, metadata_json, read_metadata

if TYPE_CHECKING:
    from divae.text_tokenizer import TextTokenizer

PRIOR_FORMAT = "divae-prior-v1"
PRIOR_EXPORT = "prior.safetensors"  # the prior stage's export in its run folder (and in each checkpoint)


def resolve_prior_path(path: str | Path) -> tuple[Path, str]:
    """The prior file that `path` (--prior of divae.generate and evaluation.t2i_fid) names, and why, in one line:
    a file (or a path that does not exist) is itself; a prior-stage run folder gives its best.safetensors, the
    export at the lowest validation loss (trainer/validation.py; best.json says which step), when it has one,
    else its prior.safetensors, the last export. FileNotFoundError (one line) when the folder holds neither."""
    p = Path(path)
    if not p.is_dir():
        return p, f"{p}: the file given"
    best, last = p / BEST_WEIGHTS, p / PRIOR_EXPORT
    if best.is_file():
        return best, f"{best}: the run's best checkpoint by validation loss{_best_record(p / BEST_RECORD)}"
    if last.is_file():
        return last, f"{last}: the run's last export (no {BEST_WEIGHTS}: the run had no validation, data.val_path)"
    raise FileNotFoundError(f"{p} holds neither {BEST_WEIGHTS} nor {PRIOR_EXPORT}: pass a prior file, or the run "
                            "folder of a prior-stage run")


def _best_record(path: Path) -> str:
    """" (val_loss V at step S, best.json)" from the record beside best.safetensors; a note when it is unreadable."""
    try:
        record = json.loads(path.read_text())
        return f" (val_loss {float(record['val_loss']):.5g} at step {int(record['step'])}, {path.name})"
    except (OSError, ValueError, KeyError, TypeError):
        return f" ({path.name} missing or unreadable)"


def save_prior(path: str | Path, model: PriorModel, tokenizer: TextTokenizer, weights: dict | None = None) -> None:
    """One safetensors file: the weights, plus metadata `prior_config` (JSON) and `text_tokenizer` (the
    tokenizer's JSON), so the tokenizer always travels with the model; `weights` (which weights these are,
    as in `divae.model.weights_info`) under the metadata key `weights`."""
    from safetensors.torch import save_file

    tok_vocab = tokenizer.vocab_size
    if tok_vocab > model.cfg.text_vocab_size:
        raise ValueError(f"tokenizer has {tok_vocab} tokens but the prior's text_vocab_size is "
                         f"{model.cfg.text_vocab_size}")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": PRIOR_FORMAT, "prior_config": json.dumps(to_dict(model.cfg)),
            "text_tokenizer": tokenizer.to_json()}
    if weights:
        meta["weights"] = json.dumps(weights)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_prior(path: str | Path, device: torch.device | str = "cpu",
               **overrides) -> tuple[PriorModel, TextTokenizer]:
    """Load (model, tokenizer) written by `save_prior`; `overrides` replace config fields that do not
    change weights (e.g. attn_backend="sdpa", grad_checkpointing=True). The model is in eval mode."""
    from safetensors.torch import load_file

    from divae.text_tokenizer import TextTokenizer

    meta = read_metadata(path, "prior checkpoint", "pass the .safetensors file written by save_prior (or exported "
                         "by the trainer's prior task)")
    if meta.get("format") != PRIOR_FORMAT or "prior_config" not in meta or "text_tokenizer" not in meta:
        raise WeightsFileError(f"{path} is not a prior checkpoint (metadata format={meta.get('format')!r}, "
                               f"expected {PRIOR_FORMAT!r} with prior_config and text_tokenizer)")
    cfg = replace(from_dict(PriorConfig, metadata_json(path, meta, "prior_config")), **overrides)
    state = load_file(str(path), device="cpu")  # bounded by the file's size (safetensors checks it)
    check_config_size(path, lambda: PriorModel(cfg), state)  # before anything is allocated for the config
    model = PriorModel(cfg)
    model.load_state_dict(state)
    return model.to(device).eval(), TextTokenizer.from_json(meta["text_tokenizer"])
