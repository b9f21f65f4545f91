"""Watch a run: TensorBoard and MLflow mirror the run directory; the progress line says the time left.

Read back with the tools' own readers (TensorBoard's ``EventAccumulator``, MLflow's
``MlflowClient``), from the shared Ray runs of tests/conftest.py, so no Ray run is added:
the in-process run of ``same_seed_runs`` is tracked in TensorBoard, the run of
``killed_then_resumed`` (SIGKILLed after round 2, resumed by a new ``fedtune run``
process) in MLflow.  The resume windows (killed before or after the tracker got the
checkpointed round) and the grouping of a sweep's jobs are checked on the trackers
themselves, without Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.flower.run_record import format_time_left, time_left
from fedtune.results.store import METRIC_COLUMNS, read_metrics
from fedtune.tracking import check_installed, open_tracker

LABELS = ("round", "strategy", "sampled_clients", "failed_clients")
TINY = "model=tiny dataset=tiny"


def _expected(rows: list[dict[str, str]]) -> dict[str, list[tuple[int, float]]]:
    """Column -> (round, value) of every measured cell of metrics.csv (the oracle)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for column in METRIC_COLUMNS:
        if column in LABELS:
            continue
        cells = [(int(r["round"]), float(r[column])) for r in rows if r.get(column, "") not in ("", "nan")]
        if cells:
            out[column] = cells
    return out


