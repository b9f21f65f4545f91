"""Where a ``model=hf`` checkpoint comes from, and what this machine can load it as.

Each check is a one-line :class:`~fedtune.errors.ConfigError` naming the field, raised
before Ray starts (:mod:`fedtune.models.preflight`): a folder that does not exist, a
hub id the hub cannot serve (offline, or unreachable), a dtype or a bitsandbytes mode
the device cannot run.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "4bit", "8bit")


def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (``org/name`` or ``name``): absolute, ``./``, ``~``,
    or more than one ``/``."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


@functools.lru_cache(maxsize=16)
def load_config(path: str, revision: str, trust_remote_code: bool) -> Any:
    """The checkpoint's ``AutoConfig``: from a local folder with ``config.json``, or a hub id
    the hub (or its local cache under ``HF_HUB_OFFLINE=1``) serves; else a one-line error."""
    if not path:
        raise ConfigError("model.path is required for model=hf: a hub id or a local folder that from_pretrained loads")
    from transformers import AutoConfig

    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path: {folder} has no config.json (not a save_pretrained folder)")
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if looks_local(path):
        raise ConfigError(f"model.path: folder not found: {folder}")
    try:
        return AutoConfig.from_pretrained(path, revision=revision or None, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, or the hub's own errors: all mean "not here"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "HF_HUB_OFFLINE=1 and it is not in the local cache" if offline else \
            f"the hub did not serve it ({type(exc).__name__})"
        raise ConfigError(f"model.path: cannot load hub id {path!r}: {why}; fetch it with "
                          f"`hf download {path} --local-dir DIR` and set model.path=DIR") from None


def resolve_dtype(dtype: str, device: Any) -> Any:
    """The torch dtype: ``auto`` is bfloat16 on a CUDA GPU that supports it, else float32."""
    import torch

    if dtype == "auto":
        cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def check_machine(dtype: str, quantization: str, device: Any) -> None:
    """Refuse a dtype or quantization mode this machine cannot run (before Ray starts)."""
    import torch

    cuda = str(device).startswith("cuda")
    if dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.dtype: this GPU does not support bfloat16; accepted here: float32, float16")
    if quantization == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization: {quantization} needs bitsandbytes; install it with: "
                          "pip install bitsandbytes")
    if quantization in ("4bit", "8bit") and dtype == "float16" and not cuda:
        raise ConfigError("model.dtype: float16 compute under bitsandbytes needs a CUDA GPU; "
                          "accepted on CPU: float32, bfloat16")


def quantization_config(quantization: str, compute_dtype: Any) -> Any:
    """bitsandbytes settings: NF4 4-bit with ``compute_dtype`` compute (QLoRA, Dettmers et al.
    2023, arXiv 2305.14314), or LLM.int8() 8-bit; None for ``none``."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
