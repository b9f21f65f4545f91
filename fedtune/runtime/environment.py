"""Process-wide defaults: offline, no telemetry, quiet libraries, capped Ray.

Set before Flower/Ray start so that their subprocesses (Ray actors, a local SuperLink)
inherit them.  Values already set by the user win.
"""

from __future__ import annotations

import logging
import os
import warnings

DEFAULT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else uv would fetch CUDA torch
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",  # offline: Ray would try to report usage to its servers
    "MLFLOW_DISABLE_TELEMETRY": "true",  # tracking=mlflow: the same for mlflow's usage reports
    "RAY_memory_usage_threshold": "0.9",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}


def set_default_env() -> None:
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)


def quiet_libraries(flower_level: str = "WARNING") -> None:
    """Flower at ``flower_level``; the libraries' expected chatter off, their warnings kept.

    One warning is dropped, where it is raised: peft's ``PeftModel`` asks every model it
    wraps for ``is_gradient_checkpointing``, a property transformers has deprecated, so
    each LoRA model built would print transformers' FutureWarning although fedtune never
    uses the property.
    """
    set_default_env()
    logging.getLogger("flwr").setLevel(getattr(logging, flower_level.upper(), logging.WARNING))
    for name in ("transformers", "peft", "datasets", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module=r"transformers\.modeling_utils")
