"""``model=hf``: any Hugging Face checkpoint that ``from_pretrained`` loads.

``model.path`` is a hub id or a local folder (``save_pretrained`` output).  The task is
read from the checkpoint's architecture unless ``model.task`` says it: a ``*ForCausalLM``
trains on instruction data, anything else gets a sequence-classification head sized by
the dataset's labels.  The tokenizer comes from the same path; a missing pad token is set
to the EOS token (said once), because batches are padded.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from fedtune.errors import ConfigError
from fedtune.models.zoo import LoRAConfig, ModelSpec, _offline
from fedtune.registry import MODELS

TASKS = ("auto", "causal_lm", "classification")
log = logging.getLogger(__name__)


@dataclass
class HFModelConfig:
    """``model=hf model.path=<hub id or folder>``: your own Hugging Face model.

    path : what ``from_pretrained`` loads (a hub id, or a local folder).
    revision : a branch, tag or commit of a hub repository ("" = the default branch).
    task : auto (from the checkpoint's architecture) | causal_lm | classification.
    trust_remote_code : run the repository's own modelling code (off unless you trust it).
    max_length : tokens per example.
    lora : peft LoRA settings (target names are the model's module names).
    """

    name: str = "hf"
    path: str = ""
    revision: str = ""
    task: str = "auto"
    trust_remote_code: bool = False
    max_length: int = 256
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(target_modules=["q_proj", "v_proj"]))

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: unknown {self.task!r}; accepted: {', '.join(TASKS)}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")


def _load_kwargs(cfg: HFModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


@functools.lru_cache(maxsize=8)
def _architectures(path: str, revision: str, trust_remote_code: bool) -> tuple[str, ...]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=revision or None, trust_remote_code=trust_remote_code)
    return tuple(getattr(config, "architectures", None) or ())


def hf_task(cfg: HFModelConfig) -> str:
    """``causal_lm`` or ``classification``: ``model.task``, else read from the checkpoint's config."""
    if cfg.task != "auto":
        return cfg.task
    if not cfg.path:
        raise ConfigError("model.path is required for model=hf: a hub id or a local folder that from_pretrained loads")
    archs = _architectures(cfg.path, cfg.revision, cfg.trust_remote_code)
    return "causal_lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "classification"


def hf_kind(cfg: HFModelConfig) -> str:
    return "causal_lm" if hf_task(cfg) == "causal_lm" else "classifier"


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, revision: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision or None, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        log.warning("model.path: %s has no pad token; padding with its EOS token %r", path, tokenizer.eos_token)
    return tokenizer


def hf_tokenizer(cfg: HFModelConfig) -> Any:
    """The checkpoint's own tokenizer (cached per process), with a pad token."""
    return _tokenizer(cfg.path, cfg.revision, cfg.trust_remote_code)


def build_hf(cfg: HFModelConfig, num_labels: int, seed: int) -> Any:
    """The frozen base: a causal LM as saved, or the encoder with a new head seeded from the run seed."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedtune.randomness import seed_torch

    _offline_if_set()
    seed_torch(seed, "model-init")  # a new classification head is identical on every party
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialised head" is expected
    transformers.logging.disable_progress_bar()
    try:
        if hf_task(cfg) == "causal_lm":
            return AutoModelForCausalLM.from_pretrained(cfg.path, **_load_kwargs(cfg))
        return AutoModelForSequenceClassification.from_pretrained(cfg.path, num_labels=num_labels,
                                                                  ignore_mismatched_sizes=True, **_load_kwargs(cfg))
    finally:
        transformers.logging.set_verbosity(verbosity)


def _offline_if_set() -> None:
    """Local folders never need the hub; a hub id goes online unless HF_HUB_OFFLINE is set."""
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        _offline()


MODELS.register("hf", ModelSpec(build_hf, HFModelConfig, tokenizer=hf_tokenizer, kind="causal_lm", kind_of=hf_kind))
