"""The contract every registered method keeps, as checks on real in-process rounds (no Ray).

:func:`run_method` drives a method's strategy for two rounds against the real ClientApp
(:class:`LocalGrid`, one persistent ``Context`` per node) on the tiny model, recording
what each check needs.  The ``check_*`` functions are the contract; tests/test_method_contract.py
runs them over ``METHODS.names()`` and tests/test_method_plugin.py over a method from a
package outside fedtune.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedtune.comm.metered_grid import MeteredGrid
from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.flower.client_app import make_client_app
from fedtune.flower.strategy import ClientUpdate, weights_for
from fedtune.registry import METHODS, MethodSpec
from fedtune.runtime.workspace import Workspace

BASE = ["model=tiny", "dataset=tiny", "federation.num_clients=3", "train.local_steps=2", "runtime.device=cpu",
        "eval.max_examples=32", "seed=1"]
ROUNDS = 2


class LocalGrid:
    """Each node is the real ClientApp with its own Context; an exception becomes an error
    reply, as Flower's simulation engine makes it."""

    def __init__(self, cfg: Any, num_nodes: int) -> None:
        self.app = make_client_app(cfg.to_dict())
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                                          node_config={"partition-id": i, "num-partitions": num_nodes})
                         for i in range(num_nodes)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        out = []
        for m in messages:
            try:
                out.append(self.app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as exc:  # noqa: BLE001
                reason = f"<class '{type(exc).__name__}'>:<'Exception ClientAppException occurred. Message: {exc}'>"
                out.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=m))
        return out


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages built outside a running Flower app need a task identity."""
    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


# ----------------------------------------------------------------------------- state
def state_of(strategy: Any) -> dict[str, Any]:
    """The strategy's explicit state (``state_dict``)."""
    return strategy.state_dict()


def load_state(strategy: Any, state: dict[str, Any]) -> None:
    """Give ``strategy`` a deep copy of ``state`` (nothing stays shared with where it came from)."""
    strategy.load_state_dict(copy.deepcopy(state))


def restored(spec: MethodSpec, cfg: Any, initial: dict[str, torch.Tensor], state: dict[str, Any]) -> Any:
    """A fresh strategy of ``spec`` (as a restarted server builds it) holding ``state``."""
    strategy = spec.strategy_cls.from_config(cfg)
    strategy.initialize({k: v.clone() for k, v in initial.items()})
    load_state(strategy, state)
    return strategy


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Bit-for-bit equality of nested state (tensors by value and dtype, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b))), f"{where}: {a} != {b}"
    elif isinstance(a, (int, str, bytes, bool, type(None), torch.dtype, torch.Size)):
        assert a == b, f"{where}: {a!r} != {b!r}"
    elif callable(a) and not hasattr(a, "__dict__"):
        assert getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None), where
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        assert_same({f.name: getattr(a, f.name) for f in dataclasses.fields(a)},
                    {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}, where)
    else:
        assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
        state = lambda o: o.__getstate__() if hasattr(o, "__getstate__") else vars(o)  # noqa: E731
        sa, sb = state(a), state(b)
        sa, sb = ({k: v for k, v in s.items() if not callable(v) or isinstance(v, torch.Tensor)}
                  if isinstance(s, dict) else s for s in (sa, sb))
        assert_same(sa, sb, where)


# ----------------------------------------------------------------------------- running
@dataclass
class Round:
    messages: list[Message]
    replies: list[Message]
    updates: list[ClientUpdate]
    expected_bytes: dict[int, tuple[int, int]]  # pid -> (down, up) by the method's formula
    state_before: dict[str, Any]  # the strategy's state right before this round's aggregation


@dataclass
class Run:
    spec: MethodSpec
    cfg: Any
    initial: dict[str, torch.Tensor]
    strategy: Any
    rounds: dict[int, Round] = field(default_factory=dict)


def quick_config(name: str, extra: list[str] | tuple[str, ...] = ()) -> Any:
    return compose([*BASE, f"strategy={name}", *METHODS.get(name).quick, *extra])


