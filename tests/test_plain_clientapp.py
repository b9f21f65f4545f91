"""fedtune's strategies drive a plain Flower ClientApp: one with a ``train`` handler only.

Such an app answers no roll-call, so the strategy numbers its nodes by rank among the
sorted node ids (:mod:`fedtune.flower.nodes`) and samples them from the run's seeded
stream.  Every registered method that declares no :attr:`client_app_needs` must train
against it, in Flower's real simulation; a method that declares some (a one-time setup,
client-side state) must stop with an error that says what the ClientApp must provide.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import pytest
from conftest import end_warm_actors
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from fedtune.config import RunConfig, compose
from fedtune.flower.nodes import BY_RANK, ROLLCALL, ROLLCALL_SOURCE, discover_nodes, no_handler_reason
from fedtune.flower.strategy import FedtuneStrategy, RoundInfo
from fedtune.registry import METHODS
from fedtune.runtime.workspace import Workspace
from fedtune.sampling import sample_partitions
from fedtune.trainer import TrainContext
from strategies.fedavg_lora import FedAvgLoRA

NUM_NODES, PER_ROUND, ROUNDS, SEED = 3, 2, 2, 5  # federation.fraction=0.67: 2 of 3 per round
BASE = (f"model=tiny dataset=tiny federation.num_clients={NUM_NODES} federation.fraction=0.67 "
        f"train.local_steps=2 runtime.device=cpu num_rounds={ROUNDS} seed={SEED}")
QUICK = {"num_seeds": 64, "local_steps": 8}  # method config fields shrunk for the tiny model, where present
VERBATIM = "FedAvgLoRA(num_clients=3, clients_per_round=3).start(grid, ArrayRecord(init), num_rounds=2)"
BY_RANK_WARNING = "reproducible only for the same node ids"
# Flower's own backend config, attached to the suite's shared Ray cluster (conftest.ray_address), one actor
RAY_CLIENT_RESOURCES = {"num_cpus": 2, "num_gpus": 0.0}


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower messages need a run id; a ServerApp process has one, a test sets it."""
    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def _needs(name: str) -> tuple[str, ...]:
    return METHODS.get(name).strategy_cls.client_app_needs


def _config(name: str) -> RunConfig:
    fields = {f.name for f in dataclasses.fields(METHODS.get(name).config_cls)}
    quick = " ".join(f"strategy.{k}={v}" for k, v in QUICK.items() if k in fields)
    model = " ".join(o for o in METHODS.get(name).quick if o.startswith("model."))  # e.g. room for prompts
    cfg = compose(f"{BASE} strategy={name} {quick} {model}")
    assert cfg.federation.clients_per_round == PER_ROUND
    return cfg


