"""Zeroth-order local steps over shared seeds: the FedKSeed / FedKSeed-Pro client.

FedKSeed (Qin et al., ICML'24, arXiv 2312.06353), docs/methods.md#fedkseed.  The client

1. syncs its model to the downlinked accumulators ``a``: ``θ = θ0 − η Σ_j a_j z_j``,
   replaying only ``a − a_last`` onto this process's cached copy (:class:`SeedReplica`),
   with the directions read from this process's bank (:mod:`fedtune.directions`,
   generated once per process when ``4·K·d ≤ strategy.direction_cache_mb`` MiB);
2. draws τ seed indices (uniform, or from the Pro probabilities) and τ batches from
   its seeded streams, runs :func:`~strategies.fedkseed.zo_steps` at the round's
   ``η_r`` (:func:`fedtune.schedule.train_lr`) in eval mode on an
   fp32 master copy of θ (so ``θ+εz`` and ``θ−εz`` never drift, §5.9);
3. uploads the τ ``(index, g)`` pairs (or the K per-seed sums).

The tuned parameters are bound, once per process, as views of one flat fp32 buffer in
sorted-name order (the layout of the seeded directions), so writing a candidate θ into
the model is a single copy.  Nothing is kept in Flower's ``Context.state``: the cached
replica is a pure function of θ0 (rebuilt from the config) and ``a`` (downlinked), so
a fresh worker simply rebuilds.  :class:`SeededTrainer` is shared with Ferret.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

from fedtune.config.run import RunConfig
from fedtune.data.batches import local_batches
from fedtune.directions import SeedDirections, directions_for
from fedtune.randomness import seed_pool, torch_generator
from fedtune.registry import TRAINERS
from fedtune.schedule import train_lr
from fedtune.trainable import check_trainable
from fedtune.trainer import TrainContext

from strategies.fedkseed import SeedReplica, check_exact, encode_upload, zo_steps


class SeededTrainer:
    """Model building and replica caching shared by the seed-replay trainers."""

    check_config: Callable[[Any], None] = staticmethod(lambda cfg: None)

    def __init__(self) -> None:
        # model -> (flat buffer its tuned parameters view, θ0 as built)
        self._flat: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = \
            weakref.WeakKeyDictionary()
        self._replicas: weakref.WeakKeyDictionary[torch.nn.Module, SeedReplica] = weakref.WeakKeyDictionary()

    def build_model(self, base: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        """Tune the parameters selected by ``strategy.trainable``, bound to one flat buffer."""
        self.check_config(cfg)
        tuned = set(check_trainable([n for n, _ in base.named_parameters()], cfg.strategy.trainable))
        for name, p in base.named_parameters():
            p.requires_grad_(name in tuned)
        params = dict((n, p) for n, p in base.named_parameters() if p.requires_grad)
        names = sorted(params)
        flat = torch.cat([params[n].detach().reshape(-1).float() for n in names])
        pos = 0
        for n in names:  # parameters become views of `flat` (fp32, canonical order)
            k = params[n].numel()
            params[n].data = flat[pos: pos + k].view_as(params[n])
            pos += k
        base.eval()
        self._flat[base] = (flat, flat.detach().to("cpu", copy=True))
        return base

    def flat(self, model: torch.nn.Module) -> torch.Tensor:
        return self._flat[model][0]

    def theta0(self, model: torch.nn.Module) -> torch.Tensor:
        """The tuned parameters as built (flat, CPU fp32), before any round."""
        return self._flat[model][1]

    def zo_loss(self, model: torch.nn.Module, workspace: Any, ctx: TrainContext, steps: int,
                batch_size: int) -> Callable[[torch.Tensor, int], float]:
        """``loss_at(vector, t)``: the loss with the tuned parameters set to ``vector``, on step
        t's batch of the client's seeded batch stream (what a two-point ZO step evaluates)."""
        batch_gen = torch_generator(workspace.cfg.seed, "batches", ctx.server_round, ctx.partition_id)
        batches = list(local_batches(workspace.partitions()[ctx.partition_id], steps, batch_size, batch_gen))
        encoded, flat = workspace.encoded("train"), self.flat(model)

        @torch.no_grad()
        def loss_at(vector: torch.Tensor, t: int) -> float:
            flat.copy_(vector)
            return float(model(**encoded.batch(batches[t], ctx.device)).loss)

        return loss_at

    def replica(self, model: torch.nn.Module, apply: Callable[[torch.Tensor, torch.Tensor], None]) -> SeedReplica:
        """This process's replica of the global model (θ0 = the freshly built model)."""
        if model not in self._replicas:
            self._replicas[model] = SeedReplica(self._flat[model][1], apply)
        return self._replicas[model]


class ZOSeedsTrainer(SeededTrainer):
    """FedKSeed client: τ two-point zeroth-order steps over the K candidate seeds."""

    name = "zo_seeds"
    check_config = staticmethod(check_exact)

    def run(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
            ctx: TrainContext) -> dict[str, Any]:
        """Sync, run the τ steps; return start/final θ, indices, grads, losses, replays."""
        cfg: RunConfig = workspace.cfg
        sc = cfg.strategy
        seeds, numel = seed_pool(cfg.seed, sc.num_seeds, "fedkseed-pool"), self.theta0(model).numel()

        def directions() -> SeedDirections:  # this process's bank of z_j, built once (or streaming)
            return directions_for(seeds, "gaussian", numel=numel, cache_mb=sc.direction_cache_mb)

        replica = self.replica(model, lambda th, c: directions().add(th, c, alpha=-sc.lr))
        replayed = replica.sync(arrays["accumulators"])
        gen = torch_generator(cfg.seed, "zo-seeds", ctx.server_round, ctx.partition_id)
        probs = arrays.get("probabilities", torch.full((sc.num_seeds,), 1.0 / sc.num_seeds))
        indices = torch.multinomial(probs.double(), sc.local_steps, replacement=True, generator=gen)
        loss_at, flat = self.zo_loss(model, workspace, ctx, sc.local_steps, sc.batch_size), self.flat(model)
        model.eval()
        theta = replica.theta.to(flat.device, copy=True)
        lr = train_lr(cfg, ctx.server_round, sc.lr)  # η_r: the server scales this round's sums by η_r/η
        grads, losses = zo_steps(theta, indices, directions(), loss_at, sc.eps, lr, sc.grad_clip)
        flat.copy_(replica.theta)  # leave the process's model at the global state
        return {"start": replica.theta, "final": theta.cpu(), "indices": indices, "grads": grads,
                "losses": losses, "replayed": replayed}

    def train(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
              ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        out = self.run(model, arrays, workspace, ctx)
        sc = workspace.cfg.strategy
        upload = encode_upload(out["indices"], out["grads"], sc.num_seeds, sc.encoding)
        return upload, {"train-loss": sum(out["losses"]) / len(out["losses"]),
                        "num-examples": len(workspace.partitions()[ctx.partition_id]),
                        "replayed-seeds": out["replayed"]}


TRAINERS.register(ZOSeedsTrainer.name, ZOSeedsTrainer())
