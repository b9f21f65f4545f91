"""LoRA-SB: a frozen low-rank sandwich with one trainable r×r core per module.

LoRA-SB (Ponkshe et al., "Initialization using Update Approximation is a Silver
Bullet for Extreme Efficient Low-Rank Fine-Tuning", arXiv 2411.19557), as used by
Fed-SB (Singhal et al., arXiv 2502.15436); docs/methods.md#fed_sb.  Each target
``nn.Linear`` with weight ``W0 ∈ R^{m×n}`` becomes::

    y = W0 x + s · B R A x,      B ∈ R^{m×r}, A ∈ R^{r×n} frozen,  R ∈ R^{r×r} trained

so only ``L·r²`` scalars (plus the classifier head) are trainable.  With
``G = ∂L/∂W`` the gradient of the core is ``∂L/∂R = s · Bᵀ G Aᵀ``.

The bases come from the *update approximation*: the rank-r truncated SVD of an
approximate first full fine-tuning step ``ΔW ≈ U_r S_r V_rᵀ`` gives ``B = U_r``,
``A = V_rᵀ`` and ``R0 = S_r / s``, so ``s·B R0 A`` is the Eckart–Young optimum of
``ΔW`` at rank r, ``BᵀB = I`` and ``AAᵀ = I``.

Opacus: ``A`` and ``B`` are frozen ``nn.Parameter`` s (not
buffers) and ``R`` is a bias-free ``nn.Linear(r, r)`` child applied between them
(``R.weight`` *is* the matrix R), which per-sample-gradient hooks support natively.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedtune.errors import PayloadError
from fedtune.models.state import check_arrays
from fedtune.models.targets import matched
from fedtune.randomness import seed_torch

HEAD_MODULES = ("classifier", "score")  # what peft's SEQ_CLS keeps trainable (modules_to_save)


class LoRASBLinear(nn.Module):
    """``y = base(x) + scale · B R A x`` around a frozen ``nn.Linear``.

    Parameters
    ----------
    base : the linear layer to adapt (its weight ``W0`` stays frozen).
    rank : r, with ``1 <= r <= min(out_features, in_features)``.
    scale : s = alpha / r.

    Before the bases are set, ``A``, ``B`` and ``R`` are zero: the module equals ``base``.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        m, n = base.out_features, base.in_features
        if not 1 <= rank <= min(m, n):
            raise ValueError(f"rank must be in [1, min(out, in) = {min(m, n)}], got {rank}")
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.base = base
        self.sb_A = nn.Parameter(torch.zeros(rank, n, **like), requires_grad=False)
        self.sb_B = nn.Parameter(torch.zeros(m, rank, **like), requires_grad=False)
        self.sb_R = nn.Linear(rank, rank, bias=False, **like)
        nn.init.zeros_(self.sb_R.weight)
        self.rank, self.scale, self.enabled = rank, float(scale), True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.scale * F.linear(self.sb_R(F.linear(x, self.sb_A)), self.sb_B)

    def delta_weight(self) -> torch.Tensor:
        """``s · B R A`` (m×n), the adapter's full-weight update."""
        return self.scale * self.sb_B @ self.sb_R.weight @ self.sb_A


class LoRASBModel(nn.Module):
    """A HF model whose target linears are :class:`LoRASBLinear` (what trainers return).

    Only the cores ``R`` and the classifier head have ``requires_grad``.  Calls are
    forwarded to the wrapped model; :meth:`save_pretrained` writes the adapter only.
    """

    def __init__(self, model: nn.Module, target_modules: Iterable[str], rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be > 0, got {rank}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.model, self.rank, self.alpha = model, rank, float(alpha)
        self.target_modules = list(target_modules)
        for p in model.parameters():
            p.requires_grad_(False)
        targets = [name for name in matched((n for n, _ in model.named_modules()), self.target_modules)
                   if name.rsplit(".", 1)[-1] not in HEAD_MODULES]  # peft's rule (fedtune.models.targets)
        if not targets:
            raise ValueError(f"target_modules {self.target_modules} match no nn.Linear of the model")
        for name in targets:
            if not isinstance(model.get_submodule(name), nn.Linear):
                raise ValueError(f"target_modules: {name} is a {type(model.get_submodule(name)).__name__}, "
                                 "not the nn.Linear LoRA-SB wraps")
        for name in targets:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, LoRASBLinear(getattr(owner, child), rank, alpha / rank))
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in HEAD_MODULES:
                for p in mod.parameters():
                    p.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def save_pretrained(self, path: str) -> None:
        """Write ``adapter_model.safetensors`` (B, A, R, head) and ``adapter_config.json``."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters()
                 if p.requires_grad or n.endswith((".sb_A", ".sb_B"))}
        save_file(state, str(out / "adapter_model.safetensors"))
        config = {"peft_type": "LORA_SB", "r": self.rank, "lora_alpha": self.alpha,
                  "target_modules": self.target_modules, "modules_to_save": list(HEAD_MODULES)}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def lora_sb_modules(model: nn.Module) -> dict[str, LoRASBLinear]:
    """The adapted modules by (sorted) name: the canonical order of every party."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, LoRASBLinear)}
    return {n: found[n] for n in sorted(found)}


