"""The simulation engine's own map of virtual clients: node id → partition id.

Why: fedtune samples clients by partition id (:mod:`fedtune.sampling`), so the server must
know which node serves which partition.  In a deployment only the nodes know, and the
server asks each one (the roll-call, :class:`~fedtune.flower.strategy.FedtuneStrategy`).
In a simulation run by ``fedtune run`` the answer already exists in this process: Flower's
engine registers the virtual nodes itself (``vce_api._register_nodes``) and gives node
``n`` the node config ``partition-id = mapping[n]``.  Reading that map costs nothing,
where a roll-call is one ClientApp call per virtual client, which grows with the
federation (measured in ``simulations/bench_scale.py``).

:func:`capture_roster` records the map while one ``run_simulation`` runs (through
:mod:`fedtune.runtime.flower_private`: on another Flower version it says so in one line,
and the server holds the roll-call); ``runtime.node_map=rollcall`` keeps the roll-call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedtune.runtime.flower_private import ENGINE_NODE_MAP, on_nodes_registered, usable


class SimulationRoster:
    """Filled once, by the engine's thread, when the virtual nodes are registered."""

    def __init__(self) -> None:
        self._partition_of_node: dict[int, int] = {}
        self._ready = threading.Event()

    def record(self, partition_of_node: dict[int, int]) -> None:
        self._partition_of_node = {int(node): int(pid) for node, pid in partition_of_node.items()}
        self._ready.set()

    def wait(self, timeout: float) -> dict[int, int] | None:
        """The node id → partition id map, or ``None`` if the engine did not register
        nodes within ``timeout`` seconds."""
        return dict(self._partition_of_node) if self._ready.wait(timeout) else None


@contextmanager
def capture_roster(enabled: bool = True) -> Iterator[SimulationRoster | None]:
    """Record the node map of the simulation started inside the block.

    Yields ``None`` (the server then holds a roll-call) when disabled or when Flower's
    engine is not the version this was checked against.  The engine is restored on exit.
    """
    if not enabled or not usable(ENGINE_NODE_MAP):
        yield None
        return
    roster = SimulationRoster()
    with on_nodes_registered(roster.record):
        yield roster
