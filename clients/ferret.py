"""Ferret client: T first-order steps, then a block-wise shared-seed projection of Δ.

Ferret (Shu et al., ICML'25, arXiv 2409.06277), docs/methods.md#ferret.  The client syncs its
model to the downlinked coefficient matrix ``C`` (``w = w0 − Σ_{j,l} C_{j,l} v_{j,l}``,
replaying only ``C − C_last`` onto this process's cached copy, with the bases read from
this process's bank, :mod:`fedtune.directions`), runs ``train.local_steps``
first-order steps with ``train.optimizer`` (:func:`clients.local_steps.run_local_steps`;
the official script: SGD, T = 10), forms ``Δ = w_old − w_new`` and uploads the
block-wise coordinates of :func:`strategies.ferret.project` as ``(K_l, index, value)``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.config.run import RunConfig
from fedtune.directions import SeedDirections, directions_for
from fedtune.randomness import seed_pool, torch_generator
from fedtune.registry import TRAINERS
from fedtune.trainer import TrainContext

from clients.local_steps import run_local_steps
from clients.zo_seeds import SeededTrainer
from strategies.ferret import apply_coefficients, block_seeds, encode_upload, make_blocks, project


class FerretTrainer(SeededTrainer):
    """First-order local training + projection onto shared random bases."""

    name = "ferret"

    def layout(self, model: torch.nn.Module, cfg: RunConfig) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """Blocks and the ``(K, L)`` basis seeds (the same function of the model as the server's)."""
        numels = [p.numel() for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)]
        blocks = make_blocks(numels)
        return blocks, block_seeds(seed_pool(cfg.seed, cfg.strategy.num_seeds, "ferret-pool"), len(blocks))

    @staticmethod
    def bases(blocks: list[tuple[int, int]], seeds: torch.Tensor, cfg: RunConfig) -> SeedDirections:
        """This process's basis source: its cached bank (built once) when it fits the cap."""
        return directions_for(seeds, "uniform", segments=blocks, cache_mb=cfg.strategy.direction_cache_mb)

    def run(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
            ctx: TrainContext) -> dict[str, Any]:
        """Sync, train, project; return start/final w, the coordinates and the loss."""
        cfg: RunConfig = workspace.cfg
        blocks, seeds = self.layout(model, cfg)
        replica = self.replica(model, lambda th, c: apply_coefficients(th, c, blocks, self.bases(blocks, seeds, cfg)))
        replayed = replica.sync(arrays["coefficients"])
        flat = self.flat(model)
        flat.copy_(replica.theta)
        loss = run_local_steps(model, workspace, ctx)
        final = flat.detach().to("cpu", copy=True)
        flat.copy_(replica.theta)  # leave the process's model at the global state
        gen = torch_generator(cfg.seed, "ferret-select", ctx.server_round, ctx.partition_id)
        counts, indices, values = project(replica.theta - final, blocks, self.bases(blocks, seeds, cfg),
                                          cfg.strategy.num_seeds, cfg.strategy.scaling, gen)
        return {"start": replica.theta, "final": final, "counts": counts, "indices": indices, "values": values,
                "loss": loss, "replayed": replayed, "blocks": blocks, "seeds": seeds}

    def train(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
              ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        out = self.run(model, arrays, workspace, ctx)
        upload = encode_upload(out["counts"], out["indices"], out["values"], workspace.cfg.strategy.num_seeds)
        return upload, {"train-loss": out["loss"], "num-examples": len(workspace.partitions()[ctx.partition_id]),
                        "replayed-seeds": out["replayed"], "coordinates": int(out["counts"].sum())}


TRAINERS.register(FerretTrainer.name, FerretTrainer())
