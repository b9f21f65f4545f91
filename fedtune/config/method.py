"""What every method's config has in common: its name and the client weighting.

Each method's config dataclass (``strategies/<name>.py``) subclasses
:class:`MethodConfig`, so ``weighting`` is declared and validated once; the strategy
base reads ``config.weighting`` and trusts it.
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHTINGS = ("examples", "uniform")


@dataclass
class MethodConfig:
    """Fields shared by every ``strategy=<name>`` section.

    name : the method's registry name (set by each subclass).
    weighting : the client weights p_k of the aggregate, ``examples`` (p_k = n_k / Σ_j n_j,
        FedAvg) or ``uniform`` (p_k = 1/N); a method may default to either.
    """

    name: str = ""
    weighting: str = "examples"  # examples | uniform

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: unknown {self.weighting!r}; accepted: {', '.join(WEIGHTINGS)}")
