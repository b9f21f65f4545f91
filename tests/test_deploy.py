"""Issue 6: the same app on Flower's deployment engine (SuperLink + SuperNodes) and on a Ray cluster.

Everything listens on 127.0.0.1, on ports in 39500-39999; every process a test starts is
stopped by that test, by PID, with bounded waits.  Deployment rounds are slow (each
message spawns a ``flwr-clientapp`` process that imports torch; the ServerApp polls
every 3 s), so rounds and clients are minimal.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fedtune.config import compose
from fedtune.results.store import METRIC_COLUMNS
from fedtune.runtime.deploy import LocalTrial, stop_process
from fedtune.runtime.simulation import simulate
from fedtune.runtime.workspace import Workspace

pytestmark = pytest.mark.simulation
REPO = Path(__file__).resolve().parent.parent
BASE = "model=tiny dataset=tiny federation.num_clients=3 num_rounds=2 seed=2"
FEDKSEED = "strategy=fedkseed strategy.num_seeds=64 strategy.local_steps=10 strategy.batch_size=4"


def free_port(lo: int, hi: int, span: int = 1) -> int:
    """The first port p in [lo, hi) with p..p+span-1 all free on 127.0.0.1."""
    for port in range(lo, hi - span):
        try:
            for p in range(port, port + span):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {span} free ports in [{lo}, {hi})")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def check_completed(out: Path, proc: subprocess.CompletedProcess | None = None) -> dict:
    """``flwr run`` exits 0 even when the ServerApp fails: judge by summary.json and metrics.csv."""
    logs = "" if proc is None else proc.stdout[-3000:] + proc.stderr[-2000:]
    assert (out / "summary.json").is_file(), logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", (summary, logs)
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == METRIC_COLUMNS
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    return summary


def payloads(run_dir: Path) -> list[tuple[str, ...]]:
    """Per message: (round, partition, direction, kind, payload bytes); wire bytes carry ids that differ."""
    rows = read_csv(run_dir / "ledger.csv")
    return sorted((r["server_round"], r["partition_id"], r["direction"], r["kind"], r["payload_bytes"]) for r in rows)


def assert_all_stopped(trial: LocalTrial) -> None:
    for name, proc in trial.procs.items():
        assert proc.poll() is not None, f"{name} (PID {proc.pid}) still running"


@pytest.mark.deploy
def test_deployment_runs_the_same_app_with_the_same_bytes(tmp_path: Path) -> None:
    trial = LocalTrial(tmp_path / "trial", num_nodes=3, port=free_port(39500, 39700, 5), insecure=True)
    outs = {}
    try:
        with pytest.warns(UserWarning, match="insecure"):
            trial.start(timeout=60)
        for name, extra in (("fedavg_lora", "strategy=fedavg_lora"), ("fedkseed", FEDKSEED)):
            outs[name] = tmp_path / f"deploy-{name}"
            proc = trial.run(f"{BASE} {extra}", outs[name], app_dir=REPO, timeout=400)
            check_completed(outs[name], proc)
    finally:
        trial.stop(timeout=10)
    assert_all_stopped(trial)
    for name, extra in (("fedavg_lora", "strategy=fedavg_lora"), ("fedkseed", FEDKSEED)):
        sim = tmp_path / f"sim-{name}"
        simulate(compose(f"{BASE} {extra}"), sim)
        assert payloads(outs[name]) == payloads(sim), name
        rows = read_csv(outs[name] / "metrics.csv")
        assert [r["num_replies"] for r in rows[1:]] == ["3", "3"]
    # FedAvg-LoRA's payload per client-round is the trainable state, 4 bytes a scalar
    cfg = compose(f"{BASE} strategy=fedavg_lora")
    expected = sum(v.numel() * v.element_size() for v in Workspace(cfg).initial_arrays().values())
    assert json.loads((outs["fedavg_lora"] / "summary.json").read_text())["payload_up_per_client_round"] == expected


@pytest.mark.deploy
def test_tls_and_supernode_authentication(tmp_path: Path) -> None:
    trial = LocalTrial(tmp_path / "trial", num_nodes=3, port=free_port(39700, 39800, 6))
    out = tmp_path / "deploy"
    try:
        trial.start(timeout=60)
        assert trial.creds is not None
        config = (trial.flwr_home / "config.toml").read_text()
        assert "root-certificates" in config and "insecure" not in config
        intruder = trial.start_intruder()  # a valid key nobody registered
        assert intruder.wait(timeout=60) != 0
        log = (trial.dir / "logs" / "intruder.log").read_text()
        assert "Failed to activate SuperNode" in log
        trial.wait_for_nodes(3, timeout=60)
        assert len(trial.online_nodes()) == 3
        proc = trial.run(f"{BASE} strategy=fedavg_lora", out, app_dir=REPO, timeout=400)
    finally:
        trial.stop(timeout=10)
    assert_all_stopped(trial)
    check_completed(out, proc)
    link_log = (trial.dir / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link_log


@pytest.mark.deploy
def test_supernode_killed_mid_run(tmp_path: Path) -> None:
    trial = LocalTrial(tmp_path / "trial", num_nodes=3, port=free_port(39800, 39900, 5), insecure=True)
    out = tmp_path / "deploy"
    overrides = f"{BASE} federation.min_clients=2 federation.round_timeout=60"
    run = None
    try:
        with pytest.warns(UserWarning):
            trial.start(timeout=60)
        trial.wait_for_nodes(3, timeout=60)
        run_config = f"overrides={json.dumps(overrides)} output-dir={json.dumps(str(out))}"
        run = subprocess.Popen(["flwr", "run", str(REPO), trial.federation, "--stream", "--run-config", run_config],
                               env=trial.env, cwd=trial.dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
        deadline = time.monotonic() + 300
        while not ((out / "metrics.csv").is_file() and len(read_csv(out / "metrics.csv")) >= 2):
            assert time.monotonic() < deadline and run.poll() is None, "round 1 did not finish"
            time.sleep(1)
        trial.kill("supernode2")  # SIGKILL, children too: partition 2 vanishes without notice
        stdout, _ = run.communicate(timeout=300)
    finally:
        if run is not None and run.poll() is None:
            stop_process(run.pid)
        trial.stop(timeout=10)
    assert_all_stopped(trial)
    summary = check_completed(out)
    rows = read_csv(out / "metrics.csv")
    assert rows[1]["num_replies"] == "3" and rows[1]["num_failures"] == "0"
    assert rows[2]["num_replies"] == "2" and rows[2]["num_failures"] == "1"
    assert summary["client_failures"] == 1
    assert "1 failed (client 2)" in stdout


def _ray(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _ray_ports(base: int) -> list[str]:
    return ["--node-manager-port", str(base), "--object-manager-port", str(base + 1),
            "--runtime-env-agent-port", str(base + 2), "--dashboard-agent-grpc-port", str(base + 3),
            "--dashboard-agent-listen-port", str(base + 4), "--metrics-export-port", str(base + 5),
            "--min-worker-port", str(base + 10), "--max-worker-port", str(base + 39)]


@pytest.mark.deploy
def test_simulation_on_a_ray_cluster(tmp_path: Path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="ftray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    head = free_port(39900, 39910)
    env = {**os.environ, "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(200 * 2**20),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        _ray(["start", "--head", "--node-ip-address=127.0.0.1", f"--port={head}", "--num-cpus=1", "--num-gpus=0",
              "--include-dashboard=false", f"--ray-client-server-port={head + 1}", f"--temp-dir={temp_dir}",
              "--object-store-memory", str(100 * 2**20), *_ray_ports(39910)], env)
        _ray(["start", f"--address=127.0.0.1:{head}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
              "--object-store-memory", str(100 * 2**20), *_ray_ports(39950)], env)
        cfg = compose(f"{BASE} runtime.ray_address=127.0.0.1:{head} runtime.device=cpu")
        summary = simulate(cfg, tmp_path / "sim")
    finally:
        for proc in psutil.process_iter(["pid", "cmdline"]):  # ours: the temp dir or the head port is in the cmdline
            cmd = " ".join(proc.info["cmdline"] or [])
            if temp_dir in cmd or f"127.0.0.1:{head}" in cmd:
                stop_process(proc.info["pid"], timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert summary["status"] == "completed"
    assert summary["ray_cluster"]["nodes"] == 2 and summary["ray_cluster"]["cpus"] == 2.0
    assert summary["ray_cluster"]["client_actors"] == 2


def test_trial_credentials_and_local_data(tmp_path: Path) -> None:
    """Fast checks of the pieces: certificates, keys, federation entry, a node's own data file."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.app import Context, RecordDict

    from fedtune.data.sources import TINY_FILE
    from fedtune.flower.client_app import workspace_for
    from fedtune.runtime.credentials import make_trial_credentials
    from fedtune.runtime.deploy import write_federation
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
