"""LoRA-FAIR oracles (docs/methods.md#lora_fair) on non-square modules, unequal weights."""

import pytest
import torch
from lora_testing import HEAD, MODULES, a_key, b_key, client_updates, message_payload, p_weights, random_state

from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.registry import METHODS
from strategies.lora_fair import (LoRAFAIR, LoRAFAIRConfig, cosine_distance, fair_objective, solve_iterative,
                                  solve_ridge, value_and_gradient)
from strategies.lora_math import lora_pairs, weighted_product

R = 3


def _module_problem(seed: int = 0, k: int = 4, m: int = 12, n: int = 7):
    """ΔW, B̄, Ā of one m×n module from k random clients with unequal weights (fp64)."""
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(R, n, generator=g, dtype=torch.float64) for _ in range(k)]
    Bs = [torch.randn(m, R, generator=g, dtype=torch.float64) for _ in range(k)]
    p = p_weights(k)
    A_bar = sum(w * A for w, A in zip(p, As))
    B_bar = sum(w * B for w, B in zip(p, Bs))
    return weighted_product(As, Bs, p), B_bar, A_bar


def _ls(dW, B_bar, A_bar, dB):
    return float(((dW - (B_bar + dB) @ A_bar) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_solver_reduces_the_data_term_and_the_objective(seed: int) -> None:
    dW, B_bar, A_bar = _module_problem(seed)
    dB = solve_iterative(dW, B_bar, A_bar, lam=0.01, steps=100, lr=0.2)
    before, after = float(cosine_distance(dW, B_bar @ A_bar)), float(cosine_distance(dW, (B_bar + dB) @ A_bar))
    assert after < before - 1e-3  # strictly better: the clients differ and λ is small
    objective = fair_objective(dW, B_bar, A_bar, 0.01)
    assert float(objective(dB)) <= float(objective(torch.zeros_like(dB)))
    assert dB.shape == B_bar.shape == (12, R)


@pytest.mark.parametrize("distance", ["cosine", "frobenius"])
def test_closed_form_value_and_gradient_equal_autograd_of_the_objective(distance: str) -> None:
    """The solver's O(m·r²) value and gradient are those of the explicit objective (the
    m×n product, differentiated by autograd), at ΔB = 0 (the norm's subgradient) and off it."""
    dW, B_bar, A_bar = _module_problem(6)
    objective, evaluate = fair_objective(dW, B_bar, A_bar, 0.01, distance), value_and_gradient(
        dW, B_bar, A_bar, 0.01, distance)
    g = torch.Generator().manual_seed(7)
    for dB in (torch.zeros_like(B_bar), 0.1 * torch.randn(B_bar.shape, generator=g, dtype=torch.float64)):
        x = dB.clone().requires_grad_(True)
        value = objective(x)
        (grad,) = torch.autograd.grad(value, x)
        fast_value, fast_grad = evaluate(dB)
        assert fast_value == pytest.approx(float(value), rel=1e-12, abs=1e-12)
        torch.testing.assert_close(fast_grad, grad, rtol=1e-10, atol=1e-12)


def test_descent_is_gradient_descent_on_the_objective() -> None:
    """The same iterates as plain autograd descent on X (ΔB = ‖B̄‖·X) of the explicit objective."""
    dW, B_bar, A_bar = _module_problem(8)
    objective, scale = fair_objective(dW, B_bar, A_bar, 0.01), float(torch.linalg.vector_norm(B_bar))
    X = torch.zeros_like(B_bar, requires_grad=True)
    best, best_value = torch.zeros_like(B_bar), float(objective(torch.zeros_like(B_bar)))
    for _ in range(30):
        value = objective(scale * X)
        if float(value) < best_value:
            best, best_value = (scale * X).detach().clone(), float(value)
        (grad,) = torch.autograd.grad(value, X)
        X = (X - 0.2 * grad).detach().requires_grad_(True)
    last = (scale * X).detach()
    reference = last if float(objective(last)) < best_value else best
    torch.testing.assert_close(solve_iterative(dW, B_bar, A_bar, lam=0.01, steps=30, lr=0.2), reference,
                               rtol=1e-9, atol=1e-12)


def test_cosine_solver_is_scale_free() -> None:
    """The step acts on ΔB/‖B̄‖: factors scaled like a real LoRA (B ≈ 1e-3) still improve."""
    dW, B_bar, A_bar = _module_problem(3)
    c = 1e-3
    dB = solve_iterative(c * dW, c * B_bar, A_bar, lam=0.01, steps=100, lr=0.2)
    assert float(cosine_distance(dW, (c * B_bar + dB) @ A_bar)) < float(cosine_distance(dW, B_bar @ A_bar)) - 1e-3


def test_best_iterate_is_kept_even_when_descent_diverges() -> None:
    dW, B_bar, A_bar = _module_problem(4)
    for distance in ("cosine", "frobenius"):
        objective = fair_objective(dW, B_bar, A_bar, 0.01, distance)
        dB = solve_iterative(dW, B_bar, A_bar, lam=0.01, steps=20, lr=1e4, distance=distance)
        assert float(objective(dB)) <= float(objective(torch.zeros_like(dB)))


def test_ridge_closed_form_reduces_the_ls_data_term_and_is_the_minimiser() -> None:
    dW, B_bar, A_bar = _module_problem(5)
    lam = 0.01
    dB = solve_ridge(dW, B_bar, A_bar, lam)
    assert _ls(dW, B_bar, A_bar, dB) < _ls(dW, B_bar, A_bar, torch.zeros_like(dB)) - 1e-3
    # first-order optimality of ‖ΔW − (B̄+ΔB)Ā‖² + λ‖ΔB‖²: −2(ΔW − (B̄+ΔB)Ā)Āᵀ + 2λΔB = 0
    grad = -2 * (dW - (B_bar + dB) @ A_bar) @ A_bar.T + 2 * lam * dB
    assert grad.abs().max() < 1e-10
    # λ → 0: the corrected product is the projection of ΔW onto the row space of Ā
    proj = dW @ torch.linalg.pinv(A_bar) @ A_bar
    torch.testing.assert_close((B_bar + solve_ridge(dW, B_bar, A_bar, 0.0)) @ A_bar, proj, atol=1e-10, rtol=0)


def test_iterative_ls_solver_converges_to_the_closed_form() -> None:
    dW, B_bar, A_bar = _module_problem(6)
    closed = solve_ridge(dW, B_bar, A_bar, 0.01)
    iterative = solve_iterative(dW, B_bar, A_bar, lam=0.01, steps=3000, lr=1.0, distance="frobenius")
    assert closed.abs().max() > 1e-2  # a non-trivial correction
    torch.testing.assert_close(iterative, closed, atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", ["iterative", "ridge"])
def test_identical_clients_need_no_correction(solver: str) -> None:
    state = random_state(torch.Generator().manual_seed(7), R)
    strategy = LoRAFAIR(num_clients=3, clients_per_round=3, config=LoRAFAIRConfig(solver=solver))
    out = strategy.aggregate(1, client_updates([{k: v.clone() for k, v in state.items()} for _ in range(3)]))
    for key, value in state.items():
        torch.testing.assert_close(out[key], value, atol=1e-6, rtol=0)
    dW, B_bar, A_bar = _module_problem(8, k=1)
    assert strategy.correction(dW, B_bar, A_bar).abs().max() < 1e-12


@pytest.mark.parametrize("solver", ["iterative", "ridge"])
def test_strategy_corrects_b_only_and_improves_every_module(solver: str) -> None:
    g = torch.Generator().manual_seed(9)
    states = [random_state(g, R) for _ in range(4)]
    strategy = LoRAFAIR(num_clients=4, clients_per_round=4, config=LoRAFAIRConfig(solver=solver))
    out = strategy.aggregate(1, client_updates(states))
    p = p_weights(4)
    for key in [*HEAD, *(a_key(m) for m in MODULES)]:  # Ā and the head: plain FedAvg
        torch.testing.assert_close(out[key], sum(w * s[key] for w, s in zip(p, states)), atol=1e-5, rtol=0)
    for module in MODULES:
        As = [s[a_key(module)].double() for s in states]
        Bs = [s[b_key(module)].double() for s in states]
        dW = weighted_product(As, Bs, p)
        B_bar = sum(w * B for w, B in zip(p, Bs))
        corrected = out[b_key(module)].double() @ out[a_key(module)].double()
        plain = B_bar @ out[a_key(module)].double()
        if solver == "ridge":
            assert torch.linalg.norm(dW - corrected) < torch.linalg.norm(dW - plain) - 1e-3
            expected = B_bar + solve_ridge(dW, B_bar, out[a_key(module)].double(), 0.01)
            torch.testing.assert_close(out[b_key(module)].double(), expected, atol=1e-5, rtol=0)
        else:
            assert float(cosine_distance(dW, corrected)) < float(cosine_distance(dW, plain)) - 1e-3


def test_bytes_per_client_round_equal_fedit() -> None:
    g = torch.Generator().manual_seed(10)
    states = [random_state(g, R) for _ in range(3)]
    strategy = LoRAFAIR(num_clients=3, clients_per_round=3)
    strategy.initialize(states[0])
    strategy.global_arrays = strategy.aggregate(1, client_updates(states))
    p_lora = sum(R * (m + n) for m, n in MODULES.values())
    head = sum(torch.Size(s).numel() for s in HEAD.values())
    for pid in range(3):
        assert message_payload(strategy.downlink(2, pid)) == 4 * (p_lora + head)
        assert message_payload(states[pid]) == 4 * (p_lora + head)
        assert strategy.expected_upload(pid) == {k: tuple(v.shape) for k, v in states[pid].items()}
    assert len(lora_pairs(strategy.global_arrays)) == len(MODULES)


def test_config_validation_and_registration() -> None:
    with pytest.raises(ValueError, match=r"^lam must be >= 0, got -1"):
        LoRAFAIRConfig(lam=-1)
    with pytest.raises(ValueError, match=r"^solver"):
        LoRAFAIRConfig(solver="sgd")
    with pytest.raises(ConfigError, match=r"strategy\.steps must be >= 0"):
        compose("strategy=lora_fair strategy.steps=-2")
    cfg = compose("strategy=lora_fair strategy.solver=ridge strategy.lam=0.5 federation.num_clients=4")
    spec = METHODS.get("lora_fair")
    assert spec.trainer == "lora_sgd"
    strategy = spec.strategy_cls.from_config(cfg)
    assert strategy.config is cfg.strategy and (strategy.config.solver, strategy.config.lam) == ("ridge", 0.5)
