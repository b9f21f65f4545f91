"""Every use of a Flower internal, behind one exact-version check.

fedtune runs on Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``,
``flwr.simulation``).  A few features go further, into modules and attributes Flower may
change in any release; each of them is built here and nowhere else:

* the fast message pump (:mod:`fedtune.runtime.message_pump`) replaces the simulation
  engine's ``vce_api.add_messages_to_queue`` and reads the in-memory LinkState's store;
* the engine node map (:mod:`fedtune.runtime.roster`) wraps ``vce_api._register_nodes``;
* the quiet actor shutdown replaces ``BasicActorPool.terminate_all_actors`` (Flower asks
  each actor to ``exit_actor()`` itself, which Ray reports as a failed, retried task on
  restartable actors);
* warm actors (``runtime.warm_actors``) replace ``BasicActorPool.add_actors_to_pool`` and
  ``terminate_all_actors``: the pool's actors are named, detached and left running;
* the warm SuperExec (:mod:`fedtune.runtime.warm_superexec`) runs Flower's SuperExec loop
  with its own executor and starts task processes with Flower's own arguments;
* Flower's notice that ``run_simulation`` is deprecated is dropped (fedtune ships ``flwr run`` too).

They were written against :data:`CHECKED_FLWR` and read its source.  On any other version
:func:`usable` says, in one line per feature at start, what is off and what that costs,
and the caller takes Flower's public path instead (docs/flower_internals.md has the table).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Queue
from typing import Any

CHECKED_FLWR = "1.41.0"
"""The one Flower release whose internals this module was written against."""


@dataclass(frozen=True)
class Feature:
    """A fedtune feature that rests on Flower internals: what it is and what losing it costs."""

    name: str
    cost: str


FAST_MESSAGE_PUMP = Feature("fast message pump", "large simulations dispatch in O(clients × messages)")
ENGINE_NODE_MAP = Feature("engine node map", "the server holds a roll-call: one ClientApp call per virtual client")
QUIET_ACTOR_SHUTDOWN = Feature("quiet actor shutdown",
                               "Ray prints '(raylet) Task ClientAppActor.terminate failed' lines at the end")
WARM_SUPEREXEC = Feature("warm SuperExec", "each app process imports torch again, about 10 CPU s per message")
WARM_ACTORS = Feature("warm actors", "every run starts its client actors afresh: imports, about 10 CPU s each")
FEATURES = (FAST_MESSAGE_PUMP, ENGINE_NODE_MAP, QUIET_ACTOR_SHUTDOWN, WARM_SUPEREXEC, WARM_ACTORS)
WARM_NAMESPACE = "fedtune-warm-actors"
"""The Ray namespace of the detached client actors that ``runtime.warm_actors`` keeps."""

_told: set[str] = set()  # features whose notice this process has printed


def installed_version() -> str:
    import flwr

    return str(flwr.__version__)


def version_checked() -> bool:
    """The one check: the installed Flower is exactly :data:`CHECKED_FLWR`."""
    return installed_version() == CHECKED_FLWR


def notice(feature: Feature) -> str:
    return (f"fedtune: flwr {installed_version()} is not {CHECKED_FLWR}: {feature.name} off "
            f"({feature.cost})")


def usable(feature: Feature) -> bool:
    """Whether ``feature`` may use Flower's internals; if not, print its notice (once per process)."""
    if version_checked():
        return True
    if feature.name not in _told:
        _told.add(feature.name)
        print(notice(feature), file=sys.stderr, flush=True)
    return False


# ------------------------------------------------------------------ the simulation engine
def pump_once(state: Any, queue: Queue, node_ids: frozenset[int] | set[int]) -> int:
    """Move the undelivered messages for ``node_ids`` (one per client) into ``queue``.

    ``state`` is Flower's ``InMemoryLinkState``: every stored message is validated once
    (expiry, federation membership, as ``get_message_ins`` does per node) and marked
    delivered under the state's lock.  Returns how many messages moved.
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


MessageLoop = Callable[[Any, Queue, dict[int, int], threading.Event], None]


@contextmanager
def message_loop(loop: MessageLoop) -> Iterator[None]:
    """Run ``loop`` as the engine's ``add_messages_to_queue`` inside the block.

    A state that is not the in-memory one (no ``message_ins_store``) keeps Flower's own
    loop.  The original is restored on exit, also on error.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: dict[int, int],
                              f_stop: threading.Event) -> None:
        if not hasattr(state, "message_ins_store"):
            return original(state, queue, nodes_mapping, f_stop)
        return loop(state, queue, nodes_mapping, f_stop)

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


