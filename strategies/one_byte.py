"""One byte per gradient: zeroth-order tuning whose every step crosses the wire as one int8.

Zelikman et al., "Just One Byte (per gradient): A Note on Low-Bandwidth Decentralized
Language Model Finetuning Using Shared Randomness", arXiv 2306.10015; docs/methods.md#one_byte.

Step t of client k in round r perturbs along ``z_{r,k,t} = z(s_{r,k,t})``, a Gaussian
direction over the tuned parameters whose seed is derived from the (round, client, step)
identifier (:func:`step_seeds`; the paper's "(machine, sample)" seed), so every party can
regenerate every other party's perturbation.  The client measures the SPSA projected
gradient ``g_t = (L(θ + ε z) − L(θ − ε z)) / (2ε)`` and uploads it as one signed byte
``q_t = clamp(round(g_t / s), −127, 127)`` (:func:`quantize`) with the step ``s`` of the
quantiser: ``strategy.scale`` when > 0 (fixed, nothing else sent), else ``max_t |g_t| / 127``
sent as one fp32 per upload.  The global model is, with ``p_k`` the client weights and
``η_r`` the round's step size,

    θ_r = θ_{r−1} − η_r Σ_k p_k s_k Σ_t q_{k,t} z_{r,k,t}.

Unlike FedKSeed's fixed pool of K seeds, the directions never repeat, so no fixed-size
accumulator summarises the past: a client brings its model up to date by replaying the
logged updates of the rounds it has not seen.  The server keeps that log, an entry per
aggregated upload ``(round, sender, c = p_k s_k, q_{1..τ})``, and sends each client the
entries after the last round it is known to hold (:meth:`OneByte.downlink`: it holds a
round once a reply of a later round arrives; after a resume, the entries it held are
sent back in a ``train.setup`` message metered as the restart's); the client keeps its copy of the log in
Flower's ``Context.state`` (a resend after a lost reply is merged once) and replays onto
a per-process cached model.  ``local_update=accumulate`` (the paper's gradient
accumulation) measures all τ projected gradients at the same θ; ``sequential`` moves θ
after every step, as FedKSeed's clients do.

Bytes per client and round: up ``τ`` (+ 4 for ``s`` when the scale is adaptive); down
``Σ_{missed entries} (12 + τ)`` (int32 round and sender, fp32 c, τ int8 codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fedtune.capabilities import Capabilities, Export, Payload, Support
from fedtune.config.method import MethodConfig
from fedtune.errors import ConfigError
from fedtune.flower.strategy import Arrays, ClientUpdate, FedtuneStrategy, weights_for
from fedtune.randomness import add_directions, seed_pool
from fedtune.registry import register_method
from fedtune.schedule import train_lr
from fedtune.trainable import validate_trainable
from fedtune.tuning import Relative
from strategies.seed_replay import flatten, unflatten

QMAX = 127  # int8 codes in [-127, 127]: symmetric, so -s and +s quantise alike
ROUNDINGS = ("nearest", "stochastic")
LOCAL_UPDATES = ("accumulate", "sequential")
LOG_KEYS = ("rounds", "senders", "coeffs", "codes")  # one entry per aggregated upload


def step_seeds(seed: int, server_round: int, sender: int, steps: int) -> torch.Tensor:
    """The seeds of client ``sender``'s τ perturbations in ``server_round`` (int64)."""
    return seed_pool(seed, steps, "one-byte", server_round, sender)


