"""The ledger in a checkpoint: one int64 tensor and two short vocabularies.

A large run holds one :class:`~fedtune.comm.ledger.WireRecord` per message (clients ×
rounds × 2); as JSON objects they would dominate every checkpoint's size and digest.
Column by column they are a ``(records, 6)`` tensor of ``round, partition, direction
code, kind code, wire bytes, payload bytes`` plus the direction and kind names.  Flower's
node ids are left out: a resumed run has new ones.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.comm.ledger import WireRecord


def ledger_state(records: list[WireRecord]) -> dict[str, Any]:
    directions = sorted({r.direction for r in records})
    kinds = sorted({r.kind for r in records})
    rows = [(r.server_round, r.partition_id, directions.index(r.direction), kinds.index(r.kind), r.wire_bytes,
             r.payload_bytes) for r in records]
    return {"columns": torch.tensor(rows, dtype=torch.int64).reshape(-1, 6), "directions": directions,
            "kinds": kinds}


def ledger_records(state: dict[str, Any]) -> list[WireRecord]:
    """Inverse of :func:`ledger_state`."""
    directions, kinds = state["directions"], state["kinds"]
    return [WireRecord(rnd, pid, directions[d], kinds[k], wire, payload)
            for rnd, pid, d, k, wire, payload in state["columns"].tolist()]
