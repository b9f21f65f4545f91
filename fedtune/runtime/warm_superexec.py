"""A warm SuperExec: import the heavy libraries once, fork a fresh process per Flower task.

Flower runs every ``ClientApp`` message (and every ``ServerApp`` run) in a process of its
own, started by a SuperExec with ``subprocess.Popen`` (``flwr-clientapp --token ...``).
Each such process imports torch, transformers, peft and flwr-datasets again, and tears
the interpreter down at the end: about 10 CPU seconds, against ~3 for the work of a
tiny-model training message (measured on the 2-core CI box).

This SuperExec is Flower's own loop (``run_superexec``: acquire a task from the
Runtime API, launch it, reconcile) with one difference: the launcher.  The parent
imports the libraries once, and each task runs in a child made with ``os.fork()``
that calls the very entry point the ``flwr-clientapp`` / ``flwr-serverapp`` console
scripts call, with the same arguments, then leaves with ``os._exit``.  A task still gets
a fresh process (nothing is shared between messages but already-imported library code),
talks to the SuperNode/SuperLink through the same Runtime API, and loads the app from
its FAB.  The app itself (``fedtune``) is *not* preloaded (the child even forgets this
launcher's own package), so the FAB's code is what runs.

Use it with ``--isolation process`` on ``flower-supernode`` (or ``flower-superlink``)::

    flower-supernode ... --isolation process --port 9094
    python -m fedtune.runtime.warm_superexec --runtime-api-address 127.0.0.1:9094 --insecure

or, for several nodes on one machine from one preload (what ``LocalTrial(warm=True)``
does), ``--targets targets.json``: one loop per Runtime API, forked after the preload.

POSIX only (``fork``).  The parent never runs a torch operation, so no thread pool
exists when it forks.  Flower's loop, its executor protocol and its task arguments are
internals (:mod:`fedtune.runtime.flower_private`): on another Flower version this
SuperExec refuses to start, and :class:`~fedtune.runtime.deploy.LocalTrial` uses Flower's own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from fedtune.runtime.flower_private import (WARM_SUPEREXEC, forget_exit_handlers, launch_accepted, notice,
                                            run_superexec_loop, subprocess_executor, task_arguments, task_command,
                                            task_entry_points, usable)
from fedtune.runtime.processes import is_running, signal_if_alive

PRELOAD = ("torch", "numpy", "transformers", "transformers.models.bert.modeling_bert",
           "transformers.models.bert.configuration_bert", "transformers.models.auto.tokenization_auto",
           "tokenizers", "peft", "hydra", "omegaconf", "datasets", "flwr_datasets.partitioner",
           "flwr.clientapp", "flwr.serverapp", "flwr.supernode.cli", "flwr.superlink.cli")
"""Modules imported before the first fork; a missing one is skipped."""

_CHILD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


def preload(modules: Sequence[str] = PRELOAD) -> list[str]:
    """Import ``modules`` (skipping those that fail); return the ones that loaded."""
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception:  # noqa: BLE001 - an optional library, or one that needs more than an import
            continue
    return loaded


class ForkExecutor:
    """A Flower SuperExec ``Executor`` that forks the warm parent for each task.

    Task types without a known entry point (simulation, agent apps) are started as
    Flower's ``SubprocessExecutor`` would start them.

    Parameters
    ----------
    watch_pid : exit (SIGTERM to the children first) once this process is gone, like
        Flower's ``--parent-pid``, but checked in the poll loop rather than in a thread,
        so that the parent stays single-threaded when it forks.
    """

    def __init__(self, watch_pid: int | None = None) -> None:
        self.children: dict[int, str] = {}
        self.watch_pid = watch_pid
        self._fallback = subprocess_executor()
        self._entries = task_entry_points()

    # --- Flower's Executor protocol ---------------------------------------------------
    def get_eligible_capacity(self, supported_task_types: set, *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set, set[str]]:
        return set(supported_task_types), set()

    def wait_for_capacity(self, task_type: object = None, *, fab_hash: str | None = None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        return None

    def launch(self, spec):  # type: ignore[no-untyped-def]  # ExecutionSpec -> LaunchResult
        command = task_command(spec)
        entry = self._entries.get(command)
        if entry is None:
            return self._fallback.launch(spec)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child never returns
            _run_child(entry, [command, *task_arguments(spec)], spec.suppress_output)
        self.children[pid] = command
        return launch_accepted()

    def reconcile(self) -> None:
        """Reap finished children; stop everything once the watched process is gone."""
        self._reap()
        if self.watch_pid is not None and not is_running(self.watch_pid):
            self.close()
            os._exit(0)

    def close(self) -> None:
        """SIGTERM the children still running, reap them, SIGKILL what is left after 5 s."""
        for pid in self.children:
            signal_if_alive(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while self.children and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()
        for pid in self.children:
            signal_if_alive(pid, signal.SIGKILL)

    def _reap(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                del self.children[pid]


def _run_child(entry: Callable[[], None], argv: list[str], suppress_output: bool) -> None:
    """In the forked child: forget the parent's handlers, run the task, exit without cleanup."""
    code = 1
    try:
        for sig in _CHILD_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        forget_exit_handlers()
        _forget_own_package()
        if suppress_output:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        sys.argv = argv
        entry()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, then the exit code says it
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # never run the parent's atexit/finalizers in the child


