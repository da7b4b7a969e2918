"""One (de)serializer for every config dataclass: formats, method options, fit specs.

A config is a frozen dataclass whose fields are ints, floats, bools, strings, None, tuples of
those, or other configs. ``to_dict`` gives plain JSON-ready data; ``from_dict`` rebuilds the
dataclass and refuses unknown keys and values of the wrong type with one line naming the field,
so a typo in a recipe file or a damaged checkpoint is an error, never silently ignored (the
torchao idea of configs as versioned dataclasses with one generic serializer).

Versioning: a config class may declare ``VERSION`` (ClassVar int, default 1). ``to_dict`` leaves
the version out while it is 1, so data written before versioning existed reads unchanged; a
class that changes incompatibly bumps VERSION and reads older data in its ``__post_init__`` or a
``from_dict`` override. Data carrying a version newer than the class's is refused.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")
VERSION_KEY = "version"


class ConfigError(ValueError):
    """A config dict that does not describe the dataclass it is read as."""


def to_dict(cfg) -> dict:
    """Plain data (dicts, lists, scalars) for a config dataclass, recursively."""
    out = {}
    for f in dataclasses.fields(cfg):
        out[f.name] = _plain(getattr(cfg, f.name))
    version = getattr(type(cfg), "VERSION", 1)
    if version != 1:
        out[VERSION_KEY] = version
    return out


def _plain(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return to_dict(v)
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Rebuild ``cls`` from ``data`` (the output of ``to_dict``); ConfigError on anything else."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    version = data.pop(VERSION_KEY, 1)
    own = getattr(cls, "VERSION", 1)
    if not isinstance(version, int) or version > own:
        raise ConfigError(f"{where}: version {version!r} is newer than this loraq reads ({own}); upgrade loraq")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {k: _typed(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None


def _typed(tp, v, where: str):
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _typed(a, v, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {v!r} matches none of {tp}")
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {v!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_typed(item, x, f"{where}[{i}]") for i, x in enumerate(v))
    if tp is Any:
        return v
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, where)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: expected an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected a string, got {v!r}")
        return v
    raise ConfigError(f"{where}: cannot read a value of type {tp}")


__all__ = ["ConfigError", "from_dict", "to_dict"]
