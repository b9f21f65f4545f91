"""Test environment: offline, no telemetry, a private FLWR_HOME, Ray always shut down."""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
if "FLWR_HOME" not in os.environ:  # a private one, removed when the session ends
    os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix="fedtune-flwr-home-")
    atexit.register(shutil.rmtree, os.environ["FLWR_HOME"], True)
os.environ["MPLBACKEND"] = "Agg"

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402


def _absl_writes_to_the_real_stderr() -> None:
    """rouge-score logs through absl, whose handler binds the stderr of the moment it is
    imported and, when logging is reconfigured (Hydra does so in every in-process
    ``fedtune run``), closes that stream unless it is the *current* sys.stderr.  Under pytest
    the stream of the moment is pytest's capture, so a later test closing it would end the
    session: bind absl to the process's real stderr instead."""
    import sys

    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


_absl_writes_to_the_real_stderr()

import pytest  # noqa: E402

from fedtune.runtime.processes import process_table  # noqa: E402

SIMULATION_OVERRIDES = ("model=tiny dataset=tiny federation.num_clients=4 num_rounds=3 seed=3 train.local_steps=8 "
                        "runtime.client_num_cpus=2")  # one client actor: tiny clients train in a second
# Flower's own simulation path: a roll-call to learn the node map, Flower's message loop
# (fedtune's default reads the engine's node map and pumps messages in one pass).
STOCK_ENGINE = "runtime.node_map=rollcall runtime.fast_message_pump=false"
# A Flower release fedtune's use of Flower internals was not checked against: the same path
# as STOCK_ENGINE, taken because of the version (fedtune/runtime/flower_private.py).
OTHER_FLWR = "1.99.0"


def without_control(run_dir: Path) -> list[dict[str, str]]:
    """``metrics.csv`` rows with the roll-call's "control" traffic taken out of the byte
    columns, so a run that held one compares with a run that read the engine's map."""
    import csv
    from collections import Counter

    from fedtune.results.store import read_metrics

    control: Counter[tuple[int, str]] = Counter()  # (round, direction) -> control wire bytes
    for rec in csv.DictReader(open(run_dir / "ledger.csv", newline="")):
        if rec["kind"] == "control":
            control[int(rec["server_round"]), rec["direction"]] += int(rec["wire_bytes"])
    rows, removed = read_metrics(run_dir), 0
    for row in rows:
        for direction in ("up", "down"):
            taken = control[int(row["round"]), direction]
            row[f"bytes_{direction}"] = str(int(row[f"bytes_{direction}"]) - taken)
            removed += taken
        row["cumulative_bytes"] = str(int(row["cumulative_bytes"]) - removed)
    return rows


def load_script(name: str):  # type: ignore[no-untyped-def]
    """``simulations/<name>.py`` as a module (a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", Path(__file__).resolve().parent.parent
                                                  / "simulations" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_study_module():  # type: ignore[no-untyped-def]
    """``simulations/study.py`` as a module."""
    return load_script("study")


def load_study_main():  # type: ignore[no-untyped-def]
    """``main`` of ``simulations/study.py``."""
    return load_study_module().main


def study_args(root: Path) -> list[str]:
    """``simulations/study.py`` arguments for one untuned run of ``SIMULATION_OVERRIDES`` that the
    server SIGKILLs after round 2's checkpoint (``faults.server_kill_round=2``), tracked in
    MLflow (tests/test_tracking.py reads the resumed run back)."""
    extra = [o for o in SIMULATION_OVERRIDES.split() if not o.startswith(("seed=", "num_rounds="))]
    return ["--out", str(root), "--stage", "untuned", "--strategies", "fedavg_lora", "--seeds", "3", "--partitions", "dir0.5",
            "--rounds", "3", "--target", "0.3", *extra, "faults.server_kill_round=2", "tracking=mlflow"]


def live_ray_processes() -> dict[int, str]:
    """The Ray processes (``ray::…`` workers and agents) alive now, zombies and the shared
    cluster's own (:func:`ray_address`) left out: pid -> a description that says what it is
    and where it sits (group, session, parent)."""
    shared = _SHARED_RAY[0].pids() if _SHARED_RAY else set()
    return {p.pid: f"{p.pid} {p.cmdline[:40]!r} state={p.state} pgrp={p.pgrp} session={p.session} ppid={p.ppid}"
            for p in process_table() if p.alive and p.cmdline.startswith("ray::") and p.pid not in shared}


_SHARED_RAY: list = []  # the session's shared cluster, once started


def on_shared_ray(address: str) -> str:
    """Overrides that attach a simulation to the shared cluster (:func:`ray_address`) with one
    client actor: the tiny tests' clients train in a second each, so one process importing
    torch and building the model beats two competing for the same two cores.  The actor is
    warm (``runtime.warm_actors``): the next such run reuses its process and imports."""
    return f"runtime.ray_address={address} runtime.client_num_cpus=2 runtime.warm_actors=true"


def end_warm_actors(address: str) -> None:
    """Before a simulation that does not go through fedtune's ``simulate`` (which does this
    itself): the shared cluster's idle warm actor holds both its CPUs."""
    import ray

    from fedtune.runtime import flower_private

    ray.init(address=address)
    try:
        flower_private.end_warm_actors()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """``runtime.ray_address`` of one 2-CPU Ray cluster on this machine, shared by the suite's
    in-process simulations: each attaches to it (Flower's pool sizes itself from the
    cluster's CPUs, as on a local Ray capped at 2), so Ray starts once per session rather
    than once per run.  The CLI runs and the faults tests keep fedtune's own local Ray."""
    from ray_testing import local_ray_cluster

    with local_ray_cluster([2], (24000, 24010), [24010], object_store_mb=200) as cluster:
        _SHARED_RAY.append(cluster)
        try:
            yield cluster.address
        finally:
            _SHARED_RAY.clear()


