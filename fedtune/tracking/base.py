"""What every tracker does with a run, and the no-op tracker of ``tracking=none``.

A :class:`Tracker` mirrors a run directory into a tracking tool; the run directory stays
the source of truth.  The server calls it at four points: the resolved config once
(:meth:`Tracker.log_config`), every ``metrics.csv`` row after its round is checkpointed
(:meth:`Tracker.log_row`), the end-of-run files (:meth:`Tracker.log_artifacts`) and
:meth:`Tracker.close`.  Rows are mirrored generically (:func:`metrics_of`: every numeric
column), so a column added to ``metrics.csv`` reaches the tracker without a change here.

Resume: rows are logged after the checkpoint of their round, so when a killed run is
continued from round c's checkpoint, the tracked run holds every round before c and maybe
c.  A backend sets :attr:`Tracker.next_round` to the first round it still needs (or wants
again); :meth:`log_row` skips the rounds before it, and :meth:`Tracker.replay` logs the
kept ``metrics.csv`` rows from there, so no step is missing or logged twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedtune.results.store import NON_METRIC_COLUMNS, atomic_write_dir, atomic_write_text

STATE_FILE = "tracking.json"  # in the run directory: which tracked run mirrors it (for a resume)


class Tracker:
    """The interface, and ``tracking=none``: every call does nothing."""

    next_round = 0  # rounds before it are in the tracked run already (set on resume)

    def log_config(self, config: dict[str, Any]) -> None:
        """The resolved config (``config.yaml``'s content) as hyper-parameters."""

    def log_row(self, server_round: int, row: dict[str, Any]) -> None:
        """Round ``server_round``'s ``metrics.csv`` row, unless the tracked run holds it already."""
        if server_round >= self.next_round:
            self.write_metrics(server_round, metrics_of(row))
            self.next_round = server_round + 1

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """A resumed run's kept ``metrics.csv`` rows: those its tracked run lacks are logged."""
        for row in rows:
            self.log_row(int(row["round"]), row)

    def write_metrics(self, server_round: int, metrics: dict[str, float]) -> None:
        """Backends: write ``metrics`` at step ``server_round`` durably (flushed, committed)."""

    def log_artifacts(self, run_dir: Path) -> None:
        """The finished run's plots (and, where the tool keeps files, its adapter and results)."""

    def close(self, status: str) -> None:
        """End the tracked run; ``status`` is summary.json's (``completed`` or ``failed``)."""


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """The numeric cells of a ``metrics.csv`` row (typed, or the strings read back from the
    file), without the label columns and the empty or NaN cells (not measured that round)."""
    out = {}
    for key, value in row.items():
        if key in NON_METRIC_COLUMNS or isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isnan(number):
            out[key] = number
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}``; lists and ``None`` as their YAML-ish text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif value is None:
            out[name] = "null"
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        else:
            out[name] = value
    return out


def run_plots(run_dir: Path) -> list[Path]:
    """Write the run's two figures (:func:`fedtune.plots.plot_runs`) to ``RUN_DIR/plots/`` (atomically)."""
    from fedtune.plots import plot_runs

    def fill(tmp: Path) -> None:
        plot_runs([run_dir], tmp, title=run_dir.name)

    atomic_write_dir(run_dir / "plots", fill)
    return sorted((run_dir / "plots").glob("*.png"))


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_text(run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run directory's tracking state, ``{}`` if none was written."""
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