def plain_client_app(configs: dict[str, RunConfig]) -> ClientApp:
    """What a Flower user writes: a ``train`` handler that trains the received arrays with
    the method's client half and replies as Flower's FedAvg clients do."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        workspace = Workspace(configs[str(config["method"])])
        ctx = TrainContext(server_round=int(config["server-round"]),
                           partition_id=int(context.node_config["partition-id"]), device=torch.device("cpu"))
        arrays = msg.content["arrays"].to_torch_state_dict()
        upload, metrics = workspace.trainer.train(workspace.model(), arrays, workspace, ctx)
        return Message(RecordDict({"arrays": ArrayRecord(upload), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def plain_runs(ray_address: str) -> dict[str, dict[str, Any]]:
    """One Flower simulation whose ServerApp runs every registered method in turn, each
    ``strategy.start(grid, ArrayRecord(initial), num_rounds=2)`` as a Flower user calls it."""
    import ray
    from ray import cloudpickle
    from flwr.simulation import run_simulation

    configs = {name: _config(name) for name in METHODS.names()}
    runs: dict[str, dict[str, Any]] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for name, cfg in configs.items():
            strategy = METHODS.get(name).strategy_cls.from_config(cfg)
            initial = Workspace(cfg).initial_arrays()
            handler = _Warnings()
            logging.getLogger("flwr").addHandler(handler)
            try:
                strategy.start(grid, ArrayRecord(initial), num_rounds=ROUNDS)
                runs[name] = {"strategy": strategy, "initial": initial, "nodes": sorted(grid.get_node_ids())}
            except Exception as exc:  # noqa: BLE001 - the error is what the test checks
                runs[name] = {"strategy": strategy, "error": str(exc)}
            finally:
                logging.getLogger("flwr").removeHandler(handler)
            runs[name]["warnings"] = handler.lines
        initial = Workspace(configs[FedAvgLoRA.name]).initial_arrays()  # the call, word for word
        result = FedAvgLoRA(num_clients=3, clients_per_round=3).start(grid, ArrayRecord(initial), num_rounds=2)
        runs[VERBATIM] = {"initial": initial, "result": result}

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the ClientApp is defined here
    end_warm_actors(ray_address)
    try:
        run_simulation(server_app=server, client_app=plain_client_app(configs), num_supernodes=NUM_NODES,
                       backend_config={"client_resources": RAY_CLIENT_RESOURCES,
                                       "init_args": {"address": ray_address}})
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        if ray.is_initialized():
            ray.shutdown()
    return runs


@pytest.mark.simulation
@pytest.mark.parametrize("name", [n for n in METHODS.names() if not _needs(n)])
def test_a_strategy_trains_against_a_plain_client_app(plain_runs: dict, name: str) -> None:
    run = plain_runs[name]
    assert "error" not in run, run.get("error")
    strategy: FedtuneStrategy = run["strategy"]
    assert strategy.node_of == dict(enumerate(run["nodes"]))  # partition id = rank of the sorted node id
    for server_round in range(1, ROUNDS + 1):
        info: RoundInfo = strategy.rounds[server_round]
        assert info.sampled == sample_partitions(SEED, server_round, range(NUM_NODES), PER_ROUND)
        assert info.received == info.sampled and info.failures == {}
    initial = run["initial"]
    assert any(k in initial and not torch.equal(v, initial[k]) for k, v in strategy.global_arrays.items()), \
        "training moved no global tensor"
    assert all(torch.isfinite(v).all() for v in strategy.global_arrays.values())
    assert sum(BY_RANK_WARNING in line for line in run["warnings"]) == 1, run["warnings"]


@pytest.mark.simulation
def test_the_call_a_flower_user_makes_trains_all_three_clients(plain_runs: dict) -> None:
    run = plain_runs[VERBATIM]
    assert sorted(run["result"].train_metrics_clientapp) == [1, 2]
    for metrics in run["result"].train_metrics_clientapp.values():
        assert metrics["num-replies"] == 3 and metrics["num-failures"] == 0
    final = run["result"].arrays.to_torch_state_dict()
    assert final.keys() == run["initial"].keys()
    assert any(not torch.equal(final[k], v) for k, v in run["initial"].items())


@pytest.mark.simulation
@pytest.mark.parametrize("name", [n for n in METHODS.names() if _needs(n)])
def test_a_strategy_that_needs_more_says_what_the_client_app_must_provide(plain_runs: dict, name: str) -> None:
    run = plain_runs[name]
    assert "error" in run, f"{name} ran against a ClientApp that lacks what it declares it needs"
    for need in _needs(name):
        assert need in run["error"], run["error"]
    assert ROLLCALL in run["error"]
    assert not any(r.kind == "one_time" for r in run["strategy"].ledger.records)  # refused before any setup


def test_a_method_with_a_one_time_setup_declares_its_client_app_needs() -> None:
    """Overriding ``setup`` means messages a plain ClientApp cannot answer: declared, not guessed."""
    for name in METHODS.names():
        cls = METHODS.get(name).strategy_cls
        if cls.setup is not FedtuneStrategy.setup:
            assert cls.client_app_needs, f"{name} overrides setup but declares no client_app_needs"


def test_the_missing_handler_reason_is_flowers_own_words(task_identity: None) -> None:
    """The roll-call fallback keys on the text Flower's ClientApp raises for an unknown type."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict(), reply_to=msg)

    query = Message(RecordDict({"config": ConfigRecord({"rollcall": 1})}), dst_node_id=1, message_type=ROLLCALL)
    with pytest.raises(ValueError) as caught:
        app(query, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    assert no_handler_reason(ROLLCALL) == "No query function registered with name 'rollcall'"
    assert no_handler_reason(ROLLCALL) in str(caught.value)


@pytest.mark.parametrize("records, reason", [
    ({"config": ConfigRecord({"x": 1})}, "reply has no 'arrays' record (ArrayRecord); it holds {'config': 'ConfigRecord'}"),
    ({"arrays": None, "metrics": MetricRecord({"num-examples": 3})}, "reply has no 'arrays' record"),
    ({"arrays": ..., "result": MetricRecord({"num-examples": 3})}, "reply has no 'metrics' record (MetricRecord)"),
    ({"arrays": ..., "metrics": ConfigRecord({"num-examples": 3})}, "reply record 'metrics' is a ConfigRecord"),
    ({"arrays": ..., "metrics": MetricRecord({"loss": 1.0})}, "the 'metrics' record has no 'num-examples'"),
])
def test_a_reply_without_flowers_records_is_rejected_with_a_clear_reason(task_identity: None, records: dict,
                                                                        reason: str) -> None:
    arrays = {"head.weight": torch.ones(2, 3)}
    strategy = FedtuneStrategy(num_clients=1, clients_per_round=1)  # rejected before any method's maths
    strategy.initialize(arrays)
    strategy.node_of, strategy.partition_of_node = {0: 7}, {7: 0}
    [msg] = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None)  # type: ignore[arg-type]
    content = {k: ArrayRecord(arrays) if v is ... else v for k, v in records.items() if v is not None}
    strategy.aggregate_train(1, [Message(RecordDict(content), reply_to=msg)])
    assert strategy.rounds[1].failures[0].startswith(f"rejected payload: {reason}"), strategy.rounds[1].failures


