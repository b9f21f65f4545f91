"""The round loop of a fedtune run, which can start at any round (resume).

Flower's ``Strategy.start`` always begins at round 1 and evaluates the initial model;
it has no resume.  This loop does what it does for fedtune's strategies (train, then
central evaluation; client-side evaluation is empty for every fedtune method) from
``first_round`` on, so a fresh run (``first_round=1``) and a resumed one run the same
code.  Flower's DP wrappers keep Flower's own loop (and are not resumable).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy


def run_rounds(strategy: Strategy, grid: Grid, arrays: ArrayRecord, num_rounds: int, timeout: float,
               train_config: ConfigRecord | None = None,
               evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
               first_round: int = 1) -> Result:
    """Rounds ``first_round..num_rounds`` of ``strategy`` on ``grid``, starting from ``arrays``.

    ``evaluate_fn(0, arrays)`` (the initial model) runs only when ``first_round == 1``.
    """
    train_config = ConfigRecord() if train_config is None else train_config
    result = Result()
    if evaluate_fn and first_round == 1:
        if (res := evaluate_fn(0, arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = res
    t_start = time.time()
    for server_round in range(first_round, num_rounds + 1):
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        messages = strategy.configure_train(server_round, arrays, train_config, grid)
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        new_arrays, metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            result.arrays = arrays = new_arrays
        if metrics is not None:
            result.train_metrics_clientapp[server_round] = metrics
        if evaluate_fn and (res := evaluate_fn(server_round, arrays)) is not None:
            result.evaluate_metrics_serverapp[server_round] = res
    log(INFO, "rounds %d..%d done in %.2f s", first_round, num_rounds, time.time() - t_start)
    return result
