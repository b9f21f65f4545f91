"""Bytes on the wire, counted in exactly one place.

``measure`` takes a real Flower :class:`~flwr.app.Message` and returns

* **wire bytes**: the length of its serialized object tree as Flower's transport ships
  it (``Message`` → ``RecordDict`` → records → ``Array`` → ``ArrayChunk``; every node
  deflated with Flower's own serde, identical chunks deduplicated as the SuperLink
  object store does; walked through the public ``children``, ``object_id`` and
  ``deflate()`` of Flower's message classes).  This is what the deployment engine
  sends; in simulation the same objects are built.
* **payload bytes**: the scalars the method actually needs, ``numel × itemsize`` of
  every array in the message's ``ArrayRecord``\\ s (docs/methods.md#notation).  Everything
  else (npy headers, keys, protobuf, round numbers, metrics) is framing/control.

The :class:`Ledger` keeps one :class:`WireRecord` per message and direction and answers
the per-round and cumulative totals that ``metrics.csv`` and the plots read.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable

import numpy as np
from flwr.app import Message, RecordDict

DOWN, UP = "down", "up"
RESUME = "resume"
TRAIN, SPLIT = "train", "split"
# What every round repeats, per client: the method's training exchange and a split model's
# per-batch activations and gradients; not roll-calls ("control"), set-up ("one_time") or a
# restart's traffic ("resume").
ROUND_KINDS = frozenset({TRAIN, SPLIT})


@dataclass(frozen=True)
class WireRecord:
    """One message between the server and one client."""

    server_round: int
    partition_id: int
    direction: str  # "down" (server → client) or "up" (client → server)
    kind: str  # "train", "control" (roll-call), "one_time" (setup broadcasts) or "resume" (a restart's)
    wire_bytes: int
    payload_bytes: int
    node_id: int = field(default=0, compare=False)  # Flower's random id: kept out of the CSV


def payload_bytes(content: RecordDict) -> int:
    """Scalars × dtype size over all arrays in ``content``."""
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            total += math.prod(array.shape) * np.dtype(array.dtype).itemsize
    return total


def object_tree(obj: Any, seen: dict[str, Any] | None = None) -> dict[str, Any]:
    """``obj`` and every object below it, once per object id (children before parents)."""
    seen = {} if seen is None else seen
    for child in (obj.children or {}).values():
        object_tree(child, seen)
    seen[obj.object_id] = obj
    return seen


def measure(message: Message) -> tuple[int, int]:
    """Return ``(wire_bytes, payload_bytes)`` of a message."""
    wire = sum(len(obj.deflate()) for obj in object_tree(message).values())
    payload = payload_bytes(message.content) if message.has_content() else 0
    return wire, payload


class Ledger:
    """All :class:`WireRecord` s of a run."""

    def __init__(self, records: Iterable[WireRecord] = ()) -> None:
        self.records: list[WireRecord] = list(records)

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, str]]) -> "Ledger":
        """The ledger of a finished run from its ``ledger.csv`` rows (:meth:`rows`)."""
        return cls(WireRecord(int(r["server_round"]), int(r["partition_id"]), r["direction"], r["kind"],
                              int(r["wire_bytes"]), int(r["payload_bytes"])) for r in rows)

    def record(self, message: Message, server_round: int, partition_id: int, direction: str, kind: str,
               node_id: int = 0) -> WireRecord:
        wire, payload = measure(message)
        rec = WireRecord(server_round, partition_id, direction, kind, wire, payload, node_id)
        self.records.append(rec)
        return rec

    def attribute(self, partition_of_node: dict[int, int]) -> None:
        """Fill in the partition of records made before it was known (the roll-call)."""
        self.records = [replace(r, partition_id=partition_of_node.get(r.node_id, -1)) if r.partition_id < 0 else r
                        for r in self.records]

    def method_records(self) -> list[WireRecord]:
        """The records of the method's own traffic: all but a resumed run's restart
        (its roll-call and re-sent client state), which an uninterrupted run never sends;
        those stay in ``ledger.csv`` and in summary.json ``resume_bytes``."""
        return [r for r in self.records if r.kind != RESUME]

    def round_totals(self, server_round: int) -> dict[str, int]:
        """Wire and payload bytes of one round, per direction."""
        out = {"bytes_up": 0, "bytes_down": 0, "payload_up": 0, "payload_down": 0}
        for r in self.method_records():
            if r.server_round == server_round:
                out[f"bytes_{r.direction}"] += r.wire_bytes
                out[f"payload_{r.direction}"] += r.payload_bytes
        return out

    def payload_per_client_round(self, direction: str) -> float:
        """Mean payload bytes one client exchanges in one round in ``direction``: its messages of
        :data:`ROUND_KINDS` summed per (round, client), over the client-rounds that carried any
        (a split model sends many messages a round; an error reply carries none)."""
        sums: defaultdict[tuple[int, int], int] = defaultdict(int)
        for r in self.records:
            if r.kind in ROUND_KINDS and r.direction == direction:
                sums[(r.server_round, r.partition_id)] += r.payload_bytes
        carried = [v for v in sums.values() if v > 0]
        return sum(carried) / len(carried) if carried else 0.0

    def cumulative_bytes(self, up_to_round: int) -> int:
        """Wire bytes in both directions of all rounds ``<= up_to_round``."""
        return sum(r.wire_bytes for r in self.method_records() if r.server_round <= up_to_round)

    def rows(self) -> list[dict[str, int | str]]:
        """One dict per record, in a deterministic order (replies arrive in any order)."""
        order = sorted(self.records, key=lambda r: (r.server_round, r.kind, r.direction != DOWN, r.partition_id))
        return [{k: v for k, v in asdict(r).items() if k != "node_id"} for r in order]
