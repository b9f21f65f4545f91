"""FedKSeed / FedKSeed-Pro oracles (docs/methods.md#fedkseed) and shared randomness."""

import hashlib
import math
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from fedtune.comm.ledger import payload_bytes
from fedtune.config import compose
from fedtune.directions import SeedDirections, cached_banks, clear_banks
from fedtune.errors import ConfigError
from fedtune.flower.strategy import ClientUpdate
from fedtune.models.state import trainable_state
from fedtune.randomness import add_directions, draw_directions, seed_pool
from fedtune.registry import MODELS
from fedtune.runtime.workspace import Workspace
from fedtune.trainer import TrainContext
from strategies.fedkseed import (FedKSeed, FedKSeedConfig, FedKSeedPro, FedKSeedProConfig, SeedReplica, encode_upload,
                                 flatten, per_seed_sums, pro_probabilities, zo_steps)

BASE = "model=tiny dataset=tiny federation.num_clients=3"


def _digest(kind: str) -> str:
    return hashlib.sha256(draw_directions(seed_pool(7, 3, "test"), 1000, kind).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_directions_are_bit_identical_across_calls_and_processes(kind: str) -> None:
    code = f"from tests.test_fedkseed import _digest; print(_digest({kind!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=".")
    assert _digest(kind) == _digest(kind) == other.stdout.strip()
    z = draw_directions(seed_pool(7, 3, "test"), 1000, kind)
    assert not torch.equal(z[0], z[1])  # distinct seeds give distinct directions
    if kind == "uniform":
        assert z.abs().max() <= 1 / math.sqrt(1000) and (z.norm(dim=1) <= 1).all()


def test_vectorised_replay_equals_per_seed_loop() -> None:
    seeds = seed_pool(1, 50, "replay")
    coeffs = torch.randn(50, generator=torch.Generator().manual_seed(0))
    coeffs[::3] = 0.0  # skipped seeds must not matter
    fast = add_directions(torch.zeros(300), seeds, coeffs, alpha=-0.1)
    slow = torch.zeros(300)
    for s, c in zip(seeds.tolist(), coeffs.tolist()):
        slow.add_(draw_directions([s], 300)[0], alpha=-0.1 * c)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    assert fast.abs().max() > 0.1


def test_central_difference_is_exact_on_a_quadratic() -> None:
    g = torch.Generator().manual_seed(3)
    d = 40
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    H, b = M @ M.T + torch.eye(d, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64)

    def loss(x: torch.Tensor, t: int) -> float:
        return float(0.5 * x @ H @ x + b @ x)

    seeds = seed_pool(0, 5, "quad")
    start = theta.clone()
    grads, _ = zo_steps(theta, torch.tensor([0]), SeedDirections(seeds, "gaussian", numel=d), loss, eps=1e-2, lr=0.0)
    z = draw_directions(seeds[:1], d)[0].double()
    assert float(grads[0]) == pytest.approx(float(z @ (H @ start + b)), rel=1e-6)
    assert torch.equal(theta, start)  # lr = 0 leaves θ alone


@pytest.fixture(scope="module")
def tiny():
    """One torch thread for this module, restored after: the thread count changes float
    sums, and other tests compare runs bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = compose(f"{BASE} strategy=fedkseed strategy.num_seeds=64 strategy.local_steps=20 strategy.batch_size=4")
    ws = Workspace(cfg)
    yield cfg, ws, ws.model()
    torch.set_num_threads(threads)


def _strategy(cfg, model, cls=FedKSeed, **kw) -> FedKSeed:  # type: ignore[no-untyped-def]
    params = {k: v for k, v in vars(cfg.strategy).items() if k != "name"}
    config = (FedKSeedProConfig if cls is FedKSeedPro else FedKSeedConfig)(**{**params, **kw})
    strategy = cls(num_clients=3, clients_per_round=3, seed=cfg.seed, config=config)
    Workspace(cfg).trainer.flat(model).copy_(Workspace(cfg).trainer.theta0(model))  # θ0, as the ServerApp sees it
    strategy.initialize(trainable_state(model))
    return strategy


def test_replaying_the_pairs_reproduces_the_client_model(tiny) -> None:
    cfg, ws, model = tiny
    acc = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 0.1  # a non-trivial start model
    out = ws.trainer.run(model, {"accumulators": acc}, ws, TrainContext(1, 0, ws.device))
    seeds = seed_pool(cfg.seed, 64, "fedkseed-pool")
    replayed = add_directions(out["start"].clone(), seeds, per_seed_sums(out["indices"], out["grads"], 64),
                              alpha=-cfg.strategy.lr)
    scale = float(out["final"].norm())
    assert float((out["final"] - out["start"]).norm()) > 1e-4 * scale  # the client did move
    assert float((replayed - out["final"]).norm()) <= 1e-6 * scale
    assert torch.equal(flatten(trainable_state(model))[2], out["start"])  # model left at the global state


def test_weighted_client_average_equals_server_replay_for_both_encodings(tiny) -> None:
    cfg, ws, model = tiny
    strategies = {enc: _strategy(cfg, model, encoding=enc) for enc in ("pairs", "sums")}
    finals, updates = [], {enc: [] for enc in strategies}
    for pid, n in ((0, 10), (1, 30), (2, 60)):
        down = strategies["pairs"].downlink(1, pid)
        out = ws.trainer.run(model, down, ws, TrainContext(1, pid, ws.device))
        finals.append(out["final"])
        for enc in strategies:
            updates[enc].append(ClientUpdate(pid, n, encode_upload(out["indices"], out["grads"], 64, enc), {}))
    expected = 0.1 * finals[0] + 0.3 * finals[1] + 0.6 * finals[2]
    for enc, strategy in strategies.items():
        got = flatten(strategy.aggregate(1, updates[enc]))[2]
        assert float((got - expected).norm()) <= 1e-6 * float(expected.norm()), enc
    assert float((expected - strategies["pairs"].replica.theta0).norm()) > 0


def test_rebuild_from_theta0_equals_sequential_rounds_and_late_clients_catch_up(tiny) -> None:
    cfg, _, model = tiny
    strategy = _strategy(cfg, model)
    late = SeedReplica(strategy.replica.theta0, strategy.replay)  # a client away for rounds 1-3
    gen = torch.Generator().manual_seed(5)
    for r in range(1, 5):
        ups = [ClientUpdate(pid, 10 + pid, {"indices": torch.randint(0, 64, (20,), generator=gen, dtype=torch.int16),
                                            "values": torch.randn(20, generator=gen)}, {}) for pid in range(3)]
        strategy.aggregate(r, ups)
        if r == 1:
            late.sync(strategy.accumulators)
    late.sync(strategy.accumulators)
    rebuilt = strategy.replica.rebuild(strategy.accumulators)
    scale = float(rebuilt.norm())
    assert float((strategy.replica.theta - strategy.replica.theta0).norm()) > 1e-3
    assert float((strategy.replica.theta - rebuilt).norm()) <= 1e-6 * scale
    assert float((late.theta - rebuilt).norm()) <= 1e-6 * scale


def test_pro_probabilities() -> None:
    K = 100
    counts = torch.full((K,), 3.0)
    uniform = pro_probabilities(torch.full((K,), 2.0), counts)
    torch.testing.assert_close(uniform, torch.full((K,), 1.0 / K))
    abs_sum = torch.linspace(0, 50, K)
    p = pro_probabilities(abs_sum, counts)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(p.max() / p.min()) <= math.e * (1 + 1e-5)
    assert float(p.max() / p.min()) == pytest.approx(math.e, rel=1e-4)  # the spread reaches e here
    assert (p[1:] >= p[:-1]).all() and p[-1] > p[0]  # monotone in mean |g|


def test_pro_server_keeps_histories_and_sends_probabilities(tiny) -> None:
    cfg, _, model = tiny
    strategy = _strategy(cfg, model, cls=FedKSeedPro)
    assert set(strategy.downlink(1, 0)) == {"accumulators", "probabilities"}
    up = {"indices": torch.tensor([3, 3, 7], dtype=torch.int16), "values": torch.tensor([2.0, -4.0, 5000.0])}
    strategy.aggregate(1, [ClientUpdate(0, 1, up, {})])
    # histories: seed 3 [0, 2, -4] -> mean |g| 2; seed 7 [0, clip(5000)=1000] -> 500; others 0
    p = strategy.downlink(2, 0)["probabilities"]
    assert p[7] > p[3] > p[0] and float(p[7] / p[0]) == pytest.approx(math.e, rel=1e-5)
    assert float(p[3] / p[0]) == pytest.approx(math.exp(2 / 500), rel=1e-5)


def _bytes(arrays) -> int:  # type: ignore[no-untyped-def]
    return payload_bytes(RecordDict({"arrays": ArrayRecord(arrays)}))


@pytest.mark.parametrize("method", ["fedkseed", "fedkseed_pro"])
def test_bytes_per_client_round_match_section_8_and_stay_under_18kb(method: str) -> None:
    cfg = compose(f"{BASE} strategy={method} strategy.num_seeds=4096 strategy.local_steps=200")
    ws = Workspace(cfg)
    model = ws.model()
    strategy = _strategy(cfg, model, cls=FedKSeedPro if method == "fedkseed_pro" else FedKSeed)
    down = strategy.downlink(1, 0)
    upload, metrics = ws.trainer.train(model, down, ws, TrainContext(1, 0, ws.device))
    K, tau = 4096, 200
    assert _bytes(down) == (8 if method == "fedkseed_pro" else 4) * K
    assert _bytes(upload) == tau * (4 + math.ceil(math.log2(K) / 8)) == 1200
    if method == "fedkseed":
        assert _bytes(down) + _bytes(upload) == 17_584 <= 18_000  # §5.6: 16,384 + 200·(4+2)
        sums = FedKSeed(num_clients=1, clients_per_round=1, config=FedKSeedConfig(encoding="sums")).expected_upload(0)
        assert sums == {"sums": (K,)}  # sums encoding: 4K up
    assert metrics["num-examples"] > 0 and math.isfinite(metrics["train-loss"])


def test_inexact_settings_are_refused() -> None:
    cfg = compose(f"{BASE} strategy=fedkseed train.weight_decay=0.01")
    with pytest.raises(ConfigError, match="train.weight_decay"):
        FedKSeed.from_config(cfg)
    with pytest.raises(ConfigError, match="train.weight_decay"):
        Workspace(cfg).trainer.build_model(MODELS.get("tiny").build(cfg.model, 4, 0), cfg)
    with pytest.raises(ConfigError, match=r"^strategy\.encoding"):
        compose(f"{BASE} strategy=fedkseed_pro strategy.encoding=sums")
    with pytest.raises(ConfigError, match=r"^strategy\.num_seeds"):
        compose(f"{BASE} strategy=fedkseed strategy.num_seeds=0")
    with pytest.raises(ConfigError, match=r"^strategy\.trainable"):
        compose(f"{BASE} strategy=fedkseed strategy.trainable=lora")


def test_out_of_range_seed_indices_are_a_payload_problem(tiny) -> None:
    """Rejected in validation (so recorded as the client's failure: tests/test_faults.py)."""
    cfg, _, model = tiny
    strategy = _strategy(cfg, model)
    good = {"indices": torch.full((20,), 5, dtype=torch.int16), "values": torch.ones(20)}
    bad = {"indices": torch.full((20,), 64, dtype=torch.int16), "values": torch.ones(20)}
    negative = {"indices": torch.full((20,), -1, dtype=torch.int16), "values": torch.ones(20)}
    assert strategy.payload_problem(0, good) == ""
    assert strategy.payload_problem(1, bad) == strategy.payload_problem(2, negative) == "seed indices outside [0, 64)"


def _two_rounds(cache_mb: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clients' scalar gradients and the server model after 2 rounds of 3 clients (tiny model)."""
    cfg = compose(f"{BASE} strategy=fedkseed strategy.num_seeds=64 strategy.local_steps=20 strategy.batch_size=4 "
                  f"strategy.direction_cache_mb={cache_mb}")
    ws = Workspace(cfg)
    model = ws.model()
    strategy = _strategy(cfg, model)
    grads = []
    for r in (1, 2):
        updates = []
        for pid in range(3):
            upload, metrics = ws.trainer.train(model, strategy.downlink(r, pid), ws, TrainContext(r, pid, ws.device))
            grads.append(upload["values"])
            updates.append(ClientUpdate(pid, metrics["num-examples"], upload, metrics))
        strategy.aggregate(r, updates)
    return grads, strategy.replica.theta


def test_client_and_server_results_are_the_same_with_and_without_the_direction_bank(tiny) -> None:
    clear_banks()
    streamed_grads, streamed = _two_rounds(0.0)
    assert cached_banks() == []  # cap 0: every direction regenerated
    banked_grads, banked = _two_rounds(1024.0)
    (bank,) = cached_banks()  # one bank shared by the server and the client in this process
    assert bank.num_seeds == 64 and bank.numel == streamed.numel() and bool(bank.filled.any())
    for g0, g1 in zip(streamed_grads[:3], banked_grads[:3]):
        assert torch.equal(g0, g1)  # round 1 starts from θ0: the same rows give the same steps bit for bit
    for g0, g1 in zip(streamed_grads[3:], banked_grads[3:]):  # round 2: start models differ by fp32 rounding
        torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-3 * float(g0.abs().max()))
    # a g_t off by ~5e-5 (relative) moves θ by η·δg·‖z‖: measured 1.7e-6·‖θ‖ after two rounds
    assert float((banked - streamed).norm()) <= 1e-5 * float(streamed.norm())
    clear_banks()


def test_under_a_cosine_schedule_the_server_replay_equals_the_clients_models(tiny) -> None:
    """Rounds 1 and 2 of 3 at η_r = 1e-2, 5.5e-3: each client steps at η_r (its pairs replayed
    at η_r give its model) and the server's model is the weighted mean of the clients'."""
    cfg = compose(f"{BASE} strategy=fedkseed strategy.num_seeds=64 strategy.local_steps=20 strategy.batch_size=4 "
                  "strategy.lr=1e-2 num_rounds=3 train.lr_schedule=cosine train.lr_min=1e-3")  # `tiny`: 1 thread
    ws = Workspace(cfg)
    model = ws.model()  # its own (strategy.lr differs): a process's cached replica replays at its run's η
    strategy = FedKSeed.from_config(cfg)
    ws.trainer.flat(model).copy_(ws.trainer.theta0(model))
    strategy.initialize(trainable_state(model))
    seeds = seed_pool(cfg.seed, 64, "fedkseed-pool")
    for r, lr in ((1, 1e-2), (2, 5.5e-3)):
        finals, updates = [], []
        for pid, n in ((0, 10), (1, 30), (2, 60)):
            out = ws.trainer.run(model, strategy.downlink(r, pid), ws, TrainContext(r, pid, ws.device))
            at_lr = add_directions(out["start"].clone(), seeds, per_seed_sums(out["indices"], out["grads"], 64),
                                   alpha=-lr)
            assert float((at_lr - out["final"]).norm()) <= 1e-6 * float(out["final"].norm()), (r, pid)
            finals.append(out["final"])
            updates.append(ClientUpdate(pid, n, encode_upload(out["indices"], out["grads"], 64, "pairs"), {}))
        expected = 0.1 * finals[0] + 0.3 * finals[1] + 0.6 * finals[2]
        got = flatten(strategy.aggregate(r, updates))[2]
        assert float((got - expected).norm()) <= 1e-6 * float(expected.norm()), r
        assert float((got - out["start"]).norm()) > 1e-4 * float(expected.norm())  # the round moved the model
    late = SeedReplica(strategy.replica.theta0, strategy.replay)  # a client away until now rebuilds the same
    late.sync(strategy.accumulators)
    assert float((late.theta - strategy.replica.theta).norm()) <= 1e-6 * float(late.theta.norm())
