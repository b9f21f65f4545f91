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
    "RAY_memory_usage_threshold": "0.9",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}


class _DropDeprecation(logging.Filter):
    """Hide Flower's notice that ``run_simulation`` is deprecated (we also ship ``flwr run``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "run_simulation" not in text and "DEPRECATED FEATURE" not in text


def set_default_env() -> None:
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)


def quiet_libraries(flower_level: str = "WARNING") -> None:
    """Flower at ``flower_level``; transformers/peft/datasets warnings that are expected, off."""
    set_default_env()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(getattr(logging, flower_level.upper(), logging.WARNING))
    if not any(isinstance(f, _DropDeprecation) for f in flwr_logger.filters):
        flwr_logger.addFilter(_DropDeprecation())
        for handler in flwr_logger.handlers:
            handler.addFilter(_DropDeprecation())
    for name in ("transformers", "peft", "datasets", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
