"""Client replies: what a train reply must hold, and how one is decoded and validated.

Any ClientApp, fedtune's or a plain Flower one, replies to a train message with the
records Flower's own ``FedAvg`` reads: ``{"arrays": ArrayRecord, "metrics": MetricRecord}``
where the metrics hold ``num-examples`` (the client's weight ``n_k``).  A reply that
cannot be aggregated (a missing or mistyped record, wrong keys, shapes or dtypes,
NaN/Inf, a bad ``num-examples``) is rejected on its own, with its reason recorded as
that client's failure; it never fails the round.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Protocol

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fedtune.errors import PayloadError
from fedtune.models.state import check_arrays

Arrays = dict[str, torch.Tensor]
ARRAYS, METRICS, NUM_EXAMPLES = "arrays", "metrics", "num-examples"


@dataclass
class ClientUpdate:
    """One client's decoded, validated reply."""

    partition_id: int
    num_examples: int
    arrays: Arrays
    metrics: dict[str, float]


@dataclass
class RoundInfo:
    """What happened in one round (read by the ServerApp for ``metrics.csv``)."""

    sampled: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    train_loss: float = float("nan")
    aggregate_seconds: float = 0.0
    budget_spent: list[int] = field(default_factory=list)  # DP: replied, but their privacy budget is spent
    epsilon: float = float("nan")  # DP: max ε over all clients so far (NaN without privacy)


def weights_for(updates: list[ClientUpdate], weighting: str) -> list[float]:
    """Normalised aggregation weights ``p_k``: by example count (FedAvg) or uniform."""
    raw = [float(u.num_examples) if weighting == "examples" else 1.0 for u in updates]
    total = sum(raw)
    return [w / total for w in raw]


class UploadSpec(Protocol):
    """What a strategy says a client's upload must be (see :class:`FedtuneStrategy`)."""

    def expected_upload(self, partition_id: int) -> dict[str, tuple[int, ...]]: ...

    def expected_dtypes(self, partition_id: int) -> dict[str, torch.dtype]: ...

    def payload_problem(self, partition_id: int, arrays: Arrays) -> str: ...


def decode_replies(replies: Iterable[Message], info: RoundInfo, spec: UploadSpec,
                   partition_of: Callable[[int], int], client_epsilon: dict[int, float],
                   unattributed: list[str] | None = None) -> Iterator[ClientUpdate]:
    """Valid updates; every other reply is recorded in ``info.failures`` with its reason.

    ``partition_of`` maps a node id to its partition id (-1: not a client's node);
    ``client_epsilon`` collects the ε a private client reports.  Error replies from the
    SuperLink itself (no client's node) go to ``unattributed`` when it is given.
    """
    for reply in replies:
        pid = partition_of(reply.metadata.src_node_id)
        if reply.has_error() and pid < 0 and unattributed is not None:  # from the SuperLink, not a node
            unattributed.append(last_line(reply.error.reason))
            continue
        if reply.has_error():
            info.failures[pid] = last_line(reply.error.reason)
            log(WARNING, "client %d failed: %s", pid, info.failures[pid])
            continue
        try:
            if _budget_spent(pid, reply, info, client_epsilon):
                continue
            expected = spec.expected_upload(pid)
            arrays = _arrays(reply.content, required=bool(expected))
            check_arrays(arrays, expected, spec.expected_dtypes(pid))
            if problem := spec.payload_problem(pid, arrays):
                raise PayloadError(problem)
            metrics = dict(_record(reply.content, METRICS, MetricRecord))
            if NUM_EXAMPLES not in metrics:
                raise PayloadError(f"the {METRICS!r} record has no {NUM_EXAMPLES!r} (the client's example "
                                   f"count, as Flower's FedAvg reads it); it has {sorted(metrics)[:5]}")
            count = num_examples(metrics[NUM_EXAMPLES])
            scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        except (PayloadError, KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            info.failures[pid] = f"rejected payload: {exc}"
            log(WARNING, "client %d: %s", pid, info.failures[pid])
            continue
        yield ClientUpdate(pid, count, arrays, scalars)


def missing_replies(info: RoundInfo, unattributed: list[str]) -> None:
    """Count a sampled client that never answered as failed (deployment: its node vanished,
    or the round timed out); the SuperLink's own error replies name no client, so their
    reason is attached to the missing ones."""
    answered = set(info.received) | set(info.failures) | set(info.budget_spent)
    reason = unattributed[0] if unattributed else "no reply within federation.round_timeout"
    for pid in info.sampled:
        if pid not in answered:
            info.failures[pid] = reason
            log(WARNING, "client %d failed: %s", pid, reason)


def _budget_spent(pid: int, reply: Message, info: RoundInfo, client_epsilon: dict[int, float]) -> bool:
    """Record a DP client's ε; True when it sent nothing because its budget is spent
    (no contribution: neither an update nor a failure)."""
    metrics = reply.content[METRICS] if METRICS in reply.content else {}
    if "dp-epsilon" in metrics:
        client_epsilon[pid] = float(metrics["dp-epsilon"])
    if not metrics.get("dp-budget-spent"):
        return False
    info.budget_spent.append(pid)
    log(INFO, "client %d: privacy budget spent (epsilon %.4g); no contribution", pid,
        client_epsilon.get(pid, float("nan")))
    return True


def _record(content: RecordDict, name: str, kind: type) -> object:
    """``content[name]``, which must be a ``kind`` record; a :class:`PayloadError` that
    says what the reply holds instead."""
    if name not in content:
        held = {key: type(rec).__name__ for key, rec in content.items()}
        raise PayloadError(f"reply has no {name!r} record ({kind.__name__}); it holds {held or 'none'}")
    record = content[name]
    if not isinstance(record, kind):
        raise PayloadError(f"reply record {name!r} is a {type(record).__name__}, expected {kind.__name__}")
    return record


def _arrays(content: RecordDict, required: bool) -> Arrays:
    """The upload's tensors (an empty upload may leave the record out when none is expected)."""
    if ARRAYS not in content and not required:
        return {}
    record = _record(content, ARRAYS, ArrayRecord)
    assert isinstance(record, ArrayRecord)
    return record.to_torch_state_dict()


def last_line(reason: str) -> str:
    """The informative end of an error reply's reason: Flower's simulation writes
    ``<class ...>:<'traceback ... Exception ClientAppException occurred. Message: why'>``."""
    lines = [line.strip() for line in str(reason).strip().splitlines() if line.strip()]
    if not lines:
        return "error reply without a reason"
    line = lines[-1].removesuffix("'>")
    line = re.sub(r"^Exception (\w+) occurred\. Message: ", r"\1: ", line)
    return line[:200]


def num_examples(value: object) -> int:
    """A client's ``num-examples`` as a positive int; :class:`PayloadError` otherwise."""
    number = float(value)  # type: ignore[arg-type]  # a list or a string raises TypeError/ValueError
    if not (number >= 1 and number.is_integer()):
        raise PayloadError(f"num-examples must be an integer >= 1, got {value!r}")
    return int(number)
