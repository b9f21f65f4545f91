"""Clients whose frozen base moves: FedEx-LoRA and FLoRA fold updates into ``W0``.

FedEx-LoRA (Singhal et al., ACL'25, arXiv 2410.09432) adds the exact aggregation
residual to the frozen weights; FLoRA (Wang et al., NeurIPS'24, arXiv 2409.05976)
merges the stacked product into them and restarts LoRA.  Either way a client's target
weights are ``W0 + D`` with ``D`` the server's cumulative merged delta, which arrives in
the train message under extra keys (:mod:`fedtune.models.base_delta`, shared with the
server's evaluation and export).  Every call rebuilds ``W ← W0 + D`` from the pristine
``W0`` snapshotted when the model is built, because a worker's cached model is shared
by every client it serves.
"""

from __future__ import annotations

import torch

from fedtune.config.run import RunConfig
from fedtune.models.base_delta import fresh_adapter, load_non_lora, set_base, snapshot_base, split_deltas
from fedtune.randomness import torch_generator
from fedtune.registry import TRAINERS
from fedtune.trainer import TrainContext

from clients.lora_sgd import LoRATrainer
from strategies.flora import client_rank


class BaseDeltaTrainer(LoRATrainer):
    """FedEx-LoRA's client: ``W ← W0 + D``, then FedIT local training from ``(Ā, B̄)``."""

    name = "lora_sgd_base_delta"

    def build_model(self, base: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        model = super().build_model(base, cfg)
        snapshot_base(model)
        return model

    def load(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace,  # type: ignore[no-untyped-def]
             ctx: TrainContext) -> None:
        deltas, rest = split_deltas(arrays)
        set_base(model, deltas)
        super().load(model, rest, workspace, ctx)


class FreshRankTrainer(BaseDeltaTrainer):
    """FLoRA's client: ``W ← W0 + D``, a fresh LoRA of this client's rank ``r_k``, the head.

    The fresh ``A`` is drawn from the stream ``(seed, "fresh-adapter", round, partition)``.
    """

    name = "lora_fresh_rank"

    def load(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace,  # type: ignore[no-untyped-def]
             ctx: TrainContext) -> None:
        cfg: RunConfig = workspace.cfg
        deltas, rest = split_deltas(arrays)
        set_base(model, deltas)
        rank, alpha = client_rank(list(cfg.strategy.ranks), cfg.strategy.alpha, cfg.model.lora.rank,
                                  cfg.model.lora.alpha, ctx.partition_id)
        fresh_adapter(model, rank, alpha, torch_generator(cfg.seed, "fresh-adapter", ctx.server_round,
                                                          ctx.partition_id))
        load_non_lora(model, rest)


TRAINERS.register(BaseDeltaTrainer.name, BaseDeltaTrainer())
TRAINERS.register(FreshRankTrainer.name, FreshRankTrainer())
