"""One clear line for the errors Hydra and OmegaConf raise while composing a config.

Hydra reports a bad override over several lines (``Could not override 'federation.nope'.
/ To append to your config use +federation.nope=1 / Key 'nope' is not in struct ...``)
and OmegaConf names the field only on a later ``full_key:`` line.  :func:`error_line`
turns them into the one line fedtune prints for every bad input, naming the field and
what is accepted, like the schema's own errors
(``federation.nope is not a known field; accepted: fraction, min_clients, ...``).
"""

from __future__ import annotations

import re
from typing import Any

GROUP_SECTIONS = ("strategy", "model", "dataset", "privacy")


def compose_mapping(overrides: list[str]) -> dict[str, Any]:
    """The composed, unvalidated config for ``overrides`` (no interpolation resolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from fedtune.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        composed = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(composed, resolve=False)  # type: ignore[return-value]


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
        where = ""
        if parent in GROUP_SECTIONS and "name" in node:
            where = f" of {parent}={node['name']}"
        accepted = ", ".join(sorted(k for k in node if k != "hydra"))
        return f"{path} is not a known field{where}; accepted: {accepted}"
    return f"{key}: cannot be overridden"


def error_line(exc: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra/OmegaConf composition error, naming the field."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if match := re.match(r"Could not override '([^']+)'", first):
        return unknown_key_line(match.group(1), overrides)
    override = getattr(exc, "override", None)  # hydra's OverrideParseException: a malformed key=value
    if isinstance(override, str):
        detail = [line for line in lines if not line.startswith(("Error parsing override", "See https://"))]
        return f"cannot parse the override {override!r}: {detail[0] if detail else first}"
    full_key = getattr(exc, "full_key", None) or getattr(exc.__cause__, "full_key", None)
    if full_key and str(full_key) not in first:
        return f"{full_key}: {first}"
    return first
