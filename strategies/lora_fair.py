"""LoRA-FAIR: FedIT averages plus a server-side residual on ``B``.

Implementation of LoRA-FAIR (Bian, Wang, Zhang, Xu, ICCV'25, arXiv 2411.14961),
docs/methods.md#lora_fair.  Averaging ``A`` and ``B`` separately (FedIT) misses the ideal
product ``ΔW = Σ_k p_k B_k A_k``; LoRA-FAIR keeps ``Ā`` and corrects ``B̄`` so that the
product points the same way as ``ΔW``, per LoRA module::

    Ā = Σ p_k A_k,   B̄ = Σ p_k B_k,   ΔW = Σ p_k B_k A_k
    ΔB* = argmin_ΔB  [1 − cos(ΔW, (B̄ + ΔB) Ā)] + λ ‖ΔB‖_F          (λ = 0.01)
    clients start the next round from (Ā, B̄ + ΔB*);   W0 never changes

The paper solves by SGD from ΔB = 0 without giving iterations or a step size, so
both are configurable; the best iterate is kept, so the objective never exceeds its
value at 0 and hence ``D(ΔW, (B̄+ΔB*)Ā) ≤ D(ΔW, B̄Ā)``.  Descent runs on
``ΔB = ‖B̄‖_F·X`` (a scalar preconditioner: the cosine term is invariant to the scale
of B, so a step size in X means the same for any model).  ``solver: ridge`` uses the
closed form of the least-squares variant instead:
``ΔB = (ΔW − B̄Ā) Āᵀ (ĀĀᵀ + λI)⁻¹`` (the minimiser of
``‖ΔW − (B̄+ΔB)Ā‖_F² + λ‖ΔB‖_F²``).

Bytes per client and round are FedIT's, ``4·P_LoRA`` (+ head) each way; the extra
cost is server compute, O(N·m·n·r) per module for ΔW plus the solve, O(m·n·r) once and
O(m·r²) per descent step (timed by the base class into ``aggregate_seconds``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fedtune.capabilities import Capabilities, Payload, Support
from fedtune.config.method import MethodConfig
from fedtune.flower.strategy import Arrays, ClientUpdate, FedtuneStrategy, weights_for
from fedtune.registry import register_method
from fedtune.tuning import LEARNING_RATES
from fedtune.models.targets import lora_preflight
from strategies.fedavg_lora import ADAPTER_ONLY, FIRST_ORDER, LOCAL_LR, PEFT_EXPORT, state_each_way, weighted_average
from strategies.lora_math import lora_pairs, module_factors, require_choice, weighted_product

_TINY = 1e-30


def cosine_distance(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``1 − cos(vec X, vec Y)`` (1 when either is zero)."""
    denom = (torch.linalg.vector_norm(X) * torch.linalg.vector_norm(Y)).clamp_min(_TINY)
    return 1.0 - (X * Y).sum() / denom


def fair_objective(dW: torch.Tensor, B_bar: torch.Tensor, A_bar: torch.Tensor, lam: float,
                   distance: str = "cosine") -> Callable[[torch.Tensor], torch.Tensor]:
    """``ΔB ↦ D(ΔW, (B̄+ΔB)Ā) + reg(ΔB)``.

    ``cosine``: ``1 − cos`` and ``λ‖ΔB‖_F`` (the paper); ``frobenius``:
    ``‖ΔW − (B̄+ΔB)Ā‖_F²`` and ``λ‖ΔB‖_F²`` (the LS variant, minimised by :func:`solve_ridge`).
    """
    if distance == "cosine":
        return lambda dB: cosine_distance(dW, (B_bar + dB) @ A_bar) + lam * torch.linalg.vector_norm(dB)
    return lambda dB: ((dW - (B_bar + dB) @ A_bar) ** 2).sum() + lam * (dB ** 2).sum()


