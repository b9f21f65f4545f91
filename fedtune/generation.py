"""Generative evaluation of a causal LM on a :class:`~fedtune.data.prompt_encoding.GenerativeEval`.

Each prompt is answered by greedy decoding (``model.generate(do_sample=False,
use_cache=True)``, batched over left-padded prompts, so one KV cache per batch serves
every decoding step) up to ``eval.max_new_tokens`` new tokens, stopping at EOS.  The
decoded answer is compared with the reference response:

``rouge_l``      the ROUGE-L F-measure of the ``rouge-score`` package (its default
                 tokenisation: lower-cased alphanumeric tokens, no stemming), the
                 generation metric FedKSeed and Ferret report on Natural Instructions
                 and Dolly;
``exact_match``  1 when the answer equals the reference after stripping the ends and
                 collapsing runs of whitespace (case kept); this is what ``eval_accuracy``
                 (and ``final_accuracy``) mean for a generative dataset;
``loss``         the mean next-token cross-entropy over the reference responses' tokens
                 (EOS included), teacher-forced: the training loss on unseen examples.

Metrics are means over examples (``eval.max_examples`` caps their number; the splits
are in a seeded order), on the seen categories' split and on the held-out categories'
(together and per category).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from fedtune.data.batches import eval_batches
from fedtune.data.chat_encoding import IGNORE, CausalEncoded
from fedtune.data.prompt_encoding import GenerationSet, GenerativeEval


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    """rouge-score's Rouge-L scorer with its default tokenizer, passed explicitly: left to pick
    it, the scorer logs through absl, whose first log call installs a stderr handler on the
    root logger (``logging.basicConfig``) that outlives whatever stream stderr was then."""
    from rouge_score import rouge_scorer, tokenizers

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False,
                                    tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``reference`` (rouge-score)."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def exact_match(prediction: str, reference: str) -> float:
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def _generator(model: torch.nn.Module) -> Any:
    """The module with ``generate``: the model, or the HF model a fedtune wrapper holds (LoRA-SB)."""
    return model if hasattr(model, "generate") else model.model


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, pad_id: int, eos_id: int, batch_size: int,
                    device: torch.device | str) -> list[list[int]]:
    """Each left-padded prompt's greedy continuation, cut before its first EOS."""
    model.eval()
    out: list[list[int]] = []
    for idx in eval_batches(int(input_ids.shape[0]), batch_size):
        mask = attention_mask[idx]
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding in every row: dropped
        ids, mask = input_ids[idx, first:].to(device), mask[:, first:].to(device)
        generated = _generator(model).generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                                               max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                               eos_token_id=eos_id, num_beams=1)
        for row in generated[:, ids.shape[1]:].tolist():
            out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


@torch.no_grad()
def response_losses(model: torch.nn.Module, scored: CausalEncoded, n: int, batch_size: int,
                    device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed cross-entropy of its response tokens, and their number."""
    model.eval()
    sums, counts = [], []
    for idx in eval_batches(n, batch_size):
        batch = scored.batch(idx, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
        valid = target != IGNORE
        sums.append((ce * valid).sum(1).cpu().double())
        counts.append(valid.sum(1).cpu().double())
    return torch.cat(sums), torch.cat(counts)


def score_set(model: torch.nn.Module, data: GenerationSet, tokenizer: Any, pad_id: int, eos_id: int,
              max_new_tokens: int, batch_size: int, device: torch.device | str,
              max_examples: int = 0) -> dict[str, Any]:
    """Per-example ``rouge_l``, ``exact_match``, ``loss`` sums and ``tokens``, and ``categories``."""
    n = min(len(data), max_examples) if max_examples else len(data)
    new = greedy_generate(model, data.input_ids[:n], data.attention_mask[:n], max_new_tokens, pad_id, eos_id,
                          batch_size, device)
    answers = tokenizer.batch_decode(new, skip_special_tokens=True)
    refs = data.references[:n]
    loss, tokens = response_losses(model, data.scored, n, batch_size, device)
    return {"rouge_l": [rouge_l(a, r) for a, r in zip(answers, refs)],
            "exact_match": [exact_match(a, r) for a, r in zip(answers, refs)],
            "loss": loss.tolist(), "tokens": tokens.tolist(), "categories": data.categories[:n], "answers": answers}


def _summary(scores: dict[str, Any], rows: list[int]) -> dict[str, float]:
    if not rows:
        return {"loss": math.nan, "rouge_l": math.nan, "exact_match": math.nan}
    pick = lambda key: [scores[key][i] for i in rows]  # noqa: E731
    return {"loss": sum(pick("loss")) / max(sum(pick("tokens")), 1.0),
            "rouge_l": sum(pick("rouge_l")) / len(rows), "exact_match": sum(pick("exact_match")) / len(rows)}


def generative_metrics(model: torch.nn.Module, data: GenerativeEval, max_new_tokens: int, batch_size: int,
                       device: torch.device | str, max_examples: int = 0) -> dict[str, float]:
    """The server's metric record for a generative dataset (keys as :mod:`fedtune.evaluation` names them).

    ``heldout-<metric>/<category>`` keys are added when more than one category is held out."""
    args = (data.tokenizer, data.pad_id, data.eos_id, max_new_tokens, batch_size, device, max_examples)
    seen = score_set(model, data.seen, *args)
    s = _summary(seen, list(range(len(seen["loss"]))))
    out = {"eval-loss": s["loss"], "eval-accuracy": s["exact_match"], "rouge-l": s["rouge_l"],
           "exact-match": s["exact_match"]}
    held = score_set(model, data.heldout, *args) if data.heldout is not None else None
    h = _summary(held, list(range(len(held["loss"])))) if held else _summary({}, [])
    out.update({"heldout-loss": h["loss"], "heldout-accuracy": h["exact_match"], "heldout-rouge-l": h["rouge_l"],
                "heldout-exact-match": h["exact_match"]})
    categories = sorted(set(held["categories"])) if held else []
    if len(categories) > 1:
        for cat in categories:
            c = _summary(held, [i for i, x in enumerate(held["categories"]) if x == cat])
            out.update({f"heldout-rouge-l/{cat}": c["rouge_l"], f"heldout-exact-match/{cat}": c["exact_match"],
                        f"heldout-loss/{cat}": c["loss"]})
    return out
