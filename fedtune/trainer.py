"""The client half of a method: what a ``ClientApp`` calls to train locally.

A trainer (registered by name in ``clients/``) decides what is trainable (it wraps the
frozen base with its adapter) and runs the local steps.  It never touches Flower types
or counts bytes; the ClientApp adapter decodes the message, calls it, and encodes the
reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class TrainContext:
    """What a trainer knows about the call it is serving."""

    server_round: int
    partition_id: int
    device: torch.device
    state: dict[str, Any] = field(default_factory=dict)  # persists across rounds (Flower Context.state)
    config: dict[str, Any] = field(default_factory=dict)  # the message's ConfigRecord (e.g. a step's phase)


class ClientTrainer(Protocol):
    def build_model(self, base: torch.nn.Module, cfg: Any) -> torch.nn.Module:
        """Wrap the frozen base with the method's trainable part (seeded, identical everywhere)."""

    def train(self, model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
              ctx: TrainContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Start from ``arrays``, train locally, return the upload and metrics (``num-examples``...)."""

    # Optional: ``setup(model, arrays, workspace, ctx) -> (upload, metrics)`` serves the
    # strategy's one-time ``"train.setup"`` messages (see FedtuneStrategy.setup), and
    # ``step(...)`` the ``"train.step"`` messages of a round that is an exchange of several
    # messages (split learning's per-batch activations; ``ctx.config`` says which).