def decode(strategy: Any, reply: Message) -> ClientUpdate:
    pid = strategy.partition_of_node[reply.metadata.src_node_id]
    metrics = dict(reply.content["metrics"])
    return ClientUpdate(pid, int(metrics["num-examples"]), reply.content["arrays"].to_torch_state_dict(), metrics)


def run_method(name: str, extra: list[str] | tuple[str, ...] = (), rounds: int = ROUNDS) -> Run:
    """``rounds`` real rounds of ``strategy=name`` through the ClientApp, in this process."""
    spec, cfg = METHODS.get(name), quick_config(name, extra)
    ws = Workspace(cfg)
    run = Run(spec, cfg, ws.initial_arrays(), spec.strategy_cls.from_config(cfg))
    strategy = run.strategy
    strategy.initialize({k: v.clone() for k, v in run.initial.items()})
    grid = MeteredGrid(LocalGrid(cfg, cfg.federation.num_clients), strategy.ledger,
                       lambda node: strategy.partition_of_node.get(node, -1))
    for r in range(1, rounds + 1):
        messages = list(strategy.configure_train(r, ArrayRecord(), ConfigRecord(), grid))
        replies = list(grid.send_and_receive(messages))
        assert not any(m.has_error() for m in replies), [m.error.reason[-300:] for m in replies if m.has_error()]
        updates = sorted((decode(strategy, m) for m in replies), key=lambda u: u.partition_id)
        formula = spec.payload.formula if spec.payload else None
        expected = {u.partition_id: formula(strategy, u.partition_id, u.arrays) for u in updates} if formula else {}
        run.rounds[r] = Round(messages, replies, updates, expected, copy.deepcopy(state_of(strategy)))
        arrays, _ = strategy.aggregate_train(r, replies)
        assert arrays is not None and not strategy.rounds[r].failures, strategy.rounds[r].failures
    return run


# ----------------------------------------------------------------------------- the contract
def check_spec(spec: MethodSpec) -> None:
    """The spec is complete: a trainer, a config whose default name is the method's, a
    payload with a byte formula, a reason for every capability, and a note on what a
    client-side one-time setup computes on client data."""
    from fedtune.registry import TRAINERS

    trainer = TRAINERS.get(spec.trainer)
    assert spec.config_cls().name == spec.name
    if hasattr(trainer, "setup"):  # a client-side setup runs where the data is: say what it computes
        note = spec.capabilities.setup_note(spec.config_cls())
        assert note.strip(), f"{spec.name}: setup_on_client_data undeclared"
    assert spec.payload is not None and spec.payload.formula is not None and spec.payload.up and spec.payload.down
    caps = spec.capabilities
    for support in (caps.example_dp, caps.client_dp, caps.sum_only, caps.quantized_base):
        assert support.reason.strip(), spec.name
    assert spec.export.format.strip()


def check_payload_bytes(run: Run) -> None:
    """Each client's train payload in a round (summed over its train messages, e.g. SFPrompt's
    begin and upload), as the ledger counts it, is the method's formula."""
    for r, rnd in run.rounds.items():
        records = [rec for rec in run.strategy.ledger.records if rec.server_round == r and rec.kind == "train"]
        down: dict[int, int] = {}
        up: dict[int, int] = {}
        for rec in records:
            side = down if rec.direction == "down" else up
            side[rec.partition_id] = side.get(rec.partition_id, 0) + rec.payload_bytes
        assert sorted(down) == sorted(up) == sorted(rnd.expected_bytes), (r, down, up)
        for pid, (want_down, want_up) in rnd.expected_bytes.items():
            assert (down[pid], up[pid]) == (want_down, want_up), (run.spec.name, r, pid)
            assert up[pid] > 0


