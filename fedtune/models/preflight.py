"""The model checks run before Ray starts, so bad input is one line and no run directory.

Building a model happens inside the ServerApp and the client actors, after Ray has
started; whatever can be known from the config and the checkpoint's ``config.json`` is
checked here instead: the checkpoint's source, what the machine can run, and each
method's own checks against the model's :class:`~fedtune.models.inventory.ModelInventory`
(its ``preflight`` hook, e.g. LoRA targets that match nothing, Fed-SB's rank bound).
"""

from __future__ import annotations

from typing import Any

from fedtune.config.run import check_quantized_base
from fedtune.registry import METHODS, MODELS


def preflight(cfg: Any) -> Any:
    """Check ``cfg``'s model before Ray starts; returns its inventory (a ConfigError on bad input)."""
    from fedtune.models.hf_source import check_machine, load_config
    from fedtune.models.inventory import model_inventory
    from fedtune.runtime.workspace import Workspace

    check_quantized_base(cfg)
    workspace = Workspace(cfg)
    spec = MODELS.get(cfg.model.name)
    hf = spec.as_hf(cfg.model) if spec.as_hf is not None else None
    if hf is not None:
        load_config(hf.path, hf.revision, hf.trust_remote_code)
        check_machine(hf.dtype, hf.quantization, workspace.device)
    inventory = model_inventory(cfg.model, workspace.data.num_labels)
    hook = METHODS.get(cfg.strategy.name).preflight
    if hook is not None:
        hook(cfg, inventory)
    return inventory
