"""A method's tuning search space, and the trials an equal budget gives it.

Papers tune each method; a comparison at one shared learning rate ranks a method by how
well that rate suits it.  So every method declares, in its own ``register_method(...,
tuning=...)``, the knobs worth tuning and their candidates: an override key
(``train.lr``, ``strategy.rank``) mapped to absolute values or to :class:`Relative`
factors of the run's own value.  Factors keep one declaration sensible across models
(SmolLM2's LoRA lr is 5e-4 where MiniLM's is 1e-3; FedKSeed's is 1e-4 on MiniLM).

The *default point* is the untuned run: every knob at the value the run has without the
knob's override (the base config).  :func:`resolve_space` puts that value first in each
knob's list, so the grid's first point is the default point; :func:`select_trials` keeps
every method within the same number of trials and always keeps the default point, so a
tuned method is never scored worse on validation than its untuned self.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Relative:
    """Candidates as factors of the run's own value of the knob: ``Relative(1, 0.3, 3)``
    on a base lr of 1e-3 tries 1e-3, 3e-4 and 3e-3.  Factor 1 (the default point) is required."""

    factors: tuple[float, ...]

    def __init__(self, *factors: float) -> None:
        if 1 not in factors:
            raise ValueError(f"Relative{factors}: factor 1 (the untuned value) must be a candidate")
        if any(not f > 0 for f in factors):
            raise ValueError(f"Relative{factors}: factors must be > 0")
        object.__setattr__(self, "factors", tuple(float(f) for f in factors))


# The learning rates every first-order method tries: the untuned value, 0.3x, 3x and 10x.
LEARNING_RATES = Relative(1.0, 0.3, 3.0, 10.0)

Space = Mapping[str, Any]  # override key -> tuple of values, or Relative


def _scaled(base: Any, factor: float) -> Any:
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise ValueError(f"Relative factors need a numeric base value, got {base!r}")
    if isinstance(base, int):
        return max(1, int(round(base * factor)))
    return float(f"{base * factor:.3g}")  # 3 significant digits: 3e-4, not 0.00030000000000000003


def resolve_space(space: Space, base: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Each knob's candidate values, the base (untuned) value first, no value twice.

    ``base``: the run's value of every knob of ``space`` without the knob's override."""
    out: dict[str, list[Any]] = {}
    for key, candidates in space.items():
        if key not in base:
            raise KeyError(f"{key}: no base value (the run's config has no such field)")
        values = ([_scaled(base[key], f) for f in candidates.factors] if isinstance(candidates, Relative)
                  else list(candidates))
        out[key] = [base[key]] + [v for i, v in enumerate(values) if v != base[key] and v not in values[:i]]
    return out


def grid(values: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """The full product of the knobs' values, in order; the first point is the default point."""
    keys = list(values)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values[k] for k in keys))]


def select_trials(values: Mapping[str, list[Any]], budget: int, seed: int, *keys: str) -> list[dict[str, Any]]:
    """The trials of a budget of ``budget``: the whole grid when it fits; else the default
    point, then points that try candidates not tried yet (most new ones first), then any
    others, each taken in a seeded order (stream ``(seed, "tuning", *keys)``); returned in
    grid order.  So every candidate of every knob is tried once the budget allows it, a
    random subset could leave a whole learning rate out.  Deterministic; never more than
    ``budget`` trials for any method."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    points = grid(values)
    if len(points) <= budget:
        return points
    from fedtune.randomness import numpy_rng  # torch is not needed to declare a space

    order = (numpy_rng(seed, "tuning", *keys).permutation(len(points) - 1) + 1).tolist()
    tried = lambda i: {(k, repr(v)) for k, v in points[i].items()}  # noqa: E731
    chosen, covered = [0], tried(0)
    while len(chosen) < budget:
        fresh = [i for i in order if i not in chosen]
        best = max(fresh, key=lambda i: len(tried(i) - covered))  # max keeps the first of equals: the seeded order
        if not tried(best) - covered:
            chosen += fresh[: budget - len(chosen)]
            break
        chosen.append(best)
        covered |= tried(best)
    return [points[i] for i in sorted(chosen)]


def overrides_of(point: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides that set ``point``."""
    return [f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}" for key, value in point.items()]


def config_value(cfg: Any, key: str) -> Any:
    """The value at a dotted ``key`` of a composed :class:`~fedtune.config.run.RunConfig`."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value
