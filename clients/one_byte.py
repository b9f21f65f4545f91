"""One-byte zeroth-order client (Zelikman et al., arXiv 2306.10015; docs/methods.md#one_byte).

The client

1. merges the downlinked log entries (the rounds it has not seen) into its own copy of the
   log, kept in Flower's ``Context.state`` (:func:`strategies.one_byte.merge_logs`);
2. brings this process's cached model to the end of the last round by replaying the
   entries after the round the cache holds (all of them onto θ0 when it holds none, or a
   later round: another run), :func:`strategies.one_byte.replay`;
3. measures τ SPSA projected gradients along its own seeded directions
   (:func:`strategies.one_byte.step_seeds`) in eval mode on an fp32 master copy, all at
   the round's θ (``accumulate``) or moving after each (``sequential``);
4. uploads them as int8 codes (+ the adaptive scale), and reports the quantiser's error
   against the fp32 scalars (``quant-rel-error`` = ‖q s − g‖ / ‖g‖, ``quant-max-error``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from fedtune.config.run import RunConfig
from fedtune.directions import SeedDirections
from fedtune.randomness import torch_generator
from fedtune.registry import TRAINERS
from fedtune.schedule import train_lr
from fedtune.trainer import TrainContext

from clients.zo_seeds import SeededTrainer
from strategies.one_byte import (LOG_KEYS, check_no_decay, dequantize, empty_log, merge_logs, quantize, replay,
                                 step_seeds)
from strategies.seed_replay import zo_steps

STATE_PREFIX = "one-byte/"  # the client's log in TrainContext.state


def client_log(state: dict[str, Any], steps: int) -> dict[str, torch.Tensor]:
    if f"{STATE_PREFIX}rounds" not in state:
        return empty_log(steps)
    return {k: state[f"{STATE_PREFIX}{k}"] for k in LOG_KEYS}


def store_log(state: dict[str, Any], steps: int, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge the received log entries into the client's copy in ``state``; return the merged log."""
    log = merge_logs(client_log(state, steps), {k: arrays[k] for k in LOG_KEYS})
    state.update({f"{STATE_PREFIX}{k}": v for k, v in log.items()})
    return log


class OneByteTrainer(SeededTrainer):
    """Replays the log, then τ one-byte projected gradients."""

    name = "one_byte"
    check_config = staticmethod(check_no_decay)

    def __init__(self) -> None:
        super().__init__()
        # model -> (last round the cached θ includes, θ)
        self._cache: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, torch.Tensor]] = \
            weakref.WeakKeyDictionary()

    def synced_theta(self, model: torch.nn.Module, log: dict[str, torch.Tensor], cfg: RunConfig,
                     through: int) -> tuple[torch.Tensor, int]:
        """The global θ after round ``through``, and how many log entries were replayed."""
        held, theta = self._cache.get(model, (0, None))  # type: ignore[arg-type]
        if theta is None or held > through:
            held, theta = 0, self.theta0(model).clone()
        lr_of = lambda r: train_lr(cfg, r, cfg.strategy.lr)  # noqa: E731  (the server's η_r)
        todo = (log["rounds"] > held) & (log["rounds"] <= through)
        replay(theta, {k: v[todo] for k, v in log.items()}, cfg.seed, lr_of)
        self._cache[model] = (through, theta)
        return theta, int(todo.sum())

    def run(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
            ctx: TrainContext) -> dict[str, Any]:
        """Merge, sync, measure τ projected gradients; return them with the losses."""
        cfg: RunConfig = workspace.cfg
        sc = cfg.strategy
        log = store_log(ctx.state, sc.local_steps, arrays)
        start, replayed = self.synced_theta(model, log, cfg, ctx.server_round - 1)
        loss_at, flat = self.zo_loss(model, workspace, ctx, sc.local_steps, sc.batch_size), self.flat(model)
        model.eval()
        theta = start.to(flat.device, copy=True)
        directions = SeedDirections(step_seeds(cfg.seed, ctx.server_round, ctx.partition_id, sc.local_steps),
                                    "gaussian", numel=theta.numel())
        lr = train_lr(cfg, ctx.server_round, sc.lr) if sc.local_update == "sequential" else 0.0
        grads, losses = zo_steps(theta, torch.arange(sc.local_steps), directions, loss_at, sc.eps, lr, sc.grad_clip)
        flat.copy_(start)  # leave the process's model at the global state
        rounding_gen = torch_generator(cfg.seed, "one-byte-rounding", ctx.server_round, ctx.partition_id)
        codes, scale = quantize(grads, sc.scale, sc.rounding, rounding_gen)
        return {"start": start, "grads": grads, "codes": codes, "scale": scale, "losses": losses,
                "replayed": replayed}

    def setup(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
              ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """A resumed server's whole log: merged into this client's copy, replayed at its next round."""
        log = store_log(ctx.state, workspace.cfg.strategy.local_steps, arrays)
        return {}, {"log-entries": len(log["rounds"])}

    def train(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
              ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        out = self.run(model, arrays, workspace, ctx)
        sc = workspace.cfg.strategy
        upload = {"codes": out["codes"]}
        if sc.scale == 0:
            upload["scale"] = torch.tensor([out["scale"]], dtype=torch.float32)
        error = dequantize(out["codes"], out["scale"]) - out["grads"]
        norm = float(out["grads"].norm())
        return upload, {"train-loss": sum(out["losses"]) / len(out["losses"]),
                        "num-examples": len(workspace.partitions()[ctx.partition_id]),
                        "replayed-entries": out["replayed"],
                        "quant-rel-error": float(error.norm()) / norm if norm > 0 else 0.0,
                        "quant-max-error": float(error.abs().max())}


TRAINERS.register(OneByteTrainer.name, OneByteTrainer())
