"""``model=hf``: any Hugging Face checkpoint that ``from_pretrained`` loads.

``model.path`` is a hub id or a local folder (``save_pretrained`` output).  The task is
read from the checkpoint's architecture unless ``model.task`` says it: a ``*ForCausalLM``
trains on instruction data, anything else gets a sequence-classification head sized by
the dataset's labels.  The tokenizer comes from the same path; a missing pad token is set
to the EOS token (said once), because batches are padded; a chat template, when the
tokenizer has one, frames instruction prompts (:mod:`fedtune.data.chat_encoding`).

``model.dtype`` and ``model.quantization`` (bitsandbytes NF4 / int8, then peft's
``prepare_model_for_kbit_training``: QLoRA) decide how the frozen base is held; a quantized
base is placed on its device at load time (bitsandbytes quantizes while placing), every
other base by the :class:`~fedtune.runtime.workspace.Workspace`.  The built-in ``minilm``
and ``smollm2`` load through :func:`load_base` too (their ``as_hf`` configs).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from fedtune.models.hf_source import DTYPES, QUANTIZATIONS, load_config, quantization_config, resolve_dtype
from fedtune.models.spec import LoRAConfig, ModelSpec, _offline
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
    dtype : auto (bfloat16 on a CUDA GPU that supports it, else float32) | float32 | bfloat16 | float16.
    quantization : none | 4bit (bitsandbytes NF4) | 8bit (bitsandbytes LLM.int8()): a frozen
        quantized base under a LoRA-family method (QLoRA).
    gradient_checkpointing : recompute activations in the backward pass (less memory, same gradients).
    lora : peft LoRA settings; ``target_modules: auto`` is peft's default for the architecture,
        else names matched by dotted suffix, as peft matches them.
    """

    name: str = "hf"
    path: str = ""
    revision: str = ""
    task: str = "auto"
    trust_remote_code: bool = False
    max_length: int = 256
    dtype: str = "auto"
    quantization: str = "none"
    gradient_checkpointing: bool = False
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(target_modules="auto"))

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: unknown {self.task!r}; accepted: {', '.join(TASKS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: unknown {self.dtype!r}; accepted: {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: unknown {self.quantization!r}; accepted: {', '.join(QUANTIZATIONS)}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")


def _load_kwargs(cfg: HFModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


def _architectures(path: str, revision: str, trust_remote_code: bool) -> tuple[str, ...]:
    config = load_config(path, revision, trust_remote_code)
    return tuple(getattr(config, "architectures", None) or ())


def hf_task(cfg: HFModelConfig) -> str:
    """``causal_lm`` or ``classification``: ``model.task``, else read from the checkpoint's config."""
    if cfg.task != "auto":
        return cfg.task
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


def build_hf(cfg: HFModelConfig, num_labels: int, seed: int, device: Any = "cpu") -> Any:
    """The frozen base: a causal LM as saved, or the encoder with a new head seeded from the run seed."""
    return load_base(cfg, num_labels, seed, device)


def load_base(cfg: HFModelConfig, num_labels: int, seed: int, device: Any = "cpu") -> Any:
    """The one loading path of every pretrained model (``model=hf``, ``minilm``, ``smollm2``)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedtune.randomness import seed_torch

    _offline_if_set()
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = {**_load_kwargs(cfg), "dtype": dtype}
    if (quant := quantization_config(cfg.quantization, dtype)) is not None:
        kwargs.update(quantization_config=quant, device_map={"": _placement(device)})  # quantized while placed
    seed_torch(seed, "model-init")  # a new classification head is identical on every party
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialised head" is expected
    transformers.logging.disable_progress_bar()
    try:
        if hf_task(cfg) == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(cfg.path, num_labels=num_labels,
                                                                       ignore_mismatched_sizes=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:  # a classifier finds each row's last token by the pad id
        model.config.pad_token_id = hf_tokenizer(cfg).pad_token_id
    return _prepare(model, cfg)


def _placement(device: Any) -> str:
    """A ``device_map`` target: this process's GPU (Ray's ``num_gpus`` share makes it index 0), or the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _prepare(model: Any, cfg: HFModelConfig) -> Any:
    """QLoRA's preparation of a quantized base (peft casts norms to fp32, makes inputs require
    grad), or plain gradient checkpointing; non-reentrant, so frozen inputs still backpropagate."""
    ckpt_kwargs = {"use_reentrant": False}
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        from fedtune.models.bnb_cpu import disable_cpu_repacking

        disable_cpu_repacking(model)  # evaluation and training share the layers (see the module)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=ckpt_kwargs)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    return model


def is_quantized(model: Any) -> bool:
    """A bitsandbytes base: placed at load time, never moved afterwards."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner, "is_quantized", False))


def _offline_if_set() -> None:
    """Local folders never need the hub; a hub id goes online unless HF_HUB_OFFLINE is set."""
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        _offline()


MODELS.register("hf", ModelSpec(build_hf, HFModelConfig, tokenizer=hf_tokenizer, kind="causal_lm", kind_of=hf_kind,
                                as_hf=lambda cfg: cfg))
