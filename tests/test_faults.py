"""Client faults and malformed payloads (issue 7, reliability).

* the fault plan (which client fails, how) is a pure function of the seed;
* every malformed reply, built as a client builds it (a real Flower ``Message`` replying
  to the strategy's own instruction), is rejected by the real ``FedtuneStrategy`` with
  its reason, and the new global state is exactly the aggregate of the good replies;
* ``federation.min_clients``: too few valid replies keep the global state;
* the real ClientApp with ``faults:`` on, in process, end to end;
* a real Ray simulation with 30% of the clients failing (raise, exit, NaN) completes,
  aggregates the others and records who failed and why.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import on_shared_ray
import torch
from method_testing import LocalGrid
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedtune.comm.metered_grid import MeteredGrid
from fedtune.config import FAULT_MALFORMED, compose
from fedtune.flower.faults import EXTRA_KEY, InjectedFault, corrupt, expand_modes, fault_plan, with_faults
from fedtune.flower.strategy import FedtuneStrategy
from fedtune.registry import METHODS
from fedtune.runtime.workspace import Workspace
from strategies.fedavg_lora import weighted_average

BASE = "model=tiny dataset=tiny train.local_steps=2 runtime.device=cpu"
EXAMPLES = {0: 30, 1: 10, 2: 60, 3: 25}
BAD = 0  # the malformed client sorts first: aggregation would take its dtype for the global state


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower messages need a run id; a ServerApp process has one, a test sets it."""
    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


# ----------------------------------------------------------------------------- the plan
def test_fault_plan_is_seeded_exact_and_cycles_modes() -> None:
    cfg = compose(f"{BASE} federation.num_clients=10 faults.fraction=0.3 faults.modes=[raise,exit,nan_value]")
    plans = [fault_plan(cfg, r) for r in range(1, 7)]
    assert all(len(p) == 3 for p in plans)  # exactly round(0.3 · 10) faulty clients every round
    assert all(sorted(p.values()) == ["exit", "nan_value", "raise"] for p in plans)  # 3 modes, 3 faults: one each
    assert len({tuple(sorted(p)) for p in plans}) > 1  # a fresh draw every round
    assert plans == [fault_plan(compose(f"{BASE} federation.num_clients=10 faults.fraction=0.3 "
                                        "faults.modes=[raise,exit,nan_value]"), r) for r in range(1, 7)]
    other = compose(f"{BASE} federation.num_clients=10 faults.fraction=0.3 seed=1")
    assert [fault_plan(other, r) for r in range(1, 7)] != plans
    assert fault_plan(compose(BASE), 1) == {}
    every = compose(f"{BASE} federation.num_clients=10 faults.fraction=0.7 faults.modes=[malformed]")
    assert sorted(fault_plan(every, 1).values()) == sorted(FAULT_MALFORMED)  # 7 faults, 7 kinds
    assert expand_modes(["raise", "malformed"]) == ["raise", *FAULT_MALFORMED]


def test_faults_off_is_the_trainer_itself() -> None:
    def train(*args: Any) -> tuple[dict, dict]:
        return {}, {}

    assert with_faults(train, compose(BASE)) is train


def test_exit_outside_a_client_process_raises_instead_of_killing_it() -> None:
    cfg = compose(f"{BASE} federation.num_clients=4 faults.fraction=1.0 faults.modes=[exit]")
    wrapped = with_faults(lambda model, arrays, ws, ctx: ({"w": torch.ones(2)}, {"num-examples": 3}), cfg)
    ctx = type("Ctx", (), {"server_round": 1, "partition_id": 2})()
    with pytest.raises(InjectedFault, match=r"injected fault 'exit' \(round 1, client 2\)"):
        wrapped(None, {}, None, ctx)


def test_corrupt_makes_each_kind_of_malformed_reply() -> None:
    upload = {"a": torch.ones(3, 2), "b": torch.zeros(4)}
    metrics = {"num-examples": 5, "train-loss": 0.5}
    out = {kind: corrupt(upload, metrics, kind) for kind in FAULT_MALFORMED}
    assert torch.isnan(out["nan_value"][0]["a"]).any() and torch.isinf(out["inf_value"][0]["a"]).any()
    assert out["wrong_shape"][0]["a"].shape == (4, 2) and out["wrong_dtype"][0]["a"].dtype == torch.float64
    assert "a" not in out["missing_key"][0] and EXTRA_KEY in out["extra_key"][0]
    assert out["bad_num_examples"][1]["num-examples"] == 0
    assert torch.equal(upload["a"], torch.ones(3, 2)) and metrics["num-examples"] == 5  # inputs untouched


