"""Ferret oracles (docs/methods.md#ferret)."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from fedtune.comm.ledger import payload_bytes
from fedtune.config import compose
from fedtune.directions import cached_banks, clear_banks
from fedtune.flower.strategy import ClientUpdate
from fedtune.models.state import trainable_state
from fedtune.randomness import draw_directions, seed_pool
from fedtune.runtime.workspace import Workspace
from fedtune.trainer import TrainContext
from strategies.fedkseed import SeedReplica, flatten
from strategies.ferret import (Ferret, FerretConfig, block_seeds, encode_upload, make_blocks, project, reconstruct,
                               seeds_per_block)

D = 64


def _delta(seed: int = 0, d: int = D) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def test_least_squares_coordinates_are_exact_at_k_equals_d() -> None:
    V = draw_directions(seed_pool(0, D, "ls"), D, "uniform").double()  # K = d bases (rows)
    delta = _delta().double()
    gamma = torch.linalg.solve(V @ V.T, V @ delta)
    torch.testing.assert_close(V.T @ gamma, delta, rtol=0, atol=1e-8)


def _one_block(pool_seed: int, k: int, scaling: str, delta: torch.Tensor) -> torch.Tensor:
    seeds = block_seeds(seed_pool(pool_seed, k, "mc"), 1)
    blocks = [(0, delta.numel())]
    counts, idx, vals = project(delta, blocks, seeds, k, scaling, torch.Generator().manual_seed(pool_seed))
    assert counts.tolist() == [k]  # the only block is the largest: K_l = K
    return reconstruct(counts, idx, vals, blocks, seeds).double()


def test_inversion_free_form_is_unbiased_with_error_proportional_to_d_over_k() -> None:
    delta, S = _delta(1).double(), 1500
    for k in (8, 32):
        recs = torch.stack([_one_block(s, k, "unbiased", delta.float()) for s in range(S)])
        rel_bias = float((recs.mean(0) - delta).norm() / delta.norm())
        assert rel_bias < 3 * math.sqrt((D / k) / S)
        mse = float(((recs - delta) ** 2).sum(1).mean() / (delta @ delta))
        assert mse == pytest.approx((D - 0.2) / k, rel=0.15)  # uniform bases: E‖Δ̃−Δ‖² = (d−0.2)/K ‖Δ‖²
    official = torch.stack([_one_block(s, 32, "official", delta.float()) for s in range(S)]).mean(0)
    assert float((official - delta / 3).norm() / (delta / 3).norm()) < 3 * math.sqrt((D / 32) / S)


def test_same_seed_gives_identical_bases_and_blocks_differ() -> None:
    pool = seed_pool(4, 5, "ferret-pool")
    server, client = block_seeds(pool, 3), block_seeds(pool.clone(), 3)
    assert torch.equal(server, client)
    a, b = draw_directions(server[:, 1], 50, "uniform"), draw_directions(client[:, 1], 50, "uniform")
    assert torch.equal(a, b)
    assert not torch.equal(a, draw_directions(server[:, 2], 50, "uniform"))


def test_seeds_per_block_rule() -> None:
    counts = seeds_per_block(torch.tensor([0.0, 1.0, 0.5, 2.0, 0.01]), 100)
    assert counts.tolist() == [2, 50, 25, 100, 2]
    assert seeds_per_block(torch.zeros(3), 100).tolist() == [2, 2, 2]


def test_blocks_follow_the_median_rule() -> None:
    # median 10 -> target 9: a param >= target stands alone, small ones are grouped
    assert make_blocks([10, 4, 4, 4, 100, 10, 10]) == [(0, 10), (10, 18), (18, 22), (22, 122), (122, 132), (132, 142)]
    assert make_blocks([3]) == [(0, 3)]


def _server(numels: list[int], clip: float, weighting: str = "examples") -> Ferret:
    server = Ferret(num_clients=3, clients_per_round=3, seed=0,
                    config=FerretConfig(num_seeds=16, server_lr=1.0, clip=clip, weighting=weighting))
    server.initialize({f"p{i}": _delta(10 + i, n) for i, n in enumerate(numels)})
    return server


def test_coordinate_space_aggregation_equals_averaged_reconstructions() -> None:
    server = _server([40, 30, 30, 8], clip=0.0)
    theta0 = server.replica.theta.clone()
    updates, recs = [], []
    for pid, n in ((0, 1), (1, 3)):
        counts, idx, vals = project(_delta(pid, 108), server.blocks, server.seeds, 16, "unbiased",
                                    torch.Generator().manual_seed(pid))
        updates.append(ClientUpdate(pid, n, encode_upload(counts, idx, vals, 16), {}))
        recs.append(reconstruct(counts, idx, vals, server.blocks, server.seeds))
    got = flatten(server.aggregate(1, updates))[2]
    expected = theta0 - (0.25 * recs[0] + 0.75 * recs[1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert float((got - theta0).norm()) > 0.1
    clipped = _server([40, 30, 30, 8], clip=1e-3)  # per-(seed, block) clipping bounds every term
    moved = theta0 - flatten(clipped.aggregate(1, updates))[2]
    assert float(moved.norm()) <= 1e-3 * int((clipped.coefficients != 0).sum()) + 1e-6


def test_trainer_round_trip_bytes_and_client_sync_on_the_tiny_model(request: pytest.FixtureRequest) -> None:
    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))  # float sums
    torch.set_num_threads(1)  # elsewhere depend on the thread count: restore it after
    cfg = compose("model=tiny dataset=tiny federation.num_clients=3 strategy=ferret strategy.num_seeds=50 "
                  "train.optimizer=sgd train.lr=0.1 train.local_steps=3")
    ws = Workspace(cfg)
    model = ws.model()
    ws.trainer.flat(model).copy_(ws.trainer.theta0(model))
    server = Ferret.from_config(cfg)
    server.initialize(trainable_state(model))
    L = len(server.blocks)
    for r in (1, 2):
        updates = []
        for pid in range(3):
            down = server.downlink(r, pid)
            assert payload_bytes(RecordDict({"arrays": ArrayRecord(down)})) == 4 * 50 * L  # ≤ K·L scalars
            upload, metrics = ws.trainer.train(model, down, ws, TrainContext(r, pid, ws.device))
            coords = int(upload["counts"].sum())
            assert upload["counts"].min() >= 2 and coords == metrics["coordinates"]
            assert payload_bytes(RecordDict({"arrays": ArrayRecord(upload)})) == 4 * L + (4 + 2) * coords
            updates.append(ClientUpdate(pid, metrics["num-examples"], upload, metrics))
        server.global_arrays = server.aggregate(r, updates)
    # a client process that joins now rebuilds w0 − Σ C v and lands on the server's model
    fresh = SeedReplica(ws.trainer.theta0(model), server.replica.apply)
    fresh.sync(server.coefficients)
    moved = float((server.replica.theta - server.replica.theta0).norm())
    assert moved > 0
    assert float((fresh.theta - server.replica.theta).norm()) <= 1e-6 * float(fresh.theta.norm())
    out = ws.trainer.run(model, server.downlink(3, 0), ws, TrainContext(3, 0, ws.device))
    assert float((out["start"] - server.replica.theta).norm()) <= 1e-6 * float(fresh.theta.norm())


def test_inconsistent_sparse_uploads_are_a_payload_problem() -> None:
    """Rejected in validation, so recorded as that client's failure and never aggregated."""
    server = _server([40, 30, 30, 8], clip=0.0)
    counts = torch.tensor([2, 2, 2, 2], dtype=torch.int32)
    good = {"counts": counts, "indices": torch.arange(8, dtype=torch.int16), "values": torch.ones(8)}
    out_of_pool = {**good, "indices": torch.tensor([0, 1, 2, 3, 4, 5, 6, 99], dtype=torch.int16)}  # 99 >= K
    miscounted = {**good, "counts": torch.tensor([2, 2, 2, 3], dtype=torch.int32)}  # sums to 9, 8 sent
    assert server.payload_problem(0, good) == ""
    assert "outside" in server.payload_problem(0, out_of_pool)
    assert "sum to 9" in server.payload_problem(1, miscounted)


