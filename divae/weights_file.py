"""The one reader of a safetensors file's metadata (the string key/value header every model file of the project
carries: `divae_config`, `prior_config`, `weights`, `elastic`, ...).

Model files arrive from elsewhere (a path typed by hand, a download, a copied run), so every loader needs the same
three refusals before it looks at a single key: no such file, a file that is not safetensors (or whose header is
damaged), and a metadata value that is not the JSON it should be. Each is one line that names the file, what it was
meant to be and how to fix it; `read_metadata` and `metadata_json` give them, so the loaders (`divae.model`,
`divae.prior_io`, `trainer.elastic`, `trainer.checkpoint_tool`) keep only their own kind checks.

    meta = read_metadata(path, "prior checkpoint", "pass the .safetensors file written by save_prior")
    cfg = metadata_json(path, meta, "prior_config")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from divae.utils.cli import one_line

# A training run folder's best checkpoint by validation loss (trainer/validation.py writes both; the prior's
# loaders read them, divae.prior_io.resolve_prior_path): the export's weights, and {"step", "val_loss", ...}.
BEST_WEIGHTS = "best.safetensors"
BEST_RECORD = "best.json"


class WeightsFileError(ValueError):
    """A file that is not the safetensors file a loader needs (not safetensors, a damaged header, a metadata value
    that is not JSON). A ValueError, so callers that catch a foreign file's ValueError keep working."""


def read_metadata(path: str | Path, what: str, fix: str) -> dict[str, str]:
    """The metadata of safetensors file `path` (its header only: no tensor is read; {} when it has none).
    `what` names the file's role ("DiVAE weights", "prior checkpoint") and `fix` says what to do, in the one-line
    FileNotFoundError for a missing file and WeightsFileError for a file safetensors cannot open."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found: {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a foreign or damaged file
        raise WeightsFileError(f"{what} {path} is not a safetensors file or its header is damaged "
                               f"({one_line(e)}): {fix}") from None


def metadata_json(path: str | Path, meta: dict[str, str], key: str, default: Any = None) -> Any:
    """`meta[key]` parsed as JSON (`default` when the key is absent). The metadata is untrusted: a value that is
    not JSON is a one-line WeightsFileError naming the file and the key, not a JSONDecodeError."""
    if key not in meta:
        return default
    try:
        return json.loads(meta[key])
    except ValueError as e:
        raise WeightsFileError(f"{path}: metadata `{key}` is not valid JSON ({one_line(e)}); the file was not "
                               "written by this project or is damaged") from None
