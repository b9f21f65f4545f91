"""SFPrompt's client: the model's head and tail, soft prompts, pruning and the local loss.

Cao, Zhu, Gong, "SFPrompt: Communication-Efficient Split Federated Fine-Tuning for Large
Pre-Trained Models over Resource-Limited Devices", arXiv 2407.17533; docs/methods.md#sfprompt.

The client holds the embeddings, the first ``strategy.head_blocks`` blocks (the head),
the last ``strategy.tail_blocks`` blocks with the task head (the tail) and the trained
parameters: peft prompt-tuning's soft prompts (prepended to the input embeddings) and,
for a classifier, its new head.  A round is a sequence of messages (the strategy drives
it, :mod:`strategies.sfprompt`), each one call of :meth:`SFPromptTrainer.step`:

``begin``     load the global prompts/head; the *local-loss update*: ``local_steps`` steps
              on the client's own model, head then tail with the body skipped; then
              *dataset pruning*: score every local example by EL2N (Paul et al. 2021,
              ``‖softmax(f(x)) − onehot(y)‖₂``) and keep the ``1 − prune_ratio`` hardest.
``forward``   apply the gradient at the cut for the previous batch (if any), then send
              the head's activations (and the attention mask) for the next batch.
``tail``      run the tail on the body's activations, step the task head, send the
              gradient with respect to those activations back.
``backward``  apply the last batch's gradient at the cut.
``train``     upload the prompts (and head) for FedAvg.

The optimizer is plain SGD (stateless, so nothing but the parameters persists between
messages; they live in Flower's ``Context.state``).  The model runs in eval mode, so a
head recomputed for the backward pass is the one that produced the sent activations.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedtune.config.run import RunConfig
from fedtune.data.batches import eval_batches, local_batches
from fedtune.models.causal_lm import is_causal_lm
from fedtune.models.split import Cut, check_cut, check_split, run_head, run_local, run_tail
from fedtune.models.state import load_trainable_state, trainable_state
from fedtune.randomness import seed_torch, torch_generator
from fedtune.registry import TRAINERS
from fedtune.schedule import train_lr
from fedtune.trainer import TrainContext
from strategies.sfprompt import check_prompt_room

STATE_PREFIX = "sfprompt/"  # the working parameters inside the round, in Context.state


def extra_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What the model takes beside ids, mask and labels (a causal batch's ``logits_to_keep``)."""
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}


def cut_of(cfg: RunConfig) -> Cut:
    return Cut(cfg.strategy.head_blocks, cfg.strategy.tail_blocks)


def step_lr(cfg: RunConfig, ctx: TrainContext) -> float:
    """Round ``ctx.server_round``'s SGD step (``strategy.lr`` under ``train.lr_schedule``)."""
    return train_lr(cfg, ctx.server_round, cfg.strategy.lr)


def with_prompts(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs_embeds, attention_mask, labels)`` with the P soft prompts in front, as peft's
    prompt-tuning forward builds them (token labels over every position get -100 under the
    prompts; labels of only the last positions, with ``logits_to_keep``, stay as they are)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    base = model.get_base_model()
    embeds = base.get_input_embeddings()(ids)
    prompts = model.get_prompt(batch_size=ids.shape[0]).to(embeds.dtype)
    p = prompts.shape[1]
    mask = torch.cat([torch.ones(ids.shape[0], p, dtype=mask.dtype, device=mask.device), mask], dim=1)
    if labels.dim() == 2 and labels.shape[1] == ids.shape[1]:  # token labels of every position
        labels = torch.cat([torch.full((ids.shape[0], p), -100, dtype=labels.dtype, device=labels.device),
                            labels], dim=1)
    return torch.cat([prompts, embeds], dim=1), mask, labels


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example EL2N score; a causal LM's is the mean over its supervised next tokens."""
    if labels.dim() == 1:
        probs = logits.float().softmax(-1)
        return (probs - torch.nn.functional.one_hot(labels, probs.shape[-1])).norm(dim=-1)
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    valid = labels != -100
    probs = logits.softmax(-1)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), probs.shape[-1])
    per_token = (probs - onehot).norm(dim=-1) * valid
    return per_token.sum(1) / valid.sum(1).clamp(min=1)


