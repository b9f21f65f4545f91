"""Central evaluation of the global model on the held-out test split.

Classification datasets: mean cross-entropy of the classifier and its accuracy.

Instruction datasets (a causal LM, :class:`~fedtune.data.chat_encoding.CausalEval`):
every candidate answer (each category's word + end-of-turn) is scored by its summed
token log-likelihood after the prompt; the **accuracy** is how often the right answer
ranks first on the seen categories' test split, the **loss** is the mean next-token
cross-entropy of the right answers' tokens.  :func:`evaluate_heldout` gives both on the
held-out category, which no client ever trained on (generalisation).

Generative datasets (``dataset=hf``, :class:`~fedtune.data.prompt_encoding.GenerativeEval`):
greedy generation scored by Rouge-L and exact match, and the loss on response tokens
(:mod:`fedtune.generation`).  :func:`central_metrics` is the server's one entry point.

Candidates share their prompt: one forward pass over the prompts fills a KV cache,
which is repeated once per candidate, and a second pass over the answers' tokens (at
most four) scores all of them, about C times cheaper than C full sequences.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedtune.data.batches import Encoded, eval_batches
from fedtune.data.chat_encoding import IGNORE, CausalEval, Prompts


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Encoded | CausalEval, batch_size: int, device: torch.device,
             max_examples: int = 0) -> tuple[float, float]:
    """Return ``(loss, accuracy)`` over the first ``max_examples`` (0 = all)."""
    if isinstance(data, CausalEval):
        return choice_metrics(model, data.seen, data, batch_size, device, max_examples)
    n = min(len(data), max_examples) if max_examples else len(data)
    model.eval()
    loss_sum, correct = 0.0, 0
    for idx in eval_batches(n, batch_size):
        batch = data.batch(idx, device)
        out = model(**batch)
        loss_sum += float(out.loss) * len(idx)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return loss_sum / n, correct / n


@torch.no_grad()
def answer_scores(model: torch.nn.Module, prompts: Prompts, answers: list[list[int]], pad_id: int, rows: int,
                  batch_size: int, device: torch.device) -> torch.Tensor:
    """``(rows, C)``: the summed log-probability of each candidate answer after each of the first prompts."""
    model.eval()
    num, width = len(answers), max(len(a) for a in answers)
    suffix = torch.full((num, width - 1), pad_id, dtype=torch.long)  # answers without their last token,
    suffix_mask = torch.zeros((num, width - 1), dtype=torch.long)     # right-padded (pads come last: unseen)
    target = torch.full((num, width), IGNORE, dtype=torch.long)
    for c, ans in enumerate(answers):
        suffix[c, : len(ans) - 1] = torch.tensor(ans[:-1], dtype=torch.long)
        suffix_mask[c, : len(ans) - 1] = 1
        target[c, : len(ans)] = torch.tensor(ans, dtype=torch.long)
    scores = []
    for idx in eval_batches(rows, max(1, batch_size // num)):
        ids, mask = prompts.input_ids[idx].to(device), prompts.attention_mask[idx].to(device)
        first = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache = first.past_key_values
        cache.batch_repeat_interleave(num)  # row b·C + c: prompt b, candidate c
        b = len(idx)
        logits = first.logits[:, -1:].float().repeat_interleave(num, 0)  # predicts each answer's 1st token
        if width > 1:
            full_mask = torch.cat([mask.repeat_interleave(num, 0), suffix_mask.repeat(b, 1).to(device)], 1)
            rest = model(input_ids=suffix.repeat(b, 1).to(device), attention_mask=full_mask, past_key_values=cache,
                         use_cache=False)
            logits = torch.cat([logits, rest.logits.float()], 1)
        tgt = target.repeat(b, 1).to(device)
        logp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.append((logp * (tgt != IGNORE)).sum(1).view(b, num).cpu())
    return torch.cat(scores)


def choice_metrics(model: torch.nn.Module, prompts: Prompts, data: CausalEval, batch_size: int,
                   device: torch.device, max_examples: int = 0) -> tuple[float, float]:
    """``(loss of the right answers' tokens, how often the right answer ranks first)``."""
    n = min(len(prompts), max_examples) if max_examples else len(prompts)
    scores = answer_scores(model, prompts, data.answers, data.pad_id, n, batch_size, device)
    gold = prompts.gold[:n]
    tokens = torch.tensor([len(a) for a in data.answers], dtype=torch.float64)[gold].sum()
    loss = -float(scores[torch.arange(n), gold].double().sum() / tokens)
    return loss, float((scores.argmax(1) == gold).double().mean())


def evaluate_heldout(model: torch.nn.Module, data: Encoded | CausalEval, batch_size: int, device: torch.device,
                     max_examples: int = 0) -> tuple[float, float]:
    """``(loss, accuracy)`` on the held-out category, as :func:`evaluate`; NaNs when there is none."""
    if not isinstance(data, CausalEval) or data.heldout is None:
        return math.nan, math.nan
    return choice_metrics(model, data.heldout, data, batch_size, device, max_examples)


def central_metrics(model: torch.nn.Module, data: Any, eval_cfg: Any, device: torch.device) -> dict[str, float]:
    """The server's metric record of one evaluation: ``eval-loss``, ``eval-accuracy``,
    ``heldout-loss``, ``heldout-accuracy`` (NaN when no category is held out), and for a
    generative dataset its generation metrics (:func:`fedtune.generation.generative_metrics`)."""
    from fedtune.data.prompt_encoding import GenerativeEval

    if isinstance(data, GenerativeEval):
        from fedtune.generation import generative_metrics

        return generative_metrics(model, data, eval_cfg.max_new_tokens, eval_cfg.batch_size, device,
                                  eval_cfg.max_examples)
    loss, acc = evaluate(model, data, eval_cfg.batch_size, device, eval_cfg.max_examples)
    h_loss, h_acc = evaluate_heldout(model, data, eval_cfg.batch_size, device, eval_cfg.max_examples)
    return {"eval-loss": loss, "eval-accuracy": acc, "heldout-loss": h_loss, "heldout-accuracy": h_acc}
