"""Communication-vs-accuracy curves from run directories (reads results only).

``comm_vs_accuracy.png``: global accuracy against cumulative bytes on the wire (log x),
the figure that compares methods on both axes; ``accuracy_vs_round.png``: the same runs
by round.  One line per run, labelled by strategy (plus the directory name when two
runs share a strategy).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from fedtune.results.store import read_metrics


def _label(run_dir: Path) -> str:
    summary = run_dir / "summary.json"
    if summary.is_file():
        return str(json.loads(summary.read_text()).get("strategy", run_dir.name))
    rows = read_metrics(run_dir)
    return rows[0]["strategy"] if rows else run_dir.name


def plot_runs(run_dirs: list[Path], out_dir: Path, title: str | None = None) -> list[Path]:
    """Write the two PNGs for ``run_dirs`` into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in run_dirs:
        rows = [r for r in read_metrics(d) if r["eval_accuracy"] not in ("", "nan")]
        rows = [r for r in rows if not math.isnan(float(r["eval_accuracy"]))]
        if not rows:
            raise ValueError(f"{d}: metrics.csv has no evaluated round yet")
        runs.append((Path(d), _label(Path(d)), rows))
    counts = Counter(label for _, label, _ in runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, xkey, xlabel, logx in (
        ("comm_vs_accuracy.png", "cumulative_bytes", "cumulative bytes on the wire (up + down)", True),
        ("accuracy_vs_round.png", "round", "round", False),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for d, label, rows in runs:
            shown = [r for r in rows if float(r[xkey]) > 0] if logx else rows  # round 0 sent nothing
            xs = [float(r[xkey]) for r in shown]
            ys = [float(r["eval_accuracy"]) for r in shown]
            ax.plot(xs, ys, marker="o", markersize=3, label=label if counts[label] == 1 else f"{label} ({d.name})")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("global test accuracy")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if title:
            ax.set_title(title)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
