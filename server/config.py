"""One config loader for every process.

TOML file -> `SKM_*` environment overrides -> frozen dataclasses. Unknown keys
are an error at start, never a silent default. Nested dataclass fields are TOML
tables; their env names join the path: ``[rootkey] provider`` is
``SKM_ROOTKEY_PROVIDER`` (with the process prefix, e.g. ``SKM_SIDECAR_``).
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from server.errors import ConfigError

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value == "" and len(args) < len(typing.get_args(tp))):
            return None
        return _coerce(value, args[0], where)
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list")
        if _is_dataclass_type(inner):
            # An array of tables ([[render]]): each one built like a table, its position in the names.
            return tuple(_table(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_coerce(v, inner, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where} must be a string")
        return str(value)
    return value


def _table(value: Any, tp: type[T], where: str) -> T:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table (only the config file can give it, not the environment)")
    return build(tp, value, {}, "", where + ".")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def build(cls: type[T], data: Mapping[str, Any], env: Mapping[str, str], env_prefix: str, where: str = "",
          base: Any = None) -> T:
    """`base`: the instance whose values stand for settings neither file nor environment gives. A nested
    table starts from its parent field's default (``ServerConfig.data`` is ``ListenerConfig(port=8443)``,
    not ``ListenerConfig()``), so no config at all means the documented defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(sorted(where + k for k in unknown))}; check the spelling")
    if base is not None and not isinstance(base, cls):
        base = None
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        env_name = f"{env_prefix}{f.name}".upper()
        if _is_dataclass_type(tp):
            sub = data.get(f.name, {})
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{where}{f.name} must be a table")
            sub_base = getattr(base, f.name) if base is not None else _field_default(f)
            kwargs[f.name] = build(tp, sub, env, env_name + "_", f"{where}{f.name}.", base=sub_base)
            continue
        if env_name in env:
            kwargs[f.name] = _coerce(env[env_name], tp, env_name)
        elif f.name in data:
            kwargs[f.name] = _coerce(data[f.name], tp, where + f.name)
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def load(cls: type[T], path: str | os.PathLike | None, env_prefix: str = "SKM_",
         env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """Load `cls` from an optional TOML file, the environment and explicit overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML ({e})") from None
    if overrides:
        data = _merge(data, overrides)
    return build(cls, data, os.environ if env is None else env, env_prefix)


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out
