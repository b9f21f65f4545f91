"""The run configuration: typed sections, validated where they are defined.

Hydra composes ``configs/config.yaml`` with the groups ``strategy``, ``model``,
``dataset`` and ``privacy``; :func:`from_dict` turns the composed, resolved mapping
into a :class:`RunConfig`.  Sections whose shape depends on a registered name
(strategy, model, dataset) are validated by the dataclass registered with that name,
so ``strategy=fed_sb`` accepts exactly Fed-SB's fields.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError
from fedtune.schema import build, to_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class FederationConfig:
    """Who takes part: ``num_clients`` partitions, ``fraction`` of them sampled per round."""

    num_clients: int = 10
    fraction: float = 1.0
    min_clients: int = 1
    round_timeout: float = 3600.0  # seconds a round waits for replies (deployment: a vanished node)

    def __post_init__(self) -> None:
        if not (self.round_timeout > 0 and math.isfinite(self.round_timeout)):
            raise ValueError(f"round_timeout must be a positive number of seconds, got {self.round_timeout}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")
        if self.min_clients > self.num_clients:
            raise ValueError(
                f"min_clients ({self.min_clients}) exceeds num_clients ({self.num_clients}): "
                "cannot sample more clients than exist"
            )

    @property
    def clients_per_round(self) -> int:
        return min(self.num_clients, max(int(self.num_clients * self.fraction), self.min_clients))


PARTITION_KINDS = ("iid", "dirichlet", "label")


@dataclass
class PartitionConfig:
    """How the training split is divided among clients (flwr-datasets partitioners).

    ``iid``: uniform; ``dirichlet``: label skew with concentration ``alpha``;
    ``label``: one value of the column ``by`` (label, task, domain) per client.
    """

    kind: str = "dirichlet"
    alpha: float = 0.5
    min_partition_size: int = 10
    by: str = "label"

    def __post_init__(self) -> None:
        if self.kind not in PARTITION_KINDS:
            raise ValueError(f"kind: unknown partitioner {self.kind!r}; accepted: {', '.join(PARTITION_KINDS)}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha}")
        if self.min_partition_size < 0:
            raise ValueError(f"min_partition_size must be >= 0, got {self.min_partition_size}")


@dataclass
class TrainConfig:
    """Local training on each sampled client (optimizer rebuilt every round, as FedIT does)."""

    local_steps: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer: unknown {self.optimizer!r}; accepted: adamw, sgd")


@dataclass
class EvalConfig:
    """Server-side evaluation of the global model on the held-out test split."""

    batch_size: int = 64
    max_examples: int = 0  # 0 = the whole test split
    every: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


NODE_MAPS = ("engine", "rollcall")  # how a simulation's server learns node id -> partition id


@dataclass
class RuntimeConfig:
    """Where clients run.  Ray is capped to this machine and shut down after every run."""

    device: str = "auto"  # auto | cpu | cuda
    client_num_cpus: float = 1.0
    client_num_gpus: float | None = None  # None = auto: share the GPU among actors when present
    ray_num_cpus: int | None = 2
    ray_object_store_mb: int = 256
    ray_address: str | None = None
    log_level: str = "WARNING"  # Flower's own logger; fedtune prints one line per round
    fast_message_pump: bool = True  # simulation: O(messages) dispatch, not O(clients × messages)
    node_map: str = "engine"  # simulation: engine (read the engine's node map) | rollcall (ask every node)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: unknown {self.device!r}; accepted: auto, cpu, cuda")
        if not (self.client_num_cpus > 0 and math.isfinite(self.client_num_cpus)):
            raise ValueError(f"client_num_cpus must be a positive number, got {self.client_num_cpus}")
        if self.client_num_gpus is not None and not (self.client_num_gpus >= 0 and math.isfinite(self.client_num_gpus)):
            raise ValueError(f"client_num_gpus must be a number >= 0 (or null for auto), got {self.client_num_gpus}")
        if self.ray_num_cpus is not None and self.ray_num_cpus < 1:
            raise ValueError(f"ray_num_cpus must be >= 1, got {self.ray_num_cpus}")
        if self.ray_object_store_mb < 64:
            raise ValueError(f"ray_object_store_mb must be >= 64, got {self.ray_object_store_mb}")
        if self.node_map not in NODE_MAPS:
            raise ValueError(f"node_map: unknown {self.node_map!r}; accepted: {', '.join(NODE_MAPS)}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level: unknown {self.log_level!r}; accepted: {', '.join(LOG_LEVELS)}")
        if not self.ray_address and self.ray_num_cpus is not None and self.client_num_cpus > self.ray_num_cpus:
            raise ValueError(f"client_num_cpus ({self.client_num_cpus:g}) exceeds runtime.ray_num_cpus "
                             f"({self.ray_num_cpus}): no client could be scheduled")


PRIVACY_NAMES = ("none", "dp_sgd")
ACCOUNTANTS = ("rdp", "prv", "gdp")  # Opacus' accountants (fedtune/privacy/accounting.py)
DP_SAMPLINGS = ("poisson", "shuffle")
GRAD_SAMPLE_MODES = ("hooks", "functorch")  # the Opacus modes that work with peft LoRA and LoRA-SB


@dataclass
class PrivacyConfig:
    """Client-side differential privacy (``privacy=none`` is the default).

    ``dp_sgd``: example-level DP-SGD with Opacus in every first-order client loop
    (:mod:`fedtune.privacy`).  Give ``noise_multiplier`` (σ), or ``target_epsilon`` alone
    (σ calibrated per client over ``planned_rounds`` × ``train.local_steps`` steps), or
    both (σ fixed, ``target_epsilon`` only the budget at which a client stops).  ``δ < 1/n``
    (n = the largest client's examples) is checked where n is known.  σ = 0 is accepted
    (ε = ∞: a diagnostic run that must equal the non-private one).
    """

    name: str = "none"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    planned_rounds: int | None = None  # None: expected participation, ceil(num_rounds·fraction)
    sampling: str = "poisson"
    grad_sample_mode: str = "hooks"

    def __post_init__(self) -> None:
        if self.name not in PRIVACY_NAMES:
            raise ValueError(f"name: unknown privacy mode {self.name!r}; "
                             f"accepted: {', '.join(PRIVACY_NAMES)}, client_dp")
        if self.noise_multiplier is not None and not (self.noise_multiplier >= 0 and
                                                      math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a number >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.target_epsilon is not None and math.isinf(self.target_epsilon):
            raise ValueError("target_epsilon must be finite (null means no budget), got inf")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1) (and < 1/n for n examples per client), got {self.delta}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive number, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant: unknown {self.accountant!r}; accepted: {', '.join(ACCOUNTANTS)}")
        if self.planned_rounds is not None and self.planned_rounds < 1:
            raise ValueError(f"planned_rounds must be >= 1, got {self.planned_rounds}")
        if self.sampling not in DP_SAMPLINGS:
            raise ValueError(f"sampling: unknown {self.sampling!r}; accepted: {', '.join(DP_SAMPLINGS)}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode: unknown {self.grad_sample_mode!r}; "
                             f"accepted: {', '.join(GRAD_SAMPLE_MODES)}")
        if self.name == "dp_sgd" and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("noise_multiplier: dp_sgd needs privacy.noise_multiplier or privacy.target_epsilon")
        if self.noise_multiplier == 0 and self.target_epsilon is not None:
            raise ValueError("noise_multiplier 0 gives epsilon = inf: it cannot meet privacy.target_epsilon")


CLIPPING_SIDES = ("server", "client")


@dataclass
class ClientDPConfig:
    """Client-level (user-level) DP with Flower's fixed-clipping wrappers (``privacy=client_dp``).

    Each sampled client's update (reply − global) is clipped to L2 norm ``clipping_norm``
    (C) on the ``server`` or, by Flower's ``fixedclipping_mod``, on the ``client``; the
    server adds ``N(0, (σC/m)²)`` to the uniform mean of the m = clients_per_round
    updates (:mod:`fedtune.privacy.client_level`).  σ must be > 0: a σ of 0 releases the
    exact mean, which is no privacy.  ``delta`` is only used to report ε (δ < 1/num_clients
    is checked with the federation).  ``reproducible_noise``: draw the noise from the
    run's seeded stream (a simulation repeats exactly; anyone who knows the seed can
    remove the noise, so turn it off outside simulation).
    """

    name: str = "client_dp"
    clipping: str = "server"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    reproducible_noise: bool = True

    def __post_init__(self) -> None:
        if self.name != "client_dp":
            raise ValueError(f"name: expected 'client_dp' for this section, got {self.name!r}")
        if self.clipping not in CLIPPING_SIDES:
            raise ValueError(f"clipping: unknown side {self.clipping!r}; accepted: {', '.join(CLIPPING_SIDES)}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a positive number (sigma = 0 is no privacy), "
                             f"got {self.noise_multiplier}")
        if not (self.clipping_norm > 0 and math.isfinite(self.clipping_norm)):
            raise ValueError(f"clipping_norm must be a positive number, got {self.clipping_norm}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1) (and < 1/num_clients), got {self.delta}")


FAULT_MALFORMED = ("nan_value", "inf_value", "wrong_shape", "wrong_dtype", "missing_key", "extra_key",
                   "bad_num_examples")
FAULT_MODES = ("raise", "exit", *FAULT_MALFORMED, "malformed")  # malformed = each of FAULT_MALFORMED in turn


@dataclass
class FaultsConfig:
    """Fault injection on clients (off by default; :mod:`fedtune.flower.faults`).

    Each round, ``round(fraction · num_clients)`` partitions drawn from the stream
    ``("faults", round)`` are faulty; those sampled fail after their local training with
    the next of ``modes`` (cycled): ``raise`` (the ClientApp raises), ``exit`` (its process
    dies), or a malformed reply (``nan_value``, ``inf_value``, ``wrong_shape``, ``wrong_dtype``,
    ``missing_key``, ``extra_key``, ``bad_num_examples``; ``malformed`` = all of these in turn).
    ``server_kill_round`` > 0 kills the server process (SIGKILL, no clean-up) right after
    that round's checkpoint, to test ``fedtune run resume=RUN_DIR``.
    """

    fraction: float = 0.0
    modes: list[str] = field(default_factory=lambda: ["raise"])
    server_kill_round: int = 0

    def __post_init__(self) -> None:
        if self.server_kill_round < 0:
            raise ValueError(f"server_kill_round must be >= 0 (0 = off), got {self.server_kill_round}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if not self.modes:
            raise ValueError(f"modes must name at least one fault; accepted: {', '.join(FAULT_MODES)}")
        for mode in self.modes:
            if mode not in FAULT_MODES:
                raise ValueError(f"modes: unknown fault {mode!r}; accepted: {', '.join(FAULT_MODES)}")


@dataclass
class RunConfig:
    """Everything one federated run needs; the single source of truth for server and clients."""

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
    privacy: PrivacyConfig | ClientDPConfig = field(default_factory=PrivacyConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _named_section(data: dict[str, Any], section: str, registry: Any) -> Any:
    raw = data.get(section)
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"{section}.name is missing; accepted: {', '.join(registry.names())}")
    spec = registry.get(raw["name"])
    return build(spec.config_cls, raw, section)


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a composed config mapping and return the typed :class:`RunConfig`."""
    from fedtune.registry import DATASETS, METHODS, MODELS

    data = {k: v for k, v in data.items() if k != "hydra"}
    named = {
        "strategy": _named_section(data, "strategy", METHODS),
        "model": _named_section(data, "model", MODELS),
        "dataset": _named_section(data, "dataset", DATASETS),
    }
    from fedtune.models.causal_lm import check_model_dataset

    check_model_dataset(named["model"].name, named["dataset"].name)  # a causal LM needs an instruction task
    if isinstance(data.get("privacy"), dict) and data["privacy"].get("name") == "client_dp":
        from fedtune.privacy.client_level import build_section

        named["privacy"] = build_section(data["privacy"])  # its own dataclass, ClientDPConfig
    rest = {k: v for k, v in data.items() if k not in named}
    cfg = build(RunConfig, {**rest, **{k: {} for k in named}}, "")
    for key, value in named.items():
        setattr(cfg, key, value)
    from fedtune.privacy.accounting import check_supported

    check_supported(cfg)  # e.g. privacy=dp_sgd with a zeroth-order method: refused here
    return cfg


