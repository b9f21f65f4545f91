"""FLoRA oracles (docs/methods.md#flora): the stacked product is Σ p_k s_k B_k A_k
exactly with heterogeneous ranks; clients restart fresh on W0 + D; bytes as documented."""

import pytest
import torch
from lora_testing import (HEAD, MODULES, a_key, b_key, effective_weights, message_payload, p_weights,
                          random_state, tiny_lora_shapes, tiny_workspace, train_client)

from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.flower.strategy import ClientUpdate
from fedtune.models.state import check_arrays, trainable_state
from fedtune.trainer import TrainContext
from strategies.flora import FLoRA, FLoRAConfig
from strategies.lora_math import stack_factors, weighted_product

RANKS, LORA_RANK, LORA_ALPHA = [5, 3, 2], 4, 8.0


def test_stacked_product_with_heterogeneous_ranks_and_scalings() -> None:
    g = torch.Generator().manual_seed(0)
    p, s = p_weights(3), [1.6, 2.0, 4.0]
    As = [torch.randn(r, 7, generator=g, dtype=torch.float64) for r in RANKS]
    Bs = [torch.randn(12, r, generator=g, dtype=torch.float64) for r in RANKS]
    B_stack, A_stack = stack_factors(As, Bs, p, s)
    assert B_stack.shape == (12, sum(RANKS)) and A_stack.shape == (sum(RANKS), 7)
    expected = sum(w * c * (B @ A) for w, c, A, B in zip(p, s, As, Bs))
    torch.testing.assert_close(B_stack @ A_stack, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(weighted_product(As, Bs, p, s), expected, atol=1e-12, rtol=0)


def _strategy(merged: str, alpha: str = "fixed") -> FLoRA:
    config = FLoRAConfig(ranks=RANKS, alpha=alpha, merged=merged)
    strategy = FLoRA(num_clients=3, clients_per_round=3, config=config)
    strategy.lora_rank, strategy.lora_alpha = LORA_RANK, LORA_ALPHA  # the model's LoRA (from_config: model.lora)
    strategy.initialize(random_state(torch.Generator().manual_seed(99), LORA_RANK))
    return strategy


def _updates(g: torch.Generator, pids: list[int]) -> list[ClientUpdate]:
    return [ClientUpdate(pid, 10 * (pid + 1), random_state(g, RANKS[pid]), {}) for pid in pids]


@pytest.mark.parametrize("merged", ["dense", "factored"])
@pytest.mark.parametrize("alpha", ["fixed", "proportional"])
def test_strategy_merges_sum_of_scaled_products_over_rounds(merged: str, alpha: str) -> None:
    g = torch.Generator().manual_seed(1)
    strategy = _strategy(merged, alpha)
    scales = {pid: (LORA_ALPHA / r if alpha == "fixed" else LORA_ALPHA / LORA_RANK) for pid, r in enumerate(RANKS)}
    assert {pid: strategy.rank_of(pid) for pid in range(3)} == {pid: (RANKS[pid], scales[pid]) for pid in range(3)}
    expected = {m: torch.zeros(shape, dtype=torch.float64) for m, shape in MODULES.items()}
    for server_round, pids in ((1, [0, 1, 2]), (2, [0, 2])):
        updates = _updates(g, pids)
        for u in updates:
            check_arrays(u.arrays, strategy.expected_upload(u.partition_id))  # rank r_k uploads accepted
        total = sum(u.num_examples for u in updates)
        for m in MODULES:
            expected[m] += sum(u.num_examples / total * scales[u.partition_id]
                               * u.arrays[b_key(m)].double() @ u.arrays[a_key(m)].double() for u in updates)
        strategy.global_arrays = strategy.aggregate(server_round, updates)
        for m in MODULES:
            torch.testing.assert_close(strategy.delta.total()[m], expected[m], atol=1e-5, rtol=0)
        assert set(strategy.global_arrays) == set(HEAD)
        for key in HEAD:
            torch.testing.assert_close(strategy.global_arrays[key],
                                       sum(u.num_examples / total * u.arrays[key] for u in updates))


def test_downlink_bytes_dense_and_factored_grow_as_documented() -> None:
    g = torch.Generator().manual_seed(2)
    dense, factored = _strategy("dense"), _strategy("factored")
    head = sum(torch.Size(s).numel() for s in HEAD.values())
    assert message_payload(dense.downlink(1, 0)) == message_payload(factored.downlink(1, 0)) == 4 * head
    merged_rank = 0
    for server_round, pids in ((1, [0, 1, 2]), (2, [1, 2])):
        updates = _updates(g, pids)
        for strategy in (dense, factored):
            strategy.global_arrays = strategy.aggregate(server_round, updates)
        merged_rank += sum(RANKS[pid] for pid in pids)
        for u in updates:
            assert message_payload(u.arrays) == 4 * (sum(RANKS[u.partition_id] * (m + n)
                                                         for m, n in MODULES.values()) + head)
        for pid in range(3):
            assert message_payload(dense.downlink(server_round + 1, pid)) == \
                4 * (head + sum(m * n for m, n in MODULES.values()))
            assert message_payload(factored.downlink(server_round + 1, pid)) == \
                4 * (head + sum(merged_rank * (m + n) for m, n in MODULES.values()))


@pytest.fixture(scope="module")
def ws():
    return tiny_workspace("flora", "strategy.ranks=[4,2] strategy.alpha=fixed")


def test_through_the_trainer_on_tiny_bert(ws) -> None:
    model = ws.model()
    strategy = FLoRA.from_config(ws.cfg)
    strategy.initialize(trainable_state(model))
    lora = ws.cfg.model.lora
    shapes = tiny_lora_shapes(model)
    assert any(m != n for m, n in shapes.values())
    w0 = effective_weights(model)  # B = 0 at build: these are the pristine W0
    expected = {k: torch.zeros_like(v) for k, v in w0.items()}
    for server_round, pids in ((1, (0, 1, 2)), (2, (1, 3))):
        updates, deltas = [], []
        for pid in pids:
            arrays = strategy.downlink(server_round, pid)
            ws.trainer.load(model, arrays, ws, TrainContext(server_round, pid, torch.device("cpu")))
            for name, weight in effective_weights(model).items():  # fresh LoRA on W0 + D, any history
                torch.testing.assert_close(weight, w0[name] + expected[name], atol=1e-5, rtol=0)
            update = train_client(ws, arrays, server_round, pid)
            check_arrays(update.arrays, strategy.expected_upload(pid))
            rank = (4, 2)[pid % 2]
            assert update.arrays[next(k for k in update.arrays if ".lora_A." in k)].shape[0] == rank
            weights = effective_weights(model)
            deltas.append({k: weights[k] - w0[k] - expected[k] for k in weights})  # s_k B_k A_k
            updates.append(update)
        total = sum(u.num_examples for u in updates)
        for k in expected:
            expected[k] = expected[k] + sum(u.num_examples / total * d[k] for u, d in zip(updates, deltas))
        strategy.global_arrays = strategy.aggregate(server_round, updates)
        strategy.load_into(model)
        for name, weight in effective_weights(model).items():
            torch.testing.assert_close(weight, w0[name] + expected[name], atol=1e-5, rtol=0)
    assert lora.alpha / 2 == strategy.rank_of(1)[1]  # alpha: fixed -> s_k = α / r_k
    assert max(d.abs().max() for d in expected.values()) > 1e-4  # training really moved the base


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"^ranks must all be >= 1"):
        FLoRAConfig(ranks=[4, 0])
    with pytest.raises(ConfigError, match=r"strategy\.merged"):
        compose("strategy=flora strategy.merged=svd")
