"""Node discovery: which Flower node serves which partition id.

fedtune samples clients by partition id (:mod:`fedtune.sampling`), so before round 1 the
server learns a node id → partition id map, from the first of these that applies:

1. **the engine's roster**: in ``fedtune run``'s simulation the engine's own node map
   (:mod:`fedtune.runtime.roster`), no messages;
2. **the roll-call**: a ``query.rollcall`` message to every node; fedtune's ClientApp
   answers with the ``partition-id`` of its node config, so a seed samples the same
   clients in simulation and in deployment;
3. **by rank**: a node that cannot answer the roll-call (a plain Flower ClientApp with
   no ``query.rollcall`` handler) is given, as its partition id, its rank among the
   sorted node ids.  Sampling then still draws from the run's seeded stream, but over
   node ids that Flower assigns per run, so it is reproducible only for the same node
   ids; one warning line says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import WARNING

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtune.runtime.roster import SimulationRoster

ROLLCALL = "query.rollcall"
PARTITION_ID = "partition-id"
ENGINE, ROLLCALL_SOURCE, BY_RANK = "the simulation engine", "the roll-call", "the sorted node ids"


def no_handler_reason(message_type: str) -> str:
    """The words of Flower's ``ClientApp`` when it has no function for ``message_type``
    (``flwr.clientapp.ClientApp.__call__``)."""
    category, _, action = message_type.partition(".")
    return f"No {category} function registered with name '{action or 'default'}'"


def lacks_handler(reply: Message, message_type: str) -> bool:
    """True when ``reply`` is the error of a ClientApp with no function for ``message_type``."""
    return reply.has_error() and no_handler_reason(message_type) in str(reply.error.reason)


@dataclass(frozen=True)
class NodeMap:
    """Partition id → node id, and where it came from (one of :data:`ENGINE`,
    :data:`ROLLCALL_SOURCE`, :data:`BY_RANK`)."""

    node_of: dict[int, int]
    source: str

    @property
    def partition_of_node(self) -> dict[int, int]:
        return {node: pid for pid, node in self.node_of.items()}

    @property
    def by_rank(self) -> bool:
        """True when the nodes could not say their partition (a plain Flower ClientApp)."""
        return self.source == BY_RANK


def discover_nodes(grid: Grid, num_clients: int, timeout: float,
                   roster: SimulationRoster | None = None) -> NodeMap:
    """The map of all ``num_clients`` partitions (see the module docstring for the order).

    Raises ``RuntimeError`` when fewer nodes connect within ``timeout`` seconds, when a
    node fails the roll-call for another reason than a missing handler, or when the
    answers do not name each partition in ``[0, num_clients)`` exactly once.
    """
    if roster is not None and (engine_map := roster.wait(timeout)) is not None:
        return _checked(engine_map.items(), num_clients, ENGINE)
    nodes = _wait_for_nodes(grid, num_clients, timeout)
    queries = [Message(RecordDict({"config": ConfigRecord({"rollcall": 1})}), dst_node_id=n,
                       message_type=ROLLCALL) for n in nodes]
    answers, unable = [], []
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node = reply.metadata.src_node_id
        if lacks_handler(reply, ROLLCALL):
            unable.append(node)
        elif reply.has_error():
            raise RuntimeError(f"node {node} failed the roll-call: {reply.error.reason}")
        else:
            answers.append((node, _partition_id(node, reply)))
    if not unable:
        return _checked(answers, num_clients, ROLLCALL_SOURCE)
    if len(nodes) != num_clients:
        raise RuntimeError(f"{len(nodes)} nodes connected, but num_clients is {num_clients}: nodes without a "
                           f"'{ROLLCALL}' handler are numbered by rank, which needs exactly num_clients nodes")
    log(WARNING, "%d of %d nodes have no '%s' handler: partition ids are ranks of the sorted node ids, so "
        "sampling is reproducible only for the same node ids", len(unable), len(nodes), ROLLCALL)
    return _checked(((node, rank) for rank, node in enumerate(nodes)), num_clients, BY_RANK)


def _wait_for_nodes(grid: Grid, num_clients: int, timeout: float) -> list[int]:
    """The sorted ids of the connected nodes, once at least ``num_clients`` are."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {num_clients} nodes connected within {timeout:.0f} s")
        time.sleep(0.2)
    return nodes


def _partition_id(node: int, reply: Message) -> int:
    metrics = reply.content["metrics"] if "metrics" in reply.content else None
    if not isinstance(metrics, MetricRecord) or PARTITION_ID not in metrics:
        raise RuntimeError(f"node {node} answered the roll-call without a 'metrics' record holding "
                           f"'{PARTITION_ID}'")
    return int(metrics[PARTITION_ID])  # type: ignore[arg-type]


def _checked(node_partitions: Iterable[tuple[int, int]], num_clients: int, source: str) -> NodeMap:
    """``(node id, partition id)`` pairs as a map: one node per partition, all present."""
    node_of: dict[int, int] = {}
    for node, pid in node_partitions:
        if pid in node_of or not 0 <= pid < num_clients:
            raise RuntimeError(f"node {node} reports partition-id {pid}, "
                               f"which is duplicated or outside [0, {num_clients})")
        node_of[pid] = node
    if len(node_of) < num_clients:
        missing = sorted(set(range(num_clients)) - set(node_of))
        raise RuntimeError(f"{source} names no node for partitions {missing[:10]} "
                           f"({len(node_of)} of {num_clients} known)")
    return NodeMap(node_of, source)
