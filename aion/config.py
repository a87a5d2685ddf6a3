"""YAML recipes -> typed dataclass configs, with errors that name the offending key."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], source: T | dict[str, Any] | str | os.PathLike, what: str) -> T:
    """``source`` as a ``cls``: already one, a mapping (errors name ``what``) or a YAML path (errors name the path)."""
    if isinstance(source, cls):
        return source
    if isinstance(source, dict):
        return from_dict(cls, source, what)
    return from_dict(cls, load_yaml(source), str(source))


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming the key.

    Nested dataclass fields are built recursively; tuples given as YAML lists become tuples.
    """
    data = dict(data or {})
    where = where or cls.__name__
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{key}")
        elif (origin is tuple or hint is tuple) and isinstance(value, list):
            value = tuple(value)
        elif origin in (types.UnionType, typing.Union) and isinstance(value, list) and any(
                typing.get_origin(a) is tuple for a in typing.get_args(hint)):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def to_dict(obj: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON/YAML-friendly dict (tuples become lists)."""
    def clean(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(dataclasses.asdict(obj))