def solve_ridge(dW: torch.Tensor, B_bar: torch.Tensor, A_bar: torch.Tensor, lam: float) -> torch.Tensor:
    """Closed form ``ΔB = (ΔW − B̄Ā) Āᵀ (ĀĀᵀ + λI)⁻¹`` (pseudo-inverse when λ = 0)."""
    E = dW - B_bar @ A_bar
    if lam == 0:
        return E @ torch.linalg.pinv(A_bar)
    gram = A_bar @ A_bar.T + lam * torch.eye(A_bar.shape[0], dtype=A_bar.dtype)
    return torch.linalg.solve(gram, A_bar @ E.T).T  # gram is symmetric


def value_and_gradient(dW: torch.Tensor, B_bar: torch.Tensor, A_bar: torch.Tensor, lam: float,
                       distance: str = "cosine") -> Callable[[torch.Tensor], tuple[float, torch.Tensor]]:
    """``ΔB ↦ (objective, ∂objective/∂ΔB)`` of :func:`fair_objective`, in closed form.

    Both data terms see ``B = B̄ + ΔB`` only through ``⟨ΔW, BĀ⟩ = ⟨G, B⟩`` and
    ``‖BĀ‖_F² = ⟨B, BS⟩`` with ``G = ΔW Āᵀ`` (m×r) and ``S = ĀĀᵀ`` (r×r), computed once;
    so a step costs O(m·r²) instead of forming the m×n product (the server's solve per
    round drops from seconds to milliseconds on MiniLM).  Cosine (``w = ‖ΔW‖``,
    ``h = ‖BĀ‖``, ``g = ⟨G, B⟩``): ``1 − g/(wh)``, gradient ``−G/(wh) + g·BS/(w h³)``;
    Frobenius: ``‖ΔW‖² − 2g + h²``, gradient ``2(BS − G)``.  The regulariser's
    subgradient at ``ΔB = 0`` is 0, as autograd's.
    """
    G, S = dW @ A_bar.T, A_bar @ A_bar.T
    w = float(torch.linalg.vector_norm(dW))

    def evaluate(dB: torch.Tensor) -> tuple[float, torch.Tensor]:
        B = B_bar + dB
        BS = B @ S
        g, h2 = float((G * B).sum()), max(float((B * BS).sum()), 0.0)
        reg = float(torch.linalg.vector_norm(dB))
        if distance == "cosine":
            denom = w * h2 ** 0.5
            if denom < _TINY:  # as cosine_distance's clamp: the denominator is a constant there
                value, grad = 1.0 - g / _TINY, -G / _TINY
            else:
                value, grad = 1.0 - g / denom, -G / denom + (g / (denom * h2)) * BS
            if reg > 0:
                value, grad = value + lam * reg, grad + (lam / reg) * dB
            return value, grad
        return w * w - 2.0 * g + h2 + lam * reg * reg, 2.0 * (BS - G) + (2.0 * lam) * dB

    return evaluate


def solve_iterative(dW: torch.Tensor, B_bar: torch.Tensor, A_bar: torch.Tensor, lam: float, steps: int,
                    lr: float, distance: str = "cosine") -> torch.Tensor:
    """Gradient descent from ``ΔB = 0``; returns the best iterate seen.

    ``cosine`` descends on ``X`` with ``ΔB = ‖B̄‖_F·X`` at step ``lr``; ``frobenius``
    descends on ``ΔB`` at step ``lr / L`` with ``L = 2(σ_max(Ā)² + λ)`` the gradient's
    Lipschitz constant (so ``lr ≤ 1`` converges to :func:`solve_ridge`).  Values and
    gradients come from :func:`value_and_gradient`.
    """
    dW, B_bar, A_bar = (t.to(torch.float64) for t in (dW, B_bar, A_bar))
    zero = torch.zeros_like(B_bar)
    if torch.linalg.vector_norm(dW) == 0 or steps == 0:
        return zero
    evaluate = value_and_gradient(dW, B_bar, A_bar, lam, distance)
    if distance == "cosine":
        scale = float(torch.linalg.vector_norm(B_bar)) or 1.0
        step = lr
    else:
        scale = 1.0
        step = lr / (2.0 * (float(torch.linalg.matrix_norm(A_bar, ord=2)) ** 2 + lam))
    X = torch.zeros_like(B_bar)
    best, best_value = zero, evaluate(zero)[0]
    for _ in range(steps):
        dB = scale * X
        value, grad = evaluate(dB)
        if value < best_value:
            best, best_value = dB, value
        X = X - (step * scale) * grad  # d objective / dX = scale · d objective / dΔB
    last = scale * X
    return last if evaluate(last)[0] < best_value else best


