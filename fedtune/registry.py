"""Registries that bind names (as chosen by Hydra config groups) to code.

A federated method is one name bound to three parts (peft's ``register_peft_method``
is the model): the server-side Flower strategy in ``strategies/``, the client-side
trainer in ``clients/`` and the config dataclass that validates its section.  Models
and datasets register the same way.  Looking up an unknown name raises a
:class:`~fedtune.errors.ConfigError` that lists what is accepted.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from fedtune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → object map with errors that name the config field."""

    def __init__(self, kind: str, field: str) -> None:
        self.kind, self.field = kind, field
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        load_plugins()
        if name not in self._items:
            raise ConfigError(
                f"{self.field}: unknown {self.kind} {name!r}; accepted: {', '.join(self.names())}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)


@dataclass(frozen=True)
class MethodSpec:
    """What ``strategy=<name>`` selects.

    Attributes
    ----------
    name : registry name, equal to the module name in ``strategies/``.
    strategy_cls : the Flower ``Strategy`` subclass (server half).
    trainer : registry name of the client trainer (client half).
    config_cls : dataclass validating the ``strategy:`` config section.
    """

    name: str
    strategy_cls: type
    trainer: str
    config_cls: type


METHODS: Registry[MethodSpec] = Registry("strategy", "strategy.name")
TRAINERS: Registry[Callable[..., Any]] = Registry("client trainer", "trainer")
MODELS: Registry[Callable[..., Any]] = Registry("model", "model.name")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", "dataset.name")
PRIVACY: Registry[Any] = Registry("privacy option", "privacy.name")  # fedtune.privacy.options.PrivacySpec


def register_method(name: str, strategy_cls: type, trainer: str, config_cls: type) -> MethodSpec:
    """Register a federated method (call at the bottom of ``strategies/<name>.py``)."""
    return METHODS.register(name, MethodSpec(name, strategy_cls, trainer, config_cls))


_LOADED = False


def load_plugins() -> None:
    """Import the built-in strategies, trainers, models, datasets and privacy options so they register."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for module in ("fedtune.models.zoo", "fedtune.models.causal_lm", "fedtune.data.sources", "fedtune.data.instruct",
                   "fedtune.privacy.options", "fedtune.privacy.dp_sgd", "fedtune.privacy.client_level",
                   "clients", "strategies"):
        importlib.import_module(module)
