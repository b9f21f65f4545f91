"""FedEx-LoRA: FedIT averages plus the exact residual folded into the frozen base.

Implementation of FedEx-LoRA (Singhal, Ponkshe, Vepakomma, ACL'25, arXiv 2410.09432),
docs/methods.md#fedex_lora.  The server averages the factors as FedIT does and adds what that
average misses to the frozen weights, per LoRA module (s = lora_alpha / r)::

    Ā = Σ p_k A_k,   B̄ = Σ p_k B_k
    W0 ← W0 + s·(Σ_k p_k B_k A_k − B̄Ā)          (the residual, rank ≤ N·r)
    ⇒  W0' + s·B̄Ā = W0 + s·Σ_k p_k B_k A_k      (every client's model is the ideal one)

Clients continue from ``(Ā, B̄)``; the head is averaged as in FedAvg.  The official
code uses the unweighted mean (``weighting: uniform``).  The residual is in nn.Linear's
(out, in) layout, the same as ``B A``; no transpose (§1.2).

Bytes per client and round (b = 4): up ``b·P_LoRA`` (+ head); down ``b·P_LoRA`` (+ head)
plus the **cumulative** residual, because sampled clients may have skipped rounds
(:mod:`strategies.merged_base`): ``residual: dense`` adds ``b·Σ_l m_l n_l``;
``residual: factored`` adds ``b·Σ_l R_l(m_l+n_l)`` with ``R_l = r·Σ_{t'<t} N_{t'}``
(N_{t'} = clients merged in round t'), from round 2 on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.capabilities import Capabilities, Export, Payload, Support
from fedtune.config.method import MethodConfig
from fedtune.flower.strategy import Arrays, ClientUpdate, weights_for
from fedtune.models.export import load_exported
from fedtune.models.state import load_trainable_state
from fedtune.registry import register_method
from fedtune.tuning import LEARNING_RATES
from fedtune.models.targets import lora_preflight
from strategies.fedavg_lora import FIRST_ORDER, LOCAL_LR, MERGES_INTO_BASE, weighted_average
from strategies.lora_math import module_factors, require_choice, residual_factors
from strategies.merged_base import DELTA_MODES, MergedBaseStrategy


@dataclass
class FedExLoRAConfig(MethodConfig):
    """``strategy=fedex_lora``.

        fedtune run strategy=fedex_lora model=tiny dataset=tiny num_rounds=3
        fedtune run strategy=fedex_lora strategy.residual=factored strategy.weighting=uniform

    residual : how the cumulative residual travels, ``dense`` or ``factored``.
    weighting : ``examples`` or ``uniform`` (the official code) client weights p_k.
    """

    name: str = "fedex_lora"
    residual: str = "dense"  # dense | factored

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("residual", self.residual, DELTA_MODES)

    @property
    def delta_mode(self) -> str:
        """How :class:`~strategies.merged_base.MergedBaseStrategy` sends the merged delta."""
        return self.residual


class FedExLoRA(MergedBaseStrategy):
    """FedIT averages; ``s·(Σp_kB_kA_k − B̄Ā)`` accumulated into every client's base."""

    name = "fedex_lora"

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Arrays:
        weights = weights_for(updates, self.weighting)
        for module, (a_key, b_key) in self.pairs.items():
            B_res, A_res = residual_factors(*module_factors(updates, a_key, b_key), weights)
            self.delta.add(module, self.scale * B_res, A_res)
        return weighted_average([u.arrays for u in updates], weights)

    def load_into(self, model: torch.nn.Module) -> None:
        self.load_base(model)
        load_trainable_state(model, self.global_arrays)


def fedex_bytes(strategy: FedExLoRA, partition_id: int, upload: Arrays) -> tuple[int, int]:
    """Up ``4·P`` (A, B, head); down the same plus the cumulative residual, whose merged
    rank grows by r per client merged (:meth:`MergedBaseStrategy.delta_bytes`)."""
    state = 4 * sum(v.numel() for v in strategy.global_arrays.values())
    merged = [strategy.lora_rank] * len(strategy.merged_partitions())
    return state + strategy.delta_bytes(merged), state


register_method(
    "fedex_lora", FedExLoRA, trainer="lora_sgd_base_delta", config_cls=FedExLoRAConfig,
    capabilities=Capabilities(
        lr_schedule=LOCAL_LR, warmup=LOCAL_LR,
        example_dp=FIRST_ORDER,
        client_dp=Support(False, "it folds the residual Σ p_k B_k A_k − B̄Ā of the clients' own products into "
                                 "the frozen base and sends it unnoised"),
        sum_only=Support(False, "its residual Σ_k p_k B_k A_k − B̄Ā needs the clients' own products"),
        identical_updates_fixed_point=True, quantized_base=MERGES_INTO_BASE),
    payload=Payload(down="A, B and head (fp32) + the cumulative residual (dense or factored)",
                    up="A, B and head (fp32)", formula=fedex_bytes),
    export=Export("peft LoRA adapter (+ head) and base_delta.safetensors (the merged base delta)",
                  load=load_exported), preflight=lora_preflight,
    tuning={"train.lr": LEARNING_RATES})
