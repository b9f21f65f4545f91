"""A model config's parameter names and linear-layer shapes, without reading any weights.

Pre-flight checks (LoRA targets, Fed-SB's rank bound, a method's parameter patterns)
need the architecture, not the weights: the model is instantiated on PyTorch's ``meta``
device, where tensors have shapes and no storage.  A pretrained option (``model=hf`` and
the presets with ``as_hf``) is built from its ``config.json`` alone (``AutoConfig`` then
``from_config``); ``tiny`` is its own builder run on ``meta``.  The one exception is
``smollm2`` with ``model.cache=false``, which has no ``config.json`` to read: it is built.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

from fedtune.registry import MODELS


@dataclass(frozen=True)
class Linear:
    """A linear layer ``y = W x`` with ``W`` out×in; ``kind`` is ``Linear`` or ``Conv1D``
    (GPT-2's transposed linear, which peft adapts with ``fan_in_fan_out``)."""

    out_features: int
    in_features: int
    kind: str


@dataclass(frozen=True)
class ModelInventory:
    """What a model is made of: ``model_type`` (peft's key for default targets), every
    parameter's name and shape, and every linear layer by module name."""

    model_type: str
    parameters: dict[str, tuple[int, ...]]
    linears: dict[str, Linear]


def _linears(model: Any) -> dict[str, Linear]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            out[name] = Linear(mod.out_features, mod.in_features, "Linear")
        elif isinstance(mod, Conv1D):  # weight is in×out
            out[name] = Linear(int(mod.weight.shape[1]), int(mod.weight.shape[0]), "Conv1D")
    return out


def _of(model: Any) -> ModelInventory:
    return ModelInventory(model_type=str(getattr(model.config, "model_type", "")),
                          parameters={n: tuple(p.shape) for n, p in model.named_parameters()},
                          linears=_linears(model))


@functools.lru_cache(maxsize=16)
def _pretrained(path: str, revision: str, trust_remote_code: bool, task: str, num_labels: int) -> ModelInventory:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedtune.models.hf_source import load_config

    config = copy.deepcopy(load_config(path, revision, trust_remote_code))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            if task == "causal_lm":
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            else:
                config.num_labels = num_labels
                model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return _of(model)


def model_inventory(model_cfg: Any, num_labels: int) -> ModelInventory:
    """The parameter names and linear-layer shapes of ``model_cfg``'s model (no weights read).

    ``num_labels`` sizes a classification head (ignored by a causal LM)."""
    import torch

    from fedtune.models.hf import hf_task

    spec = MODELS.get(model_cfg.name)
    hf = spec.as_hf(model_cfg) if spec.as_hf is not None else None
    if hf is not None:
        return _pretrained(hf.path, hf.revision, hf.trust_remote_code, hf_task(hf), num_labels)
    if spec.as_hf is not None:  # a preset with no folder to read (smollm2, model.cache=false)
        return _of(spec.build(model_cfg, num_labels, 0))
    with torch.device("meta"):
        return _of(spec.build(model_cfg, num_labels, 0, device="meta"))
