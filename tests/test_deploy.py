"""Issue 6: the same app on Flower's deployment engine (SuperLink + SuperNodes) and on a Ray cluster.

Everything listens on 127.0.0.1, on ports in 23500-23999 (below Linux's ephemeral range,
so no outgoing connection can hold one); every process the module starts is stopped by
its fixtures, by PID, with bounded waits.

To fit CI (2 cores), the module shares one secured federation (TLS + SuperNode
authentication; 3 SuperNodes served by one warm SuperExec,
:mod:`fedtune.runtime.warm_superexec`) and one local Ray cluster (a head and one more
node).  :func:`scenarios` runs the deployment scenarios in an order that overlaps waiting
with work (see there); each test then checks one scenario:

* an unregistered SuperNode is refused (it tries while the federation comes up);
* FedAvg-LoRA and FedKSeed on the federation carry the simulation's bytes;
* the simulations, attached to the Ray cluster by address, completed on both nodes;
* a SuperNode SIGKILLed mid-run: the round completes without it, and the run names it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray_testing import RayCluster, free_port, local_ray_cluster

from fedtune.config import compose
from fedtune.results.store import METRIC_COLUMNS
from fedtune.runtime.credentials import make_node_key
from fedtune.runtime.deploy import LocalTrial
from fedtune.runtime.flower_home import app_snapshot
from fedtune.runtime.processes import stop_process
from fedtune.runtime.simulation import simulate
from fedtune.runtime.workspace import Workspace

pytestmark = pytest.mark.simulation
REPO = Path(__file__).resolve().parent.parent
BASE = "model=tiny dataset=tiny federation.num_clients=3 num_rounds=2 seed=2"
METHODS = {"fedavg_lora": "strategy=fedavg_lora",
           "fedkseed": "strategy=fedkseed strategy.num_seeds=64 strategy.local_steps=10 strategy.batch_size=4"}
RUN_TIMEOUT = 400.0  # seconds for one `flwr run` (CI under load); an idle 2-core box needs < 60


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def check_completed(out: Path, logs: str = "") -> dict:
    """``flwr run`` exits 0 even when the ServerApp fails: judge by summary.json and metrics.csv."""
    assert (out / "summary.json").is_file(), logs[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", (summary, logs[-4000:])
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == METRIC_COLUMNS
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    return summary


def payloads(run_dir: Path) -> list[tuple[str, ...]]:
    """Per method message: (round, partition, direction, kind, payload bytes); wire bytes
    carry ids that differ.  The roll-call ("control") is left out: a deployment holds one,
    a ``fedtune run`` simulation reads the engine's node map instead."""
    rows = read_csv(run_dir / "ledger.csv")
    return sorted((r["server_round"], r["partition_id"], r["direction"], r["kind"], r["payload_bytes"])
                  for r in rows if r["kind"] != "control")


def rollcall(run_dir: Path) -> list[tuple[str, ...]]:
    """The roll-call's messages: (round, partition, direction, payload bytes)."""
    return sorted((r["server_round"], r["partition_id"], r["direction"], r["payload_bytes"])
                  for r in read_csv(run_dir / "ledger.csv") if r["kind"] == "control")


def wait_for(proc: subprocess.Popen, timeout: float) -> int:
    """Bounded wait for a process this module started; stopped (by PID) when time runs out."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc.pid)
        raise


def start_intruder(trial: LocalTrial, name: str = "intruder", max_wait: float = 10.0) -> subprocess.Popen:
    """A SuperNode of ``trial`` whose (valid, but unregistered) key must be refused; it gives
    up after ``max_wait`` seconds.  It never runs an app, so it gets no SuperExec."""
    key = make_node_key(trial.dir / "credentials", name)
    extra = ["--max-retries", "2", "--max-wait-time", f"{max_wait:g}", "--isolation", "process"]
    return trial.start_supernode(0, key, name=name, extra=extra)


# ---------------------------------------------------------------------------------------- fixtures
@dataclass
class Federation:
    """The module's secured federation and the unregistered SuperNode started beside it."""

    trial: LocalTrial
    intruder: subprocess.Popen


