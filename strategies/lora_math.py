"""LoRA maths shared by the aggregation methods (pure tensors, no Flower, no peft).

Every method that looks at LoRA factors *as products* (LoRA-FAIR, FedEx-LoRA, FLoRA)
needs the same few pieces, written once here (docs/methods.md#notation):

* :func:`lora_pairs`: pair ``...lora_A.<adapter>.weight`` (r×n) with
  ``...lora_B.<adapter>.weight`` (m×r) by module name;
* :func:`weighted_product`: the ideal aggregate ``ΔW = Σ_k p_k s_k B_k A_k``;
* :func:`stack_factors`: FLoRA's stacking, ``[s_1B_1, …, s_NB_N] · [p_1A_1; …; p_NA_N]
  = Σ_k p_k s_k B_k A_k`` exactly, for any (heterogeneous) ranks;
* :func:`residual_factors`: the FedIT error ``Σ_k p_k B_k A_k − B̄Ā`` as a product of
  rank ≤ N·r, using ``Σ_k p_k (B_k − B̄) = 0``:
  ``Σ_k p_k B_k A_k − B̄Ā = Σ_k p_k (B_k − B̄) A_k = [B_1−B̄, …] · [p_1A_1; …]``.

Shapes follow peft on ``nn.Linear`` (docs/methods.md#notation): ``B ∈ R^{m×r}``, ``A ∈ R^{r×n}``,
so ``B A`` is in the weight's own (out, in) layout.  Sums are taken in fp64.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fedtune.flower.strategy import ClientUpdate

A_TAG, B_TAG = ".lora_A.", ".lora_B."


def require_choice(field: str, value: str, accepted: Sequence[str]) -> None:
    """Config check: ``ValueError("<field>: unknown 'x'; accepted: a, b")`` unless ``value`` is accepted."""
    if value not in accepted:
        raise ValueError(f"{field}: unknown {value!r}; accepted: {', '.join(accepted)}")


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Map each LoRA module name to its ``(lora_A key, lora_B key)``.

    ``"x.query.lora_A.default.weight"`` and ``"x.query.lora_B.default.weight"`` pair
    under the module ``"x.query"``.  A factor without its partner is an error.
    """
    keys = list(keys)
    a_keys = {k.split(A_TAG)[0]: k for k in keys if A_TAG in k}
    b_keys = {k.split(B_TAG)[0]: k for k in keys if B_TAG in k}
    if set(a_keys) != set(b_keys):
        lonely = sorted(set(a_keys) ^ set(b_keys))
        raise ValueError(f"LoRA factors without a partner for modules {lonely[:3]}")
    return {module: (a_keys[module], b_keys[module]) for module in sorted(a_keys)}


def lora_keys(keys: Iterable[str]) -> set[str]:
    """All keys that are LoRA factors (everything else, e.g. the head, is averaged as is)."""
    return {k for k in keys if A_TAG in k or B_TAG in k}


def module_factors(updates: Sequence[ClientUpdate], a_key: str,
                   b_key: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The clients' ``(A_k, B_k)`` of one module, in fp64."""
    return ([u.arrays[a_key].to(torch.float64) for u in updates],
            [u.arrays[b_key].to(torch.float64) for u in updates])


def weighted_product(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float],
                     scales: Sequence[float] | None = None) -> torch.Tensor:
    """``Σ_k p_k s_k B_k A_k`` (m×n), fp64; ``scales`` default to 1."""
    scales = [1.0] * len(As) if scales is None else scales
    out = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=torch.float64)
    for p, s, A, B in zip(weights, scales, As, Bs):
        out += (p * s) * (B.to(torch.float64) @ A.to(torch.float64))
    return out


def stack_factors(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights: Sequence[float],
                  scales: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking: ``(B_stack, A_stack)`` with ``B_stack A_stack = Σ p_k s_k B_k A_k``.

    The weights go on ``A`` (as in the paper), the per-client scaling ``s_k = α_k/r_k``
    is folded into ``B`` (docs/methods.md#notation).  Ranks may differ per client:
    ``B_stack`` is m×Σr_k and ``A_stack`` is Σr_k×n.
    """
    scales = [1.0] * len(As) if scales is None else scales
    B_stack = torch.cat([s * B.to(torch.float64) for s, B in zip(scales, Bs)], dim=1)
    A_stack = torch.cat([p * A.to(torch.float64) for p, A in zip(weights, As)], dim=0)
    return B_stack, A_stack


def residual_factors(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                     weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FedEx-LoRA's residual ``Σ p_k B_k A_k − B̄Ā`` as factors of rank N·r.

    Returns ``(B_res, A_res) = ([B_1−B̄, …, B_N−B̄], [p_1A_1; …; p_NA_N])``; exact
    because ``Σ_k p_k (B_k − B̄) Ā = 0`` when ``Σ_k p_k = 1``.
    """
    B_bar = sum(p * B.to(torch.float64) for p, B in zip(weights, Bs))
    return stack_factors(As, [B - B_bar for B in Bs], weights)  # type: ignore[operator]
