"""Client-level DP (``privacy=client_dp``): real fedtune strategies inside Flower's own
fixed-clipping wrappers, driven through the real ClientApp on an in-process grid
(``LocalGrid``), and one Ray simulation.  Nothing of fedtune's core is mocked."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import on_shared_ray
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from opacus.accountants import create_accountant

from fedtune.comm.metered_grid import MeteredGrid
from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.flower.strategy import FedtuneStrategy
from fedtune.privacy.client_level import ClientLevelDP
from fedtune.registry import METHODS
from fedtune.runtime.workspace import Workspace
from method_testing import LocalGrid, task_identity  # noqa: F401  (fixture)

BASE = "model=tiny dataset=tiny federation.num_clients=3 runtime.device=cpu train.local_steps=1"
CDP = f"{BASE} privacy=client_dp strategy.weighting=uniform"
METHOD = {"fedavg_lora": "", "ffa_lora": "strategy=ffa_lora",
          "fed_sb": "strategy=fed_sb strategy.rank=4 strategy.init_samples=8"}
Arrays = dict[str, torch.Tensor]


def _setup(overrides: str, **dp: float | str | int | None) -> tuple[FedtuneStrategy, ClientLevelDP, MeteredGrid]:
    """The method's strategy from ``overrides``, Flower's wrapper around it, a metered in-process grid
    (whose ClientApp clips only when the config says ``privacy.clipping=client``)."""
    cfg = compose(overrides)
    strategy = METHODS.get(cfg.strategy.name).strategy_cls.from_config(cfg)
    runner = ClientLevelDP(strategy, **{"clipping": "server", "noise_multiplier": 0.0, **dp})  # type: ignore[arg-type]
    strategy.initialize(Workspace(cfg).initial_arrays())
    return strategy, runner, MeteredGrid(LocalGrid(cfg, 3), strategy.ledger, strategy._partition)


def _round(runner: ClientLevelDP, grid: MeteredGrid, rnd: int) -> tuple[Arrays, dict[int, Arrays], list[Message]]:
    """One round through the wrapper: (state sent, each client's raw upload, the replies)."""
    messages = list(runner.configure_train(rnd, ArrayRecord(runner.inner.global_arrays), ConfigRecord(), grid))
    sent = {k: v.clone() for k, v in runner.inner.global_arrays.items()}  # after Fed-SB's setup
    replies = list(grid.send_and_receive(messages))
    raw = {runner.inner._partition(r.metadata.src_node_id): r.content["arrays"].to_torch_state_dict()
           for r in replies}
    return sent, raw, replies


def _delta(arrays: Arrays, base: Arrays) -> Arrays:
    return {k: arrays[k].double() - base[k].double() for k in base}


def _norm(delta: Arrays) -> float:
    return float(torch.sqrt(sum((v ** 2).sum() for v in delta.values())))


def _mean_of_replies(replies: list[Message]) -> Arrays:
    ups = [r.content["arrays"].to_torch_state_dict() for r in replies]
    return {k: sum(u[k].double() for u in ups) / len(ups) for k in ups[0]}


@pytest.mark.parametrize("method", sorted(METHOD))
def test_server_side_clipping_bounds_every_update_and_averages_the_clipped(method: str,
                                                                           task_identity: None) -> None:
    C = 1e-3  # below every update of one step at lr 1e-2
    strategy, runner, grid = _setup(f"{CDP} {METHOD[method]}", clipping_norm=C)
    sent, raw, replies = _round(runner, grid, 1)
    raw_delta = {pid: _delta(up, sent) for pid, up in raw.items()}
    assert all(_norm(d) > 10 * C for d in raw_delta.values())
    arrays, _ = runner.aggregate_train(1, replies)
    for reply in replies:  # Flower clipped each reply in place, against what that client was sent
        pid = strategy._partition(reply.metadata.src_node_id)
        clipped = _delta(reply.content["arrays"].to_torch_state_dict(), sent)
        assert _norm(clipped) == pytest.approx(C, rel=1e-4)
        scale = C / _norm(raw_delta[pid])  # same direction, shrunk
        for k in clipped:
            torch.testing.assert_close(clipped[k], raw_delta[pid][k] * scale, atol=1e-7, rtol=1e-4)
    mean = _mean_of_replies(replies)  # σ = 0: the uniform mean of the clipped updates, exactly
    for k, v in strategy.global_arrays.items():
        torch.testing.assert_close(v.double(), mean[k], atol=1e-7, rtol=0)
    assert arrays is not None and runner.released == [1]
    assert _norm(_delta(strategy.global_arrays, sent)) <= C * (1 + 1e-4)


def test_zero_noise_huge_clip_equals_the_plain_run_and_bytes_are_metered_once(task_identity: None) -> None:
    cfg = compose(CDP)
    init = ArrayRecord(Workspace(cfg).initial_arrays())
    plain = METHODS.get("fedavg_lora").strategy_cls.from_config(cfg)
    plain.start(LocalGrid(cfg, 3), init, num_rounds=2)
    inner = METHODS.get("fedavg_lora").strategy_cls.from_config(cfg)
    runner = ClientLevelDP(inner, clipping="server", noise_multiplier=0.0, clipping_norm=1e9)
    runner.start(MeteredGrid(LocalGrid(cfg, 3), inner.ledger, inner._partition), init, num_rounds=2)  # not re-wrapped
    assert runner.released == [1, 2] and not runner.withheld
    for key, value in plain.global_arrays.items():  # (x − g) + g: equal up to fp32 rounding
        torch.testing.assert_close(inner.global_arrays[key], value, atol=1e-6, rtol=0)

    def rows(s: FedtuneStrategy) -> list[tuple[int, int, str, str, int]]:
        return [(r.server_round, r.partition_id, r.direction, r.kind, r.payload_bytes) for r in s.ledger.records]

    assert rows(inner) == rows(plain) and len(rows(inner)) == 3 * 2 + 2 * 3 * 2  # roll-call + 2 rounds, once each
    for mine, theirs in zip(inner.ledger.records, plain.ledger.records):
        assert mine.wire_bytes == pytest.approx(theirs.wire_bytes, rel=0.02)


def test_noisy_aggregate_is_the_state_and_what_the_next_round_sends(task_identity: None) -> None:
    sigma, C = 1.0, 0.05
    strategy, runner, grid = _setup(CDP, noise_multiplier=sigma, clipping_norm=C, noise_seed=0)
    _, _, replies = _round(runner, grid, 1)
    rng_before = np.random.get_state()
    arrays, _ = runner.aggregate_train(1, replies)
    assert np.array_equal(np.random.get_state()[1], rng_before[1])  # NumPy's global stream restored
    noiseless = _mean_of_replies(replies)
    noise = torch.cat([(strategy.global_arrays[k].double() - noiseless[k]).flatten() for k in noiseless])
    assert float(noise.std()) == pytest.approx(sigma * C / 3, rel=0.1) and abs(float(noise.mean())) < 0.01
    state = arrays.to_torch_state_dict()
    assert all(torch.equal(strategy.global_arrays[k], state[k]) for k in state)  # the noisy state is the state
    messages = list(runner.configure_train(2, arrays, ConfigRecord(), grid))
    for message in messages:  # ...and exactly what round 2's clients receive (and the clipping reference)
        sent = message.content["arrays"].to_torch_state_dict()
        assert all(torch.equal(sent[k], state[k]) for k in state)
    reference = runner.dp.current_arrays.to_torch_state_dict()
    assert all(torch.equal(reference[k], state[k]) for k in state)
    accountant = create_accountant("rdp")
    accountant.step(noise_multiplier=sigma, sample_rate=1.0)  # 3 of 3 clients: q = 1
    assert strategy.rounds[1].epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    with runner._noise_stream(1):
        first = np.random.normal(size=4)
    with runner._noise_stream(1):
        assert np.array_equal(np.random.normal(size=4), first)  # seeded: a noisy run repeats


def test_client_side_clipping_runs_flowers_mod_and_equals_server_side(task_identity: None) -> None:
    C, sigma = 1e-3, 0.5
    strategy, runner, grid = _setup(f"{CDP} privacy.clipping=client", clipping="client", clipping_norm=C,
                                    noise_multiplier=sigma, noise_seed=0)
    sent, raw, replies = _round(runner, grid, 1)
    assert all(_norm(_delta(up, sent)) == pytest.approx(C, rel=1e-4) for up in raw.values())  # clipped on the client
    runner.aggregate_train(1, replies)
    server_side, runner_s, grid_s = _setup(CDP, clipping_norm=C, noise_multiplier=sigma, noise_seed=0)
    _, raw_s, replies_s = _round(runner_s, grid_s, 1)
    assert all(_norm(_delta(up, sent)) > 10 * C for up in raw_s.values())  # this ClientApp does not clip
    runner_s.aggregate_train(1, replies_s)
    for key, value in server_side.global_arrays.items():
        torch.testing.assert_close(strategy.global_arrays[key], value, atol=1e-7, rtol=0)

    # a client-side wrapper whose clients do not clip: every reply is refused, nothing is released
    unclipped, runner_u, grid_u = _setup(CDP, clipping="client", clipping_norm=C, noise_multiplier=sigma)
    before = {k: v.clone() for k, v in unclipped.global_arrays.items()}
    _, _, replies_u = _round(runner_u, grid_u, 1)
    assert runner_u.aggregate_train(1, replies_u)[0] is None and runner_u.withheld == [1]
    assert sorted(unclipped.rounds[1].failures) == [0, 1, 2]
    assert all("client-side clipping not applied" in r for r in unclipped.rounds[1].failures.values())
    assert all(torch.equal(unclipped.global_arrays[k], v) for k, v in before.items())


class FailingGrid(LocalGrid):
    """The last client of every training round fails (an error reply, as the runtime sends one)."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if not messages or messages[-1].metadata.message_type != MessageType.TRAIN:
            return super().send_and_receive(messages)
        error = Message(Error(code=0, reason="client crashed"), reply_to=messages[-1])
        return [*super().send_and_receive(messages[:-1]), error]


def test_a_failed_client_withholds_the_round(task_identity: None) -> None:
    cfg = compose(CDP)
    strategy = METHODS.get("fedavg_lora").strategy_cls.from_config(cfg)
    runner = ClientLevelDP(strategy, clipping="server", noise_multiplier=1.0, clipping_norm=0.1)
    init = Workspace(cfg).initial_arrays()
    runner.start(FailingGrid(cfg, 3), ArrayRecord(init), num_rounds=1)
    info = strategy.rounds[1]
    assert runner.withheld == [1] and not runner.released and runner.epsilon() == 0.0
    assert info.failures == {2: "client crashed"} and info.received == []
    assert all(torch.equal(strategy.global_arrays[k], v) for k, v in init.items())
    assert len([r for r in strategy.ledger.records if r.kind == "train"]) == 3 + 3  # down 3, up 3 (one an error)


def test_replies_are_put_in_key_order_and_malformed_ones_withhold_the_round(task_identity: None) -> None:
    """Flower's clipping pairs arrays by position: crafted replies (no training) in reversed key order
    are reordered; one with a wrong shape or a missing key is refused before Flower's wrapper sees it."""

    def reply(message: Message, arrays: Arrays) -> Message:
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=message)

    for bad in (None, "shape", "key"):
        strategy, runner, grid = _setup(CDP, clipping_norm=1e9)
        messages = list(runner.configure_train(1, ArrayRecord(), ConfigRecord(), grid))  # roll-call only
        sent = {k: v.clone() for k, v in strategy.global_arrays.items()}
        ups = [{k: v + 0.01 * (i + 1) for k, v in reversed(sent.items())} for i in range(3)]  # reversed order
        first = next(iter(sent))
        if bad == "shape":
            ups[2][first] = torch.zeros(3, 3)
        elif bad == "key":
            del ups[2][first]
        arrays, _ = runner.aggregate_train(1, [reply(m, up) for m, up in zip(messages, ups)])
        if bad is None:
            assert arrays is not None and runner.released == [1]
            for k, v in strategy.global_arrays.items():
                torch.testing.assert_close(v, sent[k] + 0.02, atol=1e-6, rtol=0)
        else:
            assert arrays is None and runner.withheld == [1]
            failures = strategy.rounds[1].failures
            assert list(failures) == [2] and "keys or shapes differ" in failures[2]
            assert all(torch.equal(strategy.global_arrays[k], v) for k, v in sent.items())


