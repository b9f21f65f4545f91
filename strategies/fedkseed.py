"""FedKSeed and FedKSeed-Pro: zeroth-order full-parameter tuning over K shared seeds.

Implementation of FedKSeed (Qin et al., "Federated Full-Parameter Tuning of Billion-Sized
Language Models with Communication Cost under 18 Kilobytes", ICML'24, arXiv 2312.06353),
docs/methods.md#fedkseed.

Every party derives the same **K candidate seeds** ``s_1..s_K`` from the run seed, and
``z_j = z(s_j) ∈ R^d`` is the seeded Gaussian direction over the tuned parameters
(:func:`fedtune.randomness.draw_directions`, served by :mod:`fedtune.directions`).  A
client runs τ two-point (MeZO-style) steps in eval mode, drawing ``j_t`` uniformly (Pro:
from ``p``)::

    g_t = (L(θ + ε z_{j_t}; B_t) − L(θ − ε z_{j_t}; B_t)) / (2ε),    θ ← θ − η g_t z_{j_t}

and uploads the τ pairs ``(j_t, g_t)`` (or their per-seed sums, K floats).  The server
keeps one accumulator per seed, never reset, ``a_j ← a_j + Σ_k p_k Σ_{t: j_t = j} g_{k,t}``
(``p_k = n_k / Σ n``), and the global model is, by linearity of the update in g,

    θ = θ0 − η Σ_j a_j z_j,

exact only for zero weight decay and the same η everywhere (refused otherwise).  Under
``train.lr_schedule=cosine`` round r steps at ``η_r`` (:func:`fedtune.schedule.train_lr`
from ``η = strategy.lr`` down to ``train.lr_min``, the same pure function on clients and
server) and the server adds ``(η_r / η) Σ_k p_k Σ_t g`` to ``a``, so the replay stays
``θ0 − η Σ_j a_j z_j``; a step size that changes within a round (``train.warmup_steps``)
could not be replayed from the per-seed sums and is refused.  A client that was away any number of rounds needs only ``a``: it replays
``a − a_last`` onto its cached model, or ``a`` onto θ0 (:class:`SeedReplica`).

Since the K seeds are fixed for the run, each process (server, Ray actor) generates the
K×d directions once into a :class:`~fedtune.directions.DirectionBank` when
``4·K·d ≤ direction_cache_mb`` MiB: a rebuild or sync is then one matrix-vector product
(or one axpy per changed seed) and a ZO step reads its row; above the cap the
directions are regenerated on every use (streaming), with the same results.

Pro keeps each seed's history of scalar gradients ``h_j`` (starting ``[0]``) and sends
``p = softmax(ψ̃)``, ``ψ_j = mean |clip(h_j, ±1000)|``, ``ψ̃`` min–max normalised, so
``max p / min p ≤ e``.

Bytes per client and round (§5.6): down ``4K`` (+ ``4K`` for p), up ``τ(4 + b_idx)``
(pairs, ``b_idx`` = 2 for K ≤ 32768) or ``4K`` (sums).  The seeds themselves derive from
the run seed (no one-time transfer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fedtune.capabilities import Capabilities, Condition, Export, Payload, Support
from fedtune.directions import SeedDirections, directions_for
from fedtune.config.method import MethodConfig
from fedtune.errors import ConfigError
from fedtune.flower.strategy import Arrays, ClientUpdate, FedtuneStrategy, weights_for
from fedtune.randomness import seed_pool
from fedtune.registry import register_method
from fedtune.tuning import Relative
from fedtune.schedule import train_lr
from fedtune.trainable import validate_trainable
from strategies.seed_replay import SeedReplica, flatten, unflatten, zo_steps  # noqa: F401  (re-exported)

ENCODINGS = ("pairs", "sums")
PRO_CLIP = 1000.0


def check_exact(cfg) -> None:  # type: ignore[no-untyped-def]
    """Refuse settings under which ``θ0 − η Σ a_j z_j`` is not the trained model."""
    if cfg.train.weight_decay != 0:
        raise ConfigError(f"train.weight_decay must be 0 for {cfg.strategy.name} (the per-seed accumulators "
                          f"replay the model only without decay), got {cfg.train.weight_decay}")


def bad_indices(indices: torch.Tensor, num_seeds: int) -> str:
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= num_seeds):
        return f"seed indices outside [0, {num_seeds})"
    return ""


def index_dtype(num_seeds: int) -> torch.dtype:
    """Smallest signed integer type holding seed indices ``< num_seeds``."""
    return torch.int16 if num_seeds <= 1 << 15 else torch.int32


def upload_shapes(num_seeds: int, local_steps: int, encoding: str) -> dict[str, tuple[int, ...]]:
    if encoding == "sums":
        return {"sums": (num_seeds,)}
    return {"indices": (local_steps,), "values": (local_steps,)}


def encode_upload(indices: torch.Tensor, grads: torch.Tensor, num_seeds: int, encoding: str) -> Arrays:
    """The τ pairs as (int indices, fp32 values), or their per-seed sums (K fp32)."""
    if encoding == "sums":
        return {"sums": per_seed_sums(indices, grads, num_seeds).float()}
    return {"indices": indices.to(index_dtype(num_seeds)), "values": grads.float()}


def per_seed_sums(indices: torch.Tensor, values: torch.Tensor, num_seeds: int) -> torch.Tensor:
    """``Σ_{t: j_t = j} values_t`` for every seed j (fp64)."""
    return torch.zeros(num_seeds, dtype=torch.float64).index_add_(0, indices.long(), values.double())


def pro_probabilities(abs_sum: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """FedKSeed-Pro sampling probabilities from each seed's mean |clipped g| (fp32)."""
    psi = abs_sum.double() / counts.double()
    span = psi.max() - psi.min()
    p = torch.softmax((psi - psi.min()) / (span + 1e-10), dim=0)
    return (p / p.sum()).float()


