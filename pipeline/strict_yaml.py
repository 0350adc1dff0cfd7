"""Strict parsing of YAML mappings into frozen dataclasses: the machinery behind params.py.

A field's type hint decides how its value is read; `check(...)` metadata adds a range check. Every
failure is a ParamsError whose message names the key. Numbers are accepted in any YAML spelling:
`dvc exp run -S train.lr=1e-6` writes `1e-06` back to params.yaml, which PyYAML's safe_load
returns as the *string* "1e-06".
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.stage_io import StageError


class ParamsError(StageError, ValueError):
    """A params.yaml problem; the message names the key."""


def check(predicate: Callable[[Any], bool], text: str) -> dict[str, Any]:
    """Field metadata: a range check and the wording used when it fails."""
    return {"check": predicate, "check_text": text}


def positive() -> dict[str, Any]:
    return check(lambda v: v > 0, "must be > 0")


def non_negative() -> dict[str, Any]:
    return check(lambda v: v >= 0, "must be >= 0")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert one YAML value to the field's type, or raise ParamsError naming `key`."""
    if dataclasses.is_dataclass(hint):  # a nested section, e.g. train.lora
        return parse_section(key, value, hint)
    origin = typing.get_origin(hint)
    if origin is tuple:  # tuple[Section, ...]: a YAML list of mappings (eval.datasets)
        item = typing.get_args(hint)[0]
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ParamsError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ParamsError(f"{key} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(key, value, args[0])
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ParamsError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ParamsError(f"{key} must be an integer, got {value!r}") from None
    if hint is float:
        # "1e-06" arrives as a str: YAML 1.1 floats need a dot, DVC does not write one.
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ParamsError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ParamsError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ParamsError(f"{key} must be finite, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {hint!r} for {key}")


def parse_section(name: str, raw: Any, cls: type) -> Any:
    """Build the frozen dataclass `cls` from the mapping `raw` found under `name`."""
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{name} must be a mapping of settings, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"unknown key {name}.{unknown[0]} (known: {', '.join(fields)})")
    missing = [k for k, f in fields.items() if k not in raw and not _has_default(f)]
    if missing:
        raise ParamsError(f"missing key {name}.{missing[0]}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, field in fields.items():
        if key not in raw:  # only a field with a default (an item of a list section) is optional
            values[key] = _default(field)
            continue
        value = _coerce(f"{name}.{key}", raw[key], hints[key])
        check = field.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise ParamsError(f"{name}.{key} {field.metadata['check_text']}, got {raw[key]!r}")
        values[key] = value
    return cls(**values)


def _has_default(field: dataclasses.Field) -> bool:
    return (
        field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
    )


def _default(field: dataclasses.Field) -> Any:
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def read_yaml(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections")
    return raw


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3, "lora": {"rank": 8}}} -> {"train.lr": 1e-3, "train.lora.rank": 8}:
    the dotted keys `-S`, MLflow and the params checks name."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stage_param_keys(stage: str, dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """The params keys dvc.yaml lists for `stage` (sections or dotted keys): one source of truth."""
    stages = read_yaml(dvc_file).get("stages", {})
    if stage not in stages:
        raise KeyError(f"no stage {stage!r} in {dvc_file}")
    return [key for key in stages[stage].get("params", []) if isinstance(key, str)]


def resolve_keys(params: Any, keys: list[str]) -> dict[str, Any]:
    """Nested dict of the values behind `keys` ("train", "train.lr" or "train.lora.quantize")."""
    resolved: dict[str, Any] = {}
    for key in keys:
        section, *path = key.split(".")
        node, name, value = resolved, section, dataclasses.asdict(getattr(params, section))
        for part in path:  # down one level per dot, keeping the nesting of params.yaml
            node, name, value = node.setdefault(name, {}), part, value[part]
        node[name] = value
    return resolved
