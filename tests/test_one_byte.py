"""One-byte ZO oracles (docs/methods.md#one_byte): the quantiser's error bound, replay
equality with the quantised scalars, the catch-up log each client is sent, and its
return to the clients after a resume."""

import csv
import json

import pytest
import torch

from method_testing import LocalGrid, quick_config, run_method, task_identity  # noqa: F401  (fixture)
from fedtune.flower.server_app import run_server
from fedtune.flower.strategy import ClientUpdate
from fedtune.randomness import draw_directions
from fedtune.runtime.workspace import Workspace
from strategies.one_byte import QMAX, OneByte, OneByteConfig, dequantize, merge_logs, quantize, step_seeds


def test_nearest_rounding_errs_by_at_most_half_a_step_and_adapts_its_scale() -> None:
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    codes, s = quantize(g, 0.0)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == QMAX
    assert s == pytest.approx(float(g.abs().max()) / QMAX, rel=1e-6)
    assert float((dequantize(codes, s) - g).abs().max()) <= s / 2 * (1 + 1e-5)


def test_a_fixed_scale_saturates_and_stochastic_rounding_is_unbiased() -> None:
    g = torch.tensor([0.05, -0.3, 10.0, -10.0])
    codes, s = quantize(g, 0.01)
    assert s == pytest.approx(0.01) and codes.tolist() == [5, -30, 127, -127]
    gen = torch.Generator().manual_seed(1)
    x = torch.full((20000,), 0.0137)
    q, s = quantize(x, 0.01, "stochastic", gen)
    assert set(q.tolist()) == {1, 2} and float((dequantize(q, s) - x).abs().max()) < s
    assert float(dequantize(q, s).mean()) == pytest.approx(0.0137, rel=0.01)


def _strategy(numel: int = 50, steps: int = 4) -> OneByte:
    strategy = OneByte(num_clients=4, clients_per_round=2, seed=3, config=OneByteConfig(local_steps=steps, lr=0.1))
    strategy.initialize({"w": torch.arange(numel, dtype=torch.float32) / numel})
    return strategy


def _update(pid: int, n: int, codes: list[int], scale: float) -> ClientUpdate:
    return ClientUpdate(pid, n, {"codes": torch.tensor(codes, dtype=torch.int8),
                                 "scale": torch.tensor([scale])}, {})


def test_the_server_replays_exactly_the_quantised_steps_along_each_senders_seeds() -> None:
    strategy = _strategy()
    theta0 = strategy.theta.clone()
    ups = [_update(0, 1, [3, -1, 0, 127], 0.5), _update(2, 3, [-2, 5, 1, 0], 0.25)]
    out = strategy.aggregate(1, ups)["w"]
    want = theta0.double()
    for u, p in zip(ups, (0.25, 0.75)):
        z = draw_directions(step_seeds(3, 1, u.partition_id, 4), 50).double()
        want -= 0.1 * p * float(u.arrays["scale"]) * (u.arrays["codes"].double() @ z)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)


def test_each_client_is_sent_the_entries_of_the_rounds_it_has_not_seen() -> None:
    strategy = _strategy()
    strategy.aggregate(1, [_update(0, 1, [1, 1, 1, 1], 1.0), _update(1, 1, [2, 2, 2, 2], 1.0)])
    strategy.aggregate(2, [_update(1, 1, [3, 3, 3, 3], 1.0), _update(2, 1, [4, 4, 4, 4], 1.0)])
    rounds = {pid: strategy.downlink(3, pid)["rounds"].tolist() for pid in range(4)}
    assert rounds == {0: [1, 1, 2, 2], 1: [2, 2], 2: [2, 2], 3: [1, 1, 2, 2]}
    strategy.resync(None, 3)  # a restart no client stored the log in: each is sent it with its next round
    assert all(len(strategy.downlink(3, pid)["rounds"]) == 4 for pid in range(4))
    log = strategy.log
    assert all(torch.equal(merge_logs(log, log)[k], log[k]) for k in log)  # a resend is merged once


def test_a_client_replaying_the_log_holds_the_servers_model_bit_for_bit(task_identity: None) -> None:
    run = run_method("one_byte", rounds=3)
    strategy, cfg = run.strategy, run.cfg
    ws = Workspace(cfg)
    model, trainer = ws.model(), ws.trainer
    cached, _ = trainer.synced_theta(model, strategy.log, cfg, 3)  # the cache held round 2: one round replayed
    trainer._cache.pop(model)
    rebuilt, replayed = trainer.synced_theta(model, strategy.log, cfg, 3)  # from θ0: the whole log
    assert torch.equal(cached, strategy.theta) and torch.equal(rebuilt, strategy.theta)
    assert replayed == len(strategy.log["rounds"])
    assert any(len(u.arrays["codes"]) == cfg.strategy.local_steps for u in run.rounds[3].updates)
    reply = run.rounds[3].replies[0].content["metrics"]
    assert 0 < reply["quant-rel-error"] < 0.05  # adaptive 8-bit grid against the fp32 scalars


def test_a_resumed_run_sends_the_lost_logs_as_restart_traffic_and_ends_where_an_unbroken_run_does(
        task_identity: None, tmp_path) -> None:  # noqa: F811
    """A restart loses every client's log (fresh Contexts): the server sends each the entries
    it held in ``train.setup`` messages metered as ``resume``, so round 3's train bytes, and
    the model, are those of the run that never stopped."""
    cfg3 = quick_config("one_byte", ["num_rounds=3"])
    run_server(LocalGrid(cfg3, cfg3.federation.num_clients), cfg3, tmp_path / "unbroken")
    cfg2 = quick_config("one_byte", ["num_rounds=2"])
    run_server(LocalGrid(cfg2, cfg2.federation.num_clients), cfg2, tmp_path / "broken")
    summary = run_server(LocalGrid(cfg3, cfg3.federation.num_clients), cfg3, tmp_path / "broken", resume=True)

    def rows(name: str, kind: str) -> list[dict[str, str]]:
        return [r for r in csv.DictReader(open(tmp_path / name / "ledger.csv")) if r["kind"] == kind]

    key = lambda r: (r["server_round"], r["partition_id"], r["direction"])  # noqa: E731
    train = {name: sorted((key(r), int(r["payload_bytes"])) for r in rows(name, "train")) for name in ("unbroken", "broken")}
    assert train["broken"] == train["unbroken"]

    def down(name: str, kind: str, pid: int) -> int:
        return sum(int(r["payload_bytes"]) for r in rows(name, kind) if r["direction"] == "down"
                   and int(r["partition_id"]) == pid and (kind == "resume" or int(r["server_round"]) <= 2))

    # each client is given back what it had been sent through round 2: the entries it held
    held = {pid: down("unbroken", "train", pid) for pid in range(cfg3.federation.num_clients)}
    assert {pid: down("broken", "resume", pid) for pid in held} == held and sum(held.values()) > 0
    assert summary["resume_bytes"] > 0

    unbroken = json.loads((tmp_path / "unbroken" / "summary.json").read_text())
    assert summary["final_eval_loss"] == unbroken["final_eval_loss"] and summary["total_bytes"] == unbroken["total_bytes"]