@pytest.mark.parametrize("override, message", [
    ("strategy=lora_fair", r"client_dp is not supported with strategy=lora_fair: its B is corrected by a residual"),
    ("strategy=fedex_lora", r"strategy=fedex_lora: it folds the residual"),
    ("strategy=flora", r"strategy=flora: it stacks the clients' factors"),
    ("strategy=fedkseed", r"strategy=fedkseed: clients upload \(seed index, scalar\) pairs"),
    ("strategy=fedkseed_pro", r"strategy=fedkseed_pro: clients upload \(seed index, scalar\) pairs"),
    ("strategy=ferret", r"strategy=ferret: clients upload per-client adaptive numbers"),
    ("strategy.weighting=examples", r"strategy\.weighting must be uniform under privacy=client_dp, got 'examples'"),
    ("strategy=fed_sb strategy.weighting=examples", r"strategy\.weighting must be uniform"),
    ("+privacy.max_grad_norm=1.0", r"privacy\.max_grad_norm belongs to privacy=dp_sgd: client_dp cannot be combined"),
    ("privacy.noise_multiplier=0", r"privacy\.noise_multiplier must be a positive number \(sigma = 0 is no privacy\)"),
    ("privacy.noise_multiplier=-1", r"privacy\.noise_multiplier must be a positive number"),
    ("privacy.clipping_norm=0", r"privacy\.clipping_norm must be a positive number, got 0"),
    ("privacy.clipping_norm=-0.5", r"privacy\.clipping_norm must be a positive number, got -0\.5"),
    ("privacy.clipping=both", r"privacy\.clipping: unknown side 'both'; accepted: server, client"),
    ("privacy.delta=0.5", r"privacy\.delta must be < 1/num_clients = 0\.333"),
])
def test_refused_combinations_and_bad_input_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(f"{CDP} {override}")


