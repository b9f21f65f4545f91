"""Clients whose frozen base moves: FedEx-LoRA and FLoRA fold updates into ``W0``.

FedEx-LoRA (Singhal et al., ACL'25, arXiv 2410.09432) adds the exact aggregation
residual to the frozen weights; FLoRA (Wang et al., NeurIPS'24, arXiv 2409.05976)
merges the stacked product into them and restarts LoRA (algorithms.md §7).  Either
way a client's target weights are ``W0 + D`` with ``D`` the server's cumulative merged
delta, which arrives in the train message under extra keys, per LoRA module::

    "<module>.base_delta"                          D, dense, (out, in)
    "<module>.base_delta_B", "<module>.base_delta_A"   D = D_B · D_A, factored

The model a worker process caches is shared by every client it serves, so the base is
rebuilt from a pristine copy of ``W0`` (taken when the model is built) on **every**
call: ``W ← W0 + D``; a missing key means ``D = 0``.  ``D`` is in nn.Linear's (out, in)
layout; it is transposed only for ``fan_in_fan_out`` layers (GPT-2 Conv1D, §1.2).
"""

from __future__ import annotations

import math

import torch

from fedtune.config.run import RunConfig
from fedtune.errors import PayloadError
from fedtune.models.state import check_arrays
from fedtune.randomness import torch_generator
from fedtune.registry import TRAINERS
from fedtune.trainer import TrainContext

from clients.lora_sgd import LoRATrainer

