"""What one process (the ServerApp or a Ray actor running ClientApps) keeps in memory.

Loading a model or tokenising a dataset is done once per process and reused across
rounds and clients: only adapter state moves in messages.  Cache entries are keyed by
the JSON of the config sections they depend on, so two runs in one process (a Hydra
multirun, the test-suite) never share state they should not.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fedtune.config.run import RunConfig
from fedtune.data.batches import Encoded, encode
from fedtune.data.partition import partition_indices
from fedtune.data.sources import TextDataset
from fedtune.registry import DATASETS, METHODS, MODELS, TRAINERS

_CACHE: OrderedDict[str, Any] = OrderedDict()
_MAX_ENTRIES = 12


def _cached(key: str, make: Callable[[], Any]) -> Any:
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = _CACHE[key] = make()
    while len(_CACHE) > _MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return value


def clear_cache() -> None:
    _CACHE.clear()


@dataclass
class Workspace:
    """Per-process view of one run: data, encodings, partitions, the adapted model."""

    cfg: RunConfig

    def _key(self, kind: str, *sections: str, extra: Any = None) -> str:
        d = self.cfg.to_dict()
        return json.dumps([kind, [d[s] for s in sections], extra], sort_keys=True, default=str)

    @property
    def device(self) -> torch.device:
        want = self.cfg.runtime.device
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            return torch.device("cuda")
        return torch.device("cpu")

    @property
    def data(self) -> TextDataset:
        return _cached(self._key("data", "dataset"), lambda: DATASETS.get(self.cfg.dataset.name).load(self.cfg.dataset))

    def encoded(self, split: str) -> Encoded:
        """A tokenised split, by the model's tokenizer and the dataset's encoding (an
        instruction dataset's ``"test"`` is its :class:`~fedtune.data.chat_encoding.CausalEval`)."""
        def make() -> Encoded:
            from fedtune.models.zoo import load_tokenizer

            model_spec, data_spec = MODELS.get(self.cfg.model.name), DATASETS.get(self.cfg.dataset.name)
            tokenizer = model_spec.tokenizer(self.cfg.model) if model_spec.tokenizer else load_tokenizer()
            if data_spec.encode is not None:
                return data_spec.encode(tokenizer, self.data, split, self.cfg.model.max_length)
            return encode(tokenizer, getattr(self.data, split), self.cfg.model.max_length)

        return _cached(self._key("encoded", "dataset", "model", extra=split), make)

    def partitions(self) -> list[list[int]]:
        return _cached(
            self._key("partitions", "dataset", "partition", "federation", extra=self.cfg.seed),
            lambda: partition_indices(self.data.train.labels, self.cfg.partition,
                                      self.cfg.federation.num_clients, self.cfg.seed,
                                      getattr(self.data, "train_columns", None)),
        )

    @property
    def trainer(self) -> Any:
        return TRAINERS.get(METHODS.get(self.cfg.strategy.name).trainer)

    def model(self) -> torch.nn.Module:
        """The adapted model (frozen base + the method's trainable part), built once per process.

        It is shared by every run and client this process serves with the same config, so
        callers always load the state they need into it (see :meth:`initial_arrays`).
        """
        return self._built()[0]

    def initial_arrays(self) -> dict[str, torch.Tensor]:
        """The trainable state as built from the seed (the run's round-0 global state)."""
        return {k: v.clone() for k, v in self._built()[1].items()}

    def _built(self) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        def make() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
            from fedtune.models.hf import is_quantized
            from fedtune.models.state import trainable_state

            base = MODELS.get(self.cfg.model.name).build(self.cfg.model, self.data.num_labels, self.cfg.seed,
                                                         device=self.device)
            if not is_quantized(base):  # bitsandbytes placed it while loading; it cannot move
                base.to(self.device)  # device first, then the adapter (Opacus issue 820), then DP
            model = self.trainer.build_model(base, self.cfg)
            return model, trainable_state(model)

        return _cached(self._key("model", "model", "dataset", "strategy", extra=[self.cfg.seed, str(self.device)]), make)


class LocalDataWorkspace(Workspace):
    """A SuperNode's view when it trains on its own file (node config ``data-path``).

    The node's whole training split is its data, whatever its partition id: nothing is
    partitioned, because no node ever sees another's file.  The label names come from the
    file, so every participant's file must use the federation's full label set.
    """

    def partitions(self) -> list[list[int]]:
        everything = list(range(len(self.data.train)))
        return [everything] * self.cfg.federation.num_clients
