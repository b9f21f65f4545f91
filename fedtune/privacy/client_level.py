"""Client-level (user-level) DP: a fedtune method inside Flower's fixed-clipping wrappers.

``privacy=client_dp`` wraps the method's strategy in Flower's own
``DifferentialPrivacyServerSideFixedClipping`` (``clipping: server``) or
``DifferentialPrivacyClientSideFixedClipping`` (``clipping: client``; the ClientApp then
runs Flower's ``fixedclipping_mod`` around its train handler, :func:`clip_on_client`).
Flower does the mechanism: each update ``reply − global`` is clipped to L2 norm C, the
aggregate gets ``N(0, (σC/m)²)`` per coordinate, m = ``num_sampled_clients``.

Why only some methods, and only ``weighting: uniform``: that noise protects a client
exactly when the released state is ``global + (1/m) Σ_k clip(Δ_k)``, i.e. the *uniform*
mean of the m uploads (one client moves it by at most C/m, the noise is σ times that).
A method declares whether it releases exactly that mean of its payload, and under which
of its settings (``weighting: uniform``: a mean weighted by examples lets one client move
it by ``p_k·C > C/m``), in its ``capabilities.client_dp``; a method that releases something
else says what (:mod:`fedtune.capabilities`).  Everything here is a wrapper around any
such strategy, not a variant per method.

What :class:`ClientLevelDP` adds around Flower's wrapper (fedtune's strategies keep
their state in ``global_arrays`` and never read the ``arrays`` of Flower's loop):

* the noisy aggregate *becomes* the strategy's state right after aggregation, so the
  next round's clients, the central evaluation and the exported adapter all see it;
* a round in which fewer than the m sampled clients contribute releases nothing (the
  noise is calibrated for m), and the state is left as it was;
* fedtune's one loop drives it (``FedtuneStrategy.start(driver=self)``): the grid is
  metered once, into the strategy's ledger, and a run resumes (:meth:`state_dict`);
* the clipping reference is what the clients were sent (a one-time setup may
  have changed it), replies are put in that key order (Flower pairs arrays by position), and with
  client-side clipping the server checks that every update really is within C;
* the noise comes from the run's seeded stream (``reproducible_noise``) and ε is
  accounted with Opacus' RDP accountant (Flower's own accountant requires its FedAvg).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, Result, Strategy)

from fedtune.errors import ConfigError
from fedtune.flower.round_loop import RoundHooks
from fedtune.flower.strategy import FedtuneStrategy, RoundInfo
from fedtune.privacy.accounting import epsilon, not_accounted
from fedtune.privacy.options import CLIPPING_SIDES, ClientDPConfig, PrivacySpec
from fedtune.randomness import derive_seed
from fedtune.registry import PRIVACY
from fedtune.results.state_codec import check_state_keys

NOT_COVERED = "the clients' train-loss metrics (Flower's wrappers protect the arrays only)"


# ----------------------------------------------------------------------------- config
def check_supported(cfg: Any) -> None:
    """Refuse a method that does not declare client-level DP (its capabilities say why) or
    whose conditions for it (e.g. ``weighting: uniform``) are unmet, and δ ≥ 1/num_clients."""
    from fedtune.registry import METHODS

    name = cfg.strategy.name
    support = METHODS.get(name).capabilities.client_dp
    if not support.ok:
        accepted = [spec.name for spec in METHODS.values() if spec.capabilities.client_dp.ok]
        raise ConfigError(f"privacy: client_dp is not supported with strategy={name}: {support.reason}; "
                          f"accepted: {', '.join(accepted)}")
    support.check(cfg.strategy, "privacy=client_dp")
    n = cfg.federation.num_clients
    if not cfg.privacy.delta < 1.0 / n:
        raise ConfigError(f"privacy.delta must be < 1/num_clients = {1.0 / n:.3g} (the unit of client-level "
                          f"privacy is a client), got {cfg.privacy.delta}")


# ----------------------------------------------------------------------------- server
class ClientLevelDP(Strategy):
    """Flower's fixed-clipping DP wrapper around a :class:`FedtuneStrategy` (module doc).

    Parameters
    ----------
    strategy : the method's strategy; it keeps the rounds, ledger and global state.
    clipping : ``"server"`` or ``"client"`` (then the ClientApp must clip, :func:`clip_on_client`).
    noise_multiplier, clipping_norm : σ and C of Flower's wrapper (σ = 0 is accepted here,
        as by Flower, for checks; the config requires σ > 0).
    delta : δ of the reported ε.
    noise_seed : the run seed, or ``None`` to leave NumPy's global generator alone.
    """

    def __init__(self, strategy: FedtuneStrategy, *, clipping: str, noise_multiplier: float, clipping_norm: float,
                 delta: float = 1e-5, noise_seed: int | None = None) -> None:
        super().__init__()
        if clipping not in CLIPPING_SIDES:
            raise ValueError(f"clipping must be one of {CLIPPING_SIDES}, got {clipping!r}")
        wrapper = (DifferentialPrivacyServerSideFixedClipping if clipping == "server"
                   else DifferentialPrivacyClientSideFixedClipping)
        self.dp = wrapper(strategy, noise_multiplier, clipping_norm, strategy.clients_per_round)
        self.inner, self.clipping, self.delta, self.noise_seed = strategy, clipping, delta, noise_seed
        self.sample_rate = strategy.clients_per_round / strategy.num_clients
        self.released: list[int] = []  # rounds whose noisy aggregate became the global state
        self.withheld: list[int] = []  # rounds that released nothing

    @classmethod
    def from_config(cls, strategy: FedtuneStrategy, cfg: Any) -> "ClientLevelDP":
        pc = cfg.privacy
        return cls(strategy, clipping=pc.clipping, noise_multiplier=pc.noise_multiplier,
                   clipping_norm=pc.clipping_norm, delta=pc.delta,
                   noise_seed=cfg.seed if pc.reproducible_noise else None)

    @property
    def noise_std(self) -> float:
        return self.dp.noise_multiplier * self.dp.clipping_norm / self.dp.num_sampled_clients

    def epsilon(self, sample_rate: float | None = None) -> float:
        """ε after the released rounds: Opacus RDP, subsampled Gaussian (σ, q, releases)."""
        q = self.sample_rate if sample_rate is None else sample_rate
        history = [(float(self.dp.noise_multiplier), q, len(self.released))] if self.released else []
        return epsilon(history, self.delta, "rdp")

    # ------------------------------------------------------------------ Flower API
    def summary(self) -> None:
        self.dp.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              resume: dict[str, Any] | None = None, hooks: RoundHooks | None = None) -> Result:
        """The inner strategy's ``start`` (fedtune's loop) driving this wrapper; ``resume``
        also restores the released rounds (``resume["privacy"]``)."""
        if resume is not None:
            self.load_state_dict(resume["privacy"])
        return self.inner.start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                                evaluate_fn, resume=resume, hooks=hooks, driver=self)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.dp.configure_train(server_round, arrays, config, grid))
        if isinstance(self.dp, DifferentialPrivacyServerSideFixedClipping):  # clip against what was sent
            self.dp.current_arrays = ArrayRecord(self.inner.global_arrays)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        info = self.inner.rounds.setdefault(server_round, RoundInfo())
        before = dict(self.inner.global_arrays)
        replies = self._screen(list(replies), info)
        with self._noise_stream(server_round):
            arrays, metrics = self.dp.aggregate_train(server_round, replies)
        m = self.dp.num_sampled_clients
        if arrays is None or len(info.received) != m:
            self.inner.global_arrays = before  # the inner aggregate (if any) was not released
            self._note_missing(replies, info)
            self.withheld.append(server_round)
            info.epsilon = self.epsilon()
            log(WARNING, "round %d: %d of the %d sampled clients contributed; client-level DP releases nothing "
                "(its noise is calibrated for %d): global state unchanged", server_round, len(info.received), m, m)
            return None, metrics
        self.inner.global_arrays = arrays.to_torch_state_dict()  # the noisy state is the state
        self.released.append(server_round)
        info.epsilon = self.epsilon()
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.dp.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ internals
    def _screen(self, replies: list[Message], info: RoundInfo) -> list[Message]:
        """Put each reply's arrays in the global key order (Flower pairs them by position);
        leave out, as failed, a reply with other keys or shapes (Flower's clipping would
        fail on it) or, under client-side clipping, an update above C (a client without
        ``fixedclipping_mod``): the round is then withheld."""
        keys = list(self.inner.global_arrays)
        kept = []
        for reply in replies:
            if reply.has_error() or "arrays" not in reply.content:
                kept.append(reply)
                continue
            record = reply.content["arrays"]
            pid = self.inner.partition_of_node.get(reply.metadata.src_node_id, -1)
            if sorted(record.keys()) != sorted(keys) or any(
                    tuple(record[k].shape) != tuple(self.inner.global_arrays[k].shape) for k in keys):
                reason = "rejected payload: its keys or shapes differ from the global state (client-level DP)"
            else:
                if list(record.keys()) != keys:
                    reply.content["arrays"] = record = ArrayRecord(array_dict={k: record[k] for k in keys})
                norm = update_norm(record, self.inner.global_arrays) if self.clipping == "client" else 0.0
                if norm <= self.dp.clipping_norm * (1 + 1e-3) + 1e-4:  # fp32 round-off of the client's clip
                    kept.append(reply)
                    continue
                reason = (f"rejected payload: update norm {norm:.4g} exceeds clipping_norm {self.dp.clipping_norm} "
                          "(client-side clipping not applied)")
            info.failures[pid] = reason
            log(WARNING, "client %d: %s", pid, reason)
        return kept

    def _note_missing(self, replies: list[Message], info: RoundInfo) -> None:
        """Failures of a round Flower's wrapper skipped (it aggregates nothing once a reply is an error)."""
        answered = set()
        for reply in replies:
            pid = self.inner.partition_of_node.get(reply.metadata.src_node_id, -1)
            answered.add(pid)
            if reply.has_error():
                info.failures.setdefault(pid, reply.error.reason.strip().splitlines()[-1][:200])
        for pid in info.sampled:
            if pid not in answered and pid not in info.received:
                info.failures.setdefault(pid, "no reply within federation.round_timeout")

    @contextlib.contextmanager
    def _noise_stream(self, server_round: int) -> Iterator[None]:
        """Flower draws its noise from NumPy's global generator: seed it from the run's
        stream for this round (then restore it), so a simulation repeats exactly."""
        if self.noise_seed is None:
            yield
            return
        state = np.random.get_state()
        np.random.seed(derive_seed(self.noise_seed, "client-dp-noise", server_round) % 2**32)
        try:
            yield
        finally:
            np.random.set_state(state)


    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Beyond the inner strategy, ε depends on the rounds released; a round's noise is
        seeded from the round, or drawn from NumPy's global state, which the checkpoint holds."""
        return {"released": list(self.released), "withheld": list(self.withheld)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(state, self.state_dict(), type(self).__name__)
        self.released, self.withheld = [int(r) for r in state["released"]], [int(r) for r in state["withheld"]]

def update_norm(record: ArrayRecord, reference: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``record − reference`` over all arrays (fp64), as Flower's clipping measures it."""
    total = sum(float(((torch.as_tensor(record[k].numpy()).double() - reference[k].double()) ** 2).sum())
                for k in reference)
    return math.sqrt(total)


def with_client_dp(strategy: FedtuneStrategy, cfg: Any) -> Strategy:
    """What the ServerApp runs: ``strategy`` itself, or wrapped when ``privacy=client_dp``."""
    return ClientLevelDP.from_config(strategy, cfg) if cfg.privacy.name == "client_dp" else strategy


def summary_block(cfg: Any, runner: ClientLevelDP) -> dict[str, Any]:
    """summary.json's ``privacy`` block for client-level DP."""
    finite = lambda eps: eps if math.isfinite(eps) else None  # noqa: E731  (σ = 0: ε = ∞, JSON null)
    out = {"name": "client_dp", "level": "client", "clipping": runner.clipping,
           "wrapper": type(runner.dp).__name__, "noise_multiplier": runner.dp.noise_multiplier,
           "clipping_norm": runner.dp.clipping_norm, "num_sampled_clients": runner.dp.num_sampled_clients,
           "noise_std": runner.noise_std, "delta": runner.delta, "sample_rate": runner.sample_rate,
           "rounds_released": len(runner.released), "rounds_withheld": runner.withheld,
           "final_epsilon": finite(runner.epsilon()), "epsilon_without_sampling": finite(runner.epsilon(1.0)),
           "accountant": "rdp",
           "accounting": "Opacus RDP of a subsampled Gaussian mechanism, q = clients_per_round/num_clients, one "
                         "step per released round; fedtune samples m clients without replacement, for which this "
                         "Poisson bound is the usual DP-FedAvg approximation (exact at q = 1); "
                         "epsilon_without_sampling is a client in every released round",
           "reproducible_noise": runner.noise_seed is not None, "not_covered": NOT_COVERED}
    return {**out, **not_accounted(cfg)}


# ----------------------------------------------------------------------------- client
def clip_on_client(cfg: Any, msg: Message, context: Context,
                   call_next: Callable[[Message, Context], Message]) -> Message:
    """The ClientApp's train handler behind Flower's ``fixedclipping_mod`` when
    ``privacy=client_dp clipping=client``; ``call_next`` itself otherwise.  Only plain train
    messages go through it: the mod fails any message without one ArrayRecord and the
    clipping norm (the roll-call, a method's one-time setup)."""
    if cfg.privacy.name == "client_dp" and cfg.privacy.clipping == "client":
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


PRIVACY.register("client_dp", PrivacySpec(ClientDPConfig, check=check_supported))
