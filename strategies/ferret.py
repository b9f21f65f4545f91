"""Ferret: first-order local updates, shared-randomness projection, exact aggregation.

Implementation of Ferret (Shu, Hu, Ng, Low, Yu, "Ferret: Federated Full-Parameter Tuning
at Scale for Large Language Models", ICML'25, arXiv 2409.06277), docs/methods.md#ferret.

A client runs T first-order steps from the global ``w`` and forms ``Δ = w_old − w_new``.
The tuned parameters are split into L blocks (:func:`make_blocks`, a deterministic
function of the parameter names and shapes).  Block l of size ``d_l`` gets
``K_l = max(⌊K ‖Δ_l‖ / max_l' ‖Δ_l'‖⌋, 2)`` bases chosen from a shared pool of K seeds;
the basis of (seed j, block l) is ``v_{j,l} ~ U(−1/√d_l, 1/√d_l)^{d_l}`` (the truncated
normal of the paper; second moment ``ρ_l = 1/(3 d_l)``, ``E[v vᵀ] = ρ_l I``).  Coordinates

    γ_{j,l} = (ρ_l K_l)^{-1} ⟨v_{j,l}, Δ_l⟩      ("unbiased", E[Σ_j γ_{j,l} v_{j,l}] = Δ_l)
    γ_{j,l} = (d_l / K_l)   ⟨v_{j,l}, Δ_l⟩      ("official" code: E[...] = Δ_l / 3)

are uploaded as (index, value) pairs.  Because every client uses the same pool, the
server averages coordinates per (seed, block), ``γ̄ = Σ_k p_k γ^{(k)}`` (exact by
linearity: ``Σ_k p_k Σ_j γ_j^{(k)} v_j = Σ_j γ̄_j v_j``), and reconstructs once, clipping
each ``‖γ̄_{j,l} v_{j,l}‖ ≤ clip`` and scaling by the server lr ``η_s``::

    w ← w − Σ_{j,l} c_{j,l} v_{j,l},   c_{j,l} = η_s γ̄_{j,l} min(1, clip / (|γ̄_{j,l}| ‖v_{j,l}‖)).

Each ``c`` is a scalar multiple of a shared basis, so the global model is
``w0 − Σ_{j,l} C_{j,l} v_{j,l}`` with the accumulated ``C ∈ R^{K×L}``: the downlink is C
(``4KL`` bytes, "≤ K·L" of §8) and a client syncs by replaying ``C − C_last``, exactly
as FedKSeed (:class:`~strategies.seed_replay.SeedReplica`).  Uplink per client and round:
``4L`` (the K_l) + ``(4 + b_idx) Σ_l K_l``.

The pool is fixed for the run, so every process keeps all K×d bases (row j = the L
blocks ``v_{j,l}`` side by side) in a :class:`~fedtune.directions.DirectionBank` when
``4·K·d ≤ direction_cache_mb`` MiB: projection, clipping norms and replays read it
instead of regenerating (same bases bit for bit; above the cap they are streamed).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Union

import torch

from fedtune.capabilities import Capabilities, Payload, Support
from fedtune.config.method import MethodConfig
from fedtune.flower.strategy import Arrays, ClientUpdate, FedtuneStrategy, weights_for
from fedtune.directions import SeedDirections, directions_for
from fedtune.randomness import derive_seed, seed_pool
from fedtune.registry import register_method
from fedtune.tuning import LEARNING_RATES
from fedtune.trainable import validate_trainable
from strategies.fedavg_lora import LOCAL_LR
from strategies.fedkseed import TUNED_MODEL, UPDATES_THE_BASE, bad_indices, check_cache_mb, index_dtype
from strategies.seed_replay import SeedReplica, flatten, unflatten

Bases = Union[torch.Tensor, SeedDirections]

SCALINGS = ("unbiased", "official")


def make_blocks(numels: list[int]) -> list[tuple[int, int]]:
    """Flat ``(start, stop)`` ranges: parameters (canonical order) grouped until the next
    one would push a group past 0.9 × the median parameter size (official code, §6.3)."""
    target = 0.9 * statistics.median(numels)
    blocks, start, size, pos = [], 0, 0, 0
    for n in numels:
        if size and size + n > target:
            blocks.append((start, pos))
            start, size = pos, 0
        size, pos = size + n, pos + n
    blocks.append((start, pos))
    return blocks


def block_seeds(pool: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Stream seed of basis (j, l): ``(K, L)`` int64, derived from pool seed j and l."""
    return torch.tensor([[derive_seed(int(s), "block", b) for b in range(num_blocks)] for s in pool.tolist()],
                        dtype=torch.int64)


