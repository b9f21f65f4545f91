"""The process table, read from ``/proc``: who is alive, in which group and session.

Ray, Flower's SuperExec and the study driver all start processes that can outlive the
one that started them (a server killed with SIGKILL never shuts Ray down).  Cleaning up
after them needs two facts the standard library does not give: whether a process still
runs (a zombie, dead but not reaped, does not) and which session it belongs to.  Killing
by *session* rather than by process group matters because Ray may move its workers into
process groups of their own (``RAY_process_group_cleanup_enabled``), while a process
leaves its session only by calling ``setsid``, which Ray's cluster processes do not.

Linux reads ``/proc/PID/stat``; elsewhere :func:`is_running` falls back to a signal-0
probe and :func:`process_table` is empty.
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