# ----------------------------------------------------------------------------- the strategy's validation
@pytest.fixture(scope="module")
def initial() -> dict[str, torch.Tensor]:
    """The real tiny model's trainable state (LoRA factors and the head), as the server starts."""
    return Workspace(compose(f"{BASE} federation.num_clients=4")).initial_arrays()


def _strategy(initial: dict[str, torch.Tensor], overrides: str = "") -> FedtuneStrategy:
    cfg = compose(f"{BASE} federation.num_clients=4 {overrides}")
    strategy = METHODS.get(cfg.strategy.name).strategy_cls.from_config(cfg)
    strategy.initialize(initial)
    strategy.node_of = {pid: 100 + pid for pid in range(4)}  # what the roll-call establishes
    strategy.partition_of_node = {100 + pid: pid for pid in range(4)}
    return strategy


def _instructions(strategy: FedtuneStrategy) -> dict[int, Message]:
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid=None)  # type: ignore[arg-type]
    return {strategy.partition_of_node[m.metadata.dst_node_id]: m for m in messages}


def _upload(initial: dict[str, torch.Tensor], pid: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(pid)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in initial.items()}


def _reply(msg: Message, arrays: Any, metrics: Any) -> Message:
    """What the ClientApp sends back: ``{"arrays": ArrayRecord, "metrics": MetricRecord}``."""
    records: dict[str, Any] = {}
    if arrays is not None:
        records["arrays"] = arrays if not isinstance(arrays, dict) else ArrayRecord(arrays)
    if metrics is not None:
        records["metrics"] = metrics if not isinstance(metrics, dict) else MetricRecord(metrics)
    return Message(RecordDict(records), reply_to=msg)


def _with(upload: dict, metrics: dict, kind: str) -> tuple[Any, Any]:
    return corrupt(upload, metrics, kind)


def _first(upload: dict) -> str:
    return sorted(upload)[0]


MALFORMED: dict[str, Callable[[dict, dict], tuple[Any, Any]]] = {
    **{kind: (lambda u, m, kind=kind: _with(u, m, kind)) for kind in FAULT_MALFORMED},
    "int_dtype": lambda u, m: ({**u, _first(u): (u[_first(u)] * 100).to(torch.int64)}, m),  # gap: was aggregated
    "int32_dtype": lambda u, m: ({**u, _first(u): (u[_first(u)] * 100).to(torch.int32)}, m),
    "float16_dtype": lambda u, m: ({**u, _first(u): u[_first(u)].half()}, m),
    "bool_dtype": lambda u, m: ({**u, _first(u): u[_first(u)] > 0}, m),
    "transposed": lambda u, m: ({**u, _first(u): u[_first(u)].T.contiguous()}, m),
    "scalar_for_matrix": lambda u, m: ({**u, _first(u): torch.tensor(1.0)}, m),
    "renamed_key": lambda u, m: ({**{k: v for k, v in u.items() if k != _first(u)}, "x": u[_first(u)]}, m),
    "no_arrays_record": lambda u, m: (None, m),
    "empty_arrays": lambda u, m: ({}, m),
    "arrays_of_wrong_record_type": lambda u, m: (MetricRecord({"a": 1.0}), m),  # gap: AttributeError, a crash
    "no_metrics_record": lambda u, m: (u, None),
    "no_num_examples": lambda u, m: (u, {"train-loss": 0.5}),
    "negative_num_examples": lambda u, m: (u, {**m, "num-examples": -3}),
    "fractional_num_examples": lambda u, m: (u, {**m, "num-examples": 2.5}),  # was truncated to 2
    "nan_num_examples": lambda u, m: (u, {**m, "num-examples": math.nan}),
    "inf_num_examples": lambda u, m: (u, {**m, "num-examples": math.inf}),  # gap: OverflowError, a crash
    "list_num_examples": lambda u, m: (u, {**m, "num-examples": [5, 5]}),
    "nan_everywhere": lambda u, m: ({k: torch.full_like(v, math.nan) for k, v in u.items()}, m),
    "huge_finite_then_inf": lambda u, m: ({**u, _first(u): u[_first(u)] * 1e38 * 1e38}, m),
}


def _good_replies(initial: dict, msgs: dict[int, Message]) -> dict[int, Message]:
    return {pid: _reply(msgs[pid], _upload(initial, pid), {"num-examples": EXAMPLES[pid], "train-loss": 1.0 + pid})
            for pid in (1, 2, 3)}


