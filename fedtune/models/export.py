"""Reload a run's exported model: ``RUN_DIR/adapter`` on top of the base model.

Most LoRA methods export a plain peft adapter (``PeftModel.from_pretrained`` is enough).
A method that folds updates into the frozen base (``W = W0 + D + s·BA``) also writes
:data:`BASE_DELTA_FILE`, the cumulative merged delta ``D`` per LoRA module;
:func:`load_exported` applies it, so the reloaded model is exactly the one the server
evaluated last.  A method names its loader in its spec (``MethodSpec.export.load``).
"""

from __future__ import annotations

from pathlib import Path

import torch

BASE_DELTA_FILE = "base_delta.safetensors"


def save_base_delta(path: str | Path, deltas: dict[str, torch.Tensor]) -> None:
    """Write ``{module name: D (fp32, m×n)}`` next to the adapter in ``path``."""
    from safetensors.torch import save_file

    save_file({m: d.detach().to("cpu", torch.float32).contiguous() for m, d in deltas.items()},
              str(Path(path) / BASE_DELTA_FILE))


def load_exported(base: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """``PeftModel.from_pretrained(base, adapter_dir)``, plus the merged base delta if any.

    Parameters
    ----------
    base : the freshly built base model (the run's ``model=`` config and seed).
    adapter_dir : a run's ``adapter/`` directory.
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    from fedtune.models.base_delta import set_base

    model = PeftModel.from_pretrained(base, str(adapter_dir))
    delta_file = Path(adapter_dir) / BASE_DELTA_FILE
    if delta_file.exists():
        set_base(model, {m: d.to(torch.float64) for m, d in load_file(str(delta_file)).items()})
    return model