@pytest.mark.simulation
def test_ray_simulation_with_client_side_clipping_reports_client_level_dp(tmp_path: Path, ray_address: str) -> None:
    from fedtune.runtime.simulation import simulate

    overrides = (f"{on_shared_ray(ray_address)} model=tiny dataset=tiny num_rounds=2 federation.num_clients=3 privacy=client_dp "
                 "strategy.weighting=uniform privacy.clipping=client privacy.clipping_norm=0.5 eval.max_examples=32 "
                 "train.local_steps=2")
    summary = simulate(compose(overrides), tmp_path)
    assert summary["status"] == "completed" and summary["client_failures"] == 0
    privacy = json.loads((tmp_path / "summary.json").read_text())["privacy"]
    accountant = create_accountant("rdp")
    for _ in range(2):
        accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    assert privacy["name"] == "client_dp" and privacy["clipping"] == "client"
    assert privacy["wrapper"] == "DifferentialPrivacyClientSideFixedClipping"
    assert privacy["noise_multiplier"] == 1.0 and privacy["clipping_norm"] == 0.5
    assert privacy["noise_std"] == pytest.approx(0.5 / 3) and privacy["rounds_released"] == 2
    assert privacy["final_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", newline="")))
    assert [int(r["num_replies"]) for r in rows[1:]] == [3, 3] and rows[0]["epsilon"] == ""
    assert float(rows[-1]["epsilon"]) == pytest.approx(privacy["final_epsilon"], abs=1e-6)
    ledger = list(csv.DictReader(open(tmp_path / "ledger.csv", newline="")))
    train = [r for r in ledger if r["kind"] == "train"]
    assert len(train) == 2 * 3 * 2 and all(int(r["payload_bytes"]) > 0 for r in train if r["direction"] == "up")