def check_cache_mb(value: float) -> None:
    """``direction_cache_mb`` must be a finite number of MiB >= 0 (0 = never bank)."""
    if not 0 <= value < float("inf"):
        raise ValueError(f"direction_cache_mb must be a number of MiB >= 0 (0 = regenerate directions on "
                         f"every use), got {value}")


@dataclass
class FedKSeedConfig(MethodConfig):
    """``strategy=fedkseed``.  Exact only with train.weight_decay=0 (anything else is refused);
    train.lr / train.optimizer / train.local_steps are not used: ZO steps use the fields below;
    train.lr_schedule / train.lr_min apply to ``lr`` (train.warmup_steps is refused).

        fedtune run strategy=fedkseed model=tiny dataset=tiny num_rounds=5            # a minute on CPU
        fedtune run strategy=fedkseed strategy.num_seeds=1024 strategy.trainable=all  # paper-style, slow

    num_seeds : K candidate seeds.       local_steps : τ ZO steps per round.
    batch_size : examples per ZO step.   eps : perturbation scale ε.
    lr : η (client steps and server replay); under ``train.lr_schedule=cosine`` the
        schedule's maximum (round 1), annealed to ``train.lr_min`` in the last round.
    trainable : tuned parameters: a preset name of :data:`fedtune.trainable.TRAINABLE_PRESETS`
        or a list of Python regular expressions, a parameter being tuned when
        ``re.search`` finds one of them in its name (``strategy.trainable='[classifier,LayerNorm]'``).
    encoding : upload ``pairs`` (τ index/value pairs) or ``sums`` (K per-seed sums).
    grad_clip : skip a step with ``|ℓ+ − ℓ−|`` above this (0 = off).
    weighting : ``examples`` or ``uniform`` client weights.
    direction_cache_mb : per-process cap (MiB) on the bank of K×d fp32 directions;
        above it (or 0) directions are regenerated on every use.
    """

    name: str = "fedkseed"
    num_seeds: int = 4096  # K candidate seeds (paper default; README runs use 1024)
    local_steps: int = 200  # tau ZO steps per client and round (paper: 200)
    batch_size: int = 1  # examples per ZO step (paper: 1)
    eps: float = 5e-4  # perturbation scale (paper zo_eps)
    lr: float = 1e-3  # eta on clients and in the server replay (paper: 3e-7 for 1.3B params); cosine: the max
    trainable: Any = "head_and_norms"  # a preset (all | no_embeddings | bias_and_head | head_and_norms) or regexes
    encoding: str = "pairs"  # pairs (tau x (int16 index + fp32)) | sums (K fp32 per-seed sums)
    grad_clip: float = 0.0  # skip a step with |l+ - l-| above this (0 = off)
    direction_cache_mb: float = 1024.0  # per-process cap (MiB) on the K x d fp32 bank of directions

    def __post_init__(self) -> None:
        super().__post_init__()
        check_cache_mb(self.direction_cache_mb)
        for key in ("num_seeds", "local_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.num_seeds > 1 << 31:
            raise ValueError(f"num_seeds must be <= 2**31, got {self.num_seeds}")
        for key in ("eps", "lr"):
            if not 0 < getattr(self, key) < float("inf"):
                raise ValueError(f"{key} must be a finite number > 0, got {getattr(self, key)}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        self.trainable = validate_trainable(self.trainable)
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding: unknown {self.encoding!r}; accepted: {', '.join(ENCODINGS)}")


@dataclass
class FedKSeedProConfig(FedKSeedConfig):
    """``strategy=fedkseed_pro``: as FedKSeed; needs ``encoding: pairs`` for the histories.

        fedtune run strategy=fedkseed_pro model=tiny dataset=tiny num_rounds=5
    """

    name: str = "fedkseed_pro"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoding != "pairs":
            raise ValueError(f"encoding must be 'pairs' for fedkseed_pro (per-step |g| histories), "
                             f"got {self.encoding!r}")


class FedKSeed(FedtuneStrategy):
    """Server half: per-seed accumulators, replayed onto θ0 (see the module docstring)."""

    name = "fedkseed"
    pro = False

    config: FedKSeedConfig

    def __init__(self, **base) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**base)
        num_seeds = self.config.num_seeds
        self.seeds = seed_pool(self.seed, num_seeds, "fedkseed-pool")
        self.accumulators = torch.zeros(num_seeds, dtype=torch.float32)
        self.abs_sum = torch.zeros(num_seeds, dtype=torch.float64)  # Pro: Σ|clip(g)| per seed,
        self.counts = torch.ones(num_seeds, dtype=torch.float64)    # over the history [0, g...]
        self.probabilities = torch.full((num_seeds,), 1.0 / num_seeds)
        self.replica: SeedReplica | None = None
        self.round_lr: Callable[[int], float] = lambda server_round: self.config.lr  # η_r (from_config: schedule)

    @classmethod
    def from_config(cls, cfg) -> "FedKSeed":  # type: ignore[no-untyped-def]
        check_exact(cfg)
        strategy = super().from_config(cfg)
        strategy.round_lr = lambda server_round: train_lr(cfg, server_round, cfg.strategy.lr)  # as the clients'
        return strategy  # type: ignore[return-value]

    def directions(self) -> SeedDirections:
        """This process's source of ``z_j`` (the cached bank when it fits the cap)."""
        return directions_for(self.seeds, "gaussian", numel=self.numel, cache_mb=self.config.direction_cache_mb)

    def replay(self, theta: torch.Tensor, coeffs: torch.Tensor) -> None:
        """``θ ← θ − η Σ_j c_j z_j``."""
        self.directions().add(theta, coeffs, alpha=-self.config.lr)

    def initialize(self, arrays: Arrays) -> None:
        super().initialize(arrays)
        self.names, self.shapes, theta0 = flatten(arrays)
        self.numel = theta0.numel()
        self.replica = SeedReplica(theta0, self.replay)

    def downlink(self, server_round: int, partition_id: int) -> Arrays:
        out = {"accumulators": self.accumulators}
        return {**out, "probabilities": self.probabilities} if self.pro else out

    def expected_upload(self, partition_id: int) -> dict[str, tuple[int, ...]]:
        return upload_shapes(self.config.num_seeds, self.config.local_steps, self.config.encoding)

    def payload_problem(self, partition_id: int, arrays: Arrays) -> str:
        return bad_indices(arrays.get("indices", torch.zeros(0)), self.config.num_seeds)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Arrays:
        delta = torch.zeros(self.config.num_seeds, dtype=torch.float64)
        for w, u in zip(weights_for(updates, self.weighting), updates):
            if self.config.encoding == "sums":
                delta += w * u.arrays["sums"].double()
            else:
                idx = u.arrays["indices"].long()
                delta += w * per_seed_sums(idx, u.arrays["values"], self.config.num_seeds)
                if self.pro:
                    clipped = u.arrays["values"].double().clamp(-PRO_CLIP, PRO_CLIP).abs()
                    self.abs_sum.index_add_(0, idx, clipped)
                    self.counts.index_add_(0, idx, torch.ones_like(clipped))
        scale = self.round_lr(server_round) / self.config.lr  # 1 under a constant schedule: a untouched
        if scale != 1.0:
            delta *= scale
        self.accumulators = (self.accumulators.double() + delta).float()
        if self.pro:
            self.probabilities = pro_probabilities(self.abs_sum, self.counts)
        assert self.replica is not None, "initialize() must run first"
        self.replica.sync(self.accumulators)
        return unflatten(self.replica.theta, self.names, self.shapes)

    def state_dict(self) -> dict:  # type: ignore[type-arg]
        """The base's state, the per-seed accumulators, Pro's histories (Σ|g|, counts) and
        probabilities, and the replayed model."""
        return {**super().state_dict(), "accumulators": self.accumulators, "abs_sum": self.abs_sum,
                "counts": self.counts, "probabilities": self.probabilities,
                "replica": self.replica.state_dict() if self.replica is not None else None}

    def load_state_dict(self, state: dict) -> None:  # type: ignore[type-arg]
        super().load_state_dict(state)
        self.accumulators, self.abs_sum = state["accumulators"], state["abs_sum"]
        self.counts, self.probabilities = state["counts"], state["probabilities"]
        assert self.replica is not None, "initialize() must run first"
        self.replica.load_state_dict(state["replica"])


class FedKSeedPro(FedKSeed):
    """FedKSeed-Pro: seeds sampled from probabilities sent down every round."""

    name = "fedkseed_pro"
    pro = True


def fedkseed_bytes(strategy: FedKSeed, partition_id: int, upload: Arrays) -> tuple[int, int]:
    """Down ``4K`` (+ ``4K`` for Pro's p); up ``τ(4 + b_idx)`` (pairs) or ``4K`` (sums)."""
    cfg = strategy.config
    k = cfg.num_seeds
    down = 4 * k * (2 if strategy.pro else 1)
    b_idx = torch.empty(0, dtype=index_dtype(k)).element_size()
    return down, (4 * k if cfg.encoding == "sums" else cfg.local_steps * (4 + b_idx))


ZEROTH_ORDER = Support(False, "FedKSeed's clients take zeroth-order steps and upload scalar finite differences of "
                              "the loss, not gradients: DP-SGD's per-example clipping does not bound them, and a "
                              "sound private variant (per-example clipped differences) is not implemented; "
                              "see the README")
SEEDS_NOT_AN_UPDATE = Support(False, "clients upload (seed index, scalar) pairs and are sent seed accumulators, "
                                     "so 'reply − global' is no model update to clip")
ROUND_LR = Support(True, "η_r scales the clients' ZO steps and, as η_r/η, the server's accumulators, so the "
                         "replay θ0 − η Σ a_j z_j stays exact")
NO_WARMUP = Support(False, "a step size changing within a round cannot be replayed from per-seed sums of g")
SEED_PAYLOAD = Payload(down="K per-seed accumulators (fp32; Pro: + K probabilities)",
                       up="τ (seed index, scalar) pairs, or K per-seed sums (fp32)", formula=fedkseed_bytes)
TUNED_MODEL = Export("the tuned model (transformers save_pretrained)")
UPDATES_THE_BASE = Support(False, "it tunes the model's own parameters (full-parameter), which a quantized base "
                                  "holds as frozen integer codes; use model.quantization=none")
# η a half-decade each way (1e-3 diverges on MiniLM: README), and fewer seeds K: the bank of K x d
# directions is what a process holds, and more K means fewer steps per seed (the paper's K = 4096)
ZO_TUNING = {"strategy.lr": Relative(1.0, 0.3, 3.0), "strategy.num_seeds": Relative(1.0, 0.5, 0.25)}
QUICK = ("strategy.num_seeds=64", "strategy.local_steps=16", "strategy.batch_size=8", "strategy.lr=1e-2")

register_method(
    "fedkseed", FedKSeed, trainer="zo_seeds", config_cls=FedKSeedConfig,
    capabilities=Capabilities(
        lr_schedule=ROUND_LR, warmup=NO_WARMUP, step_size="strategy.lr",
        example_dp=ZEROTH_ORDER, client_dp=SEEDS_NOT_AN_UPDATE, quantized_base=UPDATES_THE_BASE,
        sum_only=Support(True, "the accumulators grow by Σ_k p_k of the clients' per-seed sums",
                         (Condition("encoding", "sums", "(index, value) pairs are lists, not vectors to add"),))),
    payload=SEED_PAYLOAD, export=TUNED_MODEL, quick=QUICK, tuning=ZO_TUNING)
register_method(
    "fedkseed_pro", FedKSeedPro, trainer="zo_seeds", config_cls=FedKSeedProConfig,
    capabilities=Capabilities(
        lr_schedule=ROUND_LR, warmup=NO_WARMUP, step_size="strategy.lr",
        example_dp=ZEROTH_ORDER, client_dp=SEEDS_NOT_AN_UPDATE, quantized_base=UPDATES_THE_BASE,
        sum_only=Support(False, "its seed probabilities follow every client's own |g| history")),
    payload=SEED_PAYLOAD, export=TUNED_MODEL, quick=QUICK, tuning=ZO_TUNING)
