"""Typed dataclass configs: strict loading from dicts/YAML and ``key.sub=value`` overrides.

Every config in Potion is a (nested) dataclass. Loading rejects unknown keys and values of
the wrong type with an error that names the dotted key, so a typo never silently falls
back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from potion.errors import PotionError

C = TypeVar("C")


def from_dict(cls: type[C], data: dict | None, where: str = "") -> C:
    """Build dataclass ``cls`` from ``data``, checking every key and type."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise PotionError(f"config {where or 'root'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = _join(where, unknown[0])
        raise PotionError(
            f"unknown config key '{key}'; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        default = _default_of(fields[name])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            # A partial section overrides the field's own default, not the section class's.
            # Shallow: a value that is itself a mapping (model.args) replaces the default's.
            value = {**to_dict(default), **value}
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PotionError(f"config {where or cls.__name__}: {e}") from None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PotionError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise PotionError(f"config file {path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PotionError(f"cannot read config file {path} ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PotionError(f"config file {path} must hold a mapping at the top level")
    return data


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested dict copy."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise PotionError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        set_path(out, key.strip(), value)
    return out


def set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise PotionError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # Try exact-kind matches first so that 1 stays an int under "int | float".
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is float):
            try:
                return _coerce(arg, value, key)
            except PotionError as e:
                errors.append(e)
        raise PotionError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise PotionError(f"config key '{key}': {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise PotionError(f"config key '{key}': expected a list, got {value!r}")
        (arg, *rest) = get_args(tp) or (Any,)
        items = [_coerce(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise PotionError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif tp is type(None):
        if value is None:
            return None
    else:
        return value
    raise PotionError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


__all__ = ["from_dict", "to_dict", "load_yaml", "dump_yaml", "apply_overrides", "set_path"]
del typing
