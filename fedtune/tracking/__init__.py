"""Watch a run in a tracking tool: ``tracking=none|tensorboard|mlflow``.

The server opens one :class:`~fedtune.tracking.base.Tracker` per run
(:func:`open_tracker`) and hands it the config, every ``metrics.csv`` row and the
end-of-run files; nothing else knows which backend runs.  Each backend is one module
(:mod:`.tensorboard_run`, :mod:`.mlflow_run`), imported only when chosen, from the
optional ``tracking`` extra; :func:`check_installed` refuses a missing one in one line
before Ray starts.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError
from fedtune.tracking.base import Tracker
from fedtune.tracking.options import INSTALL

__all__ = ["Tracker", "check_installed", "open_tracker"]


def _spec(cfg: Any) -> Any:
    from fedtune.registry import TRACKING

    return TRACKING.get(cfg.tracking.name)


def check_installed(cfg: Any) -> None:
    """A :class:`ConfigError` naming the install command if ``tracking=<name>`` lacks its package."""
    for module, requirement in _spec(cfg).requires:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"tracking={cfg.tracking.name} needs {requirement}, which is not installed; "
                              f"install it with: {INSTALL}") from None


def open_tracker(cfg: Any, run_dir: Path, sweep: Path | None = None, resumed_round: int | None = None) -> Tracker:
    """The tracker of ``cfg.tracking`` for ``run_dir``.

    ``sweep``: the Hydra multirun directory this run is a job of (its runs are grouped);
    ``resumed_round``: the checkpointed round a resumed run continues after (the backend
    reattaches to the run directory's tracked run, :data:`~fedtune.tracking.base.STATE_FILE`).
    """
    spec = _spec(cfg)
    if not spec.tracker:
        return Tracker()
    check_installed(cfg)
    module, _, name = spec.tracker.partition(":")
    return getattr(importlib.import_module(module), name)(cfg, Path(run_dir), sweep, resumed_round)
