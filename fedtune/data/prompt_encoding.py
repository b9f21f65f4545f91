"""Causal-LM tensors of a :class:`~fedtune.data.generative.GenerativeDataset`, loss on the response only.

**Prompt.**  With a chat template, the context messages and the user turn (``lead``, a
blank line, ``body``) are rendered by ``tokenizer.apply_chat_template(...,
add_generation_prompt=True)``, so the prompt ends with the template's assistant header.
Without one, an Alpaca-style prompt is used: the "Below is an instruction..." preamble,
``### Instruction:`` (context and lead), ``### Input:`` (body; the section is left out
when there is only one of the two) and ``### Response:``.  A BOS token is put first when
the tokenizer itself adds one and the rendered text does not already start with it.

**Sequence.**  prompt + response + EOS.  Labels are ``-100`` on every prompt token, so
the loss is the next-token cross-entropy of the response tokens and the EOS only.
Sequences are left-padded and batches keep only the last ``longest response + 1``
positions' logits (``logits_to_keep``; the trick and why it is exact:
:mod:`fedtune.data.chat_encoding`, whose padding this module reuses).

**Truncation policy** (tokens, per example, to fit ``model.max_length``):

1. the response keeps at most ``dataset.max_response_tokens`` tokens including its EOS;
   a longer one keeps its first ``max_response_tokens`` tokens and no EOS (the model must
   not learn to stop mid-answer);
2. the template's parts are kept whole: context, lead, and the tail after the body, so
   the model always sees the assistant header it answers after;
3. the ``body`` (the input) is cut from its end to what is left;
4. when the kept parts alone leave no room, the response is shortened too; when they
   exceed ``model.max_length`` by themselves, a one-line error names ``model.max_length``.

Evaluation sets (:class:`GenerationSet`) hold the prompts alone (left-padded, for
batched greedy generation; the body cut by the same rule) and the full sequences (for
the eval loss on response tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedtune.data.chat_encoding import CausalEncoded, left_pad
from fedtune.data.generative import GenerativeDataset, PromptSplit
from fedtune.errors import ConfigError

_MARK = "\u2063BODY\u2063"  # an invisible separator: cannot occur in the data's own text
PREAMBLE = "Below is an instruction that describes a task"
ALPACA_WITH_INPUT = (PREAMBLE + ", paired with an input that provides further context. Write a response that "
                     "appropriately completes the request.\n\n### Instruction:\n{lead}\n\n### Input:\n{body}\n\n"
                     "### Response:\n")
ALPACA = PREAMBLE + ". Write a response that appropriately completes the request.\n\n### Instruction:\n{body}\n\n" \
                    "### Response:\n"


@dataclass
class GenerationSet:
    """One evaluation split: prompts to generate from, full sequences to score, references."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    scored: CausalEncoded
    references: list[str]
    categories: list[str]

    def __len__(self) -> int:
        return len(self.references)


@dataclass
class GenerativeEval:
    """What the server evaluates: the seen categories' split and the held-out categories' (or None),
    and the tokenizer that decodes generated answers."""

    seen: GenerationSet
    heldout: GenerationSet | None
    pad_id: int
    eos_id: int
    tokenizer: Any = None

    def __len__(self) -> int:
        return len(self.seen)


def render(tokenizer: Any, context: list[dict[str, str]], lead: str, body: str) -> tuple[str, str]:
    """The prompt's text before and after ``body`` (the chat template's, else the Alpaca prompt)."""
    if not body:
        lead, body = "", lead  # a lone instruction is the part that may be cut
    if getattr(tokenizer, "chat_template", None):
        user = f"{lead}\n\n{_MARK}" if lead else _MARK
        text = tokenizer.apply_chat_template([*context, {"role": "user", "content": user}],
                                             add_generation_prompt=True, tokenize=False)
    else:
        lead = "\n\n".join([*(m["content"] for m in context), lead] if lead else [m["content"] for m in context])
        text = ALPACA_WITH_INPUT.format(lead=lead, body=_MARK) if lead else ALPACA.format(body=_MARK)
    before, after = text.split(_MARK)
    return before, after


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def fit(before: list[int], body: list[int], after: list[int], response: list[int],
        max_length: int) -> tuple[list[int], list[int]]:
    """``(prompt, response)`` token ids cut by the module's truncation policy (steps 2-4)."""
    room = max_length - len(before) - len(after)
    if room < 1:
        raise ConfigError(f"model.max_length: {max_length} tokens do not hold an example's prompt template "
                          f"({len(before) + len(after)} tokens); raise model.max_length")
    response = response[:room]
    return before + body[: room - len(response)] + after, response


class PromptEncoder:
    """Tokenises a :class:`PromptSplit` with one tokenizer under the truncation policy."""

    def __init__(self, tokenizer: Any, max_length: int, max_response_tokens: int) -> None:
        if tokenizer.eos_token_id is None:
            raise ConfigError("model: the tokenizer has no EOS token to end responses with")
        self.tok, self.max_length, self.cap = tokenizer, max_length, max_response_tokens
        self.bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def pairs(self, split: PromptSplit) -> tuple[list[list[int]], list[list[int]]]:
        """Each example's (prompt, response + EOS) token ids, truncated."""
        parts = [render(self.tok, c, lead, body) for c, lead, body in zip(split.context, split.lead, split.body)]
        bodies = [body if body else lead for lead, body in zip(split.lead, split.body)]
        befores, afters = self._ids([p[0] for p in parts]), self._ids([p[1] for p in parts])
        bos_text = self.tok.bos_token or ""
        prompts, responses = [], []
        for (before_text, _), before, body, after, resp in zip(parts, befores, self._ids(bodies), afters,
                                                               self._ids(split.responses)):
            lead_ids = self.bos + before if self.bos and not before_text.startswith(bos_text) else before
            resp = (resp + [self.tok.eos_token_id])[: self.cap]
            prompt, resp = fit(lead_ids, body, after, resp, self.max_length)
            prompts.append(prompt)
            responses.append(resp)
        return prompts, responses

    def training(self, split: PromptSplit) -> CausalEncoded:
        """Left-padded prompt + response sequences; labels are the response tokens only."""
        if not len(split):
            raise ConfigError("dataset: the training split has no examples")
        prompts, responses = self.pairs(split)
        keep = max(len(r) for r in responses) + 1
        return left_pad([p + r for p, r in zip(prompts, responses)], responses, self.pad_id, keep)

    def evaluation(self, split: PromptSplit) -> GenerationSet:
        prompts, _ = self.pairs(split)
        prompt_enc = left_pad(prompts, [[]] * len(prompts), self.pad_id, 1)
        return GenerationSet(prompt_enc.input_ids, prompt_enc.attention_mask, self.training(split),
                             list(split.responses), list(split.categories))


def encode_generative(tokenizer: Any, data: GenerativeDataset, split: str, max_length: int
                      ) -> CausalEncoded | GenerativeEval:
    """``"train"``: the response-masked sequences; ``"test"`` / ``"validation"``: the :class:`GenerativeEval`."""
    encoder = PromptEncoder(tokenizer, max_length, data.max_response_tokens)
    if split == "train":
        return encoder.training(data.train)
    if split not in ("test", "validation"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'validation'")
    seen = getattr(data, split)
    if not len(seen):
        raise ConfigError(f"dataset: the {split} split has no examples outside the held-out categories")
    held = data.heldout.get(split)
    return GenerativeEval(encoder.evaluation(seen), encoder.evaluation(held) if held is not None and len(held)
                          else None, encoder.pad_id, int(tokenizer.eos_token_id), tokenizer)
