"""Build validated dataclasses from plain dicts (composed Hydra configs).

The same dataclasses are Hydra's structured configs (OmegaConf checks types while it
composes); this module validates the resolved plain dict again, for configs that do
not come through Hydra (the JSON shipped to clients, a run directory's config.yaml),
and words every error with the full field path.  Every
config dataclass validates itself in ``__post_init__`` by raising ``ValueError``
whose message starts with the field name; :func:`build` prefixes the path
(``model.lora.rank must be > 0, got 0``) and rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from fedtune.errors import ConfigError

T = TypeVar("T")


def build(cls: type[T], data: Any, path: str) -> T:
    """Return ``cls(**data)`` with types checked and errors that name ``path.field``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(unknown_field(cls, unknown[0], path))
    kwargs = {name: _coerce(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{_join(path, str(exc))}") from None


def unknown_field(cls: type, key: str, path: str) -> str:
    """``<path.key> is not a known field; accepted: ...``, or the reason the class gives
    for refusing that field (its ``MISPLACED`` map, e.g. another option's field)."""
    reason = getattr(cls, "MISPLACED", {}).get(key)
    if reason:
        return f"{_join(path, key)} {reason}"
    accepted = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    return f"{_join(path, key)} is not a known field; accepted: {', '.join(accepted)}"


def value_error(cls: type, key: str, value: Any, path: str) -> str | None:
    """The line :func:`build` would give for ``cls.key = value`` at ``path`` (None: accepted).

    Used to word the type errors OmegaConf raises while Hydra composes the same classes.
    """
    hints = get_type_hints(cls)
    if key not in hints:
        return None
    try:
        _coerce(hints[key], value, path)
    except ConfigError as exc:
        return str(exc)
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        if math.isnan(float(value)):
            raise ConfigError(f"{path} must be a number, got NaN")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain, JSON-able dict of a config dataclass (for results and for shipping to clients)."""
    return dataclasses.asdict(obj)
