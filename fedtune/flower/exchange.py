"""The server's messages to clients, built in one place: a round's ``train`` messages, the
one-time ``train.setup`` exchange, and the refusal of a ClientApp that lacks a handler a
method needs.

Every message carries ``{"arrays": ..., "config": {..., "server-round", "method"}}``, the
shape fedtune's ClientApp (:mod:`fedtune.flower.client_app`) and Flower's own ``FedAvg``
clients read.  A setup message reaches the trainer's ``setup`` method; the metered grid
counts it as ``one_time`` traffic (``resume`` after a restart).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedtune.flower.nodes import ROLLCALL, lacks_handler
from fedtune.flower.replies import Arrays

SETUP = "train.setup"  # the ClientApp's one-time exchange (its trainer's ``setup``)


def build_messages(node_of: Mapping[int, int], partitions: Iterable[int], message_type: str,
                   config: Mapping[str, Any], arrays_of: Callable[[int], Arrays]) -> list[Message]:
    """One message per partition id, to its node: ``arrays_of(pid)`` and a copy of ``config``."""
    return [Message(RecordDict({"arrays": ArrayRecord(arrays_of(pid)), "config": ConfigRecord(dict(config))}),
                    dst_node_id=node_of[pid], message_type=message_type) for pid in partitions]


def send_setup(grid: Grid, node_of: Mapping[int, int], config: Mapping[str, Any],
               arrays_of: Callable[[int], Arrays], timeout: float) -> list[Message]:
    """A ``train.setup`` message to every known client, and their replies as they came
    (error replies included); no message, no wait, when no client is known."""
    messages = build_messages(node_of, sorted(node_of), SETUP, config, arrays_of)
    return list(grid.send_and_receive(messages, timeout=timeout)) if messages else []


def handlerless(replies: Iterable[Message], message_type: str) -> list[int]:
    """Node ids whose ClientApp answered that it has no ``message_type`` handler."""
    return [r.metadata.src_node_id for r in replies if lacks_handler(r, message_type)]


def needs_error(strategy_name: str, needs: tuple[str, ...], why: str) -> str:
    """The one line that refuses a ClientApp a method cannot drive, saying what it must provide."""
    provide = "; ".join(needs) or "the handlers of fedtune's ClientApp"
    return (f"{strategy_name} cannot drive this ClientApp ({why}): each ClientApp must provide "
            f"{provide}; and a '{ROLLCALL}' query handler replying MetricRecord({{'partition-id': i}}) "
            f"(fedtune's own ClientApp, fedtune.flower.client_app, has all)")
