"""The simulation message pump hands out exactly what Flower's own loop hands out.

Both run against a real ``InMemoryLinkState`` with real nodes and messages pushed through
Flower's ``InMemoryGrid``, as ``run_simulation`` builds them.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedtune.runtime.flower_private import pump_once
from fedtune.runtime.message_pump import fast_message_pump


@pytest.fixture(autouse=True)
def _restore_task_identity():
    """These tests act as the ServerApp of their own runs; leave the process as it was."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _world(num_nodes: int):
    """A LinkState with ``num_nodes`` registered virtual nodes and a run, as run_simulation makes it."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = vce_api._register_nodes(num_nodes, factory)
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, sorted(nodes), grid


def _push(grid: InMemoryGrid, nodes: list[int], targets: list[int], ttl: float | None = None) -> None:
    """Message ``i`` (content ``{"i": i}``) to node ``nodes[targets[i]]``, stored by the grid."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, grid.run.run_id, SUPERLINK_NODE_ID
    messages = [Message(RecordDict({"config": ConfigRecord({"i": i})}), dst_node_id=nodes[t], message_type="train",
                        **({"ttl": ttl} if ttl else {})) for i, t in enumerate(targets)]
    assert len(list(grid.push_messages(messages))) == len(messages)


def _flower_sweep(state, nodes: list[int]) -> list[tuple[int, int]]:
    """One sweep of Flower's own loop body: each node asks for one message."""
    got = [m for n in nodes for m in state.get_message_ins(node_id=n, limit=1)]
    return sorted((nodes.index(m.metadata.dst_node_id), int(m.content["config"]["i"])) for m in got)


def _pump_sweep(state, nodes: list[int], served: list[int] | None = None) -> list[tuple[int, int]]:
    q: queue.Queue = queue.Queue()
    moved = pump_once(state, q, set(nodes if served is None else served))
    got = list(q.queue)
    assert moved == len(got)
    assert all(m.metadata.delivered_at != "" for m in got)
    return sorted((nodes.index(m.metadata.dst_node_id), int(m.content["config"]["i"])) for m in got)


def test_pump_delivers_what_flowers_loop_delivers_sweep_by_sweep() -> None:
    targets = [0, 1, 1, 2, 1, 4, 0, 7, 7, 7, 3]  # several messages queued for some nodes, none for others
    stock_state, stock_nodes, stock_grid = _world(9)
    pump_state, pump_nodes, pump_grid = _world(9)
    _push(stock_grid, stock_nodes, targets)
    _push(pump_grid, pump_nodes, targets)
    sweeps_stock, sweeps_pump = [], []
    for _ in range(5):
        sweeps_stock.append(_flower_sweep(stock_state, stock_nodes))
        sweeps_pump.append(_pump_sweep(pump_state, pump_nodes))
    assert sweeps_pump == sweeps_stock
    assert [len(s) for s in sweeps_pump] == [6, 3, 2, 0, 0]  # one per node per sweep, then nothing twice
    assert sorted(i for s in sweeps_pump for _, i in s) == list(range(len(targets)))


def test_pump_ignores_other_nodes_and_drops_expired_messages() -> None:
    state, nodes, grid = _world(4)
    _push(grid, nodes, [0, 1], ttl=0.2)
    _push(grid, nodes, [2, 3])
    time.sleep(0.3)
    assert _pump_sweep(state, nodes, served=nodes[2:3]) == [(2, 0)]  # only the nodes it serves
    assert _pump_sweep(state, nodes) == [(3, 1)]  # nodes 0 and 1's messages expired: dropped, never delivered
    assert len(state.message_ins_store) == 2


def test_fast_message_pump_swaps_in_and_restores_flowers_loop() -> None:
    original = vce_api.add_messages_to_queue
    with fast_message_pump(enabled=False) as used:
        assert not used and vce_api.add_messages_to_queue is original
    with pytest.raises(RuntimeError, match="boom"):
        with fast_message_pump() as used:
            assert used and vce_api.add_messages_to_queue is not original
            raise RuntimeError("boom")
    assert vce_api.add_messages_to_queue is original


def test_swapped_loop_moves_messages_until_stopped() -> None:
    state, nodes, grid = _world(3)
    _push(grid, nodes, [0, 1, 2, 2])
    q: queue.Queue = queue.Queue()
    stop = threading.Event()
    with fast_message_pump():
        loop = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, q, dict.fromkeys(nodes, 0), stop))
        loop.start()
        deadline = time.monotonic() + 10
        while q.qsize() < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        loop.join(timeout=5)
    assert q.qsize() == 4 and not loop.is_alive()