@pytest.fixture(scope="session")
def killed_then_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of ``SIMULATION_OVERRIDES`` driven by ``simulations/study.py`` through the
    ``fedtune run`` CLI: the first call's server is SIGKILLed after round 2's checkpoint;
    the second call finds it unfinished and continues it with ``fedtune run resume=…``.
    Shared by the resume tests (tests/test_resume.py), the study tests
    (tests/test_study.py), and as the second same-seed run of :func:`same_seed_runs`."""
    import contextlib
    import csv
    import io
    import json

    from fedtune.results.checkpoint import load_checkpoint

    main, root = load_study_main(), tmp_path_factory.mktemp("study")
    run_dir = root / "dir0.5" / "fedavg_lora" / "seed3"
    calls = []
    for _ in range(2):
        ray_before = live_ray_processes()
        with contextlib.redirect_stdout(io.StringIO()) as out:
            rc = main(study_args(root))
        calls.append({"rc": rc, "stdout": out.getvalue(), "log": (run_dir.parent / "seed3.log").read_text(),
                      "ray_left_behind": [d for pid, d in sorted(live_ray_processes().items()) if pid not in ray_before]})
        if len(calls) == 1:  # the state the kill left behind
            calls[0].update(summary=json.loads((run_dir / "summary.json").read_text()),
                            rounds=[r["round"] for r in csv.DictReader(open(run_dir / "metrics.csv"))],
                            checkpoint_round=load_checkpoint(run_dir)["round"])
    return {"root": root, "dir": run_dir, "killed": calls[0], "resumed": calls[1]}


@pytest.fixture(scope="session")
def same_seed_runs(tmp_path_factory: pytest.TempPathFactory, killed_then_resumed: dict) -> list[Path]:
    """Two real Ray simulations of ``SIMULATION_OVERRIDES`` (same seed): one in this
    process on Flower's own path (roll-call, Flower's message loop, Flower's actor
    shutdown), taken as on a Flower version fedtune's internals were not checked against
    (``OTHER_FLWR``: the public-API fallback of every such feature, its defaults left on),
    one through the CLI on fedtune's defaults, killed after round 2 and resumed in a new
    process (:func:`killed_then_resumed`).  The first is tracked in TensorBoard
    (``tracking=tensorboard`` changes no result; tests/test_tracking.py reads it back).  Shared by the end-to-end tests
    (tests/test_simulation.py, tests/test_every_method_simulation.py) and the resume
    test, so the suite pays for them once."""
    from fedtune.config import compose
    from fedtune.runtime import flower_private
    from fedtune.runtime.simulation import simulate

    run_dir = tmp_path_factory.mktemp("run0")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flower_private, "installed_version", lambda: OTHER_FLWR)
        simulate(compose(f"{SIMULATION_OVERRIDES} tracking=tensorboard"), run_dir)  # read back: test_tracking.py
    return [run_dir, killed_then_resumed["dir"]]


@pytest.fixture(autouse=True)
def _ray_shut_down():
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
