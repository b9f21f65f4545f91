"""Aggregate a study: many completed run directories → one table and mean curves.

A study directory holds ``<partition>/<strategy>/seed<k>/`` run directories (what
``simulations/study.py`` writes; its tuning trials sit apart, under ``tuning/``, see
:mod:`fedtune.results.tuning`).  Per (partition, strategy) over the seeds this computes
the final score mean ± std (``eval_accuracy``, or another metrics.csv column such as a
generative benchmark's ``rouge_l``, and its held-out counterpart when there is one), the
payload bytes per client-round of the round's exchange (ledger kinds ``train`` and ``split``; one-time
set-up traffic such as Fed-SB's init gradients and bases is reported apart, in total and
per direction), the wire bytes needed to first reach a target accuracy, and the median
seconds per round; and the mean accuracy-vs-cumulative-bytes curve with its seed band,
from which :func:`pareto_front` keeps the points no other point beats on both axes.
:func:`grid_cells` says where every cell of a requested grid stands (a full grid on the
default model is many hours of runs on two cores, so it is filled over several sittings).
Reads results only, so a study can be re-reported at any time.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fedtune.comm.ledger import Ledger
from fedtune.results.store import read_ledger, read_metrics


@dataclass
class StudyRun:
    """One completed run of the study."""

    partition: str
    strategy: str
    seed: int
    rows: list[dict[str, str]]  # metrics.csv
    ledger: list[dict[str, str]]  # ledger.csv


def run_dir(root: Path, partition: str, strategy: str, seed: int) -> Path:
    """Where the study keeps one run (the one layout reader and runner share)."""
    return Path(root) / partition / strategy / f"seed{seed}"


def run_status(path: Path) -> str:
    """``completed``, ``running`` / ``failed`` (as summary.json says), or ``missing``."""
    summary = Path(path) / "summary.json"
    if not summary.is_file():
        return "missing"
    return str(json.loads(summary.read_text()).get("status", "missing"))


@dataclass
class GridCell:
    """Where one (partition, strategy, seed) of a requested grid stands."""

    partition: str
    strategy: str
    seed: int
    status: str  # completed | running | failed | missing (run_status); a tuning trial: also refused
    rounds_done: int  # last round in its metrics.csv (0: none yet)
    wall_seconds: float  # its metrics.csv's last wall_seconds (0: none yet)


def rounds_and_wall(path: Path) -> tuple[int, float]:
    """The last round in a run's metrics.csv and its wall seconds ((0, 0.0): none yet)."""
    rows = read_metrics(path) if (Path(path) / "metrics.csv").is_file() else []
    last = rows[-1] if rows else {}
    return int(last.get("round") or 0), float(last.get("wall_seconds") or 0.0)


def grid_cells(root: Path, partitions: list[str], strategies: list[str], seeds: list[int]) -> list[GridCell]:
    """Every cell of the grid, in the order the study runs them."""
    cells = []
    for partition in partitions:
        for strategy in strategies:
            for seed in seeds:
                d = run_dir(root, partition, strategy, seed)
                cells.append(GridCell(partition, strategy, seed, run_status(d), *rounds_and_wall(d)))
    return cells


def measured_pace(root: Path) -> dict[str, float]:
    """Wall seconds per round of each strategy, over every run under ``root`` with a round
    done (any partition, seed, tuning trial or status: the pace of the machine that ran them)."""
    pace: dict[str, list[float]] = defaultdict(list)
    runs = [*Path(root).glob("*/*/seed*/metrics.csv"), *Path(root).glob("tuning/*/*/trial*/metrics.csv")]
    for metrics in runs:
        rounds, wall = rounds_and_wall(metrics.parent)
        if rounds > 0 and wall > 0:
            pace[metrics.parent.parent.name].append(wall / rounds)
    return {strategy: statistics.fmean(values) for strategy, values in pace.items()}


def seconds_left(cells: list[GridCell], rounds: int, pace: dict[str, float]) -> tuple[float, list[str]]:
    """Seconds the unfinished cells still need at ``pace`` (:func:`measured_pace`), and the
    strategies with no pace yet."""
    left, unknown = 0.0, []
    for c in cells:
        if c.status in ("completed", "refused"):  # refused: a tuning trial fedtune never ran
            continue
        if c.strategy not in pace:
            unknown.append(c.strategy)
            continue
        done = c.rounds_done if c.status == "running" else 0
        left += pace[c.strategy] * max(0, rounds - done)
    return left, sorted(set(unknown))


