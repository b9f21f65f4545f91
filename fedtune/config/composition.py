"""Hydra composition of a run's configuration, and its errors in one line.

The config dataclasses are Hydra structured configs: :func:`register_configs` stores
the root schema (:class:`~fedtune.config.run.RunConfig`) and every registered option of
the groups ``strategy``, ``model``, ``dataset``, ``privacy`` and ``tracking`` (its dataclass, under
its registry name) in Hydra's ConfigStore.  ``configs/config.yaml`` only selects the
options and sets Hydra's own settings; ``configs/preset/<group>/<option>.yaml``, where
one exists, holds what choosing that option changes elsewhere (``model=tiny`` sets
``train.lr``).  So a default is written once, in its dataclass, and a method, model or
dataset registered by a plugin is selectable without any YAML file.

Hydra reports a bad override over several lines and OmegaConf names the field on a
later ``full_key:`` line; :func:`error_line` turns both into the one line fedtune
prints for every bad input, worded by :mod:`fedtune.schema` like the dataclasses' own
errors (``federation.nope is not a known field; accepted: fraction, ...``).  Both
:func:`compose` (tests, ``flwr run``) and ``fedtune run`` (:func:`hydra_main`, for
multirun and run directories) go through here.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.config.run import NAMED_SECTIONS, RunConfig, from_dict, section_class
from fedtune.errors import ConfigError
from fedtune.schema import unknown_field, value_error

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
ROOT_SCHEMA = "fedtune_run"  # the ConfigStore name config.yaml's defaults list starts from
GROUPS = tuple(NAMED_SECTIONS)


def register_configs() -> None:
    """Store the root schema and every registered option in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import MISSING, OmegaConf

    store = ConfigStore.instance()
    root = OmegaConf.structured(RunConfig)
    for section in GROUPS:  # filled by the group's option (a typed default would refuse another type)
        root[section] = MISSING
    store.store(name=ROOT_SCHEMA, node=root)
    for section, registry in NAMED_SECTIONS.items():
        for name in registry.names():
            node = OmegaConf.structured(registry.get(name).config_cls)
            node.name = name  # one class may serve several names (dataset=tiny and csv)
            store.store(group=section, name=name, node=node)


def check_group_choices(overrides: list[str]) -> None:
    """Fail early, in one line, on ``group=name`` overrides that name no registered option.

    Hydra would print a multi-line report; the user only needs the accepted names.
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS:
            continue
        accepted = NAMED_SECTIONS[key].names()
        for choice in value.split(","):  # multirun sweeps list choices with commas
            if choice.strip() not in accepted:
                raise ConfigError(f"{key}: unknown option {choice.strip()!r}; accepted: {', '.join(accepted)}")


def compose_mapping(overrides: list[str], resolve: bool = False) -> dict[str, Any]:
    """The composed config for ``overrides`` as plain containers (Hydra's errors raised as is)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        composed = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(composed, resolve=resolve)  # type: ignore[return-value]


def compose(overrides: list[str] | str = ()) -> RunConfig:
    """Compose ``configs/`` with Hydra overrides (as on the command line) and validate."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    check_group_choices(list(overrides))
    try:
        data = compose_mapping(list(overrides), resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(error_line(exc, list(overrides))) from None
    return from_dict(data)


def hydra_main(task: Callable[[Any], Any]) -> Callable[[], Any]:
    """``task`` as ``@hydra.main`` over ``configs/`` (the store filled first), for ``fedtune run``."""
    import hydra

    register_configs()
    return hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)(task)


# ----------------------------------------------------------------------------- errors
def _key_of(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def unknown_key_line(key: str, overrides: list[str]) -> str:
    """``<key> is not a known field; accepted: ...`` from the config composed without it."""
    try:
        node: Any = compose_mapping([o for o in overrides if _key_of(o) != key])
    except Exception:  # noqa: BLE001  (the other overrides are bad too: say what we know)
        return f"{key} is not a known field"
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        path, parent = ".".join(parts[: i + 1]), ".".join(parts[:i])
        if not isinstance(node, dict):
            return f"{parent} has no fields (it is a value); cannot set {key}"
        if parent in GROUPS and "name" in node:
            line = unknown_field(section_class(parent, node["name"]), part, parent)
            return line.replace(" is not a known field;", f" is not a known field of {parent}={node['name']};")
        accepted = ", ".join(sorted(k for k in node if k != "hydra"))
        return f"{path} is not a known field; accepted: {accepted}"
    return f"{key}: cannot be overridden"


def _schema_line(exc: BaseException, overrides: list[str]) -> str | None:
    """OmegaConf's schema errors in :mod:`fedtune.schema`'s words: a type error
    (``Value '1.5' ... could not be converted to Integer`` → ``seed must be an integer,
    got 1.5``) or a YAML key the dataclass lacks (``Key 'nope' not in 'TinyModelConfig'``)."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    for err in (exc, exc.__cause__, exc.__context__):  # Hydra re-raises a YAML file's error without a cause
        cls, key = getattr(err, "object_type", None), getattr(err, "key", None)
        full_key = getattr(err, "full_key", None)
        if not (cls is not None and dataclasses.is_dataclass(cls) and isinstance(key, str) and full_key):
            continue
        if isinstance(err, ConfigKeyError):
            return unknown_field(cls, key, str(full_key).rpartition(".")[0])
        if isinstance(err, ValidationError):
            deeper = [k for k in map(_key_of, overrides) if k.startswith(f"{full_key}.")]
            if deeper:  # seed.x=1: a sub-key of a value
                return f"{full_key} has no fields (it is a value); cannot set {deeper[0]}"
            return value_error(cls, key, getattr(err, "value", None), str(full_key))
    return None


def error_line(exc: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra/OmegaConf composition error, naming the field."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if match := re.match(r"Could not (?:override|append to config)[^']*'([^']+)'", first):
        return unknown_key_line(match.group(1), overrides)
    override = getattr(exc, "override", None)  # hydra's OverrideParseException: a malformed key=value
    if isinstance(override, str):
        detail = [line for line in lines if not line.startswith(("Error parsing override", "See https://"))]
        return f"cannot parse the override {override!r}: {detail[0] if detail else first}"
    if line := _schema_line(exc, overrides):
        return line
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
    full_key = getattr(exc, "full_key", None) or getattr(cause, "full_key", None)
    if full_key and str(full_key) not in first:
        return f"{full_key}: {first}"
    return first
