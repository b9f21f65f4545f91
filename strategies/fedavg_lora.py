"""FedAvg-LoRA, a.k.a. FedIT.

Implementation of FedIT (Zhang et al., "Towards Building the Federated GPT: Federated
Instruction Tuning", ICASSP'24, arXiv 2305.05644), docs/methods.md#fedavg_lora.

Each sampled client trains the LoRA factors ``(A_k, B_k)`` (and the classifier head)
from the global ones; the server averages **each factor separately**, weighted by
example counts ``p_k = n_k / Σ_j n_j``::

    Ā = Σ_k p_k A_k,    B̄ = Σ_k p_k B_k,    global model W0 + s·B̄Ā  (W0 never changes)

This is inexact: ``Σ_k p_k B_k A_k − B̄Ā = Σ_k p_k (B_k − B̄)(A_k − Ā)``, the weighted
cross-covariance of the factors, which LoRA-FAIR, FedEx-LoRA, FFA-LoRA and Fed-SB
each address differently.

Bytes per client and round: ``4·P_LoRA`` (+ head) each way, ``P_LoRA = Σ_l r(m_l+n_l)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.capabilities import UNIFORM_WEIGHTING, Capabilities, Export, Payload, Support
from fedtune.config.method import MethodConfig
from fedtune.flower.strategy import Arrays, ClientUpdate, FedtuneStrategy, weights_for
from fedtune.models.export import load_exported
from fedtune.models.targets import lora_preflight
from fedtune.registry import register_method
from fedtune.tuning import LEARNING_RATES

FIRST_ORDER = Support(True, "its clients run the shared first-order loop (clients.local_steps), "
                            "which privacy=dp_sgd turns into DP-SGD")
LOCAL_LR = Support(True, "its clients' optimizer is built, and its lr set every step, by the shared first-order "
                         "loop (clients.local_steps)")
PEFT_EXPORT = Export("peft LoRA adapter (+ head)", load=load_exported)
ADAPTER_ONLY = Support(True, "its clients train only peft's A, B (and the head) beside the frozen base, which "
                             "QLoRA holds quantized (Dettmers et al. 2023, arXiv 2305.14314)")
MERGES_INTO_BASE = Support(False, "it merges aggregated LoRA products into the base weights, which a quantized "
                                  "base cannot hold exactly; use model.quantization=none")


def weighted_average(states: list[Arrays], weights: list[float]) -> Arrays:
    """``Σ_k w_k · state_k`` per key (weights already normalised), accumulated in fp64."""
    out = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for w, s in zip(weights, states):
            acc += w * s[key].to(torch.float64)
        out[key] = acc.to(states[0][key].dtype)
    return out


def factor_product_gap(As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``Σ_k p_k B_k A_k − B̄Ā``: what averaging the factors separately loses (the FedIT error)."""
    A_bar = sum(w * A for w, A in zip(weights, As))
    B_bar = sum(w * B for w, B in zip(weights, Bs))
    ideal = sum(w * (B @ A) for w, A, B in zip(weights, As, Bs))
    return ideal - B_bar @ A_bar


@dataclass
class FedAvgLoRAConfig(MethodConfig):
    """``strategy=fedavg_lora`` (the default): average LoRA A and B separately.

    weighting : ``examples`` (Shepherd/FedIT: by local dataset size) or ``uniform``.
    """

    name: str = "fedavg_lora"


class FedAvgLoRA(FedtuneStrategy):
    """FedIT: average the LoRA ``A`` and ``B`` factors (and the head) separately."""

    name = "fedavg_lora"

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Arrays:
        return weighted_average([u.arrays for u in updates], weights_for(updates, self.weighting))


def state_each_way(strategy: FedtuneStrategy, partition_id: int, upload: Arrays) -> tuple[int, int]:
    """``4·P`` bytes each way, P the trainable scalars of the global state (LoRA factors, head)."""
    n = 4 * sum(v.numel() for v in strategy.global_arrays.values())
    return n, n


register_method(
    "fedavg_lora", FedAvgLoRA, trainer="lora_sgd", config_cls=FedAvgLoRAConfig,
    capabilities=Capabilities(
        lr_schedule=LOCAL_LR, warmup=LOCAL_LR,
        example_dp=FIRST_ORDER,
        client_dp=Support(True, "its global state is the uniform mean of the uploaded A, B and head",
                          (UNIFORM_WEIGHTING,)),
        sum_only=Support(True, "Ā, B̄ and the head are Σ_k p_k of the uploads"),
        identical_updates_fixed_point=True, quantized_base=ADAPTER_ONLY),
    payload=Payload(down="A, B and head (fp32)", up="A, B and head (fp32)", formula=state_each_way),
    export=PEFT_EXPORT, preflight=lora_preflight,
    tuning={"train.lr": LEARNING_RATES})  # FedIT's one knob: the clients' AdamW step
