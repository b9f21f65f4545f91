"""Seed-replay pieces shared by FedKSeed and Ferret: flat layout, replica, ZO steps.

FedKSeed (Qin et al., arXiv 2312.06353, docs/methods.md#fedkseed) and Ferret (arXiv
2409.06277, §6) both keep the global model as ``θ0 + apply(c)`` for a coefficient tensor
``c`` over a fixed seed pool, with the tuned parameters flattened in canonical
(sorted-name) order, the layout of the seeded directions (§1.2).
"""

from __future__ import annotations

from typing import Callable

import torch

from fedtune.directions import SeedDirections
from fedtune.flower.strategy import Arrays


def flatten(arrays: Arrays) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    """Sorted names, shapes and the fp32 concatenation (canonical order of §1.2)."""
    names = sorted(arrays)
    flat = torch.cat([arrays[n].detach().reshape(-1).to("cpu", torch.float32) for n in names])
    return names, [arrays[n].shape for n in names], flat


def unflatten(flat: torch.Tensor, names: list[str], shapes: list[torch.Size]) -> Arrays:
    """Inverse of :func:`flatten` (copies)."""
    out, pos = {}, 0
    for name, shape in zip(names, shapes):
        n = shape.numel()
        out[name] = flat[pos: pos + n].reshape(shape).clone()
        pos += n
    return out


class SeedReplica:
    """``θ = θ0 + apply(c)`` for a coefficient tensor ``c`` the model is linear in.

    :meth:`sync` moves θ to new coefficients by replaying only the changed entries
    (``apply(θ, c_new − c_old)``), or rebuilds from θ0 when that touches fewer seeds
    (first call, a new run in the same process).
    """

    def __init__(self, theta0: torch.Tensor, apply: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        self.theta0, self.apply = theta0.clone(), apply
        self.theta, self.coeffs = theta0.clone(), None

    def rebuild(self, coeffs: torch.Tensor) -> torch.Tensor:
        """``θ0 + apply(coeffs)`` (a new tensor)."""
        theta = self.theta0.clone()
        self.apply(theta, coeffs)
        return theta

    def sync(self, coeffs: torch.Tensor) -> int:
        """Bring θ to ``coeffs``; return how many seeds were replayed."""
        coeffs = coeffs.to(torch.float32)
        delta = coeffs if self.coeffs is None else coeffs - self.coeffs
        changed, total = int((delta != 0).sum()), int((coeffs != 0).sum())
        if self.coeffs is None or total <= changed:
            self.theta, changed = self.rebuild(coeffs), total
        else:
            self.apply(self.theta, delta)
        self.coeffs = coeffs.clone()
        return changed

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """θ and c for a checkpoint (θ as replayed, so a resumed run continues bit for bit;
        θ0 is rebuilt from the run's initial model)."""
        return {"theta": self.theta, "coeffs": self.coeffs}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        self.theta, self.coeffs = state["theta"], state["coeffs"]


def zo_steps(theta: torch.Tensor, indices: torch.Tensor, directions: SeedDirections,
             loss_at: Callable[[torch.Tensor, int], float], eps: float, lr: float,
             grad_clip: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """τ two-point SPSA steps on ``theta`` (updated in place, any float dtype).

    Step t perturbs along ``z_{j_t}`` = ``directions.row(indices[t])`` (a bank row, or
    one regenerated into a scratch buffer).  ``loss_at(vector, t)`` evaluates the loss at
    parameters ``vector`` on step t's batch.  Returns the scalar gradients ``g_t`` (a
    step with ``|ℓ+ − ℓ−| > grad_clip > 0`` is skipped, g = 0) and the mean losses
    ``(ℓ+ + ℓ−)/2``.
    """
    grads, losses = torch.zeros(len(indices), dtype=torch.float32), []
    for t, j in enumerate(torch.as_tensor(indices).tolist()):
        z = directions.row(j).to(theta.device, theta.dtype)
        plus, minus = loss_at(theta + eps * z, t), loss_at(theta - eps * z, t)
        losses.append(0.5 * (plus + minus))
        if grad_clip > 0 and abs(plus - minus) > grad_clip:
            continue
        grads[t] = (plus - minus) / (2 * eps)
        theta.add_(z, alpha=-lr * float(grads[t]))
    return grads, losses
