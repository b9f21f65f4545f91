"""``tracking=mlflow``: the run as one MLflow run, through :class:`mlflow.tracking.MlflowClient`.

The client API (not the fluent ``mlflow.start_run``, whose active run is process-global)
writes to ``tracking.uri`` or, without one, to a local SQLite store in the run directory
(``sqlite:///RUN_DIR/mlflow.db``, artifacts in ``RUN_DIR/mlartifacts``; a sweep shares one
in its directory, an experiment named after it, a run per job).  mlflow 3.x's old
``./mlruns`` file store raises unless ``MLFLOW_ALLOW_FILE_STORE`` is set
(``mlflow.store.tracking.file_store.FileStore``), and its SQLite store needs no server:
``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``.

Each round is one ``log_batch`` (one database transaction in the SQL store) of the
row's metrics and the tag ``fedtune.last_round``, so the tag says exactly which rounds
the run holds.  A resumed run reattaches to the run id kept in ``RUN_DIR/tracking.json``
and continues after that tag: no step is logged twice.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

from fedtune.tracking.base import Tracker, flat_config, read_state, run_plots, write_state

LAST_ROUND_TAG = "fedtune.last_round"
RESULT_FILES = ("config.yaml", "metrics.csv", "ledger.csv", "summary.json")
BATCH = 100  # MLflow's limit of params + tags per log_batch (mlflow.utils.validation)


def _client(uri: str) -> Any:
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated",
                            module=r"mlflow\.store")  # SQLAlchemy 2.1 about mlflow's own ORM mapping
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import ("Creating tables...")
    return MlflowClient(tracking_uri=uri)


class MLflowRun(Tracker):
    """One MLflow run per fedtune run (module doc)."""

    def __init__(self, cfg: Any, run_dir: Path, sweep: Path | None, resumed_round: int | None) -> None:
        from mlflow.entities import RunStatus

        state = read_state(run_dir) if resumed_round is not None else {}
        if state.get("backend") == "mlflow":  # continue the tracked run of the killed process
            self.client, self.run_id = _client(state["tracking_uri"]), state["run_id"]
            run = self.client.get_run(self.run_id)
            self.next_round = int(run.data.tags.get(LAST_ROUND_TAG, -1)) + 1
            self.params = dict(run.data.params)
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return
        root = sweep or run_dir
        local = cfg.tracking.uri is None
        uri = f"sqlite:///{root.resolve() / 'mlflow.db'}" if local else cfg.tracking.uri
        self.client = _client(uri)
        name = cfg.tracking.experiment or (str(sweep) if sweep else "fedtune")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(name, artifact_location=(root.resolve() / "mlartifacts").as_uri()
                                                       if local else None))
        tags = {"fedtune.run_dir": str(run_dir), "fedtune.strategy": cfg.strategy.name}
        if sweep is not None:
            tags["fedtune.sweep"] = str(sweep.resolve())
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        self.params: dict[str, str] = {}
        write_state(run_dir, {"backend": "mlflow", "tracking_uri": uri, "experiment_id": experiment_id,
                              "run_id": self.run_id})

    def log_config(self, config: dict[str, Any]) -> None:
        """Parameters once; on a resume only new keys (MLflow refuses to change a logged
        parameter: a changed ``num_rounds`` becomes the tag ``fedtune.resumed.num_rounds``)."""
        from mlflow.entities import Param, RunTag

        flat = {k: str(v) for k, v in flat_config(config).items()}
        params = [Param(k, v) for k, v in flat.items() if k not in self.params]
        tags = [RunTag(f"fedtune.resumed.{k}", v) for k, v in flat.items() if k in self.params and self.params[k] != v]
        for i in range(0, max(len(params), len(tags)), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH], tags=tags[i:i + BATCH])

    def write_metrics(self, server_round: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, server_round) for k, v in metrics.items()],
                              tags=[RunTag(LAST_ROUND_TAG, str(server_round))])

    def log_artifacts(self, run_dir: Path) -> None:
        run_plots(run_dir)
        for folder in ("plots", "adapter"):
            if (run_dir / folder).is_dir():
                self.client.log_artifacts(self.run_id, str(run_dir / folder), folder)
        for name in RESULT_FILES:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "completed" else "FAILED")