def as_bases(bases: Bases, blocks: list[tuple[int, int]]) -> SeedDirections:
    """The basis source: given as is, or streamed from a ``(K, L)`` seed matrix."""
    return bases if isinstance(bases, SeedDirections) else SeedDirections(bases, "uniform", blocks)


def seeds_per_block(norms: torch.Tensor, num_seeds: int) -> torch.Tensor:
    """Adaptive ``K_l = max(⌊K ‖Δ_l‖ / max ‖Δ‖⌋, 2)`` (capped at K)."""
    top = float(norms.max())
    k = torch.floor(num_seeds * norms.double() / top).long() if top > 0 else torch.zeros_like(norms, dtype=torch.long)
    return k.clamp(min=min(2, num_seeds), max=num_seeds)


def coordinate_scale(scaling: str, block_size: int, k: int) -> float:
    """``1/(ρ K_l) = 3 d_l / K_l`` (unbiased) or ``d_l / K_l`` (official)."""
    return (3.0 if scaling == "unbiased" else 1.0) * block_size / k


def project(delta: torch.Tensor, blocks: list[tuple[int, int]], seeds: Bases, num_seeds: int,
            scaling: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Client side: ``(K_l per block, chosen seed indices, coordinates γ)``, concatenated by block.

    ``seeds``: the ``(K, L)`` basis seeds, or their :class:`SeedDirections` (a bank).
    """
    delta, source = delta.float(), as_bases(seeds, blocks)
    norms = torch.stack([delta[a:b].norm() for a, b in blocks])
    counts = seeds_per_block(norms, num_seeds)
    indices, values = [], []
    for l, ((a, b), k) in enumerate(zip(blocks, counts.tolist())):
        idx = torch.randperm(num_seeds, generator=generator)[:k]
        bases = source.rows(idx, l)
        indices.append(idx)
        values.append(coordinate_scale(scaling, b - a, k) * (bases @ delta[a:b]))
    return counts, torch.cat(indices), torch.cat(values)


def reconstruct(counts: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                blocks: list[tuple[int, int]], seeds: Bases) -> torch.Tensor:
    """``Δ̃ = Σ_{j,l} γ_{j,l} v_{j,l}`` (flat)."""
    source = as_bases(seeds, blocks)
    out = torch.zeros(blocks[-1][1], dtype=torch.float32)
    return apply_coefficients(out, scatter(counts, indices, values, source.num_seeds), blocks, source, alpha=1.0)


def scatter(counts: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, num_seeds: int) -> torch.Tensor:
    """Sparse upload → dense ``(K, L)`` coordinate matrix (fp64)."""
    cols = torch.repeat_interleave(torch.arange(len(counts)), counts.long())
    dense = torch.zeros(num_seeds, len(counts), dtype=torch.float64)
    dense.index_put_((indices.long(), cols), values.double(), accumulate=True)
    return dense


def apply_coefficients(theta: torch.Tensor, coeffs: torch.Tensor, blocks: list[tuple[int, int]],
                       seeds: Bases, alpha: float = -1.0) -> torch.Tensor:
    """``θ_l += alpha · Σ_j C_{j,l} v_{j,l}`` for every block (in place)."""
    return as_bases(seeds, blocks).add(theta, coeffs, alpha=alpha)


def server_coefficients(gamma: torch.Tensor, blocks: list[tuple[int, int]], seeds: Bases,
                        server_lr: float, clip: float) -> torch.Tensor:
    """``c_{j,l} = η_s γ̄ min(1, clip/(|γ̄| ‖v_{j,l}‖))`` (clip ≤ 0: off), fp32 ``(K, L)``."""
    out, source = server_lr * gamma.double(), as_bases(seeds, blocks)
    if clip > 0:
        for l, (a, b) in enumerate(blocks):
            rows = gamma[:, l].nonzero().flatten()
            norms = source.rows(rows, l).norm(dim=1).double()
            size = gamma[rows, l].double().abs() * norms
            out[rows, l] *= torch.clamp(clip / size, max=1.0)
    return out.float()


@dataclass
class FerretConfig(MethodConfig):
    """``strategy=ferret``.  Local steps use the train section (official script: sgd, lr 1e-4,
    10 steps, batch 1).

        fedtune run strategy=ferret model=tiny dataset=tiny train.optimizer=sgd train.local_steps=10 num_rounds=5
        fedtune run strategy=ferret strategy.scaling=official strategy.server_lr=10   # the official script

    num_seeds : K, the shared pool and the most bases per block.
    scaling : ``unbiased`` (1/(ρK_l)) or ``official`` (d_l/K_l).
    server_lr : η_s; default 1 (unbiased) or 3 (official), the same expected step.
    clip : per-(seed, block) norm bound on ``γ̄ v`` (0 = off; official 10).
    trainable : tuned parameters: a preset name, or a list of regular expressions over
        parameter names (``re.search``), as FedKSeed's (:mod:`fedtune.trainable`).
    weighting : ``examples`` or ``uniform`` (the official script).
    direction_cache_mb : per-process cap (MiB) on the bank of all K×d bases (0 = stream).
    """

    name: str = "ferret"
    num_seeds: int = 200  # K: shared seed pool = most bases per block (official script: 200)
    scaling: str = "unbiased"  # unbiased (1/(rho K_l) = 3 d_l/K_l) | official (d_l/K_l, E[update] = delta/3)
    server_lr: float | None = None  # null = 1 (unbiased) or 3 (official): same expected step; official script: 10
    clip: float = 10.0  # per-(seed, block) bound on ||gamma v|| (0 = off; official 10)
    trainable: Any = "head_and_norms"  # a preset (all | no_embeddings | bias_and_head | head_and_norms) or regexes
    direction_cache_mb: float = 1024.0  # per-process cap (MiB) on the K x d fp32 bank of all (seed, block) bases

    def __post_init__(self) -> None:
        super().__post_init__()
        check_cache_mb(self.direction_cache_mb)
        if not 2 <= self.num_seeds <= 1 << 31:
            raise ValueError(f"num_seeds must be in [2, 2**31], got {self.num_seeds}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling: unknown {self.scaling!r}; accepted: {', '.join(SCALINGS)}")
        if self.server_lr is not None and not (self.server_lr > 0 and math.isfinite(self.server_lr)):
            raise ValueError(f"server_lr must be > 0 (or null for the default), got {self.server_lr}")
        if self.clip < 0:
            raise ValueError(f"clip must be >= 0 (0 = off), got {self.clip}")
        self.trainable = validate_trainable(self.trainable)

    @property
    def step_size(self) -> float:
        """η_s: ``server_lr``, or 1 (unbiased) / 3 (official), the same expected step."""
        if self.server_lr is not None:
            return self.server_lr
        return 1.0 if self.scaling == "unbiased" else 3.0


class Ferret(FedtuneStrategy):
    """Server half: per-(seed, block) averaging, clipped reconstruction, accumulated C."""

    name = "ferret"

    config: FerretConfig

    def __init__(self, **base) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**base)
        self.pool = seed_pool(self.seed, self.config.num_seeds, "ferret-pool")

    def initialize(self, arrays: Arrays) -> None:
        super().initialize(arrays)
        self.names, self.shapes, theta0 = flatten(arrays)
        self.blocks = make_blocks([s.numel() for s in self.shapes])
        self.seeds = block_seeds(self.pool, len(self.blocks))
        self.coefficients = torch.zeros(self.config.num_seeds, len(self.blocks), dtype=torch.float32)
        self.replica = SeedReplica(theta0, self.replay)

    def replay(self, theta: torch.Tensor, coefficients: torch.Tensor) -> None:
        """``θ ← θ + Σ_(j,l) C[j,l] u_(j,l)`` (the model is linear in the coefficients)."""
        apply_coefficients(theta, coefficients, self.blocks, self.bases())

    def bases(self) -> SeedDirections:
        """This process's basis source (the cached bank of all (seed, block) bases if it fits)."""
        return directions_for(self.seeds, "uniform", segments=self.blocks, cache_mb=self.config.direction_cache_mb)

    def downlink(self, server_round: int, partition_id: int) -> Arrays:
        return {"coefficients": self.coefficients}

    def expected_upload(self, partition_id: int) -> dict[str, tuple[int, ...]]:
        return {"counts": (len(self.blocks),), "indices": (-1,), "values": (-1,)}

    def payload_problem(self, partition_id: int, arrays: Arrays) -> str:
        counts, n = arrays["counts"], len(arrays["indices"])
        if int(counts.min()) < 0 or int(counts.sum()) != n or len(arrays["values"]) != n:
            return f"block counts sum to {int(counts.sum())}, with {n} indices and {len(arrays['values'])} values"
        return bad_indices(arrays["indices"], self.config.num_seeds)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Arrays:
        gamma = torch.zeros(self.config.num_seeds, len(self.blocks), dtype=torch.float64)
        for w, u in zip(weights_for(updates, self.weighting), updates):
            gamma += w * scatter(u.arrays["counts"], u.arrays["indices"], u.arrays["values"], self.config.num_seeds)
        step = server_coefficients(gamma, self.blocks, self.bases(), self.config.step_size, self.config.clip)
        self.coefficients = (self.coefficients.double() + step.double()).float()
        self.replica.sync(self.coefficients)
        return unflatten(self.replica.theta, self.names, self.shapes)

    def state_dict(self) -> dict:  # type: ignore[type-arg]
        """The base's state, the accumulated coefficients C and the replayed model (the
        blocks and basis seeds are rebuilt from the initial model and the run seed)."""
        return {**super().state_dict(), "coefficients": getattr(self, "coefficients", None),
                "replica": self.replica.state_dict() if hasattr(self, "replica") else None}

    def load_state_dict(self, state: dict) -> None:  # type: ignore[type-arg]
        super().load_state_dict(state)
        self.coefficients = state["coefficients"]
        self.replica.load_state_dict(state["replica"])


def encode_upload(counts: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, num_seeds: int) -> Arrays:
    return {"counts": counts.to(torch.int32), "indices": indices.to(index_dtype(num_seeds)),
            "values": values.float()}


def ferret_bytes(strategy: Ferret, partition_id: int, upload: Arrays) -> tuple[int, int]:
    """Down ``4KL`` (C); up ``4L`` (the K_l) + ``(4 + b_idx)·Σ_l K_l`` (index, value pairs)."""
    k, blocks = strategy.config.num_seeds, len(strategy.blocks)
    b_idx = torch.empty(0, dtype=index_dtype(k)).element_size()
    return 4 * k * blocks, 4 * blocks + (4 + b_idx) * int(upload["counts"].sum())


register_method(
    "ferret", Ferret, trainer="ferret", config_cls=FerretConfig,
    capabilities=Capabilities(
        lr_schedule=LOCAL_LR, warmup=LOCAL_LR,
        example_dp=Support(True, "its clients run the shared first-order loop (clients.local_steps) before "
                                 "projecting, which privacy=dp_sgd turns into DP-SGD"),
        client_dp=Support(False, "clients upload per-client adaptive numbers of (seed, block) coordinates and are "
                                 "sent accumulated coefficients, so 'reply − global' is no model update to clip"),
        sum_only=Support(False, "clients upload different numbers of (seed, block) coordinates; only their "
                                "scatter into K×L is summed"),
        quantized_base=UPDATES_THE_BASE),
    payload=Payload(down="K×L accumulated coefficients C (fp32)",
                    up="K_l per block (int32) and Σ_l K_l (seed index, coordinate) pairs", formula=ferret_bytes),
    export=TUNED_MODEL, quick=("strategy.num_seeds=64", "train.local_steps=8"),
    tuning={"train.lr": LEARNING_RATES, "strategy.num_seeds": (200, 100, 400)})  # local steps; K (official: 200)
