"""A tuned study's tuning stage on disk: where trials run, how they score, which one wins.

``simulations/study.py --stage tune`` runs each (partition, strategy)'s trials
(:func:`fedtune.tuning.select_trials`) on the validation split into
``OUT/tuning/<partition>/<strategy>/trial<k>/`` and records them in ``tuning.json`` beside
them (:func:`tuning_record`): the declared search space, the candidates it resolved to,
the budget, every trial's overrides, status and score, and the choice, with a Markdown
table (:func:`tuning_markdown`).  A trial's score is its final validation value of the
study's metric; the choice is the best score, ties going to the fewer bytes on the wire
(then to the earlier trial), made only once every trial has completed, so a stopped
study never commits to a choice a missing trial could change.  Reads results only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from fedtune.results.store import read_metrics
from fedtune.results.study import GridCell, final_value, rounds_and_wall, run_status
from fedtune.tuning import Relative, overrides_of


def tuning_dir(root: Path, partition: str, strategy: str) -> Path:
    return Path(root) / "tuning" / partition / strategy


def trial_dir(root: Path, partition: str, strategy: str, trial: int) -> Path:
    """Where the study keeps one tuning trial (the one layout reader and runner share)."""
    return tuning_dir(root, partition, strategy) / f"trial{trial}"


REFUSED = "refused.txt"  # written by the study when fedtune refuses a trial's config (exit 2)


def trial_status(path: Path) -> str:
    """:func:`~fedtune.results.study.run_status`, or ``refused`` (the config was refused: it never ran)."""
    status = run_status(path)
    return "refused" if status == "missing" and (Path(path) / REFUSED).is_file() else status


def trial_result(path: Path, metric: str) -> dict[str, Any]:
    """A trial's status, score (final ``metric``; None until it completed, or if never
    measured), bytes on the wire and wall seconds, from its run directory (a refused
    trial's ``error`` too)."""
    status = trial_status(path)
    rows = read_metrics(path) if (Path(path) / "metrics.csv").is_file() else []
    score = final_value(rows, metric) if status == "completed" and rows else None
    out = {"status": status, "score": score, "bytes": int(rows[-1]["cumulative_bytes"]) if rows else None,
           "wall_seconds": rounds_and_wall(path)[1] if rows else None}
    if status == "refused":
        out["error"] = (Path(path) / REFUSED).read_text().strip()
    return out


def trial_cells(root: Path, partitions: list[str], strategies: list[str], counts: Mapping[str, int]) -> list[GridCell]:
    """Every tuning trial of the grid, in the order the study runs them (``seed`` holds the trial's number)."""
    cells = []
    for partition in partitions:
        for strategy in strategies:
            for k in range(counts[strategy]):
                d = trial_dir(root, partition, strategy, k)
                cells.append(GridCell(partition, strategy, k, trial_status(d), *rounds_and_wall(d)))
    return cells


def choose(trials: list[Mapping[str, Any]]) -> int | None:
    """The index of the winning trial: the best score, ties to the fewer bytes, then the
    earlier trial; None while a trial has not finished (completed, or refused: never run)
    or when no trial has a score."""
    if any(t["status"] not in ("completed", "refused") for t in trials):
        return None
    scored = [(i, t) for i, t in enumerate(trials) if t["score"] is not None and math.isfinite(t["score"])]
    if not scored:
        return None
    return min(scored, key=lambda it: (-it[1]["score"], it[1]["bytes"], it[0]))[0]


def _declared(space: Mapping[str, Any]) -> dict[str, Any]:
    return {k: {"relative_factors": list(v.factors)} if isinstance(v, Relative) else list(v) for k, v in space.items()}


def tuning_record(partition: str, strategy: str, space: Mapping[str, Any], values: Mapping[str, list[Any]],
                  grid_size: int, budget: int, seed: int, metric: str, base: list[str],
                  points: list[dict[str, Any]], results: list[Mapping[str, Any]]) -> dict[str, Any]:
    """What ``tuning.json`` holds for one (partition, strategy)."""
    trials = [{"trial": k, "point": p, "overrides": overrides_of(p), **r} for k, (p, r) in enumerate(zip(points, results))]
    best = choose(trials)
    note = (f"the grid has {grid_size} points, fewer than the budget of {budget}: every point is tried"
            if grid_size < budget else
            f"the grid has {grid_size} points: every point is tried" if grid_size == budget else
            f"the grid has {grid_size} points, more than the budget of {budget}: the default point and "
            f"{budget - 1} others, picked in a seeded order to try every candidate first")
    return {"partition": partition, "strategy": strategy, "metric": metric, "split": "validation",
            "search_space": _declared(space), "candidates": {k: list(v) for k, v in values.items()},
            "default_point": points[0] if points else {}, "grid_size": grid_size, "budget": budget,
            "trials_run": len(points), "selection_seed": seed, "note": note, "base_overrides": list(base),
            "trials": trials, "choice": trials[best] if best is not None else None}


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else f"{value:,}"


def tuning_markdown(record: Mapping[str, Any]) -> str:
    """``tuning.md``: the search space, a line per trial, and the choice."""
    keys = list(record["candidates"])
    choice = record["choice"]
    lines = [f"# Tuning `{record['strategy']}` on {record['partition']} (validation {record['metric']})", "",
             f"{record['trials_run']} trials of a budget of {record['budget']}; {record['note']}.", "",
             "| knob | candidates (default first) | declared |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | {', '.join(map(str, record['candidates'][k]))} | {record['search_space'][k]} |" for k in keys]
    lines += ["", "| trial | " + " | ".join(f"`{k}`" for k in keys) + f" | status | validation {record['metric']} "
              "| bytes | wall s | |", "| --- | " + "--- | " * len(keys) + "--- | --- | --- | --- | --- |"]
    for t in record["trials"]:
        mark = "**chosen**" if choice is not None and t["trial"] == choice["trial"] else ""
        mark = mark or ("default" if t["trial"] == 0 else "")
        wall = "–" if t["wall_seconds"] is None else f"{t['wall_seconds']:.0f}"
        lines.append(f"| {t['trial']} | " + " | ".join(str(t["point"][k]) for k in keys)
                     + f" | {t['status']} | {_cell(t['score'])} | {_cell(t['bytes'])} | {wall} | {mark} |")
    lines += ["", f"Choice: {'`' + ' '.join(choice['overrides']) + '`' if choice else 'not yet (trials left)'}", ""]
    return "\n".join(lines)


def choices_markdown(records: list[Mapping[str, Any]]) -> str:
    """``OUT/tuning/choices.md``: per partition × strategy, the trials, the default point's
    and the chosen point's validation score, and the chosen settings."""
    lines = ["| partition | strategy | trials (budget, grid) | default point | chosen | chosen settings |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        trials, choice = r["trials"], r["choice"]
        finished = sum(t["status"] in ("completed", "refused") for t in trials)
        chosen = f"{_cell(choice['score'])} (trial {choice['trial']})" if choice else f"{finished}/{len(trials)} finished"
        settings = f"`{' '.join(choice['overrides'])}`" if choice else "–"
        lines.append(f"| {r['partition']} | `{r['strategy']}` | {r['trials_run']} ({r['budget']}, {r['grid_size']}) "
                     f"| {_cell(trials[0]['score']) if trials else '–'} | {chosen} | {settings} |")
    return "\n".join(lines) + "\n"


def read_records(root: Path) -> list[dict[str, Any]]:
    """Every ``tuning.json`` under ``root/tuning``, sorted by partition and strategy."""
    return [json.loads(p.read_text()) for p in sorted(Path(root).glob("tuning/*/*/tuning.json"))]


def read_record(root: Path, partition: str, strategy: str) -> dict[str, Any] | None:
    path = tuning_dir(root, partition, strategy) / "tuning.json"
    return json.loads(path.read_text()) if path.is_file() else None
