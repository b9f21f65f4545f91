"""A message pump for Flower's simulation engine whose cost does not grow with the clients.

Why: in Flower 1.41 the simulation engine moves server messages to the client workers
with ``vce_api.add_messages_to_queue``, which, every 0.1 s, asks the in-memory LinkState
for the pending messages of *each* virtual client in turn; each such call walks the whole
message store and re-validates every stored message (expiry, federation membership).
A sweep is therefore O(clients × stored messages) under the state's lock: with 10,000
virtual clients a steady round took about twice as long as with 10, and the first
round's roll-call (10,000 messages in the store at once) took minutes
(``simulations/bench_scale.py`` measures both).

:func:`pump_once` does the same job in one pass over the store: it validates every
stored message once, then hands each client at most one undelivered message per sweep
(as Flower's ``limit=1`` does), marking it delivered under the same lock.  What a
client receives, and when it is marked delivered, is unchanged; only the bookkeeping
is O(stored messages).  :func:`fast_message_pump` swaps it in for the duration of one
``run_simulation`` (same process, Flower's engine runs in threads) when the engine and
the state are the ones it was written against, and otherwise leaves Flower alone.
``runtime.fast_message_pump=false`` turns it off.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

VERIFIED_FLWR = ("1.41.",)  # the engine versions whose add_messages_to_queue this replaces
SWEEP_SECONDS = 0.1  # Flower's own pause between sweeps


def pump_once(state: Any, queue: Queue, node_ids: frozenset[int] | set[int]) -> int:
    """Move the undelivered messages for ``node_ids`` (one per client) into ``queue``.

    ``state`` is Flower's ``InMemoryLinkState``.  Returns how many messages moved.
    """
    from flwr.supercore.date import now

    picked: dict[int, Any] = {}
    with state.lock:  # re-entrant: _check_stored_messages takes it too
        stored = list(state.message_ins_store)
        state._check_stored_messages(set(stored))  # drops expired / out-of-federation messages
        for message_id in stored:
            message = state.message_ins_store.get(message_id)
            if message is None or message.metadata.delivered_at != "":
                continue
            node = message.metadata.dst_node_id
            if node in node_ids and node not in picked:
                picked[node] = message
        delivered_at = now().isoformat()
        for message in picked.values():
            message.metadata.delivered_at = delivered_at
    for message in picked.values():
        queue.put(message)
    return len(picked)


def _pump(state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Drop-in for ``vce_api.add_messages_to_queue`` (same arguments, same loop)."""
    node_ids = frozenset(nodes_mapping)
    while not f_stop.is_set():
        pump_once(state, queue, node_ids)
        f_stop.wait(SWEEP_SECONDS)


def supported() -> bool:
    """True when Flower's engine is a version this pump was checked against."""
    import flwr

    return str(flwr.__version__).startswith(VERIFIED_FLWR)


@contextmanager
def fast_message_pump(enabled: bool = True) -> Iterator[bool]:
    """Use :func:`pump_once` in Flower's simulation engine inside the block.

    Yields whether it is in use.  The original is restored on exit, also on error.  A
    state that is not the in-memory one (it has no ``message_ins_store``) falls back to
    Flower's own loop, so the swap can never lose a message.
    """
    if not enabled or not supported():
        yield False
        return
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: dict[int, int],
                              f_stop: threading.Event) -> None:
        if not hasattr(state, "message_ins_store"):
            return original(state, queue, nodes_mapping, f_stop)
        return _pump(state, queue, nodes_mapping, f_stop)

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original