@dataclass
class LoRAFAIRConfig(MethodConfig):
    """``strategy=lora_fair``.  Bytes as FedIT; server solve time is in metrics.csv ``aggregate_seconds``.

        fedtune run strategy=lora_fair model=tiny dataset=tiny num_rounds=3
        fedtune run strategy=lora_fair strategy.solver=ridge strategy.lam=0.01

    solver : ``iterative`` (the paper's descent from 0) or ``ridge`` (closed form, LS).
    distance : data term of the iterative solver, ``cosine`` (paper) or ``frobenius`` (LS).
    lam : λ, the regulariser weight (0.01 in the paper).
    steps, lr : iterations and step size of the iterative solver (not given by the paper).
    weighting : ``examples`` or ``uniform`` client weights p_k.
    """

    name: str = "lora_fair"
    solver: str = "iterative"  # iterative (paper: descent from ΔB=0, best iterate kept) | ridge (closed form, LS)
    distance: str = "cosine"  # iterative data term: cosine (1 - cos, paper) | frobenius (LS, converges to ridge)
    lam: float = 0.01  # λ; cosine: λ‖ΔB‖_F, frobenius/ridge: λ‖ΔB‖_F²
    steps: int = 100  # iterations of the iterative solver (not given by the paper)
    lr: float = 0.2  # step size (cosine: on ΔB/‖B̄‖_F; frobenius: times 1/Lipschitz)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("solver", self.solver, ("iterative", "ridge"))
        require_choice("distance", self.distance, ("cosine", "frobenius"))
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.lam == float("inf"):
            raise ValueError(f"lam must be a finite number, got {self.lam}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")


class LoRAFAIR(FedtuneStrategy):
    """FedIT averages with ``B̄ ← B̄ + ΔB*`` per module (head and ``Ā`` averaged as in FedAvg)."""

    name = "lora_fair"

    config: LoRAFAIRConfig

    def correction(self, dW: torch.Tensor, B_bar: torch.Tensor, A_bar: torch.Tensor) -> torch.Tensor:
        """``ΔB*`` for one module, by the configured solver."""
        c = self.config
        if c.solver == "ridge":
            return solve_ridge(dW, B_bar, A_bar, c.lam)
        return solve_iterative(dW, B_bar, A_bar, c.lam, c.steps, c.lr, c.distance)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Arrays:
        weights = weights_for(updates, self.weighting)
        out = weighted_average([u.arrays for u in updates], weights)
        for a_key, b_key in lora_pairs(out).values():
            As, Bs = module_factors(updates, a_key, b_key)
            A_bar, B_bar = out[a_key].to(torch.float64), out[b_key].to(torch.float64)
            dB = self.correction(weighted_product(As, Bs, weights), B_bar, A_bar)
            out[b_key] = (B_bar + dB).to(out[b_key].dtype)
        return out


register_method(
    "lora_fair", LoRAFAIR, trainer="lora_sgd", config_cls=LoRAFAIRConfig,
    capabilities=Capabilities(
        lr_schedule=LOCAL_LR, warmup=LOCAL_LR,
        example_dp=FIRST_ORDER,
        client_dp=Support(False, "its B is corrected by a residual computed from every client's own product "
                                 "B_k A_k, which the noise on the mean does not cover"),
        sum_only=Support(False, "its correction of B̄ needs ΔW = Σ_k p_k B_k A_k, the clients' own products"),
        identical_updates_fixed_point=True, quantized_base=ADAPTER_ONLY),
    payload=Payload(down="A, B and head (fp32)", up="A, B and head (fp32)", formula=state_each_way),
    export=PEFT_EXPORT, preflight=lora_preflight,
    tuning={"train.lr": LEARNING_RATES, "strategy.lam": (0.01, 0.001, 0.1)})  # the paper's λ = 0.01, a decade each way