def keep_hardest(scores: torch.Tensor, indices: list[int], prune_ratio: float) -> torch.Tensor:
    """The ``⌈(1 − ρ) n⌉`` examples with the highest scores (ties: the lower index first)."""
    keep = max(1, math.ceil((1.0 - prune_ratio) * len(indices) - 1e-9))
    order = torch.argsort(-scores.double(), stable=True)[:keep]
    return torch.as_tensor(indices, dtype=torch.long)[order.sort().values]


class SFPromptTrainer:
    """The client half of ``strategy=sfprompt``."""

    name = "sfprompt"

    def build_model(self, base: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        for p in base.parameters():
            p.requires_grad_(False)
        check_cut(base, cut_of(cfg))
        check_prompt_room(cfg, getattr(base.config, "max_position_embeddings", None))
        seed_torch(cfg.seed, "adapter-init")  # the same prompts on every party
        task = TaskType.CAUSAL_LM if is_causal_lm(base) else TaskType.SEQ_CLS
        config = PromptTuningConfig(task_type=task, num_virtual_tokens=cfg.strategy.num_prompts,
                                    prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
        model = get_peft_model(base, config)
        model.eval()
        ids = torch.zeros(1, 4, dtype=torch.long, device=next(base.parameters()).device)
        embeds, mask, _ = with_prompts(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                               "labels": torch.zeros(1, dtype=torch.long)})
        check_split(base, embeds, mask, cut_of(cfg))
        return model

    # ------------------------------------------------------------------ one message each
    def step(self, model: Any, arrays: dict[str, torch.Tensor], workspace: Any,
             ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        phase = str(ctx.config.get("phase", ""))
        if phase == "begin":
            return self._begin(model, arrays, workspace, ctx)
        self._restore(model, ctx)
        if phase == "forward":
            if "gradients" in arrays:
                self._apply_cut_gradient(model, arrays["gradients"], workspace, ctx)
            out = self._forward(model, workspace, ctx)
        elif phase == "tail":
            out = self._tail(model, arrays["activations"], workspace, ctx)
        elif phase == "backward":
            self._apply_cut_gradient(model, arrays["gradients"], workspace, ctx)
            out = ({}, {})
        else:
            raise ValueError(f"sfprompt: unknown phase {phase!r}")
        self._keep(model, ctx)
        return out

    def train(self, model: Any, arrays: dict[str, torch.Tensor], workspace: Any,
              ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The round's last message: upload the prompts (and head) this client ended with."""
        self._restore(model, ctx)
        steps = int(ctx.state.get("sfprompt-step", 0))
        loss = (float(ctx.state["sfprompt-loss-sum"]) / steps if steps
                else float(ctx.state.get("sfprompt-local-loss", math.nan)))
        num_examples = len(workspace.partitions()[ctx.partition_id])
        return trainable_state(model), {"train-loss": loss, "num-examples": num_examples}

    # ------------------------------------------------------------------ phases
    def _begin(self, model: Any, arrays: dict[str, torch.Tensor], workspace: Any,
               ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        cfg = workspace.cfg
        load_trainable_state(model, arrays)
        encoded, indices = workspace.encoded("train"), workspace.partitions()[ctx.partition_id]
        base, cut, device = model.get_base_model(), cut_of(cfg), ctx.device
        gen = torch_generator(cfg.seed, "sfprompt-local", ctx.server_round, ctx.partition_id)
        losses = []
        for idx in local_batches(indices, cfg.strategy.local_steps, cfg.train.batch_size, gen):
            batch = encoded.batch(idx, device)
            embeds, mask, labels = with_prompts(model, batch)
            loss = run_local(base, embeds, mask, cut, labels=labels, **extra_inputs(batch)).loss
            self._sgd(model, loss, step_lr(cfg, ctx))
            losses.append(float(loss.detach()))
        kept = torch.as_tensor(indices, dtype=torch.long)
        if cfg.strategy.prune_ratio > 0:
            scores = []
            with torch.no_grad():
                for pos in eval_batches(len(indices), cfg.train.batch_size):
                    batch = encoded.batch(kept[pos], device)
                    embeds, mask, labels = with_prompts(model, batch)
                    logits = run_local(base, embeds, mask, cut, **extra_inputs(batch)).logits
                    scores.append(el2n(logits, labels))
            kept = keep_hardest(torch.cat(scores), indices, cfg.strategy.prune_ratio)
        ctx.state.update({"sfprompt-kept": kept, "sfprompt-step": 0, "sfprompt-loss-sum": 0.0,
                          "sfprompt-local-loss": sum(losses) / len(losses) if losses else math.nan})
        self._keep(model, ctx)
        return {}, {"local-loss": ctx.state["sfprompt-local-loss"], "kept": len(kept)}

    def _batch(self, model: Any, workspace: Any, ctx: TrainContext, step: int) -> tuple[Any, ...]:
        """Split step ``step``'s batch of the kept examples, prompts in front, and its extra inputs."""
        cfg = workspace.cfg
        gen = torch_generator(cfg.seed, "sfprompt-split", ctx.server_round, ctx.partition_id)
        kept = ctx.state["sfprompt-kept"].tolist()
        idx = list(local_batches(kept, step + 1, cfg.train.batch_size, gen))[step]
        batch = workspace.encoded("train").batch(idx, ctx.device)
        return (*with_prompts(model, batch), extra_inputs(batch))

    def _forward(self, model: Any, workspace: Any, ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict]:
        embeds, mask, _, _ = self._batch(model, workspace, ctx, int(ctx.state["sfprompt-step"]))
        with torch.no_grad():
            hidden = run_head(model.get_base_model(), embeds, mask, cut_of(workspace.cfg))
        return {"activations": hidden.float().cpu(), "mask": mask.bool().cpu()}, {}

    def _tail(self, model: Any, activations: torch.Tensor, workspace: Any,
              ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict]:
        step = int(ctx.state["sfprompt-step"])
        _, mask, labels, extra = self._batch(model, workspace, ctx, step)
        base = model.get_base_model()
        dtype = next(base.parameters()).dtype
        hidden = activations.to(ctx.device, dtype).requires_grad_(True)
        loss = run_tail(base, hidden, mask, cut_of(workspace.cfg), labels=labels, **extra).loss
        self._sgd(model, loss, step_lr(workspace.cfg, ctx))
        ctx.state["sfprompt-step"] = step + 1
        ctx.state["sfprompt-loss-sum"] = float(ctx.state["sfprompt-loss-sum"]) + float(loss.detach())
        return {"gradients": hidden.grad.float().cpu()}, {"split-loss": float(loss.detach())}

    def _apply_cut_gradient(self, model: Any, grad: torch.Tensor, workspace: Any, ctx: TrainContext) -> None:
        """Backpropagate the server's gradient at the cut through the recomputed head."""
        embeds, mask, _, _ = self._batch(model, workspace, ctx, int(ctx.state["sfprompt-step"]) - 1)
        hidden = run_head(model.get_base_model(), embeds, mask, cut_of(workspace.cfg))
        self._sgd(model, hidden, step_lr(workspace.cfg, ctx), grad.to(hidden.device, hidden.dtype))

    # ------------------------------------------------------------------ parameters
    @staticmethod
    def _sgd(model: Any, output: torch.Tensor, lr: float, grad: torch.Tensor | None = None) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        output.backward(grad)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)
                    p.grad = None

    @staticmethod
    def _keep(model: Any, ctx: TrainContext) -> None:
        ctx.state.update({STATE_PREFIX + k: v for k, v in trainable_state(model).items()})

    @staticmethod
    def _restore(model: Any, ctx: TrainContext) -> None:
        load_trainable_state(model, {k[len(STATE_PREFIX):]: v for k, v in ctx.state.items()
                                     if k.startswith(STATE_PREFIX)})


TRAINERS.register(SFPromptTrainer.name, SFPromptTrainer())
