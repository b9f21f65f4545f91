"""``dataset=hf``: your own data, read with ``datasets`` (:mod:`fedtune.data.hf_files`).

``dataset.format`` says what a row is; ``dataset.fields.<role>=<column>`` renames a column:

``alpaca``             ``instruction``, ``input`` (optional), ``output``
``chat``               ``messages``: a list of ``{role, content}``, ending with the assistant's answer
``prompt_completion``  ``prompt``, ``completion``
``text_label``         ``text``, ``label`` (classification; a :class:`~fedtune.data.sources.TextDataset`)

Every format may have a ``category`` column (role ``category``; used when present): the
generative formats partition by it (``partition.by=category``), hold its ``dataset.heldout``
values out of every client (evaluated apart, as ``bbc_instruct`` does) and report metrics
per held-out category.  A missing column is a one-line error naming the field and the
columns present.

Splits: ``dataset.split`` (default ``train``) trains; ``dataset.test_split`` tests, or, when
it is empty, a seeded split stratified by category (by label for ``text_label``) carves
``test_fraction`` of it; ``validation_fraction`` of what is left is carved the same way
for tuning (``eval.split=validation``), so a study never scores on the test split.  Or
``dataset.split_column`` names a column whose ``train`` / ``test`` values fix each row's
split (used when the column exists; ``dataset=csv`` reads a ``split`` column this way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.data.batches import encode
from fedtune.data.generative import GenerativeDataset, PromptSplit
from fedtune.data.hf_files import pick_split, read_splits
from fedtune.data.prompt_encoding import encode_generative
from fedtune.data.sources import DatasetSpec, PackagedDatasetConfig, Split, TextDataset, cap, carve
from fedtune.errors import ConfigError
from fedtune.registry import DATASETS

FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages",),
                 "prompt_completion": ("prompt", "completion"), "text_label": ("text", "label")}
OPTIONAL_FIELDS = ("input", "category")  # used when the column exists (required once renamed in dataset.fields)
GENERATIVE = tuple(f for f in FORMAT_FIELDS if f != "text_label")


@dataclass
class FieldsConfig:
    """The column that holds each role (``dataset.fields.output=response``); a format reads its own roles."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"
    label: str = "label"
    category: str = "category"


@dataclass
class HFDatasetConfig(PackagedDatasetConfig):
    """``dataset=hf dataset.path=<file, folder or hub id> dataset.format=<format>`` (module doc).

    fields : the column of each role (:class:`FieldsConfig`), e.g. ``dataset.fields.output=response``.
    subset : a hub dataset's configuration name, e.g. ``main`` for ``openai/gsm8k`` ("" = its default).
    split, test_split : the training split; the test split ("" = carve ``test_fraction`` with ``split_seed``).
    validation_fraction : share of the training split carved as the validation split (0 = none;
        the field and its carve are the packaged datasets', :func:`~fedtune.data.sources.carve`).
    heldout : category values no client gets, evaluated apart (generative formats).
    system_prompt : a system message put before every prompt ("" = none).
    max_response_tokens : a response's token cap, EOS included (:mod:`fedtune.data.prompt_encoding`).
    split_column : a column of ``train`` / ``test`` values that fixes the split when it exists
        (with no ``test_split``); "" = none.
    """

    name: str = "hf"
    path: str = ""
    revision: str = ""
    subset: str = ""
    format: str = "alpaca"
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    split: str = "train"
    test_split: str = ""
    heldout: list[str] = field(default_factory=list)
    system_prompt: str = ""
    max_response_tokens: int = 128
    split_column: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in FORMAT_FIELDS:
            raise ValueError(f"format: unknown {self.format!r}; accepted: {', '.join(FORMAT_FIELDS)}")
        if self.max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be >= 1, got {self.max_response_tokens}")
        if self.split_column and self.test_split:
            raise ValueError(f"split_column: {self.split_column!r} and test_split: {self.test_split!r} both fix "
                             "the test split; set one")
        if self.heldout and self.format == "text_label":
            raise ValueError(f"heldout: only for the generative formats ({', '.join(GENERATIVE)}); "
                             "a classifier cannot be scored on labels it never trained on")

    def column(self, role: str) -> str:
        return getattr(self.fields, role)

    def renamed(self, role: str) -> bool:
        return self.column(role) != role


