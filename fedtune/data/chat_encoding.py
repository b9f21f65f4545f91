"""Chat-formatted tensors for causal LMs, with the loss on the answer tokens only.

One example is the model's chat template around the task's user turn, then the answer
and the end-of-turn token::

    <|im_start|>system ... <|im_end|> <|im_start|>user Article: ... Which topic ...? <|im_end|>
    <|im_start|>assistant  business <|im_end|>

Sequences are **left**-padded, so every answer ends at the last position.  Only the
last ``keep = longest answer + 1`` positions can carry a label, so ``labels`` holds
just those (``-100`` everywhere but the answer tokens) and batches ask the model for
the logits of those positions only (``logits_to_keep``): the 49k-vocabulary head runs
on ``keep`` positions instead of ``T``, and HF's shifted next-token loss over the
sliced labels is exactly the loss over the full sequence.  Rotary position encodings
are relative, so left padding does not change what the real tokens compute.

The article is truncated (in tokens) so that the prompt, the longest answer and the
end-of-turn token fit ``model.max_length``.  The test split is encoded as prompts only
(:class:`CausalEval`): :mod:`fedtune.evaluation` scores every candidate answer after
one shared pass over each prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.data.batches import Encoded
from fedtune.errors import ConfigError

IGNORE = -100
_MARK = "\u2063ARTICLE\u2063"  # an invisible separator: cannot occur in the task's own text
MIN_ARTICLE_TOKENS = 8


@dataclass
class CausalEncoded(Encoded):
    """Left-padded chat sequences; ``labels`` are the last ``keep`` positions' targets."""

    keep: int = 1

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out = super().batch(idx, device)
        out["logits_to_keep"] = self.keep  # type: ignore[assignment]
        return out


@dataclass
class Prompts:
    """Left-padded chat prompts (ending with the assistant header) and their right answer."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    gold: torch.Tensor

    def __len__(self) -> int:
        return int(self.gold.shape[0])


@dataclass
class CausalEval:
    """The central evaluation set of an instruction task.

    ``seen``: the seen categories' test prompts; ``heldout``: the held-out category's
    (None when no category is held out).  ``answers[c]`` is candidate ``c``'s tokens,
    ending with the end-of-turn token; ``gold`` indexes into it.
    """

    seen: Prompts
    heldout: Prompts | None
    answers: list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.seen)


def template_parts(tokenizer, template: str) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """Token ids of the chat prompt before and after the article (ends with the assistant header)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("model: an instruction dataset needs a tokenizer with a chat template")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": template.format(text=_MARK)}],
                                             add_generation_prompt=True, tokenize=False)
    before, after = rendered.split(_MARK)
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return ids(before), ids(after)


def answer_ids(tokenizer, names: list[str]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Each answer's tokens followed by the end-of-turn (EOS) token."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("model: the tokenizer has no end-of-turn (EOS) token to end answers with")
    return [tokenizer(n, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for n in names]


def left_pad(rows: list[list[int]], answers: list[list[int]], pad_id: int, keep: int) -> CausalEncoded:
    """``rows`` left-padded to one width; ``labels`` holds each row's ``answer`` at the end of
    the last ``keep`` positions (``-100`` elsewhere), as the module docstring explains."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), keep), IGNORE, dtype=torch.long)
    for i, (row, ans) in enumerate(zip(rows, answers)):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
        if ans:
            labels[i, keep - len(ans):] = torch.tensor(ans)
    return CausalEncoded(ids, mask, labels, keep=keep)


def encode_instruct(tokenizer, data, split: str,  # type: ignore[no-untyped-def]
                    max_length: int) -> CausalEncoded | CausalEval:
    """``"train"``: the answer-masked training sequences; ``"test"`` / ``"validation"``: the
    :class:`CausalEval` (prompts only: candidates are scored on one shared prompt pass, :mod:`fedtune.evaluation`)."""
    before, after = template_parts(tokenizer, data.template)
    answers = answer_ids(tokenizer, data.label_names)
    longest = max(len(a) for a in answers)
    budget = max_length - len(before) - len(after) - longest
    if budget < MIN_ARTICLE_TOKENS:
        need = max_length - budget + MIN_ARTICLE_TOKENS
        raise ConfigError(f"model.max_length: {max_length} leaves {max(budget, 0)} tokens for the text (the chat "
                          f"prompt and answer take {max_length - budget}); use at least {need}")
    keep = longest + 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompts(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        body = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
        return [before + b + after for b in body]

    if split == "train":
        rows = prompts(data.train.texts)
        gold = [answers[y] for y in data.train.labels]
        return left_pad([p + a for p, a in zip(rows, gold)], gold, pad_id, keep)
    if split not in ("test", "validation"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'validation'")

    def prompt_set(split_data) -> Prompts | None:  # type: ignore[no-untyped-def]
        if not len(split_data):
            return None
        rows = prompts(split_data.texts)
        enc = left_pad(rows, [[]] * len(rows), pad_id, keep)
        return Prompts(enc.input_ids, enc.attention_mask, torch.tensor(split_data.labels, dtype=torch.long))

    seen = prompt_set(getattr(data, split))
    if seen is None:
        raise ConfigError(f"dataset: the {split} split of {type(data).__name__} has no seen-category examples")
    return CausalEval(seen, prompt_set(data.heldout if split == "test" else data.heldout_validation), answers, pad_id)