DELTA, DELTA_B, DELTA_A = ".base_delta", ".base_delta_B", ".base_delta_A"
ADAPTER = "default"
_PRISTINE = "_fedtune_pristine_base"


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """peft LoRA layers by module name (the names the strategies pair factors by)."""
    from peft.tuners.lora.layer import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def snapshot_base(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The pristine ``W0`` of every LoRA layer, copied the first time it is asked for."""
    if _PRISTINE not in model.__dict__:
        model.__dict__[_PRISTINE] = {n: layer.base_layer.weight.detach().clone()
                                     for n, layer in lora_layers(model).items()}
    return model.__dict__[_PRISTINE]


def split_deltas(arrays: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate the merged deltas (as dense fp64 matrices, by module) from the rest."""
    dense, factors, rest = {}, {}, {}
    for key, value in arrays.items():
        if key.endswith(DELTA):
            dense[key[: -len(DELTA)]] = value.to(torch.float64)
        elif key.endswith(DELTA_B) or key.endswith(DELTA_A):
            factors.setdefault(key[: -len(DELTA_B)], {})[key[-1]] = value.to(torch.float64)
        else:
            rest[key] = value
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise PayloadError(f"{module}: factored base delta needs both {DELTA_B} and {DELTA_A}")
        dense[module] = pair["B"] @ pair["A"]
    return dense, rest


def set_base(model: torch.nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """``W ← W0 + D`` on every LoRA layer (``D = 0`` where ``deltas`` has no entry)."""
    pristine, layers = snapshot_base(model), lora_layers(model)
    unknown = sorted(set(deltas) - set(layers))
    if unknown:
        raise PayloadError(f"base delta for unknown LoRA modules {unknown[:3]}")
    with torch.no_grad():
        for name, layer in layers.items():
            weight, w0 = layer.base_layer.weight, pristine[name]
            if name not in deltas:
                weight.copy_(w0)
                continue
            delta = deltas[name].T if getattr(layer, "fan_in_fan_out", False) else deltas[name]
            if tuple(delta.shape) != tuple(w0.shape):
                raise PayloadError(f"{name}: base delta shape {tuple(delta.shape)}, weight {tuple(w0.shape)}")
            weight.copy_((w0.to(torch.float64) + delta.to(w0.device)).to(weight.dtype))


def client_rank(ranks: list[int], alpha_mode: str, lora_rank: int, lora_alpha: float,
                partition_id: int) -> tuple[int, float]:
    """``(r_k, α_k)`` of a client: ``ranks`` cycled over partition ids (empty: ``lora_rank``);
    ``proportional``: ``α_k = (lora_alpha/lora_rank)·r_k`` (same s for all, FLoRA's
    α_k = 2r_k); ``fixed``: ``α_k = lora_alpha`` (so ``s_k = lora_alpha / r_k``)."""
    rank = ranks[partition_id % len(ranks)] if ranks else lora_rank
    return rank, (lora_alpha / lora_rank * rank if alpha_mode == "proportional" else lora_alpha)


def fresh_adapter(model: torch.nn.Module, rank: int, alpha: float, gen: torch.Generator) -> None:
    """Re-create every LoRA layer's factors at ``rank``: A kaiming-uniform (peft's init,
    drawn from ``gen``), B = 0, scaling ``alpha / rank``."""
    for layer in lora_layers(model).values():
        old_A, old_B = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        like = {"device": old_A.weight.device, "dtype": old_A.weight.dtype}
        if old_A.out_features != rank:
            layer.lora_A[ADAPTER] = torch.nn.Linear(old_A.in_features, rank, bias=False, **like)
            layer.lora_B[ADAPTER] = torch.nn.Linear(rank, old_B.out_features, bias=False, **like)
        A = torch.empty(rank, old_A.in_features)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
        with torch.no_grad():
            layer.lora_A[ADAPTER].weight.copy_(A)
            layer.lora_B[ADAPTER].weight.zero_()
        layer.lora_A[ADAPTER].weight.requires_grad_(True)
        layer.lora_B[ADAPTER].weight.requires_grad_(True)
        layer.r[ADAPTER], layer.lora_alpha[ADAPTER], layer.scaling[ADAPTER] = rank, alpha, alpha / rank


def load_non_lora(model: torch.nn.Module, arrays: dict[str, torch.Tensor]) -> None:
    """Copy ``arrays`` into the trainable parameters that are not LoRA factors (the head)."""
    params = {n: p for n, p in model.named_parameters()
              if p.requires_grad and ".lora_A." not in n and ".lora_B." not in n}
    check_arrays(arrays, {n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for name, value in arrays.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


class BaseDeltaTrainer(LoRATrainer):
    """FedEx-LoRA's client: ``W ← W0 + D``, then FedIT local training from ``(Ā, B̄)``."""

    name = "lora_sgd_base_delta"

    def build_model(self, base: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        model = super().build_model(base, cfg)
        snapshot_base(model)
        return model

    def load(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace,  # type: ignore[no-untyped-def]
             ctx: TrainContext) -> None:
        deltas, rest = split_deltas(arrays)
        set_base(model, deltas)
        super().load(model, rest, workspace, ctx)


class FreshRankTrainer(BaseDeltaTrainer):
    """FLoRA's client: ``W ← W0 + D``, a fresh LoRA of this client's rank ``r_k``, the head.

    The fresh ``A`` is drawn from the stream ``(seed, "fresh-adapter", round, partition)``.
    """

    name = "lora_fresh_rank"

    def load(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace,  # type: ignore[no-untyped-def]
             ctx: TrainContext) -> None:
        cfg: RunConfig = workspace.cfg
        deltas, rest = split_deltas(arrays)
        set_base(model, deltas)
        rank, alpha = client_rank(list(cfg.strategy.ranks), cfg.strategy.alpha, cfg.model.lora.rank,
                                  cfg.model.lora.alpha, ctx.partition_id)
        fresh_adapter(model, rank, alpha, torch_generator(cfg.seed, "fresh-adapter", ctx.server_round,
                                                          ctx.partition_id))
        load_non_lora(model, rest)


TRAINERS.register(BaseDeltaTrainer.name, BaseDeltaTrainer())
TRAINERS.register(FreshRankTrainer.name, FreshRankTrainer())