def test_bank_of_bases_gives_the_same_coordinates_and_model() -> None:
    clear_banks()
    results = []
    for cache_mb in (0.0, 1024.0):
        server = Ferret(num_clients=2, clients_per_round=2, seed=0,
                        config=FerretConfig(num_seeds=16, clip=1e-2, direction_cache_mb=cache_mb))
        server.initialize({f"p{i}": _delta(10 + i, n) for i, n in enumerate([40, 30, 30, 8])})
        assert server.bases().banked == (cache_mb > 0)
        ups = []
        for pid in (0, 1):
            counts, idx, vals = project(_delta(pid, 108), server.blocks, server.bases(), 16, "unbiased",
                                        torch.Generator().manual_seed(pid))
            ups.append(ClientUpdate(pid, 1 + pid, encode_upload(counts, idx, vals, 16), {}))
        server.aggregate(1, ups)
        results.append((ups, server.coefficients, server.replica.theta))
    (ups0, c0, theta0), (ups1, c1, theta1) = results
    for u0, u1 in zip(ups0, ups1):  # bank rows are the streamed bases bit for bit
        assert all(torch.equal(u0.arrays[k], u1.arrays[k]) for k in u0.arrays)
    assert torch.equal(c0, c1)  # clipping norms from the same rows
    torch.testing.assert_close(theta1, theta0, rtol=0, atol=1e-6 * float(theta0.abs().max()))
    assert len(cached_banks()) == 1
    clear_banks()