def quantize(grads: torch.Tensor, scale: float, rounding: str = "nearest",
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """``(codes, s)``: int8 codes of ``grads`` at step ``s`` (``scale``, or ``max|g|/127`` when 0).

    Nearest rounding errs by at most ``s/2`` per value, stochastic rounding (unbiased:
    ``E[q s] = g``) by less than ``s``, for every ``|g| ≤ 127 s``; a fixed scale saturates
    larger values at ``±127 s``.
    """
    g = grads.detach().double()
    s = float(scale) if scale > 0 else float(g.abs().max()) / QMAX if len(g) else 0.0
    s = float(torch.tensor(s, dtype=torch.float32))  # the step as it travels (fp32)
    if s == 0.0:
        return torch.zeros(len(g), dtype=torch.int8), 0.0
    x = g / s
    if rounding == "stochastic":
        floor = x.floor()
        x = floor + (torch.rand(len(x), generator=generator, dtype=torch.float64) < (x - floor)).double()
    else:
        x = x.round()
    return x.clamp(-QMAX, QMAX).to(torch.int8), s


def dequantize(codes: torch.Tensor, scale: float) -> torch.Tensor:
    """The projected gradients the codes stand for (fp32)."""
    return codes.float() * float(scale)


def replay(theta: torch.Tensor, log: dict[str, torch.Tensor], seed: int, lr_of: Callable[[int], float],
           after: int = 0) -> torch.Tensor:
    """``θ −= η_r c Σ_t q_t z_{r,k,t}`` for every log entry of a round > ``after``, in log order."""
    for r, k, c, q in zip(log["rounds"].tolist(), log["senders"].tolist(), log["coeffs"].tolist(), log["codes"]):
        if r > after:
            add_directions(theta, step_seeds(seed, r, k, len(q)), q.float(), alpha=-lr_of(r) * c)
    return theta


def empty_log(steps: int) -> dict[str, torch.Tensor]:
    return {"rounds": torch.zeros(0, dtype=torch.int32), "senders": torch.zeros(0, dtype=torch.int32),
            "coeffs": torch.zeros(0, dtype=torch.float32), "codes": torch.zeros(0, steps, dtype=torch.int8)}


def merge_logs(mine: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The union of two logs by (round, sender), sorted so (the server's aggregation order);
    an entry received twice (a resend after a lost reply) is kept once."""
    joined = {k: torch.cat([mine[k], received[k]]) for k in LOG_KEYS}
    keys = joined["rounds"].long() * (1 << 32) + joined["senders"].long()
    order = torch.argsort(keys, stable=True)
    keys = keys[order]
    first = torch.ones(len(keys), dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    return {k: v[order][first] for k, v in joined.items()}


def check_no_decay(cfg: Any) -> None:
    """The logged steps replay the model only when nothing else moves it."""
    if cfg.train.weight_decay != 0:
        raise ConfigError(f"train.weight_decay must be 0 for {cfg.strategy.name} (the logged one-byte steps "
                          f"replay the model only without decay), got {cfg.train.weight_decay}")


@dataclass
class OneByteConfig(MethodConfig):
    """``strategy=one_byte``.  train.lr / train.optimizer / train.local_steps are not used (the
    ZO steps use the fields below); train.lr_schedule / train.lr_min apply to ``lr``.

        fedtune run strategy=one_byte model=tiny dataset=tiny num_rounds=5

    local_steps : τ projected gradients (bytes) per client and round.
    batch_size : examples per projected gradient (the authors' code: 16).
    eps : perturbation scale ε (the authors' code: 1e-3).
    lr : η (client steps and server replay); under ``train.lr_schedule=cosine`` the maximum.
    scale : the quantiser's step s; 0 = adaptive, ``max |g| / 127`` per upload (sent as 4 bytes).
    rounding : ``nearest`` or ``stochastic`` (unbiased) rounding to the int8 grid.
    local_update : ``accumulate`` (all τ gradients at the round's θ, the paper) or
        ``sequential`` (θ moves after each step, FedKSeed-style).
    trainable : tuned parameters, a preset of :data:`fedtune.trainable.TRAINABLE_PRESETS` or regexes.
    grad_clip : drop a step with ``|ℓ+ − ℓ−|`` above this (0 = off).
    """

    name: str = "one_byte"
    local_steps: int = 64  # tau bytes per client and round
    batch_size: int = 16  # examples per projected gradient (authors' code)
    eps: float = 1e-3  # perturbation scale (authors' code)
    lr: float = 1e-3  # eta on clients and in every replay; cosine: the max
    scale: float = 0.0  # quantiser step s (0 = adaptive max|g|/127, sent as one fp32)
    rounding: str = "nearest"  # nearest | stochastic
    local_update: str = "accumulate"  # accumulate (paper) | sequential
    trainable: Any = "head_and_norms"  # a preset (all | no_embeddings | bias_and_head | head_and_norms) or regexes
    grad_clip: float = 0.0  # drop a step with |l+ - l-| above this (0 = off)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("local_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eps", "lr"):
            if not 0 < getattr(self, key) < float("inf"):
                raise ValueError(f"{key} must be a finite number > 0, got {getattr(self, key)}")
        if not 0 <= self.scale < float("inf"):
            raise ValueError(f"scale must be a finite number >= 0 (0 = adaptive max|g|/127), got {self.scale}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        for key, accepted in (("rounding", ROUNDINGS), ("local_update", LOCAL_UPDATES)):
            if getattr(self, key) not in accepted:
                raise ValueError(f"{key}: unknown {getattr(self, key)!r}; accepted: {', '.join(accepted)}")
        self.trainable = validate_trainable(self.trainable)


class OneByte(FedtuneStrategy):
    """Server half: replays each round's one-byte steps and keeps the log clients catch up from."""

    name = "one_byte"
    config: OneByteConfig

    def __init__(self, **base) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**base)
        self.log = empty_log(self.config.local_steps)
        self.synced: dict[int, int] = {}  # partition id -> last round whose entries it holds
        self.theta = torch.zeros(0)
        self.round_lr: Callable[[int], float] = lambda server_round: self.config.lr

    @classmethod
    def from_config(cls, cfg) -> "OneByte":  # type: ignore[no-untyped-def]
        check_no_decay(cfg)
        strategy = super().from_config(cfg)
        strategy.round_lr = lambda server_round: train_lr(cfg, server_round, cfg.strategy.lr)  # as the clients'
        return strategy  # type: ignore[return-value]

    def initialize(self, arrays: Arrays) -> None:
        super().initialize(arrays)
        self.names, self.shapes, self.theta = flatten(arrays)

    def resync(self, grid: Any, server_round: int) -> None:
        """A restarted simulation lost the clients' logs: give each client back what it held
        (the entries through its ``synced`` round), metered as the restart's, so that the
        rounds after it send what an unbroken run's do.  A client that did not store them
        (an error reply, or a ClientApp without the setup handler) is sent the whole log
        with its next round instead."""
        held = {pid: self.log["rounds"] <= self.synced.get(pid, 0) for pid in self.node_of}
        replies = self.setup_exchange(grid, server_round, lambda pid: {k: v[held[pid]] for k, v in self.log.items()},
                                      required=False)
        stored = {self.partition_of_node.get(r.metadata.src_node_id) for r in replies if not r.has_error()}
        self.synced = {pid: last for pid, last in self.synced.items() if pid in stored}

    def downlink(self, server_round: int, partition_id: int) -> Arrays:
        after = self.synced.get(partition_id, 0)
        keep = self.log["rounds"] > after
        return {k: v[keep] for k, v in self.log.items()}

    def expected_upload(self, partition_id: int) -> dict[str, tuple[int, ...]]:
        codes = {"codes": (self.config.local_steps,)}
        return codes if self.config.scale > 0 else {**codes, "scale": (1,)}

    def expected_dtypes(self, partition_id: int) -> dict[str, torch.dtype]:
        return {"codes": torch.int8, "scale": torch.float32}

    def payload_problem(self, partition_id: int, arrays: Arrays) -> str:
        codes, scale = arrays["codes"], arrays.get("scale")
        if len(codes) and int(codes.min()) < -QMAX:
            return f"codes outside [-{QMAX}, {QMAX}]"
        return "negative quantiser scale" if scale is not None and float(scale[0]) < 0 else ""

    def scale_of(self, upload: Arrays) -> float:
        return float(upload["scale"][0]) if "scale" in upload else self.config.scale

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Arrays:
        entries = {"rounds": [], "senders": [], "coeffs": [], "codes": []}  # type: dict[str, list[Any]]
        for w, u in zip(weights_for(updates, self.weighting), updates):
            entries["rounds"].append(server_round)
            entries["senders"].append(u.partition_id)
            entries["coeffs"].append(w * self.scale_of(u.arrays))
            entries["codes"].append(u.arrays["codes"])
            self.synced[u.partition_id] = server_round - 1  # it replied holding the log up to last round
        new = {"rounds": torch.tensor(entries["rounds"], dtype=torch.int32),
               "senders": torch.tensor(entries["senders"], dtype=torch.int32),
               "coeffs": torch.tensor(entries["coeffs"], dtype=torch.float32),
               "codes": torch.stack(entries["codes"]).to(torch.int8)}
        replay(self.theta, new, self.seed, self.round_lr)
        self.log = {k: torch.cat([self.log[k], new[k]]) for k in LOG_KEYS}
        return unflatten(self.theta, self.names, self.shapes)

    def state_dict(self) -> dict:  # type: ignore[type-arg]
        """The base's state, the replayed model, the log and what each client holds of it."""
        return {**super().state_dict(), "theta": self.theta, "log": dict(self.log),
                "synced": {str(k): v for k, v in self.synced.items()}}

    def load_state_dict(self, state: dict) -> None:  # type: ignore[type-arg]
        super().load_state_dict(state)
        self.theta, self.log = state["theta"], dict(state["log"])
        self.synced = {int(k): int(v) for k, v in state["synced"].items()}


def one_byte_bytes(strategy: OneByte, partition_id: int, upload: Arrays) -> tuple[int, int]:
    """Down ``(12 + τ)`` per missed log entry; up ``τ`` (+ 4 for an adaptive scale)."""
    cfg = strategy.config
    missed = int((strategy.log["rounds"] > strategy.synced.get(partition_id, 0)).sum())
    return missed * (12 + cfg.local_steps), cfg.local_steps + (4 if cfg.scale == 0 else 0)


ZEROTH_ORDER = Support(False, "its clients upload quantised finite differences of the loss along seeded "
                              "directions, not gradients: DP-SGD's per-example clipping does not bound them")
NOT_AN_UPDATE = Support(False, "clients upload int8 codes of projected gradients and are sent a log of "
                               "codes, so 'reply − global' is no model update to clip")
SENDER_BOUND = Support(False, "each client's codes multiply directions seeded by its own (round, client) "
                              "identifier, so the aggregate needs every upload, not their sum")
ROUND_LR = Support(True, "η_r scales the clients' steps and every replay of round r's log entries alike")
NO_WARMUP = Support(False, "one step size per round is what a log entry is replayed with")
LOG_PAYLOAD = Payload(down="the log entries of the rounds the client has not seen: (round, sender, p_k·s_k, "
                           "τ int8 codes) each", up="τ int8 codes (+ one fp32 scale when adaptive)",
                      formula=one_byte_bytes)
FULL_PARAMETER = Support(False, "it tunes the model's own parameters, which a quantized base holds as frozen "
                                "integer codes; use model.quantization=none")
QUICK = ("strategy.local_steps=16", "strategy.batch_size=8", "strategy.lr=1e-2")

register_method(
    "one_byte", OneByte, trainer="one_byte", config_cls=OneByteConfig,
    capabilities=Capabilities(
        lr_schedule=ROUND_LR, warmup=NO_WARMUP, step_size="strategy.lr", example_dp=ZEROTH_ORDER,
        client_dp=NOT_AN_UPDATE, quantized_base=FULL_PARAMETER, sum_only=SENDER_BOUND,
        sender_bound_directions=True,
        setup_on_client_data="nothing: its setup handler only stores the log entries a resumed server sends back"),
    payload=LOG_PAYLOAD, export=Export("the tuned model (transformers save_pretrained)"), quick=QUICK,
    tuning={"strategy.lr": Relative(1.0, 0.3, 3.0), "strategy.eps": Relative(1.0, 0.3, 3.0)})
