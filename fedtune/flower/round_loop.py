"""The one round loop of a fedtune run, which can start at any round (resume).

Flower's ``Strategy.start`` always begins at round 1 and evaluates the initial model;
it has no resume and no place for what a run does after each round.  This loop does
what it does for fedtune's strategies (train, then central evaluation; client-side
evaluation is empty for every fedtune method) from ``first_round`` on, so a fresh run
(``first_round=1``) and a resumed one run the same code, with or without a DP wrapper
(the wrapper is the strategy the loop drives).

After every round (and after evaluating the initial model, as round 0) it calls
:meth:`RoundHooks.round_end` with a :class:`RoundEnd`: the ServerApp writes the
metrics row, the checkpoint and, under fault injection, kills itself there
(:mod:`fedtune.flower.run_record`); ``evaluate_fn`` only evaluates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy


@dataclass
class RoundEnd:
    """What one finished round hands to :meth:`RoundHooks.round_end`."""

    server_round: int  # 0: the initial model, before any training
    arrays: ArrayRecord  # the global state after the round
    evaluation: MetricRecord | None  # what evaluate_fn returned (None without one)
    replies: list[Message] = field(default_factory=list)  # the round's training replies, as received


class RoundHooks:
    """What a run does around each round of :func:`run_rounds` (default: nothing)."""

    def before_send(self, server_round: int, messages: list[Message]) -> list[Message]:
        """The training messages to send (may add to them, e.g. a resumed DP client's history)."""
        return messages

    def round_end(self, end: RoundEnd) -> None:
        """After the round's aggregation and evaluation: record, checkpoint, stop."""


def run_rounds(strategy: Strategy, grid: Grid, arrays: ArrayRecord, num_rounds: int, timeout: float,
               train_config: ConfigRecord | None = None,
               evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
               first_round: int = 1, hooks: RoundHooks | None = None) -> Result:
    """Rounds ``first_round..num_rounds`` of ``strategy`` on ``grid``, starting from ``arrays``.

    ``evaluate_fn(0, arrays)`` (the initial model) and ``hooks.round_end`` for round 0
    run only when ``first_round == 1``.
    """
    train_config = ConfigRecord() if train_config is None else train_config
    hooks = hooks or RoundHooks()
    result = Result()
    if first_round == 1:
        res = evaluate_fn(0, arrays) if evaluate_fn else None
        if res is not None:
            result.evaluate_metrics_serverapp[0] = res
        hooks.round_end(RoundEnd(0, arrays, res))
    t_start = time.time()
    for server_round in range(first_round, num_rounds + 1):
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        messages = hooks.before_send(server_round, list(strategy.configure_train(server_round, arrays,
                                                                                 train_config, grid)))
        replies = list(grid.send_and_receive(messages=messages, timeout=timeout))
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            result.arrays = arrays = new_arrays
        if metrics is not None:
            result.train_metrics_clientapp[server_round] = metrics
        res = evaluate_fn(server_round, arrays) if evaluate_fn else None
        if res is not None:
            result.evaluate_metrics_serverapp[server_round] = res
        hooks.round_end(RoundEnd(server_round, arrays, res, replies))
    log(INFO, "rounds %d..%d done in %.2f s", first_round, num_rounds, time.time() - t_start)
    return result
