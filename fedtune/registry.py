"""Registries that bind names (as chosen by Hydra config groups) to code.

A federated method is one unit (peft's ``register_peft_method`` is the model): one
:func:`register_method` call binds its name to the server-side Flower strategy, the
client trainer, the config dataclass, what travels (:class:`~fedtune.capabilities.Payload`),
what it supports and why (:class:`~fedtune.capabilities.Capabilities`) and how its export
is loaded.  Models and datasets register the same way.  Looking up an unknown name
raises a :class:`~fedtune.errors.ConfigError` that lists what is accepted.

Methods and trainers are discovered, never listed by hand (:func:`load_plugins`): every
module of the ``clients`` and ``strategies`` packages is imported, then every entry point
of the ``fedtune.methods`` group, so a third-party package adds a method without editing
fedtune.  Such an entry point names a module (``toy = toy_pkg.strategy``), imported for its
``register_method``/``TRAINERS.register`` calls, or a callable (``toy = toy_pkg:register``)
that is called with no arguments to make them.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Generic, Mapping, TypeVar

from fedtune.capabilities import Capabilities, Export, Payload
from fedtune.errors import ConfigError
from fedtune.tuning import Relative

T = TypeVar("T")
ENTRY_POINT_GROUP = "fedtune.methods"


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

    def values(self) -> list[T]:
        return [self._items[n] for n in self.names()]


@dataclass(frozen=True)
class MethodSpec:
    """Everything ``strategy=<name>`` selects.

    Attributes
    ----------
    name : registry name (the ``strategy.name`` of its config).
    strategy_cls : the Flower ``Strategy`` subclass (server half).
    trainer : registry name of the client trainer (client half, :data:`TRAINERS`).
    config_cls : dataclass validating the ``strategy:`` config section.
    capabilities : DP support, sum-only aggregation, one-time setup on client data.
    payload : what a client receives and uploads per round, and its byte formula.
    export : the format of ``RUN_DIR/adapter`` and its loader.
    preflight : ``(cfg, inventory) -> None``, the method's own checks of the run's model
        before Ray starts (:func:`fedtune.models.preflight.preflight`; ``inventory`` is a
        :class:`~fedtune.models.inventory.ModelInventory`): raises a one-line ConfigError.
    quick : Hydra overrides under which the method trains in seconds on ``model=tiny
        dataset=tiny`` (the contract tests and the smoke simulations use them).
    tuning : the method's search space for a tuned comparison (``simulations/study.py
        --stage tune``): override key -> candidate values, or a
        :class:`~fedtune.tuning.Relative` of factors of the run's own value
        (:mod:`fedtune.tuning`); {} = nothing to tune.
    """

    name: str
    strategy_cls: type
    trainer: str
    config_cls: type
    capabilities: Capabilities = field(default_factory=Capabilities)
    payload: Payload | None = None
    export: Export = field(default_factory=lambda: Export("not declared"))
    quick: tuple[str, ...] = ()
    preflight: Callable[[Any, Any], None] | None = None
    tuning: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)


METHODS: Registry[MethodSpec] = Registry("strategy", "strategy.name")
TRAINERS: Registry[Callable[..., Any]] = Registry("client trainer", "trainer")
MODELS: Registry[Callable[..., Any]] = Registry("model", "model.name")
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", "dataset.name")
PRIVACY: Registry[Any] = Registry("privacy option", "privacy.name")  # fedtune.privacy.options.PrivacySpec
TRACKING: Registry[Any] = Registry("tracking backend", "tracking.name")  # fedtune.tracking.options.TrackingSpec


def register_method(name: str, strategy_cls: type, trainer: str, config_cls: type, *,
                    capabilities: Capabilities | None = None, payload: Payload | None = None,
                    export: Export | None = None, quick: tuple[str, ...] | list[str] = (),
                    preflight: Callable[[Any, Any], None] | None = None,
                    tuning: Mapping[str, Any] | None = None) -> MethodSpec:
    """Register a federated method (call at the bottom of its strategy module)."""
    for key, candidates in (tuning or {}).items():
        if "." not in key or not (isinstance(candidates, Relative) or (isinstance(candidates, tuple) and candidates)):
            raise ValueError(f"{name}: tuning[{key!r}] must map a dotted override key to a non-empty tuple of "
                             f"values or a Relative, got {candidates!r}")
    spec = MethodSpec(name, strategy_cls, trainer, config_cls, capabilities or Capabilities(), payload,
                      export or Export("not declared"), tuple(quick), preflight, dict(tuning or {}))
    return METHODS.register(name, spec)


_LOADED = False
_ENTRY_POINTS: set[str] = set()
BUILTIN = ("fedtune.models.zoo", "fedtune.models.causal_lm", "fedtune.models.hf", "fedtune.data.sources",
           "fedtune.data.instruct", "fedtune.data.hf_dataset", "fedtune.data.file_presets",
           "fedtune.privacy.options", "fedtune.privacy.dp_sgd",
           "fedtune.privacy.client_level", "fedtune.tracking.options")
PACKAGES = ("clients", "strategies")


def import_package(package: str) -> list[ModuleType]:
    """Import every module of ``package`` (a method's module registers it when imported)."""
    pkg = importlib.import_module(package)
    return [importlib.import_module(f"{package}.{info.name}") for info in pkgutil.iter_modules(pkg.__path__)]


def load_entry_points() -> None:
    """Load the ``fedtune.methods`` entry points not loaded yet (module, or callable to call)."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        key = f"{ep.name}={ep.value}"
        if key in _ENTRY_POINTS:
            continue
        _ENTRY_POINTS.add(key)
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, ModuleType):
                obj()
        except Exception as exc:
            raise ImportError(f"{ENTRY_POINT_GROUP} entry point {key}: {type(exc).__name__}: {exc}") from exc


def load_plugins(rescan: bool = False) -> None:
    """Import the built-in models, datasets, privacy options, trainers and methods, then the entry points.

    ``rescan``: look for entry points again (a package installed after the first look-up).
    """
    global _LOADED
    if _LOADED and not rescan:
        return
    if not _LOADED:
        _LOADED = True
        for module in BUILTIN:
            importlib.import_module(module)
        for package in PACKAGES:
            import_package(package)
    load_entry_points()
