"""A Flower ``Grid`` that records every message it carries in a :class:`Ledger`.

Wrapping the grid (rather than the strategy) means that any loop driving it, fedtune's
or Flower's own ``Strategy.start``, is metered the same way, and that strategies and
trainers never count bytes themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.comm.ledger import DOWN, TRAIN, UP, Ledger


def _kind(message_type: str) -> str:
    if message_type.startswith("query"):
        return "control"
    return "one_time" if message_type.endswith(".setup") else TRAIN


class MeteredGrid(Grid):
    """Delegate to ``inner`` and record each outgoing message and each reply.

    Parameters
    ----------
    inner : the grid handed to the ServerApp.
    ledger : where the records go.
    partition_of : maps a node id to its partition id (-1 before the roll-call).
    """

    def __init__(self, inner: Grid, ledger: Ledger, partition_of: Callable[[int], int]) -> None:
        self.inner, self.ledger, self.partition_of = inner, ledger, partition_of
        self.server_round = 0
        self.kind: str | None = None  # when set, the ledger kind of every message (e.g. "resume")

    # --- metered traffic -------------------------------------------------------------
    def _record(self, messages: list[Message], direction: str) -> None:
        for m in messages:
            node = m.metadata.dst_node_id if direction == DOWN else m.metadata.src_node_id
            self.ledger.record(m, self.server_round, self.partition_of(node), direction,
                               self.kind or _kind(m.metadata.message_type), node)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._record(messages, DOWN)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self._record(replies, UP)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._record(messages, DOWN)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self._record(replies, UP)
        return replies

    # --- plain delegation ------------------------------------------------------------
    def set_run(self, run):  # type: ignore[no-untyped-def]
        self.inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.inner.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.inner.get_nodes()


@contextmanager
def metered_as(grid: Grid, kind: str) -> Iterator[None]:
    """Record the messages sent inside the block under ledger kind ``kind`` (e.g. a
    resume's roll-call and re-sync as ``resume``); a grid that is not metered is left alone."""
    if not isinstance(grid, MeteredGrid):
        yield
        return
    grid.kind, previous = kind, grid.kind
    try:
        yield
    finally:
        grid.kind = previous
