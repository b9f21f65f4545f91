"""Which modules a LoRA-family adapter wraps: peft's matching rule, for every method.

peft matches a ``target_modules`` entry against a module's dotted name by equality or
by dotted suffix (``intermediate.dense`` matches ``bert.encoder.layer.0.intermediate.dense``;
``peft.tuners.tuners_utils.check_target_module_exists``).  Fed-SB's LoRA-SB wraps its
modules by the same rule, so every method adapts the same layers for the same config.
``auto`` is peft's per-architecture default (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``,
keyed by the checkpoint's ``model_type``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from fedtune.errors import ConfigError

AUTO = "auto"


def is_auto(targets: Any) -> bool:
    return targets == AUTO or list(targets) == [AUTO]


def default_targets(model_type: str) -> list[str]:
    """peft's default LoRA targets for ``model_type`` (a :class:`ConfigError` when peft has none)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if model_type not in DEFAULTS:
        raise ConfigError(f"model.lora.target_modules: peft has no default targets for model_type "
                          f"{model_type!r}; name them (model.lora.target_modules=[...])")
    return list(DEFAULTS[model_type])


def resolve_targets(targets: Any, model_type: str) -> list[str]:
    """The explicit target list (``auto`` replaced by peft's default for ``model_type``)."""
    return default_targets(model_type) if is_auto(targets) else list(targets)


def matches(name: str, targets: Sequence[str]) -> bool:
    """Whether peft's LoRA would wrap the module called ``name`` for ``targets`` (peft's own rule)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(LoraConfig(target_modules=list(targets)), name))


def matched(names: Iterable[str], targets: Sequence[str]) -> list[str]:
    return [n for n in names if matches(n, targets)]


def suffix_names(names: Iterable[str]) -> list[str]:
    """The last dotted component of each name, deduplicated and sorted (what a target may say)."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def check_targets(targets: Sequence[str], linear_names: Sequence[str]) -> None:
    """Refuse targets under which a name matches no linear layer, listing the layers' suffixes."""
    for target in targets:
        if not matched(linear_names, [target]):
            example = ".".join(linear_names[0].split(".")[-2:]) if linear_names else "none"
            raise ConfigError(f"model.lora.target_modules: {target!r} matches no linear layer of this model; "
                              f"its linear layers: {', '.join(suffix_names(linear_names))} "
                              f"(or a dotted suffix, e.g. {example})")


def lora_preflight(cfg: Any, inventory: Any) -> None:
    """A LoRA-family method's pre-flight hook: every ``model.lora.target_modules`` entry
    matches a linear layer of the model (peft would fail only once the model is built)."""
    check_targets(resolve_targets(cfg.model.lora.target_modules, inventory.model_type), list(inventory.linears))