def grid_markdown(cells: list[GridCell], rounds: int, column: str = "seed") -> str:
    """The grid as Markdown: a line per partition × strategy, a column per seed (or per
    tuning trial, ``column="trial"``: then ``GridCell.seed`` holds the trial's number)."""
    seeds = sorted({c.seed for c in cells})
    lines = ["| partition | strategy | " + " | ".join(f"{column} {s}" for s in seeds) + " |",
             "| --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
    by_row: dict[tuple[str, str], dict[int, GridCell]] = defaultdict(dict)
    for c in cells:
        by_row[(c.partition, c.strategy)][c.seed] = c
    for (partition, strategy), row in by_row.items():
        marks = []
        for s in seeds:
            c = row.get(s)
            if c is None or c.status == "missing":
                marks.append("–")
            elif c.status == "completed":
                marks.append(f"done ({c.wall_seconds / 60:.0f} min)")
            elif c.status == "refused":
                marks.append("refused")
            else:
                marks.append(f"{c.status}, round {c.rounds_done}/{rounds}")
        lines.append(f"| {partition} | `{strategy}` | " + " | ".join(marks) + " |")
    return "\n".join(lines) + "\n"


def collect(root: Path) -> list[StudyRun]:
    """Every completed run under ``root`` (others are skipped: the table covers what finished)."""
    runs = []
    for summary in sorted(Path(root).glob("*/*/seed*/summary.json")):
        d = summary.parent
        if run_status(d) != "completed":
            continue
        runs.append(StudyRun(d.parent.parent.name, d.parent.name, int(d.name[4:]), read_metrics(d), read_ledger(d)))
    return runs


def _measured(value: str | None) -> bool:
    return value not in (None, "", "nan") and not math.isnan(float(value))


def _evaluated(rows: list[dict[str, str]], metric: str = "eval_accuracy") -> list[dict[str, str]]:
    return [r for r in rows if _measured(r.get(metric))]


def metric_name(metric: str) -> str:
    """The name a metric goes by in the table's columns: ``accuracy`` for ``eval_accuracy``."""
    return "accuracy" if metric == "eval_accuracy" else metric


def heldout_metric(metric: str) -> str:
    """The metrics.csv column of ``metric`` on the held-out categories."""
    return f"heldout_{metric_name(metric)}"


def final_value(rows: list[dict[str, str]], metric: str = "eval_accuracy") -> float | None:
    """``metric`` at the last round that measured it (None: never measured, or NaN)."""
    evaluated = _evaluated(rows, metric)
    return float(evaluated[-1][metric]) if evaluated else None


def first_reaching(rows: list[dict[str, str]], target: float, metric: str = "eval_accuracy") -> dict[str, str] | None:
    """The first evaluated row with ``metric`` ≥ ``target`` (None: never)."""
    return next((r for r in _evaluated(rows, metric) if float(r[metric]) >= target), None)


def bytes_to_target(rows: list[dict[str, str]], target: float, metric: str = "eval_accuracy") -> int | None:
    """Cumulative wire bytes at the first evaluated round with ``metric`` ≥ ``target`` (None: never)."""
    row = first_reaching(rows, target, metric)
    return None if row is None else int(row["cumulative_bytes"])


def payload_per_client_round(ledger: list[dict[str, str]], direction: str) -> float:
    """Mean payload bytes of one client's round in ``direction`` (``up``/``down``), every
    message of the round's exchange summed (:meth:`fedtune.comm.ledger.Ledger.payload_per_client_round`)."""
    return Ledger.from_rows(ledger).payload_per_client_round(direction)


def one_time_bytes(ledger: list[dict[str, str]], direction: str | None = None) -> int:
    """Wire bytes of the one-time setup (ledger kind ``one_time``, e.g. Fed-SB's init gradients
    and bases), in ``direction`` (``up``/``down``) or both: what no round repeats."""
    return sum(int(r["wire_bytes"]) for r in ledger
               if r["kind"] == "one_time" and direction in (None, r["direction"]))


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[StudyRun], target: float, metric: str = "eval_accuracy") -> list[dict[str, object]]:
    """One row per (partition, strategy), sorted: the study table (``final_<name>_mean`` /
    ``_std`` for ``metric``, and ``final_heldout_<name>_*`` where every run measured it)."""
    groups: dict[tuple[str, str], list[StudyRun]] = defaultdict(list)
    for run in runs:
        groups[(run.partition, run.strategy)].append(run)
    table = []
    name, held = metric_name(metric), heldout_metric(metric)
    for (partition, strategy), group in sorted(groups.items()):
        finals = [float(_evaluated(r.rows, metric)[-1][metric]) for r in group]
        heldout = [v for r in group if (v := final_value(r.rows, held)) is not None]
        reach = [b for r in group if (b := bytes_to_target(r.rows, target, metric)) is not None]
        per_round = [statistics.median(float(x["round_seconds"]) for x in r.rows[1:]) for r in group if len(r.rows) > 1]
        table.append({
            "partition": partition, "strategy": strategy, "seeds": len(group),
            "rounds": max(int(r.rows[-1]["round"]) for r in group),
            f"final_{name}_mean": statistics.fmean(finals), f"final_{name}_std": _std(finals),
            **({f"final_{held}_mean": statistics.fmean(heldout), f"final_{held}_std": _std(heldout)}
               if len(heldout) == len(group) else {}),
            "payload_up_per_client_round": statistics.fmean(payload_per_client_round(r.ledger, "up") for r in group),
            "payload_down_per_client_round": statistics.fmean(payload_per_client_round(r.ledger, "down") for r in group),
            "one_time_bytes": statistics.fmean(one_time_bytes(r.ledger) for r in group),
            "one_time_up_bytes": statistics.fmean(one_time_bytes(r.ledger, "up") for r in group),
            "one_time_down_bytes": statistics.fmean(one_time_bytes(r.ledger, "down") for r in group),
            "total_bytes": statistics.fmean(int(r.rows[-1]["cumulative_bytes"]) for r in group),
            "metric": metric, "target": target, "seeds_reaching_target": len(reach),
            "bytes_to_target_mean": statistics.fmean(reach) if reach else None,
            "seconds_per_round_median": statistics.median(per_round) if per_round else None,
        })
    return table


