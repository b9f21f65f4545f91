"""The learning rate of a round, and of a step within it (``train.lr_schedule``, ``train.warmup_steps``).

``constant``: every round trains at the method's step size (``train.lr``, or the field
the method declares in :attr:`~fedtune.capabilities.Capabilities.step_size`).
``cosine``: FlowerTune's cosine annealing across rounds, from that step size ``lr`` down
to ``train.lr_min``; round ``r`` of ``R`` (1-based) trains at

    lr_r = lr_min + ½ (lr − lr_min) (1 + cos(π (r − 1) / (R − 1))),

so round 1 gets ``lr`` exactly, round ``R`` gets ``lr_min`` exactly, and a one-round run
``lr``.  Within a round, ``warmup_steps = W > 0`` scales local step ``s`` (0-based) by
``min(1, (s + 1) / W)``: linear warmup for optimisers whose fresh moment estimates make
the first steps too large (AdamW, rebuilt every round).  The lr is a pure function of
(config, round, step), so every client, the server's replay and a resumed run agree.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from fedtune.errors import ConfigError

SCHEDULES = ("constant", "cosine")


def round_lr(schedule: str, lr: float, lr_min: float, server_round: int, num_rounds: int) -> float:
    """The lr of round ``server_round`` (1-based) of ``num_rounds`` (module doc)."""
    if schedule == "constant" or num_rounds <= 1:
        return lr
    if schedule != "cosine":
        raise ValueError(f"lr_schedule: unknown {schedule!r}; accepted: {', '.join(SCHEDULES)}")
    k = min(max(server_round - 1, 0), num_rounds - 1)
    if k in (0, num_rounds - 1):  # the end points exactly, not up to rounding
        return lr if k == 0 else lr_min
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * k / (num_rounds - 1)))


def warmup_factor(warmup_steps: int, step: int) -> float:
    """``min(1, (step + 1) / warmup_steps)`` for local step ``step`` (0-based); 1 without warmup."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def train_lr(cfg: Any, server_round: int, peak: float | None = None) -> float:
    """Round ``server_round``'s lr of ``cfg`` (a RunConfig) from ``peak`` (default ``train.lr``)."""
    t = cfg.train
    return round_lr(t.lr_schedule, t.lr if peak is None else peak, t.lr_min, server_round, cfg.num_rounds)


def step_size_field(cfg: Any) -> str:
    """The config field the method's schedule starts from (its declared ``step_size``)."""
    from fedtune.registry import METHODS

    return METHODS.get(cfg.strategy.name).capabilities.step_size


def method_lr(cfg: Any, server_round: int) -> float:
    """The lr the method trains at in ``server_round`` (recorded in metrics.csv's ``lr``)."""
    return train_lr(cfg, server_round, float(operator.attrgetter(step_size_field(cfg))(cfg)))


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_schedule(cfg: Any) -> None:
    """Refuse, before Ray, a schedule the method does not declare it follows (one line)."""
    from fedtune.registry import METHODS

    caps, t, name = METHODS.get(cfg.strategy.name).capabilities, cfg.train, cfg.strategy.name
    if t.lr_schedule != "constant" and not caps.lr_schedule.ok:
        raise ConfigError(f"train.lr_schedule={t.lr_schedule} is not supported by strategy={name}: "
                          f"{caps.lr_schedule.reason}; accepted: constant")
    if t.warmup_steps and not caps.warmup.ok:
        raise ConfigError(f"train.warmup_steps must be 0 for strategy={name}, got {t.warmup_steps}: "
                          f"{caps.warmup.reason}")
    peak = float(operator.attrgetter(caps.step_size)(cfg))
    if t.lr_schedule != "constant" and t.lr_min > peak:
        raise ConfigError(f"train.lr_min ({t.lr_min:g}) exceeds {caps.step_size} ({peak:g}), the schedule's "
                          f"maximum for strategy={name}")