@contextmanager
def on_nodes_registered(record: Callable[[dict[int, int]], None]) -> Iterator[None]:
    """Inside the block, hand the engine's node id → partition id map to ``record``
    when it registers the virtual nodes.  The engine is restored on exit."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api._register_nodes

    def register_nodes(*args: Any, **kwargs: Any) -> dict[int, int]:
        mapping = original(*args, **kwargs)
        record(mapping)
        return mapping

    vce_api._register_nodes = register_nodes
    try:
        yield
    finally:
        vce_api._register_nodes = original


@contextmanager
def quiet_actor_shutdown(enabled: bool = True) -> Iterator[bool]:
    """End the simulation's client actors with ``ray.kill(no_restart=True)`` inside the block.

    Flower's pool ends each actor by calling its ``terminate`` method, which exits the
    actor from inside a task; with fedtune's restartable actors (``max_restarts``,
    ``max_task_retries``) Ray reports that task as failed and to be retried.  Killing the
    actors without restart ends them as surely and says nothing.  Yields whether in use.
    """
    if not enabled or not usable(QUIET_ACTOR_SHUTDOWN):
        yield False
        return
    import ray
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    original = BasicActorPool.terminate_all_actors

    def terminate_all_actors(pool: Any) -> None:
        for actor in pool.pool:
            ray.kill(actor, no_restart=True)

    BasicActorPool.terminate_all_actors = terminate_all_actors
    try:
        yield True
    finally:
        BasicActorPool.terminate_all_actors = original


def _shape(resources: dict[str, Any]) -> str:
    """What a warm actor holds (its name before ``#``): actors of one shape are interchangeable."""
    return "-".join(f"{k}={resources[k]:g}" for k in sorted(resources))


def end_warm_actors(keep_shape: str = "") -> int:
    """Kill the warm client actors on the connected cluster (but those of ``keep_shape``);
    returns how many.  Ray must be initialised (``ray.init(address=...)``)."""
    import ray

    ended = 0
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == WARM_NAMESPACE and not (keep_shape and entry["name"].startswith(f"{keep_shape}#")):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=WARM_NAMESPACE), no_restart=True)
                ended += 1
            except ValueError:  # ended meanwhile
                pass
    return ended


@contextmanager
def warm_actors(enabled: bool) -> Iterator[bool]:
    """Inside the block, the simulation's client actors outlive the run and the next run
    reuses them: each is a detached actor named by its resources and its place in the pool
    (``get_if_exists``), and the pool's end leaves them running.  Actors of another shape
    are killed first, so idle ones never hold the CPUs a new pool needs.  The actor process
    keeps its imports; fedtune's per-process cache is emptied when a new run reaches it
    (:mod:`fedtune.flower.client_app`).  Yields whether in use."""
    if not enabled or not usable(WARM_ACTORS):
        yield False
        return
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

    add, terminate = BasicActorPool.add_actors_to_pool, BasicActorPool.terminate_all_actors

    def add_actors_to_pool(pool: Any, num_actors: int) -> None:
        shape = _shape(pool.client_resources)
        end_warm_actors(keep_shape=shape)
        for index in range(pool.num_actors, pool.num_actors + num_actors):
            pool.pool.append(ClientAppActor.options(name=f"{shape}#{index}", namespace=WARM_NAMESPACE,
                                                    lifetime="detached", get_if_exists=True,
                                                    **pool.client_resources).remote())
        pool.num_actors += num_actors

    BasicActorPool.add_actors_to_pool = add_actors_to_pool
    BasicActorPool.terminate_all_actors = lambda pool: None
    try:
        yield True
    finally:
        BasicActorPool.add_actors_to_pool, BasicActorPool.terminate_all_actors = add, terminate


class _DropRunSimulationDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "The `run_simulation` function is deprecated" not in record.getMessage()


def drop_run_simulation_deprecation() -> None:
    """Hide Flower's notice that ``run_simulation`` is deprecated, and only that one: it is
    what ``fedtune run`` simulates with, and ``flwr run`` is there too.  On another
    version the notice shows (its wording, and the decision, may have changed)."""
    if not version_checked():
        return
    logger = logging.getLogger("flwr")
    for target in (logger, *logger.handlers):
        if not any(isinstance(f, _DropRunSimulationDeprecation) for f in target.filters):
            target.addFilter(_DropRunSimulationDeprecation())


# ------------------------------------------------------------------ the SuperExec
def subprocess_executor() -> Any:
    """Flower's own executor: a fresh ``flwr-clientapp``/``flwr-serverapp`` per task."""
    from flwr.supercore.superexec.executor import SubprocessExecutor

    return SubprocessExecutor()


def launch_accepted() -> Any:
    from flwr.supercore.superexec.executor import LaunchResult

    return LaunchResult.accepted()


def task_command(spec: Any) -> str:
    """The console script Flower starts for the task ``spec`` (``flwr-clientapp`` ...)."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    return TASK_TYPE_TO_COMMAND[spec.task_type]


def task_arguments(spec: Any) -> list[str]:
    """The command-line arguments Flower's ``SubprocessExecutor`` gives a task process."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG

    args = [TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    if spec.runtime_dependency_install:
        args.append("--allow-runtime-dependency-installation")
    return args


def task_entry_points() -> dict[str, Callable[[], None]]:
    """Console script → the function it calls, for the app processes a SuperExec starts."""
    from flwr.superlink.cli import flwr_serverapp
    from flwr.supernode.cli import flwr_clientapp

    return {"flwr-clientapp": flwr_clientapp, "flwr-serverapp": flwr_serverapp}


def forget_exit_handlers() -> None:
    """In a forked child: drop the parent's Flower exit handlers (they close its connection)."""
    from flwr.supercore.exit import exit_handler

    exit_handler.registered_exit_handlers.clear()


def run_superexec_loop(executor: Any, runtime_api_address: str, root_certificates: str | None) -> None:
    """Flower's SuperExec loop (acquire a task, launch it, reconcile) with ``executor`` as launcher."""
    from flwr.supercore.superexec import run_superexec as superexec

    superexec.get_executor = lambda *a, **k: executor
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=root_certificates is None,
                            root_certificates_path=root_certificates, runtime_dependency_install=False)
