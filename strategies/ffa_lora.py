"""FFA-LoRA: freeze ``A`` at its shared random init, train and average only ``B``.

Implementation of FFA-LoRA (Sun, Li, Li, Ding, ICLR'24, arXiv 2403.12313),
docs/methods.md#ffa_lora.  Every party builds the adapter from the same seeded init, so ``A``
is identical everywhere and never changes; clients train ``B`` (from 0) and the head::

    B̄ = Σ_k p_k B_k,    global model W0 + s·B̄A = Σ_k p_k (W0 + s·B_k A)   (exact)

Averaging is exact because the model is linear in the only trained factor.  ``A``
never travels (it is re-created from the run seed), so the bytes per client and round
are ``4·Σ_l r·m_l`` (+ head) each way, about half of FedIT's.  The client is the
``lora_sgd_frozen_a`` trainer (:mod:`clients.lora_sgd`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.capabilities import UNIFORM_WEIGHTING, Capabilities, Payload, Support
from fedtune.flower.strategy import Arrays
from fedtune.registry import register_method
from fedtune.tuning import LEARNING_RATES
from fedtune.models.targets import lora_preflight
from strategies.fedavg_lora import (ADAPTER_ONLY, FIRST_ORDER, LOCAL_LR, PEFT_EXPORT, FedAvgLoRA, FedAvgLoRAConfig,
                                    state_each_way)
from strategies.lora_math import A_TAG


@dataclass
class FFALoRAConfig(FedAvgLoRAConfig):
    """``strategy=ffa_lora`` (FedAvg's fields).

        fedtune run strategy=ffa_lora model=tiny dataset=tiny num_rounds=3

    weighting : ``examples`` (p_k = n_k / Σ n_j) or ``uniform``.
    """

    name: str = "ffa_lora"


class FFALoRA(FedAvgLoRA):
    """FedAvg (inherited) over ``B`` and the head; the trainer keeps ``A`` out of every message."""

    name = "ffa_lora"

    def initialize(self, arrays: Arrays) -> None:
        if any(A_TAG in k for k in arrays):
            raise ValueError("ffa_lora: lora_A must be frozen (trainer lora_sgd_frozen_a), "
                             "but the initial state contains lora_A factors")
        super().initialize(arrays)


register_method(
    "ffa_lora", FFALoRA, trainer="lora_sgd_frozen_a", config_cls=FFALoRAConfig,
    capabilities=Capabilities(
        lr_schedule=LOCAL_LR, warmup=LOCAL_LR,
        example_dp=FIRST_ORDER,
        client_dp=Support(True, "its global state is the uniform mean of the uploaded B and head",
                          (UNIFORM_WEIGHTING,)),
        sum_only=Support(True, "B̄ and the head are Σ_k p_k of the uploads (A never changes)"),
        identical_updates_fixed_point=True, quantized_base=ADAPTER_ONLY),
    payload=Payload(down="B and head (fp32)", up="B and head (fp32)", formula=state_each_way),
    export=PEFT_EXPORT, preflight=lora_preflight,
    tuning={"train.lr": LEARNING_RATES})  # with A frozen, lr and alpha play one role: the paper tunes the lr
