"""The first-order local loop shared by every gradient-based trainer.

A fresh optimizer every round (FedIT, FLoRA and Fed-SB rebuild AdamW per client per
round, docs/methods.md#notation), batches from the client's seeded stream, dropout seeded
from ``("train", round, partition_id)``: the same client in the same round computes
the same update in any process.  The optimizer's lr is the round's
(``train.lr_schedule``) times the step's warmup factor (``train.warmup_steps``),
:mod:`fedtune.schedule`: one place, so every first-order method follows it.  With ``privacy=dp_sgd`` the loop is Opacus DP-SGD
instead (:func:`fedtune.privacy.dp_sgd.run_private_steps`): every trainer that calls
this function is private without a line of its own.
"""

from __future__ import annotations

import torch

from fedtune.config.run import RunConfig
from fedtune.data.batches import local_batches
from fedtune.randomness import seed_torch, torch_generator
from fedtune.schedule import set_lr, train_lr, warmup_factor
from fedtune.trainer import TrainContext


def make_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)


class StepLR:
    """Sets the optimizer's lr before each local step: the round's lr × the warmup factor.

    Without warmup the lr set at construction is never touched (``constant`` runs are
    bit for bit what they were without a schedule)."""

    def __init__(self, cfg: RunConfig, server_round: int) -> None:
        self.lr, self.warmup = train_lr(cfg, server_round), cfg.train.warmup_steps

    def optimizer(self, params: list[torch.nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
        return make_optimizer(params, cfg, self.lr)

    def before_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.warmup:
            set_lr(optimizer, self.lr * warmup_factor(self.warmup, step))


def run_local_steps(model: torch.nn.Module, workspace, ctx: TrainContext) -> float:  # type: ignore[no-untyped-def]
    """Train ``model``'s trainable parameters for ``train.local_steps``; return the mean loss."""
    cfg: RunConfig = workspace.cfg
    schedule = StepLR(cfg, ctx.server_round)
    if cfg.privacy.name == "dp_sgd":
        from fedtune.privacy.dp_sgd import run_private_steps

        return run_private_steps(model, workspace, ctx, schedule.optimizer, schedule.before_step)
    encoded = workspace.encoded("train")
    indices = workspace.partitions()[ctx.partition_id]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = schedule.optimizer(params, cfg)
    seed_torch(cfg.seed, "train", ctx.server_round, ctx.partition_id)
    gen = torch_generator(cfg.seed, "batches", ctx.server_round, ctx.partition_id)
    model.train()
    losses = []
    for step, idx in enumerate(local_batches(indices, cfg.train.local_steps, cfg.train.batch_size, gen)):
        schedule.before_step(optimizer, step)
        optimizer.zero_grad(set_to_none=True)
        loss = model(**encoded.batch(idx, ctx.device)).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return sum(losses) / len(losses)