@pytest.fixture(scope="module")
def federation(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A SuperLink and 3 SuperNodes with TLS and SuperNode authentication (the default mode).

    Started after the Ray cluster: ``ray start`` gives a node 30 s to register, which a
    busy 2-core machine (the federation's app processes importing torch) can miss.
    """
    trial = LocalTrial(tmp_path_factory.mktemp("deploy") / "trial", num_nodes=3, port=free_port(23500, 23700, 6),
                       warm=True)
    try:
        trial.start(timeout=120)
        intruder = start_intruder(trial, max_wait=5)  # a valid key nobody registered
        trial.wait_for_nodes(3, timeout=180)
        yield Federation(trial, intruder)
    finally:
        trial.stop(timeout=10)
    for name, proc in trial.procs.items():
        assert proc.poll() is not None, f"{name} (PID {proc.pid}) still running"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A Ray head and one more Ray node on this machine, 1 CPU each."""
    with local_ray_cluster([1, 1], (23900, 23910), [23910, 23950]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app's FAB files, copied out of the repository (``flwr run`` would walk ``.venv/`` too)."""
    return app_snapshot(REPO, tmp_path_factory.mktemp("app"))


@dataclass
class Outcomes:
    """What :func:`scenarios` produced: run directories, and the kill run's round timeout."""

    runs: dict[str, Path]  # FedAvg-LoRA and FedKSeed on the federation
    sims: dict[str, Path]  # the same configs simulated on the Ray cluster
    killed: Path  # the run during which SuperNode 2 was SIGKILLed
    killed_log: str  # its `flwr run --stream` output
    round_timeout: float


def kill_after_round_1(trial: LocalTrial, name: str, out: Path, run: subprocess.Popen, timeout: float) -> None:
    """SIGKILL SuperNode ``name`` (children and SuperExec loop too) as soon as run directory
    ``out`` holds round 1's metrics row; fail if the run ends or time runs out first."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.csv"
    while not (metrics.is_file() and len(read_csv(metrics)) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, \
            f"round 1 did not finish: {trial.log('run-killed')[-3000:]}"
        time.sleep(0.5)
    trial.kill(name)


@pytest.fixture(scope="module")
def scenarios(federation: Federation, ray_cluster: RayCluster, app: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Outcomes:
    """Every deployment scenario on the one federation, scheduled so that waiting overlaps work.

    1. FedAvg-LoRA and FedKSeed, both at once, while FedAvg-LoRA is simulated on the cluster;
    2. then (it takes SuperNode 2 down) a FedAvg-LoRA run whose SuperNode 2 is SIGKILLed
       after round 1; FedKSeed is simulated while its round 2 waits for the vanished node.

    The kill run's ``federation.round_timeout`` adapts to this machine: 1.5 x the slowest
    round 2 of phase 1 (3 clients, two runs and a simulation at once; here 2 clients, one
    run and a simulation), at least 25 s.  Round 2 may also end earlier: the SuperLink
    declares a node gone after 2 x 30 s without a heartbeat.
    """
    trial, out = federation.trial, tmp_path_factory.mktemp("scenarios")
    runs = {name: out / f"deploy-{name}" for name in METHODS}
    sims = {name: out / f"sim-{name}" for name in METHODS}

    def simulate_on_cluster(name: str) -> None:
        cfg = compose(f"{BASE} {METHODS[name]} runtime.ray_address={ray_cluster.address} runtime.device=cpu")
        simulate(cfg, sims[name])

    for name, extra in METHODS.items():
        trial.start_run(f"{BASE} {extra}", runs[name], app_dir=app, name=f"run-{name}")
    simulate_on_cluster("fedavg_lora")
    for name in METHODS:
        wait_for(trial.procs[f"run-{name}"], RUN_TIMEOUT)

    # round 1 also holds the roll-call: round 2 is one message round trip, as the survivors' is
    slowest = max([float(r["round_seconds"]) for run in runs.values() if (run / "metrics.csv").is_file()
                   for r in read_csv(run / "metrics.csv")[2:]], default=RUN_TIMEOUT / 4)
    round_timeout = min(max(25.0, 1.5 * slowest), 90.0)
    killed = out / "deploy-killed"
    run = trial.start_run(f"{BASE} federation.min_clients=2 federation.round_timeout={round_timeout:.0f}", killed,
                          app_dir=app, name="run-killed")
    kill_after_round_1(trial, "supernode2", killed, run, RUN_TIMEOUT)  # partition 2 vanishes without notice
    simulate_on_cluster("fedkseed")  # while round 2 waits for the vanished node
    wait_for(run, RUN_TIMEOUT)
    return Outcomes(runs, sims, killed, trial.log("run-killed"), round_timeout)


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.deploy
def test_unregistered_supernode_is_refused(federation: Federation) -> None:
    trial = federation.trial
    assert trial.creds is not None and not trial.insecure  # secure unless asked otherwise
    config = (trial.flwr_home / "config.toml").read_text()
    assert "root-certificates" in config and "insecure" not in config
    assert wait_for(federation.intruder, 60) != 0
    assert "Failed to activate SuperNode" in trial.log("intruder")
    assert "No SuperNode found with the given public key" in trial.log("superlink")
    assert len(trial.online_nodes()) == 3  # the registered ones, not the intruder


@pytest.mark.deploy
def test_deployment_runs_the_same_app_with_the_same_bytes(federation: Federation, scenarios: Outcomes) -> None:
    """FedAvg-LoRA and a seed-based method over TLS + authentication: every message carries
    exactly the payload it carries in simulation."""
    for name, out in scenarios.runs.items():
        check_completed(out, federation.trial.log(f"run-{name}"))
        rows = read_csv(out / "metrics.csv")
        assert [r["num_replies"] for r in rows[1:]] == ["3", "3"], name
        assert [r["num_failures"] for r in rows[1:]] == ["0", "0"], name
        assert payloads(out) == payloads(scenarios.sims[name]), name
        assert rollcall(out) == [("1", str(p), d, "0") for p in range(3) for d in ("down", "up")], name
        assert rollcall(scenarios.sims[name]) == [], name
    # FedAvg-LoRA's payload per client-round is the trainable state, 4 bytes a scalar
    expected = sum(v.numel() * v.element_size()
                   for v in Workspace(compose(f"{BASE} strategy=fedavg_lora")).initial_arrays().values())
    summary = json.loads((scenarios.runs["fedavg_lora"] / "summary.json").read_text())
    assert summary["payload_up_per_client_round"] == expected


@pytest.mark.deploy
def test_simulation_on_a_ray_cluster(scenarios: Outcomes) -> None:
    """The reference simulations ran attached by address to a local Ray head + one more Ray node."""
    for sim in scenarios.sims.values():
        summary = json.loads((sim / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["ray_cluster"]["nodes"] == 2 and summary["ray_cluster"]["cpus"] == 2.0
        assert summary["ray_cluster"]["client_actors"] == 2


@pytest.mark.deploy
def test_supernode_killed_mid_run(scenarios: Outcomes) -> None:
    """SuperNode 2 (and its SuperExec) SIGKILLed once round 1 was in: round 2 completes with
    the 2 others (min_clients=2), and the run names the failed client."""
    summary = check_completed(scenarios.killed, scenarios.killed_log)
    rows = read_csv(scenarios.killed / "metrics.csv")
    assert rows[1]["num_replies"] == "3" and rows[1]["num_failures"] == "0"
    assert rows[2]["num_replies"] == "2" and rows[2]["num_failures"] == "1", scenarios.round_timeout
    assert rows[2]["failed_clients"] == "2"
    assert summary["client_failures"] == 1
    assert [(f["round"], f["client"]) for f in summary["failures"]] == [(2, 2)]
    assert "1 failed (client 2)" in scenarios.killed_log


def test_trial_credentials_and_local_data(tmp_path: Path) -> None:
    """Fast checks of the pieces: certificates, keys, federation entry, a node's own data file."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.app import Context, RecordDict

    from fedtune.data.sources import TINY_FILE
    from fedtune.flower.client_app import workspace_for
    from fedtune.runtime.credentials import make_trial_credentials
    from fedtune.runtime.flower_home import write_federation
    from fedtune.runtime.workspace import LocalDataWorkspace

    creds = make_trial_credentials(tmp_path / "creds", 2)
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert isinstance(load_ssh_private_key(creds.node_keys[1].private_key.read_bytes(), None),
                      ec.EllipticCurvePrivateKey)
    write_federation(tmp_path / "home", "f", "127.0.0.1:39999", creds.ca_cert)
    assert 'default = "f"' in (tmp_path / "home" / "config.toml").read_text()

    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(TINY_FILE.read_text().splitlines(keepends=True)[:100]))
    cfg = compose("model=tiny dataset=tiny federation.num_clients=3")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 2, "data-path": str(mine)},
                      state=RecordDict(), run_config={})
    ws = workspace_for(cfg, context)
    assert isinstance(ws, LocalDataWorkspace) and ws.cfg.dataset.path == str(mine)
    assert ws.partitions()[2] == list(range(len(ws.data.train))) and len(ws.data.train) == 80
    named = Context(run_id=1, node_id=1, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    assert type(workspace_for(cfg, named)) is Workspace
    with pytest.raises(ValueError, match="data-path"):
        workspace_for(compose("model=tiny dataset=bbc_news"), context)


def test_warm_superexec_starts_tasks_as_flower_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The warm SuperExec's children get the arguments Flower's own SuperExec would give
    ``flwr-clientapp``/``flwr-serverapp``, and its targets file round-trips (fast, no processes)."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, SubprocessExecutor

    from fedtune.runtime import flower_private, warm_superexec

    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: started.append(list(args)))
    for task_type, insecure, ca in ((TaskType.CLIENT_APP, True, None), (TaskType.SERVER_APP, False, "/ca.crt")):
        spec = ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:9094", token="t0k", insecure=insecure,
                             root_certificates_path=ca, runtime_dependency_install=False, parent_pid=42,
                             suppress_output=False, task_id=7)
        SubprocessExecutor().launch(spec)
        assert started[-1][1:] == flower_private.task_arguments(spec)
        assert started[-1][0] == flower_private.task_command(spec) in flower_private.task_entry_points()
    targets = [warm_superexec.Target("supernode0", "127.0.0.1:9094", None, 42),
               warm_superexec.Target("superlink", "127.0.0.1:9093", "/ca.crt", 41)]
    (tmp_path / "t.json").write_text(json.dumps([t.__dict__ for t in targets]))
    assert warm_superexec.read_targets(tmp_path / "t.json") == targets
    assert warm_superexec.is_running(os.getpid()) and not warm_superexec.is_running(2**22 + 1)
