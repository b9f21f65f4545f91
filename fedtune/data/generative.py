"""A free-form instruction dataset: prompt -> response, with an optional category.

Beside :class:`~fedtune.data.sources.TextDataset` (a label per text) and
:class:`~fedtune.data.instruct.InstructDataset` (a label answered in words), this is the
data type of ``dataset=hf`` in its generative formats (alpaca, chat, prompt_completion).
A prompt is kept in three parts so that it can be rendered with or without a chat
template and truncated where truncating is harmless (:mod:`fedtune.data.prompt_encoding`):

``context``  messages before the last user turn (a system message, earlier turns), kept whole;
``lead``     the instruction (Alpaca's ``instruction`` when there is an ``input``), kept whole;
``body``     the rest of the user turn (Alpaca's ``input``, a chat's last user message, a
             ``prompt``), cut from its end when the example does not fit ``model.max_length``.

``labels`` index ``label_names`` (the categories; one ``""`` when the data has none), so
partitioners split by category as they split a classifier's labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PromptSplit:
    """One split, as parallel lists (the same order in every process)."""

    context: list[list[dict[str, str]]] = field(default_factory=list)
    lead: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.responses)

    def take(self, idx: list[int]) -> "PromptSplit":
        """The examples at ``idx``, in that order."""
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return PromptSplit(pick(self.context), pick(self.lead), pick(self.body), pick(self.responses),
                           pick(self.categories), pick(self.labels))


@dataclass
class GenerativeDataset:
    """Train / test / validation splits of a free-form instruction dataset.

    ``heldout[split]``: the examples of that split whose category is in ``dataset.heldout``
    (no client gets them; evaluated apart).  ``train_columns``: the training split's named
    scalar columns (``category``, a task id, ...) that ``partition.by`` may name.
    ``max_response_tokens`` caps a response's tokens (the truncation policy's one knob).
    """

    train: PromptSplit
    test: PromptSplit
    validation: PromptSplit = field(default_factory=PromptSplit)
    heldout: dict[str, PromptSplit] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)
    train_columns: dict[str, list[Any]] = field(default_factory=dict)
    max_response_tokens: int = 128

    @property
    def num_labels(self) -> int:
        return len(self.label_names)
