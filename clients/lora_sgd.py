"""Local training of peft LoRA factors (+ the classifier head): the FedIT client.

Used by FedAvg-LoRA (Zhang et al., "Towards Building the Federated GPT", ICASSP'24,
arXiv 2305.05644) and by the other LoRA aggregation methods.  The client loads the
global ``(A, B, head)``, runs ``train.local_steps`` AdamW steps on them (the frozen
base ``W0`` never changes) and uploads the updated factors with its example count,
the FedAvg weight.
"""

from __future__ import annotations

import torch

from fedtune.config.run import RunConfig
from fedtune.models.causal_lm import is_causal_lm
from fedtune.models.state import load_trainable_state, trainable_state
from fedtune.models.targets import resolve_targets
from fedtune.randomness import seed_torch
from fedtune.registry import TRAINERS
from fedtune.trainer import TrainContext

from clients.local_steps import run_local_steps


class LoRATrainer:
    """First-order LoRA training; the adapter is peft's, built identically on every party."""

    name = "lora_sgd"

    def build_model(self, base: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        from peft import LoraConfig, TaskType, get_peft_model

        lora = cfg.model.lora
        for p in base.parameters():
            p.requires_grad_(False)
        seed_torch(cfg.seed, "adapter-init")  # same A init everywhere (B starts at 0)
        # a classifier keeps its new head trainable (SEQ_CLS); a causal LM has no new head
        task = TaskType.CAUSAL_LM if is_causal_lm(base) else TaskType.SEQ_CLS
        config = LoraConfig(task_type=task, r=lora.rank, lora_alpha=lora.alpha,
                            lora_dropout=lora.dropout,
                            target_modules=resolve_targets(lora.target_modules, base.config.model_type))
        model = get_peft_model(base, config)
        model.eval()
        return model

    def load(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace,  # type: ignore[no-untyped-def]
             ctx: TrainContext) -> None:
        """Make ``model`` the received starting point (subclasses also reset the base)."""
        load_trainable_state(model, arrays)

    def train(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace,  # type: ignore[no-untyped-def]
              ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        self.load(model, arrays, workspace, ctx)
        loss = run_local_steps(model, workspace, ctx)
        num_examples = len(workspace.partitions()[ctx.partition_id])
        return trainable_state(model), {"train-loss": loss, "num-examples": num_examples}


class FrozenALoRATrainer(LoRATrainer):
    """FFA-LoRA's client (Sun et al., ICLR'24, arXiv 2403.12313): ``lora_A`` stays at the
    shared seeded init, so only ``B`` and the head are trained and travel."""

    name = "lora_sgd_frozen_a"

    def build_model(self, base: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        model = super().build_model(base, cfg)
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
        return model


TRAINERS.register(LoRATrainer.name, LoRATrainer())
TRAINERS.register(FrozenALoRATrainer.name, FrozenALoRATrainer())