def bases_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU fp32 copies of every ``<module>.sb_B`` and ``<module>.sb_A``."""
    out = {}
    for name, mod in lora_sb_modules(model).items():
        out[f"{name}.sb_B"] = mod.sb_B.detach().to("cpu", torch.float32).clone()
        out[f"{name}.sb_A"] = mod.sb_A.detach().to("cpu", torch.float32).clone()
    return out


def set_bases(model: nn.Module, bases: dict[str, torch.Tensor]) -> None:
    """Copy the frozen ``B`` and ``A`` of every module (keys as in :func:`bases_of`).

    Raises :class:`PayloadError` unless the keys and shapes are exactly the model's.
    """
    modules = lora_sb_modules(model)
    params = {f"{n}.{k}": getattr(m, k) for n, m in modules.items() for k in ("sb_B", "sb_A")}
    check_arrays(bases, {k: tuple(p.shape) for k, p in params.items()})
    with torch.no_grad():
        for key, value in bases.items():
            params[key].copy_(value.to(params[key].device, params[key].dtype))


def set_cores(model: nn.Module, cores: dict[str, torch.Tensor]) -> None:
    """Copy ``R`` for the modules named in ``cores`` (keys ``<module>.sb_R.weight``)."""
    modules = lora_sb_modules(model)
    with torch.no_grad():
        for key, value in cores.items():
            name = key.removesuffix(".sb_R.weight")
            if name not in modules or tuple(value.shape) != tuple(modules[name].sb_R.weight.shape):
                raise PayloadError(f"{key}: no LoRA-SB core of shape {tuple(value.shape)} in the model")
            weight = modules[name].sb_R.weight
            weight.copy_(value.to(weight.device, weight.dtype))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its frozen base (``W0`` only) inside the block."""
    modules = list(lora_sb_modules(model).values())
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, flag in zip(modules, previous):
            m.enabled = flag


def full_weight_gradients(model: nn.Module,
                          batches: Iterable[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], float]:
    """Mean over ``batches`` of ``∂(batch loss)/∂W`` for every adapted module's weight.

    ``W = W0 + s·B R A``, so the gradient with respect to the (frozen) ``W0`` is taken at
    the model's current point.  Returns ``({"<module>.base.weight": G}, mean loss)``;
    nothing is left in any ``.grad``.
    """
    modules = lora_sb_modules(model)
    weights = [m.base.weight for m in modules.values()]
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    losses: list[float] = []
    for w in weights:
        w.requires_grad_(True)
    try:
        for batch in batches:
            loss = model(**batch).loss
            for acc, g in zip(sums, torch.autograd.grad(loss, weights)):
                acc += g.float()
            losses.append(float(loss.detach()))
    finally:
        for w in weights:
            w.requires_grad_(False)
    if not losses:
        raise ValueError("full_weight_gradients needs at least one batch")
    grads = {f"{name}.base.weight": (acc / len(losses)).cpu() for name, acc in zip(modules, sums)}
    return grads, sum(losses) / len(losses)


def base_gradients(model: nn.Module,
                   batches: Iterable[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], float]:
    """:func:`full_weight_gradients` of the frozen base (adapters off), in training mode as a
    first fine-tuning step is taken: the one-time init gradient of client and server alike."""
    was_training = model.training
    model.train()
    try:
        with adapters_disabled(model):
            return full_weight_gradients(model, batches)
    finally:
        model.train(was_training)


def update_approximation(delta: torch.Tensor, rank: int, scale: float = 1.0, method: str = "exact",
                         seed: int = 0, key: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-SB init from an update ``ΔW`` (m×n): ``(B, A, R0)`` with ``s·B R0 A = ΔW_r``.

    ``ΔW ≈ U_r diag(σ_1..σ_r) V_rᵀ``; ``B = U_r`` (m×r), ``A = V_rᵀ`` (r×n),
    ``R0 = diag(σ)/s``.  ``method="exact"`` uses ``torch.linalg.svd`` (deterministic, the
    Eckart–Young optimum); ``"lowrank"`` uses ``torch.svd_lowrank(q=r, niter=10)`` as
    the official code does, seeded from the stream ``(seed, "lora-sb-svd", key)``
    without touching the caller's RNG.  Computed in fp64 on CPU, returned in fp32.
    """
    d = delta.detach().to("cpu", torch.float64)
    if not 1 <= rank <= min(d.shape):
        raise ValueError(f"rank must be in [1, {min(d.shape)}], got {rank}")
    if method == "exact":
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    elif method == "lowrank":
        with torch.random.fork_rng(devices=[]):
            seed_torch(seed, "lora-sb-svd", key)
            U, S, V = torch.svd_lowrank(d, q=rank, niter=10)
        Vh = V.T
    else:
        raise ValueError(f"svd must be 'exact' or 'lowrank', got {method!r}")
    return U.float().contiguous(), Vh.float().contiguous(), torch.diag(S / scale).float()
