"""Typed configs: dataclasses loaded from YAML with dotted command-line overrides.

    cfg = load_config(TrainConfig, "configs/decoder_f16.yaml", ["train.batch_size=64", "optim.lr=2e-4"])
    save_config(cfg, "run/config.yaml")           # the resolved config
    assert load_config(TrainConfig, "run/config.yaml") == cfg

Every component keeps its own small `@dataclass` next to its code; a run config nests them. Values are
checked at load time, before any compute: an unknown key fails with the closest valid key, a wrong type
names the key and the expected type, a missing required value (a field without a default) names the key.

A YAML file may start from another one with `_base_: other.yaml` (path relative to the file); its keys
are merged under the file's own. A section may start from a named preset with `_preset_: name` (for instance
`unet: {_preset_: decoder_f16}`, resolved in the `presets` mapping the caller passes: section type -> name ->
instance); the section's other keys override the preset's fields. Presets resolve after `_base_` merging and
overrides, so a file names a preset once and states only what differs. Override values are parsed as YAML
scalars/flow collections (`a.b=3`, `a.c=[1,2]`, `a.d=null`, `a.e="text"`).

Supported field types: bool, int, float (ints are accepted), str, Optional[X], Literal[...], tuple[X, ...],
tuple[X, Y], list[X], dict[str, X], and nested dataclasses. This module is plain Python (no torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the offending key."""


PRESET_KEY = "_preset_"
# A config dataclass may declare `RENAMED_KEYS: ClassVar[dict[str, str]]` (old key -> new key): a YAML or
# override with an old key is refused with the new name (from_dict), and `rename_keys` maps the old keys of
# data written before the rename (model-file metadata) to the new ones.
RENAMED_ATTR = "RENAMED_KEYS"


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                presets: Mapping[type, Mapping[str, Any]] | None = None) -> T:
    """Build `cls` from a YAML file (optional) and `key.sub=value` overrides, checking every value.
    `presets` maps a section's dataclass type to its named instances (`_preset_: name` in that section)."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return from_dict(cls, apply_presets(cls, data, presets or {}))


def apply_presets(cls: type, data: Any, presets: Mapping[type, Mapping[str, Any]], prefix: str = "") -> Any:
    """`data` with every `_preset_: name` of a section of `cls` replaced by that preset's fields, the section's
    own keys merged over them (recursively, for nested dataclass sections)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    data = dict(data)
    name = data.pop(PRESET_KEY, None)
    where = prefix + PRESET_KEY
    if name is not None:
        table = presets.get(cls)
        if table is None:
            raise ConfigError(f"{where}: {cls.__name__} has no presets; remove {PRESET_KEY} and set the fields")
        if name not in table:
            close = difflib.get_close_matches(str(name), list(table), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {name!r} is not a preset{hint} (presets: {', '.join(sorted(table))})")
        merged = to_dict(table[name])
        _deep_merge(merged, data)
        data = merged
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in data and dataclasses.is_dataclass(hints.get(f.name)):
            data[f.name] = apply_presets(hints[f.name], data[f.name], presets, prefix + f.name + ".")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`"train.batch_size=64"` -> `("train.batch_size", 64)`; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value {raw!r}: {e}") from None
    return key, value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict, checking keys and types."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    renamed = getattr(cls, RENAMED_ATTR, {})
    for key in data:
        if key in renamed and key not in fields:
            raise ConfigError(f"{prefix}{key} was renamed to {prefix}{renamed[key]}: rename the key in the YAML "
                              "or override")
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), str(key), list(fields)))
    hints = get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        dotted = prefix + name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{dotted}: required value is missing (set it in the YAML or as {dotted}=...)")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ validation
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def rename_keys(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a section of `cls` written before a rename, e.g. a model file's metadata) with each old key of
    `cls.RENAMED_KEYS` replaced by its new name, so that old files still load. A key present under both names
    is left as it is (from_dict then refuses the old one)."""
    renamed = getattr(cls, RENAMED_ATTR, {})
    return {renamed[k] if k in renamed and renamed[k] not in data else k: v for k, v in data.items()}


def rename_keys_deep(cls: type, data: Any) -> Any:
    """`rename_keys` applied to `data` and to each of its nested dataclass sections (a whole saved config, e.g. a
    run folder's config.yaml written before a rename)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    data = rename_keys(cls, data)
    hints = get_type_hints(cls)
    return {k: rename_keys_deep(hints[k], v) if k in hints else v for k, v in data.items()}


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list of a config (tuples become lists), suitable for YAML or JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Any) -> str:
    """The config as YAML text (keys in declaration order)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config to `path` as YAML."""
    Path(path).write_text(dump_config(cfg))


# ----------------------------------------------------------------------------------------------
def _read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path}: _base_ cycle {[str(p) for p in _seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base), _seen + (path.resolve(),))
    _deep_merge(merged, data)
    return merged


def _deep_merge(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value)
        else:
            dst[key] = value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _unknown_key_message(dotted: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {dotted[: len(dotted) - len(key)]}{close[0]!r}?" if close else ""
    return f"{dotted}: unknown key{hint} (valid keys: {', '.join(sorted(valid))})"


_NONE_TYPE = type(None)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp` and convert lists to tuples etc.; raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value if value is not None else {}, prefix=key + ".")
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key)
    if origin is Literal:
        return _convert_literal(value, tp, key)
    if origin in (tuple, list) or tp in (tuple, list):
        return _convert_sequence(value, tp, key)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    return _convert_scalar(value, tp, key)


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    """Optional[X] / X | Y: None where allowed, else the first member type that accepts `value`."""
    args = get_args(tp)
    if value is None and _NONE_TYPE in args:
        return None
    for arg in (a for a in args if a is not _NONE_TYPE):
        try:
            return _convert(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _convert_literal(value: Any, tp: Any, key: str) -> Any:
    """Literal[...]: one of the listed values, else an error with the closest one."""
    args = get_args(tp)
    if value in args:
        return value
    close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")


def _convert_sequence(value: Any, tp: Any, key: str) -> tuple | list:
    """tuple[X, ...], tuple[X, Y] (fixed length), list[X]: a YAML list, items checked; tuples come back as
    tuples (YAML has only lists)."""
    origin, args = get_origin(tp), get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
    else:
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if (origin is tuple or tp is tuple) else items


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    """bool, int (not a bool), float (ints and YAML 1.1's dotless "1e-4" strings accepted), str, or any other
    class `value` already is an instance of."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r} (quote it)")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)} for value {value!r}")
