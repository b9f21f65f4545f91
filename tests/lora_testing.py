"""Helpers shared by the LoRA method tests (LoRA-FAIR, FFA-LoRA, FedEx-LoRA, FLoRA)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, RecordDict

from fedtune.models.base_delta import lora_layers
from fedtune.comm.ledger import payload_bytes
from fedtune.config import compose
from fedtune.flower.strategy import ClientUpdate
from fedtune.runtime.workspace import Workspace
from fedtune.trainer import TrainContext

M, N = 12, 7  # a non-square module: W is m×n (out, in), B is m×r, A is r×n
MODULES = {"blk.0.up": (M, N), "blk.1.down": (N, M)}  # two modules, both non-square
HEAD = {"head.weight": (4, 5), "head.bias": (4,)}
EXAMPLES = (30, 10, 60, 25)  # unequal client sizes -> unequal weights p_k


def a_key(module: str) -> str:
    return f"{module}.lora_A.default.weight"


def b_key(module: str) -> str:
    return f"{module}.lora_B.default.weight"


def random_state(gen: torch.Generator, rank: int, with_a: bool = True) -> dict[str, torch.Tensor]:
    """Random LoRA factors of ``rank`` for :data:`MODULES` plus a random head (fp32)."""
    state = {}
    for module, (m, n) in MODULES.items():
        if with_a:
            state[a_key(module)] = torch.randn(rank, n, generator=gen)
        state[b_key(module)] = torch.randn(m, rank, generator=gen)
    for key, shape in HEAD.items():
        state[key] = torch.randn(*shape, generator=gen)
    return state


def client_updates(states: list[dict[str, torch.Tensor]]) -> list[ClientUpdate]:
    """One :class:`ClientUpdate` per state, partition ids 0.., sizes from :data:`EXAMPLES`."""
    return [ClientUpdate(pid, EXAMPLES[pid], s, {"train-loss": 1.0}) for pid, s in enumerate(states)]


def p_weights(k: int) -> list[float]:
    total = sum(EXAMPLES[:k])
    return [n / total for n in EXAMPLES[:k]]


def message_payload(arrays: dict[str, torch.Tensor]) -> int:
    """Payload bytes of the real Flower content these arrays travel in, as the ledger counts."""
    return payload_bytes(RecordDict({"arrays": ArrayRecord(arrays)}))


TINY = ("model=tiny dataset=tiny federation.num_clients=4 train.local_steps=2 runtime.device=cpu "
        "model.lora.target_modules=[query,intermediate.dense]")  # intermediate.dense is 64×32


def tiny_workspace(strategy: str, extra: str = "") -> Workspace:
    """The tiny BERT with LoRA on ``query`` (32×32) and ``intermediate.dense`` (64×32)."""
    return Workspace(compose(f"{TINY} strategy={strategy} {extra}"))


def tiny_lora_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``(m, n)`` of every LoRA module of a peft model."""
    return {name: tuple(layer.base_layer.weight.shape) for name, layer in lora_layers(model).items()}


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``W0 + s·BA`` of every LoRA layer (peft's own delta, in the base weight's layout), fp64."""
    with torch.no_grad():
        return {name: (layer.base_layer.weight + layer.get_delta_weight("default")).double().clone()
                for name, layer in lora_layers(model).items()}


def train_client(ws: Workspace, arrays: dict[str, torch.Tensor], server_round: int,
                 pid: int) -> ClientUpdate:
    """Run the method's trainer for one client, as the ClientApp does."""
    ctx = TrainContext(server_round=server_round, partition_id=pid, device=torch.device("cpu"))
    upload, metrics = ws.trainer.train(ws.model(), arrays, ws, ctx)
    return ClientUpdate(pid, int(metrics["num-examples"]), upload, metrics)
