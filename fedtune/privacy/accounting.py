"""Privacy accounting per client, across the rounds it takes part in.

Why the state is the accountant's *history*: Opacus' accountants (RDP, PRV, GDP) are
pure functions of the list of ``(noise_multiplier, sample_rate, steps)`` triples they
record, one per run of identical steps.  Storing that list (a tiny ``(k, 3)`` float64
tensor) in :class:`~fedtune.trainer.TrainContext.state` — Flower's ``Context.state`` —
lets any worker process rebuild the client's accountant, continue it for this round's
steps and recompute ε from scratch: ε composes over *all* the client's local steps, not
per round, whichever process served it before.

Noise calibration follows ``PrivacyEngine.make_private_with_epsilon``: the smallest σ
(binary search, :func:`opacus.accountants.utils.get_noise_multiplier`) whose ε after the
*planned* steps is at most ``target_epsilon``.  The plan is per client, because the
sample rate ``q = batch_size / n_k`` depends on its data size.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from fedtune.errors import ConfigError
from fedtune.registry import METHODS

HISTORY_KEY = "dp/history"  # TrainContext.state key of the accountant's (σ, q, steps) rows


def check_supported(cfg: Any) -> None:
    """Refuse ``privacy=dp_sgd`` with a method that does not declare example-level DP (its
    :class:`~fedtune.capabilities.Capabilities` say why)."""
    support = METHODS.get(cfg.strategy.name).capabilities.example_dp
    if not support.ok:
        raise ConfigError(f"privacy: {cfg.privacy.name} is not supported with strategy={cfg.strategy.name}: "
                          f"{support.reason}")
    support.check(cfg.strategy, f"privacy={cfg.privacy.name}")


def not_accounted(cfg: Any) -> dict[str, str]:
    """summary.json's ``privacy.not_accounted``: what the method's one-time setup computes on
    client data outside the DP mechanism (empty when it declares no such setup)."""
    note = METHODS.get(cfg.strategy.name).capabilities.setup_note(cfg.strategy)
    return {"not_accounted": note} if note else {}


def check_delta(cfg: Any, partition_sizes: list[int]) -> None:
    """``δ < 1/n`` for every client (n = its examples); else a :class:`ConfigError`.

    A δ of 1/n or more allows a mechanism that publishes one example outright.
    """
    if cfg.privacy.name != "dp_sgd" or not partition_sizes:  # client_dp: δ < 1/num_clients, checked at config time
        return
    n = max(partition_sizes)
    if not cfg.privacy.delta < 1.0 / n:
        raise ConfigError(f"privacy.delta must be < 1/n = {1.0 / n:.3g} (the largest client holds n = {n} "
                          f"examples), got {cfg.privacy.delta}")


def load_history(state: dict[str, Any]) -> list[tuple[float, float, int]]:
    """The accountant's history as Opacus keeps it (an empty list before the first round)."""
    rows = state.get(HISTORY_KEY)
    if rows is None:
        return []
    return [(float(s), float(q), int(t)) for s, q, t in torch.as_tensor(rows).reshape(-1, 3).tolist()]


def save_history(state: dict[str, Any], history: list[tuple[float, float, int]]) -> None:
    state[HISTORY_KEY] = torch.tensor(history, dtype=torch.float64).reshape(-1, 3)


def extended(history: list[tuple[float, float, int]], accountant: str, noise: float, sample_rate: float,
             steps: int) -> list[tuple[float, float, int]]:
    """``history`` after ``steps`` more steps, merged exactly as the accountant's ``step`` merges."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    for _ in range(steps):
        acc.step(noise_multiplier=noise, sample_rate=sample_rate)
    return list(acc.history)


def epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """ε spent after ``history`` at ``delta`` (0 before any step; ∞ if a step had σ = 0)."""
    if not history:
        return 0.0
    if any(noise == 0 for noise, _, _ in history):
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def planned_rounds(cfg: Any) -> int:
    """Rounds a client is planned to train: ``privacy.planned_rounds`` or its expected share."""
    if cfg.privacy.planned_rounds is not None:
        return int(cfg.privacy.planned_rounds)
    share = cfg.federation.clients_per_round / cfg.federation.num_clients
    return max(1, math.ceil(cfg.num_rounds * share - 1e-9))


def sample_rate(batch_size: int, n: int) -> float:
    """Poisson rate ``q`` whose expected batch is ``batch_size`` (1 when the client has fewer)."""
    return min(1.0, batch_size / n)


@functools.lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant=accountant))


def noise_multiplier(cfg: Any, n: int) -> float:
    """σ of a client with ``n`` examples: the configured one, or calibrated to the target ε
    over ``planned_rounds(cfg) × train.local_steps`` steps at its sample rate."""
    pc = cfg.privacy
    if pc.noise_multiplier is not None:
        return float(pc.noise_multiplier)
    steps = planned_rounds(cfg) * cfg.train.local_steps
    try:
        return _calibrated(pc.target_epsilon, pc.delta, sample_rate(cfg.train.batch_size, n), steps, pc.accountant)
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise ConfigError(f"privacy.target_epsilon {pc.target_epsilon} cannot be reached in {steps} steps "
                          f"at q = {sample_rate(cfg.train.batch_size, n):.3g}: {exc}") from None
