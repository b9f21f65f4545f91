"""Communication-vs-accuracy curves from run directories (reads results only).

``comm_vs_accuracy.png``: global accuracy against cumulative bytes on the wire (log x),
the figure that compares methods on both axes; ``accuracy_vs_round.png``: the same runs
by round.  ``fedtune plot --metric rouge_l`` draws another metrics.csv column instead
(a generative dataset's ``rouge_l``, ``exact_match``, ``heldout_rouge_l``, ...).  One line per run, labelled by strategy (plus the directory name when two
runs share a strategy).

On the bytes axis a run with a one-time setup (ledger.csv kind ``one_time``, e.g. Fed-SB's
init) starts with a hollow diamond at its one-time bytes, plotted at the round-0 value
(nothing has trained yet), joined by a dotted segment to round 1: the horizontal gap from
there on is per-round traffic.  The cumulative bytes themselves are metrics.csv's, which
include the setup in round 1.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path
from fedtune.results.store import read_ledger, read_metrics
from fedtune.results.study import StudyRun, mean_curve, one_time_bytes, pareto_front


def _label(run_dir: Path) -> str:
    summary = run_dir / "summary.json"
    if summary.is_file():
        return str(json.loads(summary.read_text()).get("strategy", run_dir.name))
    rows = read_metrics(run_dir)
    return rows[0]["strategy"] if rows else run_dir.name


def _evaluated(run_dir: Path, metric: str) -> list[dict[str, str]]:
    """The rows of ``run_dir``'s metrics.csv where ``metric`` was measured."""
    rows = read_metrics(run_dir)
    if rows and metric not in rows[0]:
        raise ValueError(f"--metric: {run_dir}/metrics.csv has no column {metric!r}; columns: {', '.join(rows[0])}")
    rows = [r for r in rows if r[metric] not in ("", "nan") and not math.isnan(float(r[metric]))]
    if not rows:
        raise ValueError(f"{run_dir}: metrics.csv has no evaluated round yet")
    return rows


SETUP_LABEL = "one-time setup bytes (at the round-0 value)"


def setup_point(rows: list[dict[str, str]], ledger: list[dict[str, str]],
                metric: str) -> tuple[float, float] | None:
    """(one-time wire bytes, round-0 ``metric``) of a run with a one-time setup, else None."""
    first = next((r for r in rows if int(r["round"]) == 0), None)
    one_time = one_time_bytes(ledger)
    return (float(one_time), float(first[metric])) if one_time and first is not None else None


def _mark_setup(ax, point: tuple[float, float], first: tuple[float, float],  # type: ignore[no-untyped-def]
                colour) -> None:
    """The hollow diamond at the one-time bytes and the dotted segment to round 1."""
    ax.plot([point[0], first[0]], [point[1], first[1]], linestyle=":", linewidth=1, color=colour)
    ax.plot([point[0]], [point[1]], marker="D", markersize=6, markerfacecolor="none", color=colour, linestyle="")


def _legend(ax, marked: bool, fontsize: int) -> None:  # type: ignore[no-untyped-def]
    """The lines' legend, plus one entry for every run's setup marker when there is one."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    if marked:
        handles.append(Line2D([], [], marker="D", markerfacecolor="none", color="grey", linestyle=":"))
        labels.append(SETUP_LABEL)
    ax.legend(handles, labels, fontsize=fontsize)


def plot_runs(run_dirs: list[Path], out_dir: Path, title: str | None = None,
              metric: str = "eval_accuracy") -> list[Path]:
    """Write the two PNGs for ``run_dirs`` into ``out_dir``; return their paths.

    ``metric``: the metrics.csv column on the y axis (``rouge_l``, ``heldout_accuracy``, ...);
    a metric other than ``eval_accuracy`` names the files ``comm_vs_<metric>.png`` and
    ``<metric>_vs_round.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d), _label(Path(d)), _evaluated(Path(d), metric), read_ledger(Path(d))) for d in run_dirs]
    counts = Counter(label for _, label, _, _ in runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "accuracy" if metric == "eval_accuracy" else metric.replace("/", "_")
    ylabel = "global test accuracy" if metric == "eval_accuracy" else metric
    paths = []
    for name, xkey, xlabel, logx in (
        (f"comm_vs_{stem}.png", "cumulative_bytes", "cumulative bytes on the wire (up + down)", True),
        (f"{stem}_vs_round.png", "round", "round", False),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        marked = False
        for d, label, rows, ledger in runs:
            shown = [r for r in rows if float(r[xkey]) > 0] if logx else rows  # round 0 sent nothing
            xs = [float(r[xkey]) for r in shown]
            ys = [float(r[metric]) for r in shown]
            line, = ax.plot(xs, ys, marker="o", markersize=3,
                            label=label if counts[label] == 1 else f"{label} ({d.name})")
            point = setup_point(rows, ledger, metric) if logx and xs else None
            if point is not None:
                _mark_setup(ax, point, (xs[0], ys[0]), line.get_color())
                marked = True
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        _legend(ax, marked, 8)
        if title:
            ax.set_title(title)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_study(runs: list[StudyRun], path: Path, title: str | None = None, metric: str = "eval_accuracy",
               x: str = "cumulative_bytes") -> Path:
    """A study's ``metric`` against cumulative bytes (``x="cumulative_bytes"``: log x, with
    the Pareto front over all strategies and each run's one-time bytes marked apart) or
    against rounds (``x="round"``): one panel per partition, the seed mean of each strategy
    with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_bytes = x == "cumulative_bytes"
    partitions = sorted({r.partition for r in runs})
    strategies = sorted({r.strategy for r in runs})
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(strategies)}
    fig, axes = plt.subplots(1, len(partitions), figsize=(6 * len(partitions), 4.5), squeeze=False, sharex=True, sharey=True)
    for ax, partition in zip(axes[0], partitions):
        points, marked = [], False
        for strategy in strategies:
            group = [r for r in runs if r.partition == partition and r.strategy == strategy]
            full = mean_curve(group, metric, x) if group else []
            curve = [c for c in full if c[0] > 0] if by_bytes else full  # round 0 sent nothing
            if not curve:
                continue
            xs, ys, sd = zip(*curve)
            ax.plot(xs, ys, marker="o", markersize=2.5, color=colours[strategy], label=f"{strategy} (n={len(group)})")
            one_time = statistics.fmean(one_time_bytes(r.ledger) for r in group) if by_bytes else 0.0
            if one_time and full[0][0] == 0:  # the seeds' mean one-time bytes, at their mean round-0 accuracy
                _mark_setup(ax, (one_time, full[0][1]), (xs[0], ys[0]), colours[strategy])
                marked = True
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                            color=colours[strategy], alpha=0.18, linewidth=0)
            points += [(x_, y, strategy) for x_, y in zip(xs, ys)]
        front = pareto_front(points) if by_bytes else []
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black",
                    linestyle="--", linewidth=1, label="Pareto front")
        if by_bytes:
            ax.set_xscale("log")
        ax.set_xlabel("cumulative bytes on the wire (up + down)" if by_bytes else "round")
        ax.set_title(partition)
        ax.grid(True, alpha=0.3)
        _legend(ax, marked, 7)
    shown = "global test accuracy" if metric == "eval_accuracy" else f"{metric} (test split)"
    axes[0][0].set_ylabel(f"{shown} (mean ± std over seeds)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)  # atomic: never a half-written figure
    return path
