"""What every model option shares: its LoRA settings, how it is built, and offline loading.

A module of its own so that the model options (:mod:`fedtune.models.zoo`,
:mod:`fedtune.models.hf`, :mod:`fedtune.models.causal_lm`) import it, never each other's
modules for it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class LoRAConfig:
    """peft LoRA settings: ``W = W0 + (alpha / rank) · B A`` on ``target_modules``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Any = field(default_factory=lambda: ["query", "value"])  # a list, or "auto" (peft's default)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != "auto":
            raise ValueError(f"target_modules must be a list, got {self.target_modules!r} (or auto: peft's default)")
        if self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")


@dataclass(frozen=True)
class ModelSpec:
    """How to build a registered model: ``build(cfg, num_labels, seed, device) -> nn.Module``.

    ``tokenizer(cfg)`` returns the model's tokenizer (None: the MiniLM WordPiece one);
    ``kind`` is ``"classifier"`` (sequence classification) or ``"causal_lm"``;
    ``as_hf(cfg)`` is the :class:`~fedtune.models.hf.HFModelConfig` a pretrained preset
    loads as (None: built from a config, like ``tiny``), so it loads one way; ``as_hf`` may
    return None for a config with no folder to load (``smollm2`` with ``model.cache=false``).
    """

    build: Callable[..., Any]
    config_cls: type
    tokenizer: Callable[[Any], Any] | None = None
    kind: str = "classifier"
    kind_of: Callable[[Any], str] | None = None  # the kind read from the config (model=hf: model.task)
    as_hf: Callable[[Any], Any] | None = None


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
