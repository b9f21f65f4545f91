"""The tracking options (``tracking=none|tensorboard|mlflow``): their config dataclasses.

Each option is registered in :data:`fedtune.registry.TRACKING` as a :class:`TrackingSpec`:
its dataclass (the schema and defaults of ``tracking=<name>``, stored in Hydra's
ConfigStore like every group), the :class:`~fedtune.tracking.base.Tracker` that mirrors
a run into that tool (imported only when a run opens it, so ``tracking=none`` imports
nothing), and the packages it needs (the ``tracking`` extra of pyproject.toml).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.registry import TRACKING

INSTALL = 'pip install -e ".[tracking]"'


@dataclass(frozen=True)
class TrackingSpec:
    """What ``tracking=<name>`` selects: its dataclass, its tracker as ``"module:Class"``
    (empty: nothing is tracked) and the ``(import name, pip requirement)`` pairs it needs."""

    config_cls: type
    tracker: str = ""
    requires: tuple[tuple[str, str], ...] = ()


@dataclass
class NoTrackingConfig:
    """``tracking=none`` (the default): the run directory only, no tracking tool."""

    name: str = "none"


@dataclass
class TensorBoardConfig:
    """``tracking=tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir outputs/``).

    Every numeric ``metrics.csv`` column is a scalar at step = round, the resolved config
    is text and hyper-parameters, and the end-of-run plots are images.
    """

    name: str = "tensorboard"


@dataclass
class MLflowConfig:
    """``tracking=mlflow``: one MLflow run per fedtune run (metrics at step = round, the config
    as parameters, plots, adapter and result files as artifacts).

    ``uri`` null: a local store without a server, ``sqlite:///RUN_DIR/mlflow.db`` with the
    artifacts in ``RUN_DIR/mlartifacts`` (under ``fedtune run -m``: in the sweep directory,
    one run per job).  mlflow 3.x refuses its old ``./mlruns`` file store unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set, hence SQLite.  ``experiment`` null: ``fedtune``, or
    the sweep directory under ``-m``.
    """

    name: str = "mlflow"
    uri: str | None = None  # a tracking server (http://host:5000) or any MLflow store URI; null = local SQLite
    experiment: str | None = None  # null = "fedtune", or the sweep directory under fedtune run -m

    def __post_init__(self) -> None:
        if self.uri is not None and not self.uri.strip():
            raise ValueError("uri must be a tracking URI (http://host:5000, sqlite:///path.db) or null, got ''")
        if self.experiment is not None and not self.experiment.strip():
            raise ValueError("experiment must be a non-empty name or null, got ''")


TRACKING.register("none", TrackingSpec(NoTrackingConfig))
TRACKING.register("tensorboard", TrackingSpec(TensorBoardConfig, "fedtune.tracking.tensorboard_run:TensorBoardRun",
                                              (("tensorboard", "tensorboard"),)))
TRACKING.register("mlflow", TrackingSpec(MLflowConfig, "fedtune.tracking.mlflow_run:MLflowRun",
                                         (("mlflow", "mlflow-skinny"),)))
