"""The ServerApp's end-of-round hook: what a run writes and does after each round.

:class:`RunRecorder` is the :class:`~fedtune.flower.round_loop.RoundHooks` of a fedtune
run.  After round t's aggregation and central evaluation (``evaluate_fn`` only
evaluates) it

1. brings the server's copy of the DP accountant histories up to date
   (:mod:`fedtune.privacy.histories`, example-level DP only);
2. appends round t's row to ``metrics.csv`` (with the round's ``lr``, :func:`fedtune.schedule.method_lr`)
   and prints one progress line, with the time left estimated from the measured round times
   (:func:`time_left`);
3. writes the checkpoint (:mod:`fedtune.results.checkpoint`; not for round 0);
4. mirrors the row into the run's tracker (:mod:`fedtune.tracking`; after the checkpoint,
   so a resume knows which rounds the tracked run can hold);
5. under ``faults.server_kill_round = t``, dies as a killed process does (SIGKILL), so
   ``fedtune run resume=RUN_DIR`` can be tested against the uninterrupted run.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

from flwr.app import Message

from fedtune.flower.round_loop import RoundEnd, RoundHooks
from fedtune.privacy.histories import AccountantHistories
from fedtune.results.checkpoint import save_checkpoint
from fedtune.results.store import RunStore
from fedtune.schedule import method_lr
from fedtune.tracking.base import Tracker


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _cell(value: float) -> str:
    """A metrics.csv cell: 6 decimals, empty for NaN (not measured)."""
    return "" if math.isnan(value) else f"{value:.6f}"


def time_left(round_seconds: list[float], rounds_left: int) -> float | None:
    """Seconds the ``rounds_left`` remaining rounds will take: the mean of the measured
    ``round_seconds`` (rounds >= 1; round 0 only evaluates) times their number; ``None``
    before any round was measured."""
    if not round_seconds:
        return None
    return sum(round_seconds) / len(round_seconds) * max(rounds_left, 0)


def format_time_left(seconds: float | None) -> str:
    """``~6 min left`` (``~40 s``, ``~2.5 h``) for the progress line; ``""`` when unknown or done."""
    if seconds is None or seconds <= 0:
        return ""
    if seconds < 60:
        return f", ~{seconds:.0f} s left"
    if seconds < 5400:
        return f", ~{seconds / 60:.0f} min left"
    return f", ~{seconds / 3600:.1f} h left"


GENERATIVE_CELLS = {"rouge-l": "rouge_l", "exact-match": "exact_match", "heldout-rouge-l": "heldout_rouge_l",
                    "heldout-exact-match": "heldout_exact_match"}


def generative_cells(values: dict[str, Any]) -> dict[str, str]:
    """A generative dataset's extra metrics.csv cells (none for a classification dataset, whose
    columns stay :data:`~fedtune.results.store.METRIC_COLUMNS`): rouge_l, exact_match, their
    heldout_ counterparts, eval_seconds, and ``heldout_<metric>/<category>`` per held-out
    category when several are held out."""
    if "rouge-l" not in values:  # a classification dataset, or a round not evaluated (cells left empty)
        return {}
    cells = {col: _cell(float(values.get(key, math.nan))) for key, col in GENERATIVE_CELLS.items()}
    cells["eval_seconds"] = f"{float(values.get('eval-seconds', 0.0)):.3f}"
    for key in sorted((k for k in values if "/" in k), key=lambda k: (k.partition("/")[2], k)):  # by category
        metric, _, category = key.partition("/")
        cells[f"{metric.replace('-', '_')}/{category}"] = _cell(float(values[key]))
    return cells


class RunRecorder(RoundHooks):
    """Metrics row, progress line, checkpoint and fault kill after every round (module doc).

    Parameters
    ----------
    cfg, store, strategy : the run's config, its directory, the method's strategy.
    privacy : what else the checkpoint must hold, an object with ``state_dict()`` (the
        DP histories, or the client-level DP wrapper), or ``None``.
    t_start : ``time.perf_counter()`` at the run's start (earlier for a resumed run).
    tracker : where the rows are mirrored (:func:`fedtune.tracking.open_tracker`); none by default.
    """

    def __init__(self, cfg: Any, store: RunStore, strategy: Any, privacy: Any = None,
                 t_start: float | None = None, tracker: Tracker | None = None) -> None:
        self.cfg, self.store, self.strategy, self.privacy = cfg, store, strategy, privacy
        self.tracker = tracker if tracker is not None else Tracker()
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.last = time.perf_counter()

    def before_send(self, server_round: int, messages: list[Message]) -> list[Message]:
        if isinstance(self.privacy, AccountantHistories):
            return self.privacy.give_back(messages, self.strategy.partition_of_node)
        return messages

    def round_end(self, end: RoundEnd) -> None:
        if isinstance(self.privacy, AccountantHistories):
            self.privacy.observe(end.replies, self.strategy.partition_of_node)
        self.record(end)
        cfg, server_round = self.cfg, end.server_round
        if server_round > 0:
            save_checkpoint(self.store.dir, server_round, self.strategy.state_dict(), cfg.to_dict(),
                            self.privacy.state_dict() if self.privacy is not None else None)
        self.tracker.log_row(server_round, self.store.rows[-1])
        if server_round and server_round == cfg.faults.server_kill_round:  # fault injection: die as a killed process does
            print(f"fedtune: faults.server_kill_round={server_round}: killing the server", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def record(self, end: RoundEnd) -> None:
        """Round ``end.server_round``'s row in ``metrics.csv`` and its progress line."""
        cfg, strategy, server_round = self.cfg, self.strategy, end.server_round
        values = dict(end.evaluation) if end.evaluation is not None else {}
        loss, acc = (float(values.get(k, math.nan)) for k in ("eval-loss", "eval-accuracy"))
        h_loss, h_acc = (float(values.get(k, math.nan)) for k in ("heldout-loss", "heldout-accuracy"))
        now = time.perf_counter()
        info = strategy.rounds.get(server_round)
        totals = strategy.ledger.round_totals(server_round)
        row = {"round": server_round, "strategy": cfg.strategy.name,
               "sampled_clients": ";".join(map(str, info.sampled)) if info else "",
               "num_replies": len(info.received) if info else 0, "num_failures": len(info.failures) if info else 0,
               "failed_clients": ";".join(map(str, sorted(info.failures))) if info else "",
               "train_loss": f"{info.train_loss:.6f}" if info else "", "eval_loss": f"{loss:.6f}",
               "eval_accuracy": f"{acc:.6f}", **totals,
               "cumulative_bytes": strategy.ledger.cumulative_bytes(server_round),
               "aggregate_seconds": f"{info.aggregate_seconds:.4f}" if info else "0",
               "round_seconds": f"{now - self.last:.3f}", "wall_seconds": f"{now - self.t_start:.3f}",
               "epsilon": _cell(info.epsilon if info else math.nan), "heldout_loss": _cell(h_loss),
               "heldout_accuracy": _cell(h_acc),
               "lr": repr(method_lr(cfg, server_round)) if server_round > 0 else ""}
        row.update(generative_cells(values))
        self.last = now
        self.store.add_round(row)
        first = self.store.rows[0]["eval_accuracy"]
        fails = f", {row['num_failures']} failed" if row["num_failures"] else ""
        if info and info.failures:  # name them: in deployment a failure is a participant to look at
            fails += " (client " + ", ".join(map(str, sorted(info.failures))) + ")"
        if row["epsilon"]:
            spent = f", {len(info.budget_spent)} out of budget" if info and info.budget_spent else ""
            fails += f"  eps {float(row['epsilon']):.3g}{spent}"
        measured = [float(r["round_seconds"]) for r in self.store.rows if int(r["round"]) > 0]
        left = format_time_left(time_left(measured, cfg.num_rounds - server_round))
        rouge = f"  rouge-L {float(row['rouge_l']):.4f}" if row.get("rouge_l") else ""
        took = float(values.get("eval-seconds", 0.0))
        print(f"[round {server_round:>3}/{cfg.num_rounds}] acc {acc:.4f} (round 0: {float(first):.4f}){rouge}  "
              f"eval loss {loss:.4f}{f' (eval {took:.1f}s)' if took else ''}  "
              f"clients {row['num_replies']}/{len(info.sampled) if info else 0}{fails}  "
              f"up {_mb(totals['bytes_up'])} down {_mb(totals['bytes_down'])}  "
              f"total {_mb(row['cumulative_bytes'])}  {now - self.t_start:.1f}s{left}", flush=True)
