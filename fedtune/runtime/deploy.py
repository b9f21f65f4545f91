"""A local deployment trial: one SuperLink and N SuperNodes on Flower's deployment engine.

The simulation and the deployment run the very same ``ServerApp``/``ClientApp``
(``pyproject.toml``'s ``[tool.flwr.app.components]``); only the transport differs.
:class:`LocalTrial` starts the Flower 1.41 binaries as subprocesses, so that a trial on
one machine exercises exactly what participants run on theirs:

* ``flower-superlink`` serves the Fleet, Control and Runtime APIs over one HTTP(S)
  port; ``--disable-runtime-dependency-installation`` because Flower's ``uv sync``
  would otherwise fetch a CUDA torch for every run.
* ``flower-supernode`` ``i`` gets ``--node-config "partition-id=i num-partitions=N"``
  (its partition of the named dataset) or, with ``data_paths``, also ``data-path=...``
  (its own local file; see :mod:`fedtune.flower.client_app`).  Each SuperNode needs its
  own runtime-API port, here ``port + 1 + i``.
* a federation entry in ``$FLWR_HOME/config.toml``
  (:func:`~fedtune.runtime.flower_home.write_federation`), so ``flwr run . <federation>``
  reaches this SuperLink.
* ``warm=True``: the SuperLink and SuperNodes run with ``--isolation process`` and one
  :mod:`fedtune.runtime.warm_superexec` serves them all, forking each app process from
  a parent that imported torch once (Flower's own SuperExec starts a fresh interpreter
  per message, whose imports cost more than the work on a small model).

Secure by default: TLS plus SuperNode authentication with trial credentials from
:mod:`fedtune.runtime.credentials`; every node's public key is registered with
``flwr supernode register`` before the node starts.  ``insecure=True`` (plain HTTP,
any node may join) must be asked for and logs a warning.

Every process is started in its own session with its log in ``<dir>/logs/`` and its
PID in ``<dir>/pids.json``; :meth:`LocalTrial.stop` ends them (and the children they
spawned: superexec, ``flwr-serverapp``, ``flwr-clientapp``) by PID, with bounded waits
(:func:`fedtune.runtime.processes.stop_processes`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from fedtune.runtime.credentials import NodeKey, TrialCredentials, make_trial_credentials
from fedtune.runtime.flower_home import FEDERATION, flower_env, write_federation
from fedtune.runtime.flower_private import WARM_SUPEREXEC, usable
from fedtune.runtime.processes import kill_processes, stop_process

HOST = "127.0.0.1"


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


class LocalTrial:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (see the module docstring).

    Parameters
    ----------
    workdir : holds ``flwr-home/``, ``credentials/``, ``logs/`` and ``pids.json``.
    num_nodes : SuperNodes; node ``i`` serves partition ``i`` of ``num_nodes``.
    port : the SuperLink's port; SuperNode ``i`` uses ``port + 1 + i`` for its runtime API.
    insecure : plain HTTP and no SuperNode authentication (warns).
    data_paths : optional per-node local files (``data-path`` node config).
    warm : run the SuperLink and SuperNodes with ``--isolation process`` and serve them all
        from one :mod:`fedtune.runtime.warm_superexec` (process ``superexec``): apps start
        by forking a preloaded process instead of importing torch for every message.
        ``False``, or a Flower version the warm SuperExec was not checked against (said in
        one line): each gets Flower's own SuperExec.
    """

    def __init__(self, workdir: str | Path, num_nodes: int = 3, port: int = 39500, insecure: bool = False,
                 data_paths: list[str] | None = None, federation: str = FEDERATION, warm: bool = False) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if not 1024 <= port <= 65535 - num_nodes - 8:
            raise ValueError(f"port must leave room for {num_nodes + 8} ports below 65536, got {port}")
        if data_paths is not None and len(data_paths) != num_nodes:
            raise ValueError(f"data_paths: {len(data_paths)} paths for {num_nodes} nodes")
        self.dir = Path(workdir).resolve()
        self.num_nodes, self.port, self.insecure = num_nodes, port, insecure
        self.data_paths, self.federation = data_paths, federation
        self.warm = warm and usable(WARM_SUPEREXEC)
        self.flwr_home = self.dir / "flwr-home"
        self.env = flower_env(self.flwr_home)
        self.creds: TrialCredentials | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self._extra_ports = 0
        self._runtime_apis: dict[str, str] = {}
        self._targets_written = False

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
        if self.warm:
            link += ["--isolation", "process"]
            self._start_superexec()  # it preloads while the rest starts, then reads its targets
        proc = self._spawn("superlink", link)
        wait_for_port(self.port, proc, self.dir / "logs" / "superlink.log", timeout)
        write_federation(self.flwr_home, self.federation, self.address,
                         None if self.creds is None else self.creds.ca_cert)
        if self.creds is not None:
            self.register(list(self.creds.node_keys), timeout)
        for i in range(self.num_nodes):
            self.start_supernode(i, None if self.creds is None else self.creds.node_keys[i])
        if self.warm:
            self._write_superexec_targets()
        return self

    def register(self, keys: NodeKey | list[NodeKey], timeout: float = 60.0) -> None:
        """``flwr supernode register <key.pub>`` for each key (all at once): allow their holders to join."""
        keys = [keys] if isinstance(keys, NodeKey) else keys
        calls = [(key, subprocess.Popen(["flwr", "supernode", "register", str(key.public_key), self.federation],
                                        env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                 for key in keys]
        for key, call in calls:
            try:
                out, _ = call.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                call.kill()
                out, _ = call.communicate()
            if call.returncode != 0 or "registered" not in out:
                raise RuntimeError(f"flwr supernode register {key.public_key.name} failed: {out.strip()[-500:]}")

    def start_supernode(self, i: int, key: NodeKey | None, name: str | None = None,
                        extra: list[str] = ()) -> subprocess.Popen:
        """Start SuperNode ``i`` (partition ``i``), authenticating with ``key`` when given.

        In a warm trial the nodes started by :meth:`start` are served by the warm SuperExec;
        a node started later gets Flower's own (unless ``extra`` says otherwise).
        """
        warm = self.warm and not self._targets_written
        name = name or f"supernode{i}"
        config = f"partition-id={i} num-partitions={self.num_nodes}"
        if self.data_paths is not None:
            config += f" data-path={json.dumps(str(self.data_paths[i]))}"
        runtime_port = self.port + 1 + i if name == f"supernode{i}" else self._next_extra_port()
        cmd = ["flower-supernode", "--superlink", self.address, *self._tls_args(), "--host", HOST,
               "--port", str(runtime_port), "--node-config", config, *extra]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key.private_key)]
        if warm:
            cmd += ["--isolation", "process"]
            self._runtime_apis[name] = f"{HOST}:{runtime_port}"
        return self._spawn(name, cmd)

    def _start_superexec(self) -> subprocess.Popen:
        """One :mod:`fedtune.runtime.warm_superexec` (process ``superexec``) that will serve the
        SuperLink's and every warm SuperNode's Runtime API from one preload (its targets file is
        written once they run: :meth:`_write_superexec_targets`); each loop ends with its node."""
        targets = self.dir / "superexec-targets.json"
        targets.unlink(missing_ok=True)
        return self._spawn("superexec", [sys.executable, "-m", "fedtune.runtime.warm_superexec", "--targets",
                                         str(targets), "--pids-file", str(self.dir / "superexec-pids.json")])

    def _write_superexec_targets(self) -> None:
        ca = None if self.creds is None else str(self.creds.ca_cert)
        targets = [{"name": "superlink", "runtime_api_address": self.address, "root_certificates": ca,
                    "parent_pid": self.procs["superlink"].pid}]
        targets += [{"name": name, "runtime_api_address": address, "root_certificates": None,  # plain HTTP
                     "parent_pid": self.procs[name].pid} for name, address in self._runtime_apis.items()]
        path = self.dir / "superexec-targets.json"
        path.with_suffix(".tmp").write_text(json.dumps(targets, indent=1))
        os.replace(path.with_suffix(".tmp"), path)
        self._targets_written = True

    def superexec_loop(self, name: str) -> int | None:
        """PID of the warm SuperExec loop serving process ``name`` (None: not warm, or not up yet)."""
        path = self.dir / "superexec-pids.json"
        return json.loads(path.read_text()).get(name) if path.is_file() else None

    def _next_extra_port(self) -> int:
        self._extra_ports += 1
        return self.port + self.num_nodes + self._extra_ports

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
        """Bounded wait until ``count`` SuperNodes are online.

        The logs are watched first (a node logs its ID once the SuperLink accepted it), so
        that ``flwr supernode list``, a CLI start each time, runs only to confirm.
        """
        deadline = time.monotonic() + timeout
        nodes = [n for n in self.procs if n.startswith("supernode")]
        while sum("SuperNode ID:" in self.log(n) for n in nodes) < count:
            for name in nodes:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with code {self.procs[name].returncode}: "
                                       f"{tail(self.dir / 'logs' / f'{name}.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} SuperNodes accepted after {timeout:.0f} s")
            time.sleep(0.2)
        while len(self.online_nodes()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout:.0f} s")
            time.sleep(1.0)

    def run_command(self, overrides: str, output_dir: str | Path, app_dir: str | Path = ".") -> list[str]:
        """``flwr run <app_dir> <federation> --stream`` with the given Hydra overrides."""
        run_config = f"overrides={json.dumps(overrides)} output-dir={json.dumps(str(Path(output_dir).resolve()))}"
        return ["flwr", "run", str(Path(app_dir).resolve()), self.federation, "--stream", "--run-config", run_config]

    def run(self, overrides: str, output_dir: str | Path, app_dir: str | Path = ".",
            timeout: float = 600.0) -> subprocess.CompletedProcess:
        """Run the app on this federation and wait (bounded) for ``flwr run`` to return.

        ``flwr run`` exits 0 even when the ServerApp fails: read ``summary.json``'s status.
        """
        cmd = self.run_command(overrides, output_dir, app_dir)
        return subprocess.run(cmd, env=self.env, cwd=self.dir, capture_output=True, text=True, timeout=timeout)

    def start_run(self, overrides: str, output_dir: str | Path, app_dir: str | Path = ".",
                  name: str = "run") -> subprocess.Popen:
        """Like :meth:`run`, without waiting: ``flwr run`` becomes process ``name`` of this trial
        (stdout and stderr in ``logs/<name>.log``; stopped by :meth:`stop` if still running)."""
        return self._spawn(name, self.run_command(overrides, output_dir, app_dir))

    def log(self, name: str) -> str:
        """The output of process ``name`` so far."""
        path = self.dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def kill(self, name: str) -> None:
        """SIGKILL one process, its children and its warm SuperExec loop: a participant
        vanishing without notice."""
        roots = [self.procs[name].pid]
        if (loop := self.superexec_loop(name)) is not None:
            roots.append(loop)
        kill_processes(roots, timeout_s=10)
        self.procs[name].wait(timeout=10)

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