def test_seed_indices_outside_the_pool_are_a_recorded_failure(task_identity: None) -> None:
    """A FedKSeed upload of the right shape and dtype whose seed indices leave the pool is
    rejected in validation and recorded as the client's failure (metrics, summary)."""
    over = "strategy=fedkseed strategy.num_seeds=64 strategy.local_steps=20"
    initial = Workspace(compose(f"{BASE} federation.num_clients=4 {over}")).initial_arrays()
    strategy = _strategy(initial, over)
    msgs = _instructions(strategy)
    good = {"indices": torch.full((20,), 5, dtype=torch.int16), "values": torch.ones(20)}
    bad = {**good, "indices": torch.full((20,), 64, dtype=torch.int16)}
    replies = [_reply(msgs[pid], bad if pid == BAD else good, {"num-examples": EXAMPLES[pid]}) for pid in range(4)]
    strategy.aggregate_train(1, replies)
    info = strategy.rounds[1]
    assert info.received == [1, 2, 3] and info.failures == {BAD: "rejected payload: seed indices outside [0, 64)"}
    assert float(strategy.accumulators[5]) == pytest.approx(20.0) and int((strategy.accumulators != 0).sum()) == 1


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_reply_is_rejected_and_the_others_aggregated(task_identity: None, initial: dict,
                                                                kind: str) -> None:
    strategy = _strategy(initial)
    msgs = _instructions(strategy)
    good = _good_replies(initial, msgs)
    arrays, metrics = MALFORMED[kind](_upload(initial, BAD), {"num-examples": EXAMPLES[BAD], "train-loss": 9.0})
    bad = _reply(msgs[BAD], arrays, metrics)

    new, agg_metrics = strategy.aggregate_train(1, [good[1], bad, good[2], good[3]])  # any arrival order

    info = strategy.rounds[1]
    assert info.received == [1, 2, 3] and list(info.failures) == [BAD]
    assert info.failures[BAD].startswith("rejected payload: "), info.failures[BAD]
    expected = weighted_average([_upload(initial, p) for p in (1, 2, 3)],
                                [EXAMPLES[p] / sum(EXAMPLES[q] for q in (1, 2, 3)) for p in (1, 2, 3)])
    assert new is not None and sorted(new.keys()) == sorted(initial)
    for key, value in expected.items():
        assert strategy.global_arrays[key].dtype == torch.float32
        assert torch.equal(strategy.global_arrays[key], value), key
        assert torch.isfinite(strategy.global_arrays[key]).all()
    clean = _strategy(initial)  # the same round without the bad client: bit-identical
    clean.aggregate_train(1, list(_good_replies(initial, _instructions(clean)).values()))
    assert all(torch.equal(clean.global_arrays[k], strategy.global_arrays[k]) for k in initial)
    assert agg_metrics is not None and agg_metrics["num-failures"] == 1 and agg_metrics["num-replies"] == 3
    assert agg_metrics["train-loss"] == pytest.approx(sum(EXAMPLES[p] * (1.0 + p) for p in (1, 2, 3)) / 95)


def test_an_error_reply_is_a_failure_with_its_reason(task_identity: None, initial: dict) -> None:
    strategy = _strategy(initial)
    msgs = _instructions(strategy)
    good = _good_replies(initial, msgs)
    reason = ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'Traceback (most recent call last):\n"
              "  File \"...\", line 1, in run\n"
              "Exception ClientAppException occurred. Message: injected fault 'raise' (round 1, client 0)'>")
    raised = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msgs[BAD])
    strategy.aggregate_train(1, [*good.values(), raised])
    assert strategy.rounds[1].failures == {BAD: "ClientAppException: injected fault 'raise' (round 1, client 0)"}
    assert strategy.rounds[1].received == [1, 2, 3]


def test_extra_non_scalar_metrics_are_not_a_crash(task_identity: None, initial: dict) -> None:
    strategy = _strategy(initial)
    msgs = _instructions(strategy)
    replies = list(_good_replies(initial, msgs).values())
    replies.append(_reply(msgs[BAD], _upload(initial, BAD), {"num-examples": 30, "per-step-loss": [1.0, 0.5]}))
    strategy.aggregate_train(1, replies)  # a list-valued metric crashed float() before
    assert strategy.rounds[1].received == [0, 1, 2, 3] and not strategy.rounds[1].failures


