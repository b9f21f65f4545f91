"""FLoRA: stack the clients' LoRA factors, merge the product into the base, restart.

Implementation of FLoRA (Wang et al., NeurIPS'24, arXiv 2409.05976; official code
ATP-1010/FederatedLLM), docs/methods.md#flora.  Clients may have different ranks ``r_k``
(and scalings ``s_k = α_k / r_k``); stacking is exact for any of them::

    B_stack = [s_1B_1, …, s_NB_N]   (m × Σr_k),   A_stack = [p_1A_1; …; p_NA_N]   (Σr_k × n)
    B_stack A_stack = Σ_k p_k s_k B_k A_k
    W0 ← W0 + B_stack A_stack;   every client restarts with a fresh LoRA (A random, B = 0)

The head is averaged as in FedAvg.  ``ranks`` is cycled over partition ids
(``[64,32,16,16,8,8,4,4,4,4]`` in the paper); ``alpha: proportional`` gives
``α_k = (α/r)·r_k`` (the paper's α_k = 2r_k, one s for all), ``alpha: fixed`` gives
``α_k = α`` (s_k = α/r_k).  The client is the ``lora_fresh_rank`` trainer.

Bytes per client and round (b = 4): up ``b·Σ_l r_k(m_l+n_l)`` (+ head).  Down: the
head plus the **cumulative** merged delta (:mod:`strategies.merged_base`), because a
sampled client may have skipped rounds and keeps no model: ``merged: dense`` sends
``b·Σ_l m_l n_l`` (independent of N); ``merged: factored`` sends the stacks of all
past rounds, ``b·Σ_l (Σ_{t'<t} Σ_{k∈S_t'} r_k)(m_l+n_l)``, which in round 2 is the
paper's ``b·Σ_k P_LoRA^(k)`` (linear in N) and grows by that much every round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedtune.capabilities import Capabilities, Export, Payload, Support
from fedtune.config.method import MethodConfig
from fedtune.flower.strategy import Arrays, ClientUpdate, weights_for
from fedtune.models.base_delta import fresh_adapter, load_non_lora
from fedtune.models.export import load_exported
from fedtune.randomness import torch_generator
from fedtune.registry import register_method
from fedtune.tuning import LEARNING_RATES
from fedtune.models.targets import lora_preflight
from strategies.fedavg_lora import FIRST_ORDER, LOCAL_LR, MERGES_INTO_BASE, weighted_average
from strategies.lora_math import lora_keys, module_factors, require_choice, stack_factors
from strategies.merged_base import DELTA_MODES, MergedBaseStrategy


def client_rank(ranks: list[int], alpha_mode: str, lora_rank: int, lora_alpha: float,
                partition_id: int) -> tuple[int, float]:
    """``(r_k, α_k)`` of a client: ``ranks`` cycled over partition ids (empty: ``lora_rank``);
    ``proportional``: ``α_k = (lora_alpha/lora_rank)·r_k`` (same s for all, FLoRA's
    α_k = 2r_k); ``fixed``: ``α_k = lora_alpha`` (so ``s_k = lora_alpha / r_k``)."""
    rank = ranks[partition_id % len(ranks)] if ranks else lora_rank
    return rank, (lora_alpha / lora_rank * rank if alpha_mode == "proportional" else lora_alpha)



@dataclass
class FLoRAConfig(MethodConfig):
    """``strategy=flora``.

        fedtune run strategy=flora model=tiny dataset=tiny num_rounds=3
        fedtune run strategy=flora 'strategy.ranks=[8,4,4,2]' strategy.alpha=fixed strategy.merged=factored

    ranks : per-client LoRA ranks, cycled over partition ids (empty: ``model.lora.rank``).
    alpha : ``proportional`` (α_k = α·r_k/r, same s) or ``fixed`` (α_k = α, s_k = α/r_k).
    merged : how the cumulative merged delta travels, ``dense`` or ``factored``.
    weighting : ``examples`` or ``uniform`` client weights p_k.
    """

    name: str = "flora"
    ranks: list[int] = field(default_factory=list)  # cycled over partition ids; [] = model.lora.rank for all
    alpha: str = "proportional"  # proportional (α_k = α·r_k/r, one s) | fixed (α_k = α, s_k = α/r_k)
    merged: str = "dense"  # dense | factored

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must all be >= 1, got {self.ranks}")
        require_choice("alpha", self.alpha, ("proportional", "fixed"))
        require_choice("merged", self.merged, DELTA_MODES)

    @property
    def delta_mode(self) -> str:
        """How :class:`~strategies.merged_base.MergedBaseStrategy` sends the merged delta."""
        return self.merged


class FLoRA(MergedBaseStrategy):
    """Stacking aggregation with heterogeneous ranks; the global state is the head and ``D``."""

    name = "flora"

    def rank_of(self, partition_id: int) -> tuple[int, float]:
        """``(r_k, s_k)`` of a client."""
        rank, alpha = client_rank(self.config.ranks, self.config.alpha, self.lora_rank, self.lora_alpha, partition_id)
        return rank, alpha / rank

    def initialize(self, arrays: Arrays) -> None:
        super().initialize(arrays)  # learns the modules and their (m, n) from the LoRA keys
        self.global_arrays = {k: v for k, v in self.global_arrays.items() if k not in lora_keys(arrays)}

    def expected_upload(self, partition_id: int) -> dict[str, tuple[int, ...]]:
        rank, _ = self.rank_of(partition_id)
        shapes = {k: tuple(v.shape) for k, v in self.global_arrays.items()}
        for module, (a_key, b_key) in self.pairs.items():
            m, n = self.shapes[module]
            shapes[a_key], shapes[b_key] = (rank, n), (m, rank)
        return shapes

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Arrays:
        weights = weights_for(updates, self.weighting)
        scales = [self.rank_of(u.partition_id)[1] for u in updates]
        for module, (a_key, b_key) in self.pairs.items():
            As, Bs = module_factors(updates, a_key, b_key)
            self.delta.add(module, *stack_factors(As, Bs, weights, scales))
        heads = [{k: u.arrays[k] for k in self.global_arrays} for u in updates]
        return weighted_average(heads, weights)

    def load_into(self, model: torch.nn.Module) -> None:
        """``W0 + D`` with an all-zero adapter (B = 0) and the averaged head."""
        self.load_base(model)
        fresh_adapter(model, self.lora_rank, self.lora_alpha, torch_generator(self.seed, "server-adapter"))
        load_non_lora(model, self.global_arrays)


def flora_bytes(strategy: FLoRA, partition_id: int, upload: Arrays) -> tuple[int, int]:
    """Up ``4·(Σ_l r_k(m_l + n_l) + head)``; down ``4·head`` plus the cumulative merged delta,
    whose merged rank grows by ``r_k`` per client k merged."""
    head = 4 * sum(v.numel() for v in strategy.global_arrays.values())
    rank = strategy.rank_of(partition_id)[0]
    up = head + 4 * rank * sum(m + n for m, n in strategy.shapes.values())
    merged = [strategy.rank_of(pid)[0] for pid in strategy.merged_partitions()]
    return head + strategy.delta_bytes(merged), up


register_method(
    "flora", FLoRA, trainer="lora_fresh_rank", config_cls=FLoRAConfig,
    capabilities=Capabilities(
        lr_schedule=LOCAL_LR, warmup=LOCAL_LR,
        example_dp=FIRST_ORDER,
        client_dp=Support(False, "it stacks the clients' factors and merges their products into the base: "
                                 "no mean of the upload"),
        sum_only=Support(False, "it stacks the clients' factors side by side, one block per client"),
        quantized_base=MERGES_INTO_BASE),
    payload=Payload(down="head (fp32) + the cumulative merged delta (dense or factored)",
                    up="this client's rank-r_k A, B and head (fp32)", formula=flora_bytes),
    export=Export("peft LoRA adapter (all-zero B, + head) and base_delta.safetensors (the merged base delta)",
                  load=load_exported),
    quick=("strategy.ranks=[4,2,2]",), preflight=lora_preflight,
    tuning={"train.lr": LEARNING_RATES})