def _copies(update: ClientUpdate, updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """``update``'s upload sent by every client of ``updates`` (their own example counts)."""
    return [ClientUpdate(u.partition_id, u.num_examples, {k: v.clone() for k, v in update.arrays.items()},
                         dict(update.metrics)) for u in updates]


def check_identical_updates(run: Run) -> None:
    """Identical uploads aggregate to that upload (where the spec says so); for any method,
    every client sending one upload aggregates as that one client alone."""
    r = max(run.rounds)
    rnd = run.rounds[r]
    # the upload that most clients could have sent (an upload's shapes may depend on the client)
    one = max(rnd.updates, key=lambda u: sum(_fits(run, v.partition_id, u.arrays) for v in rnd.updates))
    copies = [c for c in _copies(one, rnd.updates) if _fits(run, c.partition_id, one.arrays)]
    assert len(copies) >= 2 or not run.spec.capabilities.identical_updates_fixed_point
    together = restored(run.spec, run.cfg, run.initial, rnd.state_before).aggregate(r, copies)
    alone = restored(run.spec, run.cfg, run.initial, rnd.state_before).aggregate(r, copies[:1])
    assert list(together) == list(alone)
    if run.spec.capabilities.sender_bound_directions:  # Σ_k p_k (alone_k − θ), not alone_1
        before = restored(run.spec, run.cfg, run.initial, rnd.state_before).global_arrays
        weights = weights_for(copies, run.strategy.weighting)
        each = [restored(run.spec, run.cfg, run.initial, rnd.state_before).aggregate(r, [c]) for c in copies]
        for k in together:
            moved = sum(w * (e[k] - before[k]) for w, e in zip(weights, each))
            torch.testing.assert_close(together[k] - before[k], moved, rtol=1e-4, atol=1e-6)
        assert any(not torch.equal(together[k], alone[k]) for k in together)
        return
    for k in together:
        torch.testing.assert_close(together[k], alone[k], rtol=1e-5, atol=1e-6)
    if run.spec.capabilities.identical_updates_fixed_point:
        assert together and set(together) <= set(one.arrays)
        for k, v in together.items():
            torch.testing.assert_close(v, one.arrays[k], rtol=1e-5, atol=1e-6)


def _fits(run: Run, pid: int, arrays: dict[str, torch.Tensor]) -> bool:
    expected = run.strategy.expected_upload(pid)
    return all(len(v.shape) == len(expected[k]) and all(w in (-1, s) for s, w in zip(v.shape, expected[k]))
               for k, v in arrays.items())


def check_state_round_trip(run: Run) -> None:
    """The state, restored into a fresh strategy, is bit for bit the same and behaves the same."""
    state = copy.deepcopy(state_of(run.strategy))
    again = restored(run.spec, run.cfg, run.initial, state)
    assert_same(state_of(again), state)
    r = max(run.rounds)
    for pid in range(run.cfg.federation.num_clients):
        assert_same(again.downlink(r + 1, pid), run.strategy.downlink(r + 1, pid), f"downlink to {pid}")
    updates = run.rounds[r].updates
    try:
        assert_same(again.aggregate(r + 1, updates), run.strategy.aggregate(r + 1, updates), "next aggregate")
        assert_same(state_of(again), state_of(run.strategy), "state after the next aggregate")
    finally:
        load_state(run.strategy, state)  # the run stays as it was for the other checks


def check_declared_privacy(name: str) -> None:
    """A mode the method does not support is refused at config time with its reason, in one
    line; a supported one composes (under its declared conditions)."""
    caps = METHODS.get(name).capabilities
    for mode, support in (("dp_sgd", caps.example_dp), ("client_dp", caps.client_dp)):
        overrides = [*BASE, f"strategy={name}", f"privacy={mode}"]
        if not support.ok:
            with pytest.raises(ConfigError) as err:
                compose(overrides)
            message = str(err.value)
            assert "\n" not in message
            assert re.match(rf"privacy: {mode} is not supported with strategy={name}: {re.escape(support.reason)}",
                            message), message
            continue
        cfg = compose([*overrides, *support.overrides()])
        assert cfg.privacy.name == mode
        for condition in support.conditions:  # an unmet condition is a one-line error naming the field
            section = dataclasses.replace(cfg.strategy)
            setattr(section, condition.field, ("not", condition.value))
            with pytest.raises(ConfigError, match=rf"^strategy\.{condition.field} must be "):
                support.check(section, f"privacy={mode}")


def check_declared_quantized_base(name: str, hf_path: str) -> None:
    """A quantized base under a method that does not declare ``quantized_base`` is refused at
    config time with its reason, in one line; a declared one composes and passes pre-flight."""
    from fedtune.models.preflight import preflight

    support = METHODS.get(name).capabilities.quantized_base
    overrides = ["model=hf", f"model.path={hf_path}", *BASE[2:], f"strategy={name}", "model.quantization=4bit",
                 *METHODS.get(name).quick]
    if not support.ok:
        with pytest.raises(ConfigError) as err:
            compose(overrides)
        assert "\n" not in str(err.value)
        assert str(err.value).startswith(f"model.quantization: strategy={name} cannot train on a 4bit base: "
                                         f"{support.reason}; accepted: "), err.value
        return
    cfg = compose([*overrides, *support.overrides()])
    assert cfg.model.quantization == "4bit"
    preflight(cfg)


def check_sum_only(run: Run) -> None:
    """Two sets of uploads with the same weighted sum (key by key) aggregate the same, and a
    different weighted sum aggregates differently."""
    r = max(run.rounds)
    rnd = run.rounds[r]
    updates = rnd.updates
    weights = weights_for(updates, run.strategy.weighting)
    gen = torch.Generator().manual_seed(0)
    shifts = {k: 1e-2 * torch.randn(v.shape, generator=gen) for k, v in updates[0].arrays.items()
              if v.is_floating_point()}

    def moved(sign_second: float) -> list[ClientUpdate]:
        out = []
        for i, u in enumerate(updates):
            arrays = dict(u.arrays)
            for k, d in shifts.items():
                if i == 0:
                    arrays[k] = u.arrays[k] + d / weights[0]
                elif i == 1:
                    arrays[k] = u.arrays[k] + sign_second * d / weights[1]
            out.append(dataclasses.replace(u, arrays=arrays))
        return out

    def aggregate(ups: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        return restored(run.spec, run.cfg, run.initial, rnd.state_before).aggregate(r, ups)

    assert shifts and len(updates) >= 2
    base, same_sum, other_sum = aggregate(updates), aggregate(moved(-1.0)), aggregate(moved(+1.0))
    for k in base:
        torch.testing.assert_close(same_sum[k], base[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(other_sum[k], base[k], rtol=1e-4, atol=1e-5) for k in base)


def check_malformed_rejected(run: Run) -> None:
    """A reply with a NaN, or with an array of the wrong shape, is rejected and recorded as
    that client's failure; the others are aggregated."""
    r = max(run.rounds)
    rnd = run.rounds[r]
    node_of_msg = {m.metadata.dst_node_id: m for m in rnd.messages}
    target = rnd.replies[0]
    arrays = target.content["arrays"].to_torch_state_dict()
    key = next(k for k, v in arrays.items() if v.is_floating_point())
    nan = {**arrays, key: arrays[key].clone().reshape(-1).index_fill(0, torch.tensor([0]), float("nan"))
           .reshape(arrays[key].shape)}
    for bad, why in ((nan, "NaN"), ({**arrays, key: arrays[key].unsqueeze(0)}, "shape")):
        strategy = restored(run.spec, run.cfg, run.initial, rnd.state_before)
        strategy.node_of = dict(run.strategy.node_of)
        strategy.partition_of_node = dict(run.strategy.partition_of_node)
        content = RecordDict({"arrays": ArrayRecord(bad), "metrics": MetricRecord(dict(target.content["metrics"]))})
        crafted = Message(content, reply_to=node_of_msg[target.metadata.src_node_id])
        replies = [crafted, *rnd.replies[1:]]
        strategy.aggregate_train(r, replies)
        pid = run.strategy.partition_of_node[target.metadata.src_node_id]
        failures = strategy.rounds[r].failures
        assert list(failures) == [pid] and failures[pid].startswith("rejected payload"), (why, failures)
        assert pid not in strategy.rounds[r].received
