"""FedIT / FedAvg-LoRA oracles (docs/methods.md#fedavg_lora)."""

import torch

from fedtune.flower.strategy import ClientUpdate
from strategies.fedavg_lora import FedAvgLoRA, FedAvgLoRAConfig, factor_product_gap, weighted_average

M, N, R = 12, 7, 3  # non-square module: B is m×r, A is r×n


def _factors(k: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(R, N, generator=g, dtype=torch.float64) for _ in range(k)]
    Bs = [torch.randn(M, R, generator=g, dtype=torch.float64) for _ in range(k)]
    return As, Bs


def test_gap_equals_weighted_cross_covariance() -> None:
    As, Bs = _factors(4)
    p = [0.1, 0.2, 0.3, 0.4]
    A_bar = sum(w * A for w, A in zip(p, As))
    B_bar = sum(w * B for w, B in zip(p, Bs))
    covariance = sum(w * (B - B_bar) @ (A - A_bar) for w, A, B in zip(p, As, Bs))
    gap = factor_product_gap(As, Bs, p)
    assert gap.abs().max() > 1e-3  # FedIT really is inexact here
    torch.testing.assert_close(gap, covariance, atol=1e-12, rtol=0)


def test_gap_is_zero_when_all_A_are_identical() -> None:
    As, Bs = _factors(3, seed=1)
    same_A = [As[0].clone() for _ in As]
    gap = factor_product_gap(same_A, Bs, [0.5, 0.25, 0.25])
    assert gap.abs().max() == 0.0 or gap.abs().max() < 1e-14


def _strategy() -> FedAvgLoRA:
    return FedAvgLoRA(num_clients=3, clients_per_round=3, seed=0)


def test_identical_clients_give_that_client() -> None:
    As, Bs = _factors(1, seed=2)
    state = {"lora_A": As[0].float(), "lora_B": Bs[0].float()}
    updates = [ClientUpdate(pid, n, {k: v.clone() for k, v in state.items()}, {}) for pid, n in ((0, 5), (1, 50), (2, 7))]
    out = _strategy().aggregate(1, updates)
    for key in state:
        torch.testing.assert_close(out[key], state[key], atol=1e-7, rtol=0)


def test_weights_follow_num_examples_and_factors_average_separately() -> None:
    As, Bs = _factors(2, seed=3)
    updates = [ClientUpdate(i, n, {"A": As[i].float(), "B": Bs[i].float()}, {}) for i, n in ((0, 30), (1, 10))]
    out = _strategy().aggregate(1, updates)
    torch.testing.assert_close(out["A"], (0.75 * As[0] + 0.25 * As[1]).float())
    torch.testing.assert_close(out["B"], (0.75 * Bs[0] + 0.25 * Bs[1]).float())
    uniform_strategy = FedAvgLoRA(num_clients=2, clients_per_round=2, config=FedAvgLoRAConfig(weighting="uniform"))
    uniform = uniform_strategy.aggregate(1, updates)
    torch.testing.assert_close(uniform["A"], (0.5 * As[0] + 0.5 * As[1]).float())


def test_weighted_average_keeps_dtype_and_keys() -> None:
    states = [{"x": torch.ones(2, 3)}, {"x": torch.zeros(2, 3)}]
    out = weighted_average(states, [0.25, 0.75])
    assert out["x"].dtype == torch.float32 and set(out) == {"x"}
    torch.testing.assert_close(out["x"], torch.full((2, 3), 0.25))
