"""Write a run directory atomically, so nobody ever reads a half-written result.

Layout of a run directory::

    config.yaml      the resolved config (what ran)
    metrics.csv      one row per round (METRIC_COLUMNS; a generative dataset adds rouge_l, exact_match,
                     heldout_rouge_l, heldout_exact_match, eval_seconds), rewritten atomically each round
                     (failed_clients: the partition ids that failed; why: summary.json failures)
    ledger.csv       one row per message: round, partition, direction, kind, wire/payload bytes
    summary.json     status "running" at the start, rewritten last: status, final and initial
                     accuracy, totals, versions
    checkpoint.json  the server state after the last completed round (fedtune run resume=RUN_DIR),
                     its tensors in checkpoint-<sha256[:16]>.safetensors (fedtune.results.checkpoint)
    adapter/         the final trainable state in peft format (PeftModel.from_pretrained)

With ``tracking=tensorboard|mlflow`` (fedtune.tracking) also: ``tracking.json`` (which
tracked run mirrors this directory), ``plots/`` (the end-of-run figures), and
``tensorboard/`` (event files) or ``mlflow.db`` + ``mlartifacts/`` (the local MLflow store).

Every file is written to a temporary sibling and ``os.replace``-d into place.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

METRIC_COLUMNS = [
    "round", "strategy", "sampled_clients", "num_replies", "num_failures", "failed_clients", "train_loss", "eval_loss",
    "eval_accuracy", "bytes_up", "bytes_down", "payload_up", "payload_down", "cumulative_bytes",
    "aggregate_seconds", "round_seconds", "wall_seconds", "epsilon", "heldout_loss", "heldout_accuracy",
    "lr",
]
TIMING_COLUMNS = ("aggregate_seconds", "round_seconds", "wall_seconds")
# Labels, not measurements: a tracker (fedtune.tracking) mirrors every other numeric column
# (a list of one client id would read as a number); the round is its step.
NON_METRIC_COLUMNS = ("round", "strategy", "sampled_clients", "failed_clients")


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """:data:`METRIC_COLUMNS`, then any other column the rows hold, in the order first seen
    (a generative dataset's rouge_l, exact_match, ..., :mod:`fedtune.flower.run_record`)."""
    extra: dict[str, None] = {}
    for row in rows:
        extra.update((k, None) for k in row if k not in METRIC_COLUMNS)
    return METRIC_COLUMNS + list(extra)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """``path`` holds ``data`` or what it held before, whatever happens (temporary sibling,
    then rename).  ``durable``: fsync the file and its directory first, so the rename also
    survives a machine crash (checkpoints, whose manifest is the commit point)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for people to open
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_dir(path: Path, fill: Callable[[Path], None]) -> None:
    """Create directory ``path`` by filling a temporary sibling and renaming it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        fill(tmp)
        tmp.chmod(0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def csv_text(columns: list[str], rows: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return buf.getvalue()


class RunStore:
    """The results of one run, in ``out_dir``."""

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.rows: list[dict[str, Any]] = []

    def write_config(self, config: dict[str, Any]) -> None:
        from omegaconf import OmegaConf

        atomic_write_text(self.dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))

    def add_round(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        atomic_write_text(self.dir / "metrics.csv", csv_text(metric_columns(self.rows), self.rows))

    def write_ledger(self, rows: list[dict[str, Any]]) -> None:
        columns = ["server_round", "partition_id", "direction", "kind", "wire_bytes", "payload_bytes"]
        atomic_write_text(self.dir / "ledger.csv", csv_text(columns, rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, str]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.csv (is this a fedtune run directory?)")
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def read_ledger(run_dir: str | Path) -> list[dict[str, str]]:
    """``ledger.csv`` of a run directory, one dict per message (``[]`` if there is none)."""
    path = Path(run_dir) / "ledger.csv"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))
