"""The Fed-SB client: LoRA-SB cores ``R`` (+ the classifier head) trained locally.

Fed-SB (Singhal et al., arXiv 2502.15436) on LoRA-SB (Ponkshe et al., arXiv
2411.19557); docs/methods.md#fed_sb.  The adapter is :class:`fedtune.models.lora_sb.LoRASBModel`:
``W = W0 + s·B R A`` on ``model.lora.target_modules`` with ``r = strategy.rank``.

``setup`` serves the strategy's two one-time ``train.setup`` messages:

* **no arrays** → the request for the init gradient (``strategy.init_source=clients``
  only): the mean full-weight gradient ``G_l = ∂L/∂W0_l`` of every adapted module, with
  the adapter off, over ``strategy.init_samples`` of this client's examples (seeded per
  partition, :func:`strategies.fed_sb_init.init_batches`), uploaded as fp32 or as its
  int8 sign (``strategy.init_upload``);
* **the bases** ``{<module>.sb_B, <module>.sb_A}`` → they are loaded into the model and
  kept in the client's persistent state (Flower ``Context.state``), so they cross the
  network exactly once, whichever process later serves this client.

``train`` reloads the bases from that state (the model is shared by every client a
process serves), then runs the FedIT loop on ``R`` and the head and uploads them.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.config.run import RunConfig
from fedtune.models.lora_sb import LoRASBModel, base_gradients, set_bases
from fedtune.models.state import load_trainable_state
from fedtune.models.targets import resolve_targets
from fedtune.randomness import seed_torch
from fedtune.registry import TRAINERS
from fedtune.trainer import TrainContext

from clients.lora_sgd import LoRATrainer
from strategies.fed_sb_init import init_batches

STATE_PREFIX = "fed-sb/"  # keys of the bases in TrainContext.state


class LoRASBTrainer(LoRATrainer):
    """LoRA-SB on the frozen base; the bases arrive once, in ``setup``."""

    name = "lora_sb"

    def build_model(self, base: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        rank = cfg.strategy.rank
        alpha = cfg.strategy.lora_alpha  # FedSBConfig: alpha, or rank when null
        targets = resolve_targets(cfg.model.lora.target_modules, base.config.model_type)
        model = LoRASBModel(base, targets, rank, alpha)  # A = B = R = 0: the base
        model.eval()
        return model

    def setup(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
              ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if arrays:
            set_bases(model, arrays)  # validates keys and shapes
            ctx.state.update({STATE_PREFIX + k: v for k, v in arrays.items()})
            return {}, {"num-modules": len(arrays) // 2}
        cfg: RunConfig = workspace.cfg
        batches = init_batches(workspace, workspace.partitions()[ctx.partition_id], cfg.strategy.init_samples,
                               ctx.partition_id)
        load_trainable_state(model, workspace.initial_arrays())  # round 0's head, whatever this process served before
        seed_torch(cfg.seed, "fed-sb-init", ctx.partition_id)
        grads, loss = base_gradients(model, batches)
        if cfg.strategy.init_upload == "sign":
            grads = {k: torch.sign(g).to(torch.int8) for k, g in grads.items()}
        num_examples = sum(len(b["labels"]) for b in batches)
        return grads, {"num-examples": num_examples, "train-loss": loss}

    def train(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
              ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        bases = {k.removeprefix(STATE_PREFIX): v for k, v in ctx.state.items() if k.startswith(STATE_PREFIX)}
        if not bases:
            raise RuntimeError(f"Fed-SB client {ctx.partition_id} has no LoRA-SB bases: "
                               "the strategy's one-time setup did not reach it")
        set_bases(model, bases)
        return super().train(model, arrays, workspace, ctx)


TRAINERS.register(LoRASBTrainer.name, LoRASBTrainer())
