"""Flower's internals behind one version check: pinned, on when checked, off (and said so) when not.

The end-to-end fallback is the first run of ``same_seed_runs`` (tests/conftest.py): it runs
as on another Flower version, and tests/test_simulation.py compares it with fedtune's path.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.simulation.ray_transport.ray_actor import BasicActorPool

from fedtune.comm.ledger import measure, object_tree
from fedtune.runtime import flower_private, warm_superexec
from fedtune.runtime.deploy import LocalTrial
from fedtune.runtime.message_pump import fast_message_pump
from fedtune.runtime.roster import capture_roster

OTHER = "1.99.0"


@pytest.fixture
def other_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as if another Flower release were installed (nothing told yet)."""
    monkeypatch.setattr(flower_private, "installed_version", lambda: OTHER)
    monkeypatch.setattr(flower_private, "_told", set())


def test_the_checked_flower_is_the_installed_one() -> None:
    import flwr

    assert flwr.__version__ == flower_private.CHECKED_FLWR, (
        "a new Flower: review fedtune/runtime/flower_private.py against its source (docs/flower_internals.md), "
        "then set CHECKED_FLWR")
    assert flower_private.version_checked()


def test_on_another_flower_each_feature_is_off_and_says_so_once(other_flower: None, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    loop, register, terminate, add = vce_api.add_messages_to_queue, vce_api._register_nodes, \
        BasicActorPool.terminate_all_actors, BasicActorPool.add_actors_to_pool
    for _ in range(2):  # a second simulation in the same process says nothing new
        with fast_message_pump(True) as pumped, capture_roster(True) as roster, \
                flower_private.quiet_actor_shutdown() as quiet, flower_private.warm_actors(True) as warm:
            assert (pumped, roster, quiet, warm) == (False, None, False, False)
            assert vce_api.add_messages_to_queue is loop and vce_api._register_nodes is register
            assert BasicActorPool.terminate_all_actors is terminate and BasicActorPool.add_actors_to_pool is add
    assert not LocalTrial(tmp_path / "trial", warm=True).warm  # Flower's own SuperExec instead
    with pytest.raises(SystemExit, match="warm SuperExec off"):
        warm_superexec.main(["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--preload"])
    assert capsys.readouterr().err.splitlines() == [
        f"fedtune: flwr {OTHER} is not 1.41.0: fast message pump off "
        "(large simulations dispatch in O(clients × messages))",
        f"fedtune: flwr {OTHER} is not 1.41.0: engine node map off "
        "(the server holds a roll-call: one ClientApp call per virtual client)",
        f"fedtune: flwr {OTHER} is not 1.41.0: quiet actor shutdown off "
        "(Ray prints '(raylet) Task ClientAppActor.terminate failed' lines at the end)",
        f"fedtune: flwr {OTHER} is not 1.41.0: warm actors off "
        "(every run starts its client actors afresh: imports, about 10 CPU s each)",
        f"fedtune: flwr {OTHER} is not 1.41.0: warm SuperExec off "
        "(each app process imports torch again, about 10 CPU s per message)"]


def test_switched_off_settings_say_nothing(other_flower: None, capsys: pytest.CaptureFixture) -> None:
    """``runtime.fast_message_pump=false`` / ``runtime.node_map=rollcall`` ask for Flower's path: no notice."""
    with fast_message_pump(False) as pumped, capture_roster(False) as roster:
        assert (pumped, roster) == (False, None)
    assert capsys.readouterr().err == ""


def test_on_the_checked_flower_the_hooks_are_in_and_restored(capsys: pytest.CaptureFixture) -> None:
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    loop, register, terminate, add = vce_api.add_messages_to_queue, vce_api._register_nodes, \
        BasicActorPool.terminate_all_actors, BasicActorPool.add_actors_to_pool
    with fast_message_pump(True) as pumped, capture_roster(True) as roster, \
            flower_private.quiet_actor_shutdown() as quiet, flower_private.warm_actors(True) as warm:
        assert pumped and quiet and warm and roster is not None
        assert vce_api.add_messages_to_queue is not loop and BasicActorPool.terminate_all_actors is not terminate
        assert BasicActorPool.add_actors_to_pool is not add
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        mapping = vce_api._register_nodes(3, factory)  # what the engine calls: the roster sees its map
        assert roster.wait(0) == mapping and sorted(mapping.values()) == [0, 1, 2]
    assert (vce_api.add_messages_to_queue, vce_api._register_nodes, BasicActorPool.terminate_all_actors,
            BasicActorPool.add_actors_to_pool) == (loop, register, terminate, add)
    assert capsys.readouterr().err == ""


def test_only_run_simulations_deprecation_notice_is_dropped() -> None:
    """The filter matches Flower's own wording, and lets every other deprecation through."""
    from flwr.simulation.run_simulation import run_simulation
    from flwr.supercore.logger import warn_deprecated_feature

    assert "The `run_simulation` function is deprecated" in inspect.getsource(run_simulation)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        flower_private.drop_run_simulation_deprecation()
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
        warn_deprecated_feature("Some other feature")
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 1 and "Some other feature" in seen[0]


def test_ledger_counts_what_flowers_own_object_walk_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger walks Flower's public ``children``/``object_id``: the same objects (and the
    same wire bytes) as Flower's private ``get_all_nested_objects``, duplicates once."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # a message needs a run: a ServerApp has one
        monkeypatch.setattr(TaskIdentity, attr, 1)

    rng = np.random.default_rng(0)
    same = rng.standard_normal((300, 40)).astype(np.float32)  # in two records: stored (and counted) once
    content = RecordDict({"arrays": ArrayRecord({"a": Array(same), "c": Array(rng.standard_normal(7))}),
                          "again": ArrayRecord({"b": Array(same.copy())}),
                          "config": ConfigRecord({"round": 3, "lr": 0.1}), "metrics": MetricRecord({"loss": 1.5})})
    message = Message(content, dst_node_id=12, message_type="train")
    walked, flowers = object_tree(message), get_all_nested_objects(message)
    assert list(walked) == list(flowers)  # same objects, same (post-)order
    assert measure(message)[0] == sum(len(o.deflate()) for o in flowers.values())
    assert len(walked) < sum(1 for _ in _all_nodes(message))  # the repeated array counted once


def _all_nodes(obj):  # type: ignore[no-untyped-def]
    yield obj
    for child in (obj.children or {}).values():
        yield from _all_nodes(child)