def _events(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _leaves(node: Any) -> int:
    return sum(_leaves(v) for v in node.values()) if isinstance(node, dict) else 1


# ----------------------------------------------------------------------------- the progress line
def test_time_left_is_the_mean_measured_round_times_the_rounds_left() -> None:
    assert time_left([], 10) is None  # round 0 only evaluates: nothing measured yet
    assert time_left([10.0, 20.0, 30.0], 5) == 100.0
    assert time_left([12.5], 0) == 0.0
    assert format_time_left(None) == "" and format_time_left(0.0) == ""  # unknown, or the last round
    assert format_time_left(40.2) == ", ~40 s left"
    assert format_time_left(time_left([26.72] * 5, 15)) == ", ~7 min left"  # 400.8 s
    assert format_time_left(9000.0) == ", ~2.5 h left"


# ----------------------------------------------------------------------------- TensorBoard
@pytest.mark.simulation
def test_tensorboard_holds_every_row_the_config_and_the_plots(same_seed_runs: list[Path]) -> None:
    run_dir = same_seed_runs[0]  # conftest.py: tracking=tensorboard, in this process
    rows = read_metrics(run_dir)
    acc = _events(run_dir / "tensorboard")
    expected = _expected(rows)
    assert {"eval_accuracy", "eval_loss", "train_loss", "bytes_up", "bytes_down", "cumulative_bytes",
            "num_failures", "round_seconds"} <= set(expected)
    assert set(acc.Tags()["scalars"]) == set(expected)  # no label column, no unmeasured one (epsilon)
    for column, cells in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(column)]
        assert [s for s, _ in got] == [s for s, _ in cells], column
        assert [v for _, v in got] == pytest.approx([v for _, v in cells], rel=1e-6), column  # float32 events

    text = acc.Tensors("config/text_summary")
    assert len(text) == 1 and text[0].step == 0
    block = text[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(block.removeprefix("```yaml\n").removesuffix("```")) == \
        yaml.safe_load((run_dir / "config.yaml").read_text())
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    cfg = compose(f"{TINY} federation.num_clients=4 num_rounds=3 seed=3 train.local_steps=8")
    assert hparams["train.lr"].number_value == cfg.train.lr and hparams["strategy.name"].string_value == "fedavg_lora"
    assert hparams["tracking.name"].string_value == "tensorboard"

    from PIL import Image

    for name in ("comm_vs_accuracy", "accuracy_vs_round"):
        (image,) = acc.Images(f"plots/{name}")
        with Image.open(run_dir / "plots" / f"{name}.png") as png:
            assert (image.step, image.width, image.height) == (3, *png.size)
    (status,) = acc.Tensors("status/text_summary")
    assert status.tensor_proto.string_val[0] == b"completed"
    assert json.loads((run_dir / "tracking.json").read_text())["log_dir"] == str(run_dir / "tensorboard")


# ----------------------------------------------------------------------------- MLflow
@pytest.mark.simulation
def test_mlflow_continues_the_killed_run_without_a_duplicate_step(killed_then_resumed: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = killed_then_resumed["dir"]  # conftest.py: tracking=mlflow, killed after round 2, resumed
    assert killed_then_resumed["resumed"]["rc"] == 0
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["tracking_uri"] == f"sqlite:///{run_dir / 'mlflow.db'}"  # the local store, no server
    client = MlflowClient(state["tracking_uri"])
    runs = client.search_runs([state["experiment_id"]])
    assert [r.info.run_id for r in runs] == [state["run_id"]]  # the resume went on in the same run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["fedtune.last_round"] == "3"
    assert client.get_experiment(state["experiment_id"]).name == "fedtune"
    for column, cells in _expected(read_metrics(run_dir)).items():
        history = client.get_metric_history(run.info.run_id, column)
        assert sorted((m.step, m.value) for m in history) == cells, column  # each step once, the csv's value
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    params = run.data.params
    assert len(params) == _leaves(config)
    assert (params["strategy.name"], params["num_rounds"], params["tracking.name"]) == ("fedavg_lora", "3", "mlflow")
    assert params["faults.server_kill_round"] == "2" and params["tracking.uri"] == "null"

    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "adapter", "config.yaml", "metrics.csv", "ledger.csv", "summary.json"} <= listed
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))  # not beside the run: the study reads that tree
    for name in ("metrics.csv", "summary.json", "adapter/adapter_model.safetensors", "plots/comm_vs_accuracy.png"):
        assert (local / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert json.loads((local / "summary.json").read_text())["status"] == "completed"


# ----------------------------------------------------------------------------- resume windows, sweeps
def _rows(n: int) -> list[dict[str, Any]]:
    return [{"round": r, "strategy": "fedavg_lora", "sampled_clients": "1", "failed_clients": "",
             "eval_accuracy": f"{0.25 + 0.1 * r:.6f}", "train_loss": "" if r == 0 else f"{1.0 / r:.6f}",
             "epsilon": "", "heldout_loss": "nan", "bytes_up": 1000 * r, "round_seconds": f"{2.0 + r:.3f}"}
            for r in range(n)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two jobs of a sweep tracked in MLflow's default local store (one SQLite store, in the
    sweep directory); the resume cases below reuse that store (creating one costs seconds)."""
    root = tmp_path_factory.mktemp("multirun") / "13-10-00"
    for seed in (0, 1):
        cfg = compose(f"{TINY} tracking=mlflow seed={seed}")
        tracker = open_tracker(cfg, root / f"{seed}_fedavg_lora_seed{seed}", root)
        tracker.log_config(cfg.to_dict())
        tracker.log_row(0, _rows(1)[0])
        tracker.close("completed")
    return root


def test_the_jobs_of_a_sweep_are_runs_of_one_mlflow_experiment(sweep: Path) -> None:
    from mlflow.tracking import MlflowClient

    states = [json.loads((sweep / f"{s}_fedavg_lora_seed{s}" / "tracking.json").read_text()) for s in (0, 1)]
    assert {s["tracking_uri"] for s in states} == {f"sqlite:///{sweep / 'mlflow.db'}"}  # one store, in the sweep
    client = MlflowClient(states[0]["tracking_uri"])
    experiment = client.get_experiment_by_name(str(sweep))
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["0_fedavg_lora_seed0", "1_fedavg_lora_seed1"]
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    assert {r.data.tags["fedtune.sweep"] for r in runs} == {str(sweep)}
    assert experiment.artifact_location == (sweep / "mlartifacts").as_uri()


# killed after the tracker got round 2 (MLflow: the Ray run of killed_then_resumed), or before
@pytest.mark.parametrize("name, got_round_2", [("tensorboard", True), ("tensorboard", False), ("mlflow", False)])
def test_a_resume_after_either_kill_window_has_each_round_once(tmp_path: Path, request: pytest.FixtureRequest,
                                                               name: str, got_round_2: bool) -> None:
    """Checkpoint 2 is written, then the tracker gets round 2 (or the kill came first); the
    resumed run replays the kept rows 0-2 and runs round 3: every step exactly once."""
    extra = [f"tracking.uri=sqlite:///{request.getfixturevalue('sweep') / 'mlflow.db'}",
             f"tracking.experiment=resume-{got_round_2}"] if name == "mlflow" else []
    cfg = compose([*TINY.split(), f"tracking={name}", *extra])
    rows = _rows(4)
    killed = open_tracker(cfg, tmp_path)
    killed.log_config(cfg.to_dict())
    for row in rows[:3 if got_round_2 else 2]:
        killed.log_row(row["round"], row)  # never closed: the process was SIGKILLed
    resumed = open_tracker(cfg, tmp_path, resumed_round=2)
    resumed.log_config(cfg.to_dict())
    resumed.replay(rows[:3])
    resumed.log_row(3, rows[3])
    resumed.close("completed")
    expected = _expected([{k: str(v) for k, v in r.items()} for r in rows])
    assert set(expected) == {"eval_accuracy", "train_loss", "bytes_up", "round_seconds"}
    if name == "tensorboard":
        acc = _events(tmp_path / "tensorboard")
        assert set(acc.Tags()["scalars"]) == set(expected) and len(acc.Tensors("config/text_summary")) == 1
        got = {c: [(e.step, e.value) for e in acc.Scalars(c)] for c in expected}
    else:
        from mlflow.tracking import MlflowClient

        state = json.loads((tmp_path / "tracking.json").read_text())
        client = MlflowClient(state["tracking_uri"])
        assert len(client.search_runs([state["experiment_id"]])) == 1
        got = {c: sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], c)) for c in expected}
    for column, cells in expected.items():
        assert [s for s, _ in got[column]] == [s for s, _ in cells], column
        assert [v for _, v in got[column]] == pytest.approx([v for _, v in cells], rel=1e-6), column


# ----------------------------------------------------------------------------- not installed
def test_a_missing_backend_is_one_line_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails, as when not installed
    with pytest.raises(ConfigError) as info:
        check_installed(compose(f"{TINY} tracking=tensorboard"))
    assert str(info.value) == ('tracking=tensorboard needs tensorboard, which is not installed; '
                               'install it with: pip install -e ".[tracking]"')
    check_installed(compose(TINY))  # tracking=none needs nothing


def test_the_cli_refuses_a_missing_backend_before_ray_and_leaves_no_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = "import sys; sys.modules['mlflow'] = None; from fedtune.cli import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, "run", "model=tiny", "dataset=tiny", "tracking=mlflow",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        'fedtune: error: tracking=mlflow needs mlflow-skinny, which is not installed; '
        'install it with: pip install -e ".[tracking]"'], proc.stderr[-3000:]
    assert "Ray" not in proc.stdout + proc.stderr and not run_dir.exists()