GROUPS = ("strategy", "model", "dataset", "privacy")


def check_group_choices(overrides: list[str]) -> None:
    """Fail early, in one line, on ``group=name`` overrides that name no config file.

    Hydra would print a multi-line report; the user only needs the accepted names.
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in GROUPS:
            continue
        accepted = sorted({p.stem for d in config_search_dirs() for p in (d / key).glob("*.yaml")})
        for choice in value.split(","):  # multirun sweeps list choices with commas
            if choice.strip() not in accepted:
                raise ConfigError(f"{key}: unknown option {choice.strip()!r}; accepted: {', '.join(accepted)}")


def config_search_dirs() -> list[Path]:
    """``configs/``, then the config directories that registered methods ship (a method
    packaged outside fedtune brings its ``strategy/<name>.yaml``)."""
    from fedtune.registry import config_dirs

    return [CONFIG_DIR, *config_dirs()]


def search_overrides() -> list[str]:
    """The Hydra override that adds those directories to its search path (none without them)."""
    extra = [f"file://{d}" for d in config_search_dirs()[1:]]
    return [f"hydra.searchpath=[{','.join(extra)}]"] if extra else []


def compose(overrides: list[str] | str = ()) -> RunConfig:
    """Compose ``configs/`` with Hydra overrides (as on the command line) and validate.

    Used by the Flower apps under ``flwr run`` and by tests; the ``fedtune run`` CLI
    goes through ``@hydra.main`` instead so that multirun and run directories work.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    check_group_choices(list(overrides))
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = hydra_compose(config_name="config", overrides=[*overrides, *search_overrides()])
            data = OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        from fedtune.hydra_errors import error_line

        raise ConfigError(error_line(exc, list(overrides))) from None
    return from_dict(data)  # type: ignore[arg-type]
