"""``dataset=csv`` and ``dataset=tiny``: presets of ``dataset=hf`` for classification files.

Both are ``dataset=hf dataset.format=text_label`` with other defaults, read, split and
checked by the same code (:func:`fedtune.data.hf_dataset.load_hf`), so a CSV or JSON Lines
file loads one way whichever name selects it:

``csv``   your own file (``dataset.path``): columns ``text`` and ``label``
          (``dataset.fields.text`` / ``dataset.fields.label`` rename them); a ``split``
          column with ``train`` / ``test`` values, when present, fixes the split.
``tiny``  480 short synthetic sentences in 4 topics shipped in this package
          (``fedtune/data/files/tiny_topics.jsonl``), learnable in seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedtune.data.hf_dataset import HFDatasetConfig, encode_hf, load_hf
from fedtune.data.sources import TINY_FILE, DatasetSpec, TextDataset
from fedtune.registry import DATASETS


@dataclass
class CSVDatasetConfig(HFDatasetConfig):
    """``dataset=csv dataset.path=/data/my.csv``: ``dataset=hf``'s fields, text_label by default."""

    name: str = "csv"
    format: str = "text_label"
    split_column: str = "split"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format != "text_label":
            raise ValueError(f"format: dataset={self.name} is a classification file (text_label); "
                             f"for {self.format!r} rows use dataset=hf")


@dataclass
class TinyDatasetConfig(CSVDatasetConfig):
    """``dataset=tiny``: the shipped file (``path`` empty), resolved where the data is read, so
    a config written on one machine loads on another."""

    name: str = "tiny"


def load_tiny(cfg: TinyDatasetConfig) -> TextDataset:
    return load_hf(cfg if cfg.path else dataclasses.replace(cfg, path=str(TINY_FILE)))


DATASETS.register("tiny", DatasetSpec(load_tiny, TinyDatasetConfig, encode=encode_hf))
DATASETS.register("csv", DatasetSpec(load_hf, CSVDatasetConfig, encode=encode_hf))
