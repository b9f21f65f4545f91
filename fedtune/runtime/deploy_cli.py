"""``fedtune deploy``: a local deployment trial from the shell.

    fedtune deploy start --dir trial/ [--nodes 3] [--port 39500] [--insecure] [--warm] [--data-path F ...]
    fedtune deploy stop --dir trial/
    fedtune deploy certs --dir creds/ [--nodes 3] [--host superlink.example.org ...]

``start`` leaves the SuperLink and SuperNodes running (PIDs in ``trial/pids.json``, logs
in ``trial/logs/``) and prints the ``flwr run`` command; ``stop`` ends them by those
PIDs.  ``certs`` only writes credentials, for SuperLinks and SuperNodes on other machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from fedtune.runtime.credentials import DEFAULT_HOSTS, make_trial_credentials
from fedtune.runtime.deploy import LocalTrial
from fedtune.runtime.flower_home import FEDERATION
from fedtune.runtime.processes import read_process, stop_process

TRIAL_COMMANDS = ("flower-superlink", "flower-supernode", "fedtune.runtime.warm_superexec")


def _start(args: argparse.Namespace) -> None:
    trial = LocalTrial(args.dir, num_nodes=args.nodes, port=args.port, insecure=args.insecure,
                       data_paths=args.data_path, federation=args.federation, warm=args.warm)
    try:
        trial.start(timeout=args.timeout)
        trial.wait_for_nodes(args.nodes, timeout=args.timeout)
    except BaseException:
        trial.stop()
        raise
    pids = ", ".join(f"{name} {p.pid}" for name, p in trial.procs.items())
    mode = "insecure" if args.insecure else "TLS + SuperNode authentication"
    print(f"fedtune: {args.nodes} SuperNodes online at {trial.address} ({mode}); PIDs: {pids}; "
          f"logs in {trial.dir / 'logs'}")
    overrides = f"model=tiny dataset=tiny federation.num_clients={args.nodes} num_rounds=2"
    run_config = shlex.quote(f'overrides={json.dumps(overrides)} output-dir="runs/deploy"')
    home = shlex.quote(str(trial.flwr_home))
    print("fedtune: run the app with:\n"
          f"  FLWR_HOME={home} FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \\\n"
          f"  flwr run . {args.federation} --stream --run-config {run_config}\n"
          f"fedtune: stop with: fedtune deploy stop --dir {shlex.quote(str(trial.dir))}")


def _stop(args: argparse.Namespace) -> None:
    pid_file = Path(args.dir) / "pids.json"
    if not pid_file.is_file():
        raise FileNotFoundError(f"--dir: no pids.json in {args.dir} (was the trial started there?)")
    for name, pid in reversed(list(json.loads(pid_file.read_text()).items())):
        row = read_process(pid)
        if row is None or not row.alive:
            continue
        if not any(b in row.cmdline for b in TRIAL_COMMANDS):  # the PID was reused by something else
            print(f"fedtune: {name} (PID {pid}) is no longer a Flower process; left alone", file=sys.stderr)
            continue
        stop_process(pid, timeout_s=args.timeout)
        print(f"fedtune: stopped {name} (PID {pid})")
    os.replace(pid_file, pid_file.with_suffix(".json.stopped"))


def _certs(args: argparse.Namespace) -> None:
    creds = make_trial_credentials(args.dir, args.nodes, tuple(args.host) if args.host else DEFAULT_HOSTS)
    print(f"fedtune: CA {creds.ca_cert}; SuperLink certificate {creds.server_cert} and key {creds.server_key}")
    for key in creds.node_keys:
        print(f"fedtune: SuperNode key {key.private_key} (register {key.public_key} with "
              "`flwr supernode register`)")


def main(argv: list[str]) -> None:
    """Parse ``fedtune deploy ...`` and run it; errors are one line (``ValueError`` and friends)."""
    parser = argparse.ArgumentParser(prog="fedtune deploy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a SuperLink and SuperNodes on 127.0.0.1")
    start.add_argument("--dir", type=Path, required=True, help="trial directory (credentials, logs, pids.json)")
    start.add_argument("--nodes", type=int, default=3, help="number of SuperNodes (partitions)")
    start.add_argument("--port", type=int, default=39500, help="SuperLink port; SuperNode i uses port+1+i")
    start.add_argument("--insecure", action="store_true", help="plain HTTP, no SuperNode authentication")
    start.add_argument("--warm", action="store_true",
                       help="--isolation process + one preloaded SuperExec that forks each app process "
                            "(fedtune.runtime.warm_superexec) instead of Flower's, which imports torch per message")
    start.add_argument("--data-path", nargs="+", default=None, help="one local data file per SuperNode")
    start.add_argument("--federation", default=FEDERATION, help="connection name in $FLWR_HOME/config.toml")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the processes")
    stop = sub.add_parser("stop", help="stop a trial started with `fedtune deploy start`")
    stop.add_argument("--dir", type=Path, required=True)
    stop.add_argument("--timeout", type=float, default=10.0)
    certs = sub.add_parser("certs", help="write a CA, a SuperLink certificate and SuperNode keys")
    certs.add_argument("--dir", type=Path, required=True)
    certs.add_argument("--nodes", type=int, default=3)
    certs.add_argument("--host", nargs="+", default=None, help="SuperLink host names/IPs (default: localhost)")
    args = parser.parse_args(argv)
    {"start": _start, "stop": _stop, "certs": _certs}[args.command](args)