def _forget_own_package() -> None:
    """Drop this launcher's package from ``sys.modules``, so the app's FAB copy is what loads."""
    own = (__spec__.name if __spec__ is not None else __name__).split(".")[0]
    for name in [m for m in sys.modules if m == own or m.startswith(own + ".")]:
        del sys.modules[name]


@dataclass(frozen=True)
class Target:
    """One Runtime API to serve (a SuperNode's or a SuperLink's).

    ``root_certificates=None`` means plain HTTP; ``parent_pid`` is the process whose exit
    ends this target's loop (the SuperNode/SuperLink itself).
    """

    name: str
    runtime_api_address: str
    root_certificates: str | None = None
    parent_pid: int | None = None


def serve(target: Target) -> NoReturn:
    """Run Flower's SuperExec loop for ``target`` in this process, launching tasks with
    :class:`ForkExecutor`; exit (without interpreter teardown) when the loop ends."""
    executor = ForkExecutor(watch_pid=target.parent_pid)
    code = 1
    try:
        run_superexec_loop(executor, target.runtime_api_address, target.root_certificates)
        code = 0
    except SystemExit as exc:  # Flower's graceful exit (SIGTERM/SIGINT): children are stopped by now
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, then the exit code says it
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip the interpreter's teardown: with torch and transformers loaded it is slow.
        os._exit(code)


def serve_all(targets: Sequence[Target], pids_file: Path | None = None) -> NoReturn:
    """Fork one :func:`serve` loop per target from this (preloaded) process, so that one
    preload serves every SuperNode of a machine; write ``{name: pid}`` to ``pids_file``;
    forward SIGTERM/SIGINT to the loops and exit once they all have."""
    loops: dict[int, str] = {}
    for target in targets:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            serve(target)
        loops[pid] = target.name
    if pids_file is not None:
        tmp = pids_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({name: pid for pid, name in loops.items()}, indent=1))
        os.replace(tmp, pids_file)

    def forward(signum: int, _frame: object) -> None:
        for pid in loops:
            signal_if_alive(pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while loops:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        loops.pop(pid, None)
    os._exit(0)


def read_targets(path: Path) -> list[Target]:
    """``[{"name", "runtime_api_address", "root_certificates", "parent_pid"}, ...]`` from JSON."""
    return [Target(**entry) for entry in json.loads(Path(path).read_text())]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fedtune.runtime.warm_superexec",
                                     description="Flower SuperExec that forks a preloaded process per task.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--runtime-api-address", help="the SuperNode's/SuperLink's Runtime API")
    where.add_argument("--targets", type=Path, help="JSON list of Runtime APIs to serve from one preload "
                       '([{"name", "runtime_api_address", "root_certificates", "parent_pid"}])')
    parser.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    parser.add_argument("--root-certificates", help="CA certificate of the Runtime API's TLS certificate")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--pids-file", type=Path, default=None, help="with --targets: write {name: pid} here")
    parser.add_argument("--targets-timeout", type=float, default=600.0,
                        help="with --targets: seconds to wait for the file to appear")
    parser.add_argument("--preload", nargs="*", default=list(PRELOAD), help="modules to import before forking")
    args = parser.parse_args(argv)
    if args.runtime_api_address and args.insecure == (args.root_certificates is not None):
        parser.error("give exactly one of --insecure and --root-certificates")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Preload, then serve one Runtime API (or several, ``--targets``) with Flower's SuperExec loop."""
    if not hasattr(os, "fork"):
        raise SystemExit("warm_superexec needs os.fork (POSIX)")
    args = parse_args(argv)
    if not usable(WARM_SUPEREXEC):
        raise SystemExit(f"{notice(WARM_SUPEREXEC)}; start Flower's flower-superexec instead")
    t0 = time.perf_counter()
    loaded = preload(args.preload)
    print(f"fedtune warm SuperExec: preloaded {len(loaded)} modules in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.targets:  # may be written while we preload: the nodes' PIDs are not known before they start
        deadline = time.monotonic() + args.targets_timeout
        while not args.targets.is_file():
            if time.monotonic() > deadline:
                raise SystemExit(f"--targets: {args.targets} did not appear within {args.targets_timeout:g} s")
            time.sleep(0.1)
        targets = read_targets(args.targets)
        print(f"fedtune warm SuperExec: serving {', '.join(t.name for t in targets)}", flush=True)
        serve_all(targets, args.pids_file)
    serve(Target("superexec", args.runtime_api_address, args.root_certificates, args.parent_pid))


if __name__ == "__main__":
    main()
