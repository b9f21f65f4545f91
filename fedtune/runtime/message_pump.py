"""A message pump for Flower's simulation engine whose cost does not grow with the clients.

Why: in Flower 1.41 the simulation engine moves server messages to the client workers
with ``vce_api.add_messages_to_queue``, which, every 0.1 s, asks the in-memory LinkState
for the pending messages of *each* virtual client in turn; each such call walks the whole
message store and re-validates every stored message (expiry, federation membership).
A sweep is therefore O(clients × stored messages) under the state's lock: with 10,000
virtual clients a steady round took about twice as long as with 10, and the first
round's roll-call (10,000 messages in the store at once) took minutes
(``simulations/bench_scale.py`` measures both).

``pump_once`` does the same job in one pass over the store: it validates every stored
message once, then hands each client at most one undelivered message per sweep
(as Flower's ``limit=1`` does), marking it delivered under the same lock.  What a
client receives, and when it is marked delivered, is unchanged; only the bookkeeping
is O(stored messages).  :func:`fast_message_pump` swaps it in for the duration of one
``run_simulation`` (same process, Flower's engine runs in threads) when the engine is the
version it was written against (:mod:`fedtune.runtime.flower_private`, which also holds
the pass itself, since it reads the LinkState's store); on another version it says so in
one line and leaves Flower's loop alone.  ``runtime.fast_message_pump=false`` turns it off.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

from fedtune.runtime.flower_private import FAST_MESSAGE_PUMP, message_loop, pump_once, usable

SWEEP_SECONDS = 0.1  # Flower's own pause between sweeps


def _pump(state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Drop-in for ``vce_api.add_messages_to_queue`` (same arguments, same loop)."""
    node_ids = frozenset(nodes_mapping)
    while not f_stop.is_set():
        pump_once(state, queue, node_ids)
        f_stop.wait(SWEEP_SECONDS)


@contextmanager
def fast_message_pump(enabled: bool = True) -> Iterator[bool]:
    """Use the one-pass ``pump_once`` in Flower's simulation engine inside the block.

    Yields whether it is in use.  The original is restored on exit, also on error.  A
    state that is not the in-memory one falls back to Flower's own loop, so the swap can
    never lose a message.
    """
    if not enabled or not usable(FAST_MESSAGE_PUMP):
        yield False
        return
    with message_loop(_pump):
        yield True