def hf_dataset_kind(cfg: HFDatasetConfig) -> str:
    return "classification" if cfg.format == "text_label" else "instruction"


def _check_columns(cfg: HFDatasetConfig, table: Any, split: str) -> dict[str, str]:
    """role -> column for the roles this table provides; a one-line error for a missing one."""
    present = list(table.column_names)
    out = {}
    for role in (*FORMAT_FIELDS[cfg.format], "category"):
        column = cfg.column(role)
        if column in present:
            out[role] = column
        elif role not in OPTIONAL_FIELDS or cfg.renamed(role):
            raise ConfigError(f"dataset.fields.{role}: column {column!r} not in split {split!r} of {cfg.path} "
                              f"(format={cfg.format}); columns present: {', '.join(present)}")
    return out


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _chat(messages: Any, row: int, column: str) -> tuple[list[dict[str, str]], str, str]:
    """(context, last user message, assistant answer) of one chat."""
    ok = isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    if not ok or len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise ConfigError(f"dataset.fields.messages: row {row} of column {column!r} is not a list of "
                          "{role, content} messages ending with a user message and the assistant's answer")
    context = [{"role": str(m["role"]), "content": _text(m["content"])} for m in messages[:-2]]
    return context, _text(messages[-2]["content"]), _text(messages[-1]["content"])


def _prompt_rows(cfg: HFDatasetConfig, table: Any, cols: dict[str, str]) -> PromptSplit:
    """A raw table in one of the generative formats as a :class:`PromptSplit` (labels filled later)."""
    data = {role: table[column] for role, column in cols.items()}
    n = len(table)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    out = PromptSplit(categories=[_text(c) for c in data.get("category", [""] * n)], labels=[0] * n)
    for i in range(n):
        if cfg.format == "chat":
            context, body, response = _chat(data["messages"][i], i, cols["messages"])
            lead = ""
            if system and not (context and context[0]["role"] == "system"):
                context = system + context
        elif cfg.format == "alpaca":
            context, lead, body = system, _text(data["instruction"][i]), _text(data["input"][i]) if "input" in data else ""
            response = _text(data["output"][i])
        else:
            context, lead, body, response = system, "", _text(data["prompt"][i]), _text(data["completion"][i])
        out.context.append(context)
        out.lead.append(lead)
        out.body.append(body)
        out.responses.append(response)
    return out


def _scalar_columns(table: Any, idx: list[int]) -> dict[str, list[Any]]:
    """The table's string / number / bool columns at ``idx`` (what ``partition.by`` may name)."""
    out = {}
    for name in table.column_names:
        values = table[name]
        if all(isinstance(v, (str, int, float, bool)) for v in values[:100]):
            out[name] = [values[i] for i in idx]
    return out