# ----------------------------------------------------------------------------- discovery, in process
def _app(partition_id: int | None = None, broken: bool = False) -> ClientApp:
    """A train-only ClientApp, plus a roll-call handler when ``partition_id`` is given."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict(), reply_to=msg)

    if partition_id is not None:
        @app.query("rollcall")
        def rollcall(msg: Message, context: Context) -> Message:
            if broken:
                raise OSError("disk full")
            return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=msg)

    return app


class LocalGrid(Grid):
    """Flower's ``Grid`` over ClientApps called in this process, replying as Flower's engine
    does: an exception becomes an error reply ``"<class ...>:<'message'>"``."""

    def __init__(self, apps: dict[int, ClientApp]) -> None:
        self.apps = apps

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
            try:
                replies.append(self.apps[node](msg, context))
            except Exception as exc:  # noqa: BLE001 - as the engine turns it into a reply
                replies.append(Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg))
        return replies

    def set_run(self, run_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def _discover(apps: dict[int, ClientApp], num_clients: int) -> tuple[Any, list[str]]:
    handler = _Warnings()
    logging.getLogger("flwr").addHandler(handler)
    try:
        return discover_nodes(LocalGrid(apps), num_clients, timeout=1.0), handler.lines
    finally:
        logging.getLogger("flwr").removeHandler(handler)


def test_nodes_that_answer_the_rollcall_keep_their_partition_ids(task_identity: None) -> None:
    nodes, warnings = _discover({30: _app(0), 10: _app(2), 20: _app(1)}, num_clients=3)
    assert nodes.source == ROLLCALL_SOURCE and nodes.node_of == {0: 30, 1: 20, 2: 10} and warnings == []


def test_one_node_without_a_rollcall_handler_numbers_every_node_by_rank(task_identity: None) -> None:
    nodes, warnings = _discover({30: _app(0), 10: _app(), 20: _app()}, num_clients=3)
    assert nodes.source == BY_RANK and nodes.node_of == {0: 10, 1: 20, 2: 30}
    assert nodes.partition_of_node == {10: 0, 20: 1, 30: 2}
    assert len(warnings) == 1 and BY_RANK_WARNING in warnings[0] and "2 of 3 nodes" in warnings[0]


def test_ranks_need_exactly_num_clients_nodes(task_identity: None) -> None:
    with pytest.raises(RuntimeError, match="4 nodes connected, but num_clients is 3"):
        _discover({n: _app() for n in (1, 2, 3, 4)}, num_clients=3)


def test_a_node_that_fails_the_rollcall_otherwise_stops_the_run(task_identity: None) -> None:
    with pytest.raises(RuntimeError, match="node 2 failed the roll-call: .*disk full"):
        _discover({1: _app(0), 2: _app(1, broken=True)}, num_clients=2)


@pytest.mark.parametrize("name", [n for n in METHODS.names() if _needs(n)])
def test_a_client_app_with_the_rollcall_but_not_the_rest_is_told_what_to_provide(task_identity: None,
                                                                                  name: str) -> None:
    """Nodes that answer the roll-call but lack a method's other handlers are refused at
    the first message they cannot serve, with the method's declared needs."""
    strategy = METHODS.get(name).strategy_cls.from_config(_config(name))
    grid = LocalGrid({10 + pid: _app(pid) for pid in range(NUM_NODES)})
    with pytest.raises(RuntimeError) as caught:
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    assert "nodes have no" in str(caught.value)
    assert all(need in str(caught.value) for need in _needs(name)), str(caught.value)
