"""The fixed sections of a run's configuration, each a dataclass that is its own schema.

These classes are registered in Hydra's ConfigStore (:mod:`fedtune.config.composition`),
so their field defaults are the only defaults: ``configs/config.yaml`` selects options
and YAML files override.  Each validates itself in ``__post_init__`` with a
``ValueError`` that starts with the field name (:func:`fedtune.schema.build` adds the path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedtune.schedule import SCHEDULES


@dataclass
class FederationConfig:
    """Who takes part: ``num_clients`` partitions, ``fraction`` of them sampled per round."""

    num_clients: int = 10  # partitions = virtual clients (SuperNodes)
    fraction: float = 1.0  # share sampled per round, from the seeded stream
    min_clients: int = 1  # fewest valid replies a round needs to update the model
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

    ``iid``: uniform; ``dirichlet``: skew over the column ``by`` with concentration ``alpha``;
    ``label``: one value of the column ``by`` per client (natural partitions).  ``by`` is
    ``label`` or a column of the dataset (``dataset=hf``: ``category``, a task id, ...).
    """

    kind: str = "dirichlet"  # iid | dirichlet | label
    alpha: float = 0.5  # Dirichlet concentration over labels (smaller = more skew)
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
    """Local training on each sampled client (optimizer rebuilt every round, as FedIT does).

    lr_schedule : ``constant`` (every round at ``lr``) or ``cosine`` (FlowerTune's annealing
        across rounds: round 1 at ``lr``, the last round at ``lr_min``; :mod:`fedtune.schedule`).
    warmup_steps : linear warmup over a round's first local steps (step s at
        ``min(1, (s+1)/warmup_steps)`` of the round's lr); 0 = off.
    """

    local_steps: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (rebuilt every round)
    lr_schedule: str = "constant"  # constant | cosine (across rounds, lr -> lr_min)
    lr_min: float = 0.0  # the last round's lr under cosine (FlowerTune: 1e-6 for lr 5e-5)
    warmup_steps: int = 0  # linear warmup over the first local steps of every round (0 = off)

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
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule: unknown {self.lr_schedule!r}; accepted: {', '.join(SCHEDULES)}")
        if not (self.lr_min >= 0 and math.isfinite(self.lr_min)):
            raise ValueError(f"lr_min must be a finite number >= 0, got {self.lr_min}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (0 = off), got {self.warmup_steps}")


EVAL_SPLITS = ("test", "validation")


@dataclass
class EvalConfig:
    """Server-side evaluation of the global model on the held-out test split.

    ``split``: what the server scores, ``test`` or ``validation`` (``dataset.validation_fraction
    > 0``: carved from the training split), so a tuning study never looks at the test split.
    ``max_new_tokens``: greedy decoding's cap on a generative dataset (:mod:`fedtune.generation`).
    """

    batch_size: int = 64
    max_examples: int = 0  # 0 = the whole test split
    every: int = 1  # evaluate the global model every N rounds (and the last)
    split: str = "test"  # test | validation
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, got {self.max_examples}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.split not in EVAL_SPLITS:
            raise ValueError(f"split: unknown {self.split!r}; accepted: {', '.join(EVAL_SPLITS)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


NODE_MAPS = ("engine", "rollcall")  # how a simulation's server learns node id -> partition id


@dataclass
class RuntimeConfig:
    """Where clients run.  Ray is capped to this machine and shut down after every run."""

    device: str = "auto"  # auto | cpu | cuda
    client_num_cpus: float = 1.0  # Ray actors = ray_num_cpus / client_num_cpus
    client_num_gpus: float | None = None  # None = auto: share the GPU among actors when present
    ray_num_cpus: int | None = 2
    ray_object_store_mb: int = 256
    ray_address: str | None = None  # attach to an existing Ray cluster instead
    log_level: str = "WARNING"  # Flower's own logger; fedtune prints one line per round
    fast_message_pump: bool = True  # simulation: O(messages) dispatch, not O(clients × messages)
    node_map: str = "engine"  # simulation: engine (read the engine's node map) | rollcall (ask every node)
    warm_actors: bool = False  # with ray_address: client actors outlive the run; the next one reuses them

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
        if self.warm_actors and not self.ray_address:
            raise ValueError("warm_actors needs runtime.ray_address (a cluster that outlives the run); "
                             "a local Ray ends with its run")
        if not self.ray_address and self.ray_num_cpus is not None and self.client_num_cpus > self.ray_num_cpus:
            raise ValueError(f"client_num_cpus ({self.client_num_cpus:g}) exceeds runtime.ray_num_cpus "
                             f"({self.ray_num_cpus}): no client could be scheduled")


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