def mean_curve(group: list[StudyRun], metric: str = "eval_accuracy",
               x: str = "cumulative_bytes") -> list[tuple[float, float, float]]:
    """Per evaluated round present in every seed: (mean ``x``, mean ``metric``, its std);
    ``x`` is ``cumulative_bytes`` or ``round``."""
    by_round = [{int(r["round"]): r for r in _evaluated(run.rows, metric)} for run in group]
    common = sorted(set.intersection(*(set(b) for b in by_round)))
    out = []
    for rnd in common:
        values = [float(b[rnd][metric]) for b in by_round]
        out.append((statistics.fmean(float(b[rnd][x]) for b in by_round), statistics.fmean(values), _std(values)))
    return out


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (bytes, accuracy, label) points that no other point dominates (no more bytes and
    no less accuracy, one of them strictly), sorted by bytes: the best accuracy each byte
    budget can buy across the methods."""
    front: list[tuple[float, float, str]] = []
    for b, a, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or a > front[-1][1]:
            front.append((b, a, label))
    return front


def format_bytes(n: float | None) -> str:
    if n is None:
        return "not reached"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def markdown_table(table: list[dict[str, object]]) -> str:
    """The study table as Markdown (one line per partition × strategy)."""
    target = table[0]["target"] if table else 0.0
    name = metric_name(str(table[0]["metric"])) if table else "accuracy"
    short = "acc." if name == "accuracy" else name
    held = f"final_heldout_{name}"
    with_heldout = bool(table) and all(f"{held}_mean" in r for r in table)
    lines = [f"| partition | strategy | seeds | final {short} (mean ± std) | "
             + (f"held-out {short} (mean ± std) | " if with_heldout else "")
             + f"payload up / down per client-round | one-time bytes | total bytes | bytes to {short} ≥ {target:g} "
             "(seeds reaching) | median s/round |",
             "| --- | --- | --- | --- | " + ("--- | " if with_heldout else "") + "--- | --- | --- | --- | --- |"]
    for r in table:
        spr = r["seconds_per_round_median"]
        one_time = (f"{format_bytes(r['one_time_bytes'])} (up {format_bytes(r['one_time_up_bytes'])}, "
                    f"down {format_bytes(r['one_time_down_bytes'])})") if r["one_time_bytes"] else "0"
        heldout = f"{r[f'{held}_mean']:.3f} ± {r[f'{held}_std']:.3f} | " if with_heldout else ""
        lines.append(
            f"| {r['partition']} | `{r['strategy']}` | {r['seeds']} | {r[f'final_{name}_mean']:.3f} ± "
            f"{r[f'final_{name}_std']:.3f} | {heldout}{r['payload_up_per_client_round']:,.0f} / "
            f"{r['payload_down_per_client_round']:,.0f} B | {one_time} "
            f"| {format_bytes(r['total_bytes'])} | {format_bytes(r['bytes_to_target_mean'])} "
            f"({r['seeds_reaching_target']}/{r['seeds']}) | {'–' if spr is None else f'{spr:.1f}'} |")
    return "\n".join(lines) + "\n"
