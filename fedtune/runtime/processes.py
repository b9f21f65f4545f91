"""The process table, read from ``/proc``: who is alive, in which group and session.

Ray, Flower's SuperExec and the study driver all start processes that can outlive the
one that started them (a server killed with SIGKILL never shuts Ray down).  Cleaning up
after them needs two facts the standard library does not give: whether a process still
runs (a zombie, dead but not reaped, does not) and which session it belongs to.  Killing
by *session* rather than by process group matters because Ray may move its workers into
process groups of their own (``RAY_process_group_cleanup_enabled``), while a process
leaves its session only by calling ``setsid``, which Ray's cluster processes do not.

Stopping a process tree (:func:`stop_processes`: SIGTERM, a bounded wait, SIGKILL) follows
the parent links of the same table, so a SuperNode's SuperExec and app processes go with it.

Linux reads ``/proc/PID/stat``; elsewhere :func:`is_running` falls back to a signal-0
probe and :func:`process_table` is empty (a tree is then its root alone).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessInfo:
    """One row of the process table (fields of ``/proc/PID/stat`` and its command line)."""

    pid: int
    state: str  # R, S, D, Z (zombie), ...
    ppid: int
    pgrp: int
    session: int

    @property
    def alive(self) -> bool:
        return self.state != "Z"

    @functools.cached_property
    def cmdline(self) -> str:
        """Arguments joined by spaces; empty for kernel threads, zombies and processes gone.

        Read on first use, not with the row: most callers (the memory sampler of
        ``simulations/bench_scale.py``, :func:`kill_session`) need only ``stat``."""
        try:
            raw = (PROC / str(self.pid) / "cmdline").read_bytes()
        except OSError:
            return ""
        return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def read_process(pid: int) -> ProcessInfo | None:
    """The row for ``pid``, or ``None`` when it has gone (or there is no procfs)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name in parentheses may itself contain spaces and ')': split after the last one
    fields = stat.rsplit(")", 1)[1].split()
    return ProcessInfo(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[3]))


def process_table() -> list[ProcessInfo]:
    """Every process visible now, zombies included (filter on :attr:`ProcessInfo.alive`)."""
    if not PROC.is_dir():
        return []
    rows = (read_process(int(p.name)) for p in PROC.iterdir() if p.name.isdigit())
    return [row for row in rows if row is not None]  # None: it exited while we looked


def is_running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    if PROC.is_dir():
        row = read_process(pid)
        return row is not None and row.alive
    try:  # no procfs: the signal-0 probe (a zombie counts as alive there)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def signal_if_alive(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``; a process that has already gone is not an error."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_session(session: int, timeout_s: float = 10.0) -> list[ProcessInfo]:
    """SIGKILL every live process of ``session`` and wait until none is left.

    SIGKILL is delivered asynchronously: a large process (a Ray actor holding a model)
    takes a moment to release its memory and become a zombie, so the caller would
    otherwise see it still running.  Members are signalled again on each pass, which
    also catches a child forked while the first signals went out.

    Returns
    -------
    list of ProcessInfo
        The members still alive after ``timeout_s`` (empty on success).  Without procfs
        only the process group ``session`` is signalled and the list is empty.
    """
    if not PROC.is_dir():
        try:
            os.killpg(session, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return []
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in process_table() if p.session == session and p.alive and p.pid != os.getpid()]
        if not left or time.monotonic() >= deadline:
            return left
        for p in left:
            signal_if_alive(p.pid, signal.SIGKILL)
        time.sleep(0.05)


def family(pids: list[int]) -> list[int]:
    """``pids`` and every process they spawned, their children, and so on (from the
    parent links of one read of the process table)."""
    children: dict[int, list[int]] = {}
    for p in process_table():
        children.setdefault(p.ppid, []).append(p.pid)
    found: dict[int, None] = {}
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = None
            todo += children.get(pid, [])
    return list(found)


def wait_until_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Poll until none of ``pids`` runs (a zombie counts as gone); return those still running."""
    deadline = time.monotonic() + timeout_s
    while (left := [pid for pid in pids if is_running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def kill_processes(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """SIGKILL ``pids`` and every process they spawned; wait up to ``timeout_s`` until
    they are gone; return those still running."""
    members = family(pids)
    for pid in members:
        signal_if_alive(pid, signal.SIGKILL)
    return wait_until_gone(members, timeout_s)


def stop_processes(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """SIGTERM ``pids`` and every process they spawned, SIGKILL what still runs after
    ``timeout_s`` (one shared wait for all); return those still running after that.
    A process already gone is no error."""
    members = family(pids)
    for pid in members:
        signal_if_alive(pid, signal.SIGTERM)
    left = wait_until_gone(members, timeout_s)
    for pid in left:
        signal_if_alive(pid, signal.SIGKILL)
    return wait_until_gone(left, timeout_s)


def stop_process(pid: int, timeout_s: float = 10.0) -> list[int]:
    """:func:`stop_processes` for one process and what it spawned."""
    return stop_processes([pid], timeout_s)