def _carve(strata: list[int], n_train: int | None, cfg: HFDatasetConfig,
           table: Any) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) indices: the named test split (rows ``n_train:``), the rows a
    ``split_column`` marks, or a carved one."""
    fixed = None if n_train is None else (list(range(n_train)), list(range(n_train, len(strata))))
    if cfg.split_column and cfg.split_column in table.column_names:
        marks = [_text(v) for v in table[cfg.split_column]]
        if bad := sorted(set(marks) - {"train", "test"}):
            raise ConfigError(f"dataset.split_column: column {cfg.split_column!r} of {cfg.path} holds {bad[0]!r}; "
                              "accepted values: train, test")
        fixed = ([i for i, m in enumerate(marks) if m == "train"], [i for i, m in enumerate(marks) if m == "test"])
    return carve(strata, cfg, fixed)


def _tables(cfg: HFDatasetConfig) -> tuple[Any, int | None]:
    """The training table (with the test split appended when one is named) and its own length."""
    import datasets

    if not cfg.path:
        raise ConfigError(f"dataset.path is required for dataset={cfg.name}: a .json/.jsonl/.csv/.parquet file, "
                          "a save_to_disk folder, or a hub dataset id")
    splits = read_splits(cfg.path, cfg.revision, cfg.subset)
    train = pick_split(splits, cfg.split, "dataset.split")
    if not cfg.test_split:
        return train, None
    test = pick_split(splits, cfg.test_split, "dataset.test_split")
    _check_columns(cfg, test, cfg.test_split)
    shared = [c for c in train.column_names if c in test.column_names]
    return datasets.concatenate_datasets([train.select_columns(shared), test.select_columns(shared)]), len(train)


def load_hf(cfg: HFDatasetConfig) -> TextDataset | GenerativeDataset:
    table, n_train = _tables(cfg)
    if not len(table):
        raise ConfigError(f"dataset.path: {cfg.path} has no rows in split {cfg.split!r}")
    cols = _check_columns(cfg, table, cfg.split)
    if cfg.format == "text_label":
        return _text_label(cfg, table, cols, n_train)
    rows = _prompt_rows(cfg, table, cols)
    names = sorted(set(rows.categories))
    unknown = [h for h in cfg.heldout if h not in names]
    if unknown:
        raise ConfigError(f"dataset.heldout: {unknown[0]!r} is no value of column {cols.get('category', 'category')!r}; "
                          f"values: {', '.join(n or repr(n) for n in names)}")
    index = {n: i for i, n in enumerate(names)}
    rows.labels = [index[c] for c in rows.categories]
    train, validation, test = _carve(rows.labels, n_train, cfg, table)
    held = set(cfg.heldout)
    train = cap([i for i in train if rows.categories[i] not in held], cfg)

    def evaluated(idx: list[int], heldout: bool) -> PromptSplit:
        """The seen (or held-out) examples of ``idx`` in a seeded order, so ``eval.max_examples`` samples fairly."""
        order = np.random.default_rng(cfg.split_seed).permutation(len(idx)).tolist()
        return rows.take([idx[j] for j in order if (rows.categories[idx[j]] in held) == heldout])

    columns = {**_scalar_columns(table, train), "category": [rows.categories[i] for i in train]}
    return GenerativeDataset(rows.take(train), evaluated(test, False), evaluated(validation, False),
                             heldout={"test": evaluated(test, True), "validation": evaluated(validation, True)},
                             label_names=names, train_columns=columns, max_response_tokens=cfg.max_response_tokens)


def _text_label(cfg: HFDatasetConfig, table: Any, cols: dict[str, str], n_train: int | None) -> TextDataset:
    texts = [_text(t) for t in table[cols["text"]]]
    raw = [_text(v) for v in table[cols["label"]]]
    names = sorted(set(raw))
    index = {n: i for i, n in enumerate(names)}
    labels = [index[v] for v in raw]
    train, validation, test = _carve(labels, n_train, cfg, table)
    train = cap(train, cfg)
    pick = lambda idx: Split([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return TextDataset(pick(train), pick(test), names, validation=pick(validation),
                       train_columns=_scalar_columns(table, train))


def encode_hf(tokenizer: Any, data: TextDataset | GenerativeDataset, split: str, max_length: int) -> Any:
    """Generative formats: :func:`~fedtune.data.prompt_encoding.encode_generative`; text_label: the classifier's."""
    if isinstance(data, GenerativeDataset):
        return encode_generative(tokenizer, data, split, max_length)
    return encode(tokenizer, getattr(data, split), max_length)


DATASETS.register("hf", DatasetSpec(load_hf, HFDatasetConfig, encode=encode_hf, kind="instruction",
                                    kind_of=hf_dataset_kind))
