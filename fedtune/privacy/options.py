"""The privacy options (``privacy=none|dp_sgd|client_dp``): their config dataclasses.

Each option is registered in :data:`fedtune.registry.PRIVACY` as a :class:`PrivacySpec`
(its dataclass and the check that refuses what it cannot protect) by the module that
implements it: ``none`` here, ``dp_sgd`` in :mod:`fedtune.privacy.dp_sgd`, ``client_dp``
in :mod:`fedtune.privacy.client_level`.  The dataclasses are the schema and the
defaults of ``privacy=<name>`` (registered in Hydra's ConfigStore like every group).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from fedtune.registry import PRIVACY

ACCOUNTANTS = ("rdp", "prv", "gdp")  # Opacus' accountants (fedtune/privacy/accounting.py)
DP_SAMPLINGS = ("poisson", "shuffle")
GRAD_SAMPLE_MODES = ("hooks", "functorch")  # the Opacus modes that work with peft LoRA and LoRA-SB


@dataclass(frozen=True)
class PrivacySpec:
    """What ``privacy=<name>`` selects: its config dataclass, and ``check(run_cfg)`` that
    raises a :class:`~fedtune.errors.ConfigError` for a combination it does not protect."""

    config_cls: type
    check: Callable[[Any], None] = lambda cfg: None


@dataclass
class NoPrivacyConfig:
    """``privacy=none`` (the default): no differential privacy; metrics.csv's epsilon stays empty."""

    name: str = "none"


@dataclass
class DPSGDConfig:
    """``privacy=dp_sgd``: example-level DP-SGD with Opacus in every first-order client loop
    (:mod:`fedtune.privacy.dp_sgd`).

        fedtune run privacy=dp_sgd privacy.target_epsilon=3                     # sigma calibrated per client
        fedtune run privacy=dp_sgd privacy.noise_multiplier=1.0 privacy.target_epsilon=8   # fixed sigma, budget 8

    A client whose next round would exceed ``target_epsilon`` sends nothing more
    (metrics.csv: epsilon).  Zeroth-order methods are refused (see the README).

    Give ``noise_multiplier`` (σ), or ``target_epsilon`` alone (σ calibrated per client
    over ``planned_rounds`` × ``train.local_steps`` steps), or both (σ fixed,
    ``target_epsilon`` only the budget at which a client stops).  ``δ < 1/n``
    (n = the largest client's examples) is checked where n is known.  σ = 0 is accepted
    (ε = ∞: a diagnostic run that must equal the non-private one).
    """

    name: str = "dp_sgd"
    noise_multiplier: float | None = None  # sigma; null = calibrated from target_epsilon
    target_epsilon: float | None = 3.0  # the budget per client; null = no budget (noise_multiplier required)
    delta: float = 1e-5  # must be < 1/n, n = examples of the largest client
    max_grad_norm: float = 1.0  # per-example clipping bound C
    accountant: str = "rdp"  # rdp | prv | gdp (Opacus)
    planned_rounds: int | None = None  # rounds a client trains (sigma calibration); null = ceil(num_rounds·fraction)
    sampling: str = "poisson"  # poisson (what the accountant assumes) | shuffle (the non-private batches; diagnostics)
    grad_sample_mode: str = "hooks"  # hooks | functorch (both work with peft LoRA and LoRA-SB)

    def __post_init__(self) -> None:
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
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("noise_multiplier: dp_sgd needs privacy.noise_multiplier or privacy.target_epsilon")
        if self.noise_multiplier == 0 and self.target_epsilon is not None:
            raise ValueError("noise_multiplier 0 gives epsilon = inf: it cannot meet privacy.target_epsilon")


CLIPPING_SIDES = ("server", "client")


@dataclass
class ClientDPConfig:
    """``privacy=client_dp``: client-level (user-level) DP with Flower's fixed-clipping wrappers.

        fedtune run privacy=client_dp strategy.weighting=uniform privacy.noise_multiplier=1.0 privacy.clipping_norm=0.5
        fedtune run privacy=client_dp strategy=fed_sb privacy.clipping=client   # fixedclipping_mod on the clients

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
    clipping: str = "server"  # server (DifferentialPrivacyServerSideFixedClipping) | client (+ fixedclipping_mod)
    noise_multiplier: float = 1.0  # sigma > 0; noise std on the mean is sigma * clipping_norm / clients_per_round
    clipping_norm: float = 1.0  # C, L2 bound of one client's update over all its uploaded arrays
    delta: float = 1e-5  # for the reported epsilon (RDP, sample rate clients_per_round/num_clients)
    reproducible_noise: bool = True  # noise from the run's seeded stream (simulation); false outside simulation
    MISPLACED: ClassVar[dict[str, str]] = {}  # DP-SGD's fields, refused by name (filled below)

    def __post_init__(self) -> None:
        if self.clipping not in CLIPPING_SIDES:
            raise ValueError(f"clipping: unknown side {self.clipping!r}; accepted: {', '.join(CLIPPING_SIDES)}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a positive number (sigma = 0 is no privacy), "
                             f"got {self.noise_multiplier}")
        if not (self.clipping_norm > 0 and math.isfinite(self.clipping_norm)):
            raise ValueError(f"clipping_norm must be a positive number, got {self.clipping_norm}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1) (and < 1/num_clients), got {self.delta}")


ClientDPConfig.MISPLACED.update({
    f.name: "belongs to privacy=dp_sgd: client_dp cannot be combined with example-level DP-SGD "
            "(one privacy mechanism per run; their composition is not implemented)"
    for f in dataclasses.fields(DPSGDConfig) if f.name not in {g.name for g in dataclasses.fields(ClientDPConfig)}
})

PRIVACY.register("none", PrivacySpec(NoPrivacyConfig))
