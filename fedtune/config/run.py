"""The whole run's configuration, and its validation from a composed mapping.

Sections whose shape depends on a registered name (``strategy``, ``model``,
``dataset``, ``privacy``, ``tracking``) are validated by the dataclass registered with that name
(:mod:`fedtune.registry`), so ``strategy=fed_sb`` accepts exactly Fed-SB's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedtune.config.sections import (EvalConfig, FaultsConfig, FederationConfig, PartitionConfig, RuntimeConfig,
                                     TrainConfig)
from fedtune.errors import ConfigError
from fedtune.models.causal_lm import check_model_dataset
from fedtune.privacy.options import NoPrivacyConfig
from fedtune.registry import DATASETS, METHODS, MODELS, PRIVACY, TRACKING
from fedtune.schedule import check_schedule
from fedtune.schema import build, to_dict
from fedtune.tracking.options import NoTrackingConfig

NAMED_SECTIONS = {"strategy": METHODS, "model": MODELS, "dataset": DATASETS, "privacy": PRIVACY, "tracking": TRACKING}
OPTIONAL_SECTIONS = ("privacy", "tracking")  # absent from an older config.yaml: their "none"


@dataclass
class RunConfig:
    """Everything one federated run needs; the single source of truth for server and clients.

    ``strategy``, ``model``, ``dataset``, ``privacy`` and ``tracking`` hold the dataclass
    registered under the chosen name (e.g. :class:`strategies.fed_sb.FedSBConfig`).
    """

    strategy: Any
    model: Any
    dataset: Any
    seed: int = 0
    num_rounds: int = 20
    federation: FederationConfig = field(default_factory=FederationConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    privacy: Any = field(default_factory=NoPrivacyConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    tracking: Any = field(default_factory=NoTrackingConfig)

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def section_class(section: str, name: str) -> type:
    """The dataclass registered as ``<section>=<name>`` (a :class:`ConfigError` if none is)."""
    return NAMED_SECTIONS[section].get(name).config_cls


def _named_section(data: dict[str, Any], section: str) -> Any:
    raw = data.get(section, {"name": "none"} if section in OPTIONAL_SECTIONS else None)
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"{section}.name is missing; accepted: {', '.join(NAMED_SECTIONS[section].names())}")
    return build(section_class(section, raw["name"]), raw, section)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a composed config mapping and return the typed :class:`RunConfig`."""
    data = {k: v for k, v in data.items() if k != "hydra"}
    named = {section: _named_section(data, section) for section in NAMED_SECTIONS}
    check_model_dataset(named["model"], named["dataset"])  # a causal LM needs an instruction task
    rest = {k: v for k, v in data.items() if k not in named}
    cfg = build(RunConfig, {**rest, **{k: {} for k in named}}, "")
    for key, value in named.items():
        setattr(cfg, key, value)
    if cfg.eval.split == "validation" and not getattr(cfg.dataset, "validation_fraction", 0):
        raise ConfigError(f"eval.split: validation needs a validation split; set dataset.validation_fraction > 0, "
                          f"got dataset={cfg.dataset.name} without one")
    PRIVACY.get(cfg.privacy.name).check(cfg)  # e.g. privacy=dp_sgd with a zeroth-order method: refused here
    check_schedule(cfg)  # e.g. train.warmup_steps with a zeroth-order method: refused here
    check_quantized_base(cfg)  # a quantized base under a method that updates or merges into it: refused here
    return cfg


def check_quantized_base(cfg: Any) -> None:
    """Refuse a quantized base under a method that does not declare ``quantized_base``."""
    quantization = getattr(cfg.model, "quantization", "none")
    if quantization == "none":
        return
    support = METHODS.get(cfg.strategy.name).capabilities.quantized_base
    if not support.ok:
        accepted = [spec.name for spec in METHODS.values() if spec.capabilities.quantized_base.ok]
        raise ConfigError(f"model.quantization: strategy={cfg.strategy.name} cannot train on a {quantization} base: "
                          f"{support.reason}; accepted: model.quantization=none, or strategy={', '.join(accepted)}")
    support.check(cfg.strategy, f"model.quantization={quantization}")
