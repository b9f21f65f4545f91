"""A local deployment trial: one SuperLink and N SuperNodes on Flower's deployment engine.

The simulation and the deployment run the very same ``ServerApp``/``ClientApp``
(``pyproject.toml``'s ``[tool.flwr.app.components]``); only the transport differs.
:class:`LocalTrial` starts the Flower 1.41 binaries as subprocesses, so that a trial on
one machine exercises exactly what participants run on theirs:

* ``flower-superlink`` serves the Fleet, Control and Runtime APIs over one HTTP(S)
  port; ``--disable-runtime-dependency-installation`` because Flower's ``uv sync``
  would otherwise fetch a CUDA torch for every run (feasibility note §2.6).
* ``flower-supernode`` ``i`` gets ``--node-config "partition-id=i num-partitions=N"``
  (its partition of the named dataset) or, with ``data_paths``, also ``data-path=...``
  (its own local file; see :mod:`fedtune.flower.client_app`).  Each SuperNode needs its
  own runtime-API port, here ``port + 1 + i``.
* a federation entry in ``$FLWR_HOME/config.toml`` (1.41 keeps connections there, not
  in ``pyproject.toml``), so ``flwr run . <federation>`` reaches this SuperLink.

Secure by default: TLS plus SuperNode authentication with trial credentials from
:mod:`fedtune.runtime.credentials`; every node's public key is registered with
``flwr supernode register`` before the node starts.  ``insecure=True`` (plain HTTP,
any node may join) must be asked for and logs a warning.

Every process is started in its own session with its log in ``<dir>/logs/`` and its
PID in ``<dir>/pids.json``; :meth:`LocalTrial.stop` ends them (and the children they
spawned: superexec, ``flwr-serverapp``, ``flwr-clientapp``) by PID, with bounded waits.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from fedtune.runtime.credentials import NodeKey, TrialCredentials, make_node_key, make_trial_credentials

FEDERATION = "fedtune-local"
HOST = "127.0.0.1"
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower binaries: this venv's ``bin`` first, a private ``FLWR_HOME``."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def write_federation(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> Path:
    """Add (or replace) the connection ``name`` in ``$FLWR_HOME/config.toml`` and make it the default.

    ``root_certificates=None`` writes ``insecure = true`` (plain HTTP).
    """
    path = Path(flwr_home) / "config.toml"
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    links[name] = entry
    links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def wait_for_port(port: int, proc: subprocess.Popen, log_file: Path, timeout: float) -> None:
    """Return once ``127.0.0.1:port`` accepts connections; fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log_file.stem} exited with code {proc.returncode}: {tail(log_file)}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{log_file.stem} did not listen on {HOST}:{port} within {timeout:.0f} s: {tail(log_file)}")


