"""Server half shared by the methods that fold updates into the frozen base.

FedEx-LoRA (arXiv 2410.09432) folds the aggregation residual into ``W0``; FLoRA
(arXiv 2409.05976) folds the stacked product into it (docs/methods.md#flora).  The server
keeps the *cumulative* merged delta ``D_l`` of every LoRA module, so the global model
is ``W0 + D`` (+ the method's adapter), and sends it to every sampled client.

Why cumulative: clients are sampled (partial participation) and simulation clients
keep no model between rounds (the cached model is shared by all clients of a worker,
and ``Context.state`` should stay small), so a client that skipped rounds can only be
exact if it receives the whole ``D``, not just this round's increment.  Two encodings,
chosen by the method's config, both counted by the ledger because they travel as arrays:

``dense``
    ``D_l`` itself, ``Σ_l m_l·n_l`` scalars per client and round, whatever N and the
    history; exact up to fp32 rounding of the sum.
``factored``
    every round's factors side by side, ``D_l = [D_B1, D_B2, …]·[D_A1; D_A2; …]``:
    ``Σ_l R_l(m_l + n_l)`` scalars where ``R_l`` is the sum of the merged ranks over all
    past rounds (N_t·r per round for FedEx, Σ_k r_k for FLoRA).  Cheaper than ``dense``
    while ``R_l < m_l n_l / (m_l + n_l)``, i.e. for a few rounds; it grows without bound.

Nothing is sent before the first merge (``D = 0``).
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.flower.strategy import Arrays, FedtuneStrategy
from fedtune.models.base_delta import DELTA, DELTA_A, DELTA_B, set_base, split_deltas
from fedtune.models.export import save_base_delta
from fedtune.models.spec import LoRAConfig
from strategies.lora_math import lora_pairs, require_choice

DELTA_MODES = ("dense", "factored")


class MergedDelta:
    """The cumulative merged delta ``D_l = Σ_t B_t A_t`` per module, and its wire form."""

    def __init__(self, mode: str) -> None:
        require_choice("delta_mode", mode, DELTA_MODES)
        self.mode = mode
        self.dense: dict[str, torch.Tensor] = {}  # fp64 running sums (dense mode)
        self.factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # fp32 (factored)
        self._wire: Arrays | None = None

    def add(self, module: str, B: torch.Tensor, A: torch.Tensor) -> None:
        """``D_module += B·A`` (B m×q, A q×n; any scaling already folded in)."""
        self._wire = None
        if self.mode == "dense":
            product = B.to(torch.float64) @ A.to(torch.float64)
            self.dense[module] = self.dense[module] + product if module in self.dense else product
        else:
            self.factors.setdefault(module, []).append((B.float(), A.float()))

    def arrays(self) -> Arrays:
        """What a client receives (fp32): empty until something was merged."""
        if self._wire is None:
            if self.mode == "dense":
                self._wire = {m + DELTA: d.float() for m, d in self.dense.items()}
            else:
                self._wire = {}
                for m, pairs in self.factors.items():
                    self._wire[m + DELTA_B] = torch.cat([B for B, _ in pairs], dim=1)
                    self._wire[m + DELTA_A] = torch.cat([A for _, A in pairs], dim=0)
        return self._wire

    def total(self) -> dict[str, torch.Tensor]:
        """``D_l`` per module (fp64), decoded from the wire form exactly as a client does."""
        return split_deltas(self.arrays())[0]

    def state_dict(self) -> dict[str, object]:
        """The running sums (dense) or every round's factors (factored)."""
        return {"dense": dict(self.dense), "factors": {m: list(pairs) for m, pairs in self.factors.items()}}

    def load_state_dict(self, state: dict) -> None:  # type: ignore[type-arg]
        self.dense = dict(state["dense"])
        self.factors = {m: [(B, A) for B, A in pairs] for m, pairs in state["factors"].items()}
        self._wire = None


class MergedBaseStrategy(FedtuneStrategy):
    """Base for FedEx-LoRA and FLoRA: keeps :class:`MergedDelta`, sends it, loads it.

    The method's config says how the delta travels (its ``delta_mode``: ``dense`` or
    ``factored``, see the module docstring for the bytes).  ``lora_rank`` and
    ``lora_alpha`` are the model's LoRA settings (``s = lora_alpha / lora_rank``):
    :class:`~fedtune.models.zoo.LoRAConfig`'s defaults, which :meth:`from_config`
    replaces by ``model.lora``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delta = MergedDelta(self.config.delta_mode)
        lora = LoRAConfig()
        self.lora_rank, self.lora_alpha = lora.rank, lora.alpha
        self.pairs: dict[str, tuple[str, str]] = {}
        self.shapes: dict[str, tuple[int, int]] = {}  # module -> (m, n)

    @classmethod
    def from_config(cls, cfg) -> "MergedBaseStrategy":  # type: ignore[no-untyped-def]
        strategy = super().from_config(cfg)
        assert isinstance(strategy, MergedBaseStrategy)
        strategy.lora_rank, strategy.lora_alpha = cfg.model.lora.rank, cfg.model.lora.alpha
        return strategy

    @property
    def scale(self) -> float:
        """``s = lora_alpha / lora_rank`` of the global adapter."""
        return self.lora_alpha / self.lora_rank

    def initialize(self, arrays: Arrays) -> None:
        super().initialize(arrays)
        self.pairs = lora_pairs(arrays)
        self.shapes = {m: (arrays[b].shape[0], arrays[a].shape[1]) for m, (a, b) in self.pairs.items()}

    def downlink(self, server_round: int, partition_id: int) -> Arrays:
        return {**self.global_arrays, **self.delta.arrays()}

    def export(self, model: torch.nn.Module, path: str) -> None:
        """The adapter, plus ``D`` in ``base_delta.safetensors`` (:mod:`fedtune.models.export`)."""
        super().export(model, path)
        save_base_delta(path, self.delta.total())

    def delta_bytes(self, merged_ranks: list[int]) -> int:
        """Bytes of the cumulative delta a client receives, by formula: nothing before the
        first merge; ``dense``: ``4·Σ_l m_l n_l``; ``factored``: ``4·Σ_l R(m_l + n_l)`` with
        ``R = Σ merged_ranks``, the ranks of every product merged so far."""
        if not merged_ranks:
            return 0
        if self.delta.mode == "dense":
            return 4 * sum(m * n for m, n in self.shapes.values())
        return 4 * sum(merged_ranks) * sum(m + n for m, n in self.shapes.values())

    def merged_partitions(self) -> list[int]:
        """The clients merged so far, one entry per client and round (rounds that aggregated)."""
        return [pid for info in self.rounds.values() if len(info.received) >= self.min_replies
                for pid in info.received]

    def load_base(self, model: torch.nn.Module) -> None:
        """``W ← W0 + D`` on the server's model, through the clients' own code path."""
        set_base(model, self.delta.total())

    def state_dict(self) -> dict:  # type: ignore[type-arg]
        """The base's state and the cumulative merged delta D."""
        return {**super().state_dict(), "delta": self.delta.state_dict()}

    def load_state_dict(self, state: dict) -> None:  # type: ignore[type-arg]
        super().load_state_dict(state)
        self.delta.load_state_dict(state["delta"])