@pytest.mark.parametrize("num_bad,updated", [(2, False), (1, True)])
def test_min_clients_keeps_the_global_state(task_identity: None, initial: dict, num_bad: int, updated: bool) -> None:
    strategy = _strategy(initial, "federation.min_clients=3")
    msgs = _instructions(strategy)
    replies = []
    for pid in range(4):
        arrays, metrics = _upload(initial, pid), {"num-examples": EXAMPLES[pid]}
        if pid < num_bad:
            arrays, metrics = corrupt(arrays, metrics, "nan_value")
        replies.append(_reply(msgs[pid], arrays, metrics))
    new, metrics = strategy.aggregate_train(1, replies)
    info = strategy.rounds[1]
    assert sorted(info.failures) == list(range(num_bad)) and len(info.received) == 4 - num_bad
    if updated:
        assert new is not None and not torch.equal(strategy.global_arrays[_first(initial)], initial[_first(initial)])
    else:  # 2 valid replies < min_clients 3: Flower keeps its arrays, the strategy its global state
        assert new is None and metrics is None
        assert all(torch.equal(strategy.global_arrays[k], initial[k]) for k in initial)


# ----------------------------------------------------------------------------- the real ClientApp, in process (LocalGrid)
def _one_round(cfg: Any) -> tuple[FedtuneStrategy, list[Message]]:
    strategy = METHODS.get(cfg.strategy.name).strategy_cls.from_config(cfg)
    strategy.initialize(Workspace(cfg).initial_arrays())
    grid = MeteredGrid(LocalGrid(cfg, cfg.federation.num_clients), strategy.ledger, strategy._partition)
    replies = list(grid.send_and_receive(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)))
    return strategy, replies


def test_client_app_with_every_malformed_kind_and_exit(task_identity: None) -> None:
    """10 clients, 8 faulty (the 7 malformed kinds and an ``exit``, which raises in this
    process): the 2 good replies make the global state, bit for bit as without faults."""
    cfg = compose(f"{BASE} federation.num_clients=10 faults.fraction=0.8 faults.modes=[malformed,exit]")
    plan = fault_plan(cfg, 1)
    assert sorted(plan.values()) == sorted([*FAULT_MALFORMED, "exit"])
    strategy, replies = _one_round(cfg)
    strategy.aggregate_train(1, replies)
    info = strategy.rounds[1]
    good = sorted(set(range(10)) - set(plan))
    assert sorted(info.failures) == sorted(plan) and info.received == good
    for pid, mode in plan.items():
        expected = "injected fault 'exit'" if mode == "exit" else "rejected payload: "
        assert expected in info.failures[pid], (mode, info.failures[pid])

    clean_cfg = compose(f"{BASE} federation.num_clients=10")
    clean, clean_replies = _one_round(clean_cfg)  # the same seed: the good clients train identically
    kept = [r for r in clean_replies if clean.partition_of_node[r.metadata.src_node_id] in good]
    clean.aggregate_train(1, kept)
    for key, value in clean.global_arrays.items():
        assert torch.equal(strategy.global_arrays[key], value), key


# ----------------------------------------------------------------------------- a real Ray simulation
SIM = (f"{BASE} federation.num_clients=10 num_rounds=2 train.local_steps=4 "
       "faults.fraction=0.3 faults.modes=[raise,exit,nan_value]")


@pytest.mark.simulation
def test_simulation_with_30_percent_failing_clients(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    ray_address: str) -> None:
    """On the shared cluster's warm actor: an ``exit`` fault ends its process, and Ray
    restarts it (a detached actor restarts as any other)."""
    from fedtune.runtime.simulation import simulate

    cfg = compose(f"{SIM} {on_shared_ray(ray_address)}")
    summary = simulate(cfg, tmp_path)
    out = capsys.readouterr().out

    assert summary["status"] == "completed"
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        plan = fault_plan(cfg, int(r["round"]))
        assert r["failed_clients"] == ";".join(map(str, sorted(plan)))  # which clients
        assert int(r["num_failures"]) == 3 and int(r["num_replies"]) == 7  # the other 7 aggregated
        assert math.isfinite(float(r["train_loss"]))
        names = ", ".join(map(str, sorted(plan)))
        assert f"clients 7/10, 3 failed (client {names})" in out  # the progress line names them
    assert float(rows[-1]["eval_loss"]) < float(rows[0]["eval_loss"])  # the global model moved on

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["client_failures"] == 6 and len(saved["failures"]) == 6
    for entry in saved["failures"]:  # and why
        mode = fault_plan(cfg, entry["round"])[entry["client"]]
        tag = f"injected fault '{mode}' (round {entry['round']}, client {entry['client']})"
        if mode == "raise":
            assert entry["reason"] == f"ClientAppException: {tag}"
        elif mode == "exit":  # the process died; Ray restarted it and its retried call says so
            assert tag in entry["reason"] and "process died" in entry["reason"], entry["reason"]
        else:
            assert entry["reason"].startswith("rejected payload: ") and "NaN or Inf" in entry["reason"]
    assert not list(tmp_path.glob(".*.tmp"))