def tail(log_file: Path, lines: int = 5) -> str:
    text = log_file.read_text(errors="replace") if log_file.is_file() else ""
    return " | ".join(text.strip().splitlines()[-lines:])


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid`` and the children it spawned, SIGKILL what is left after ``timeout``."""
    try:
        proc = psutil.Process(pid)
        family = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


class LocalTrial:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (see the module docstring).

    Parameters
    ----------
    workdir : holds ``flwr-home/``, ``credentials/``, ``logs/`` and ``pids.json``.
    num_nodes : SuperNodes; node ``i`` serves partition ``i`` of ``num_nodes``.
    port : the SuperLink's port; SuperNode ``i`` uses ``port + 1 + i`` for its runtime API.
    insecure : plain HTTP and no SuperNode authentication (warns).
    data_paths : optional per-node local files (``data-path`` node config).
    """

    def __init__(self, workdir: str | Path, num_nodes: int = 3, port: int = 39500, insecure: bool = False,
                 data_paths: list[str] | None = None, federation: str = FEDERATION) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if not 1024 <= port <= 65535 - num_nodes - 8:
            raise ValueError(f"port must leave room for {num_nodes + 8} ports below 65536, got {port}")
        if data_paths is not None and len(data_paths) != num_nodes:
            raise ValueError(f"data_paths: {len(data_paths)} paths for {num_nodes} nodes")
        self.dir = Path(workdir).resolve()
        self.num_nodes, self.port, self.insecure = num_nodes, port, insecure
        self.data_paths, self.federation = data_paths, federation
        self.flwr_home = self.dir / "flwr-home"
        self.env = flower_env(self.flwr_home)
        self.creds: TrialCredentials | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self._extra_ports = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        log_file = self.dir / "logs" / f"{name}.log"
        with open(log_file, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.dir,
                                    start_new_session=True)
        self.procs[name] = proc
        self._record()
        return proc

    def _record(self) -> None:
        pids = {name: p.pid for name, p in self.procs.items()}
        (self.dir / "pids.json").write_text(json.dumps(pids, indent=1))

    def _tls_args(self) -> list[str]:
        return ["--insecure"] if self.creds is None else ["--root-certificates", str(self.creds.ca_cert)]

    def start(self, timeout: float = 60.0) -> "LocalTrial":
        """Start the SuperLink, write the federation, register keys, start the SuperNodes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(exist_ok=True)
        if self.insecure:
            warnings.warn("insecure deployment: plain HTTP and no SuperNode authentication; "
                          "use it only on a trusted network", stacklevel=2)
        else:
            self.creds = make_trial_credentials(self.dir / "credentials", self.num_nodes)
        link = ["flower-superlink", "--host", HOST, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.creds is None:
            link.append("--insecure")
        else:
            link += ["--ssl-ca-certfile", str(self.creds.ca_cert), "--ssl-certfile", str(self.creds.server_cert),
                     "--ssl-keyfile", str(self.creds.server_key), "--enable-supernode-auth"]
        proc = self._spawn("superlink", link)
        wait_for_port(self.port, proc, self.dir / "logs" / "superlink.log", timeout)
        write_federation(self.flwr_home, self.federation, self.address,
                         None if self.creds is None else self.creds.ca_cert)
        for i in range(self.num_nodes):
            key = None
            if self.creds is not None:
                key = self.creds.node_keys[i]
                self.register(key, timeout)
            self.start_supernode(i, key)
        return self

    def register(self, key: NodeKey, timeout: float = 60.0) -> None:
        """``flwr supernode register <key.pub>``: allow the holder of ``key`` to join."""
        cmd = ["flwr", "supernode", "register", str(key.public_key), self.federation]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or "registered" not in done.stdout:
            raise RuntimeError(f"flwr supernode register {key.public_key.name} failed: "
                               f"{(done.stdout + done.stderr).strip()[-500:]}")

    def start_supernode(self, i: int, key: NodeKey | None, name: str | None = None,
                        extra: list[str] = ()) -> subprocess.Popen:
        """Start SuperNode ``i`` (partition ``i``), authenticating with ``key`` when given."""
        name = name or f"supernode{i}"
        config = f"partition-id={i} num-partitions={self.num_nodes}"
        if self.data_paths is not None:
            config += f" data-path={json.dumps(str(self.data_paths[i]))}"
        runtime_port = self.port + 1 + i if name == f"supernode{i}" else self._next_extra_port()
        cmd = ["flower-supernode", "--superlink", self.address, *self._tls_args(), "--host", HOST,
               "--port", str(runtime_port), "--node-config", config, *extra]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key.private_key)]
        return self._spawn(name, cmd)

    def _next_extra_port(self) -> int:
        self._extra_ports += 1
        return self.port + self.num_nodes + self._extra_ports

    def start_intruder(self, name: str = "intruder") -> subprocess.Popen:
        """A SuperNode whose (valid, but unregistered) key must be refused; it gives up after ~10 s."""
        key = make_node_key(self.dir / "credentials", name)
        return self.start_supernode(0, key, name=name, extra=["--max-retries", "2", "--max-wait-time", "10"])

    def online_nodes(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """``flwr supernode list --format json``: the nodes the SuperLink knows, with their status."""
        done = subprocess.run(["flwr", "supernode", "list", self.federation, "--format", "json"], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        try:
            nodes = json.loads(done.stdout).get("nodes", [])
        except json.JSONDecodeError:
            raise RuntimeError(f"flwr supernode list failed: {(done.stdout + done.stderr).strip()[-500:]}") from None
        return [n for n in nodes if str(n.get("status", "")).lower() == "online"]

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> None:
        """Bounded wait until ``count`` SuperNodes are online."""
        deadline = time.monotonic() + timeout
        while len(self.online_nodes()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout:.0f} s")
            time.sleep(1.0)

    def run(self, overrides: str, output_dir: str | Path, app_dir: str | Path = ".",
            timeout: float = 600.0) -> subprocess.CompletedProcess:
        """``flwr run <app_dir> <federation> --stream`` with the given Hydra overrides.

        ``flwr run`` exits 0 even when the ServerApp fails: read ``summary.json``'s status.
        """
        run_config = f"overrides={json.dumps(overrides)} output-dir={json.dumps(str(Path(output_dir).resolve()))}"
        cmd = ["flwr", "run", str(Path(app_dir).resolve()), self.federation, "--stream", "--run-config", run_config]
        return subprocess.run(cmd, env=self.env, cwd=self.dir, capture_output=True, text=True, timeout=timeout)

    def kill(self, name: str) -> None:
        """SIGKILL one process (and its children): a participant vanishing without notice."""
        proc = self.procs[name]
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in family:
            p.kill()
        psutil.wait_procs(family, timeout=10)
        proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process this trial started (SuperNodes first), by PID, bounded."""
        for name in reversed(list(self.procs)):
            stop_process(self.procs[name].pid, timeout)
            try:
                self.procs[name].wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "LocalTrial":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shell_commands(trial: LocalTrial) -> str:
    """The equivalent shell commands (for the README and ``fedtune deploy start``'s output)."""
    lines = [shlex.join(p.args) for p in trial.procs.values()]  # type: ignore[arg-type]
    return "\n".join(lines)
