"""SFPrompt: split federated prompt tuning, with the body of the model on the server.

Cao, Zhu, Gong, "SFPrompt: Communication-Efficient Split Federated Fine-Tuning for Large
Pre-Trained Models over Resource-Limited Devices", arXiv 2407.17533; docs/methods.md#sfprompt.

The model is cut into head (embeddings + ``head_blocks`` blocks), body and tail (the
last ``tail_blocks`` blocks + the task head).  Clients hold head and tail and train soft
prompts (and a classifier's head); the server holds the frozen body.  A round, for the
sampled clients together (:meth:`SFPrompt.configure_train`):

1. ``begin``: the global prompts go down; each client runs its local-loss update (head →
   tail, the body skipped) and prunes its data to the hardest examples by EL2N.
2. ``split_steps`` split-training steps on the kept examples: the client sends the head's
   activations ``h`` (and the mask), the server returns ``b = body(h)``, the client
   returns ``∂L/∂b``, the server backpropagates to ``∂L/∂h`` and sends it with the next
   step's request, and the client steps its prompts.  Ledger kind ``split``: per batch
   ``4·B·T·d`` bytes each of ``h``, ``b``, ``∂L/∂b``, ``∂L/∂h`` (fp32) and ``B·T`` of mask,
   T = prompts + tokens.
3. ``train``: clients upload prompts (and head); the server averages them (FedAvg).

Server maths: the body forward/backward (:func:`body_forward`, :func:`body_backward`)
and FedAvg, all testable without Flower.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from fedtune.capabilities import UNIFORM_WEIGHTING, Capabilities, Export, Payload, Support
from fedtune.comm.ledger import SPLIT
from fedtune.comm.metered_grid import metered_as
from fedtune.config.method import MethodConfig
from fedtune.errors import ConfigError
from fedtune.flower.replies import last_line
from fedtune.flower.strategy import Arrays, ClientUpdate, FedtuneStrategy, weights_for
from fedtune.models.export import load_exported
from fedtune.models.split import Cut, run_body
from fedtune.registry import register_method
from fedtune.tuning import Relative
from strategies.fedavg_lora import state_each_way, weighted_average

STEP = "train.step"


@dataclass
class SFPromptConfig(MethodConfig):
    """``strategy=sfprompt``.  train.batch_size is the split batch; train.lr / train.optimizer /
    train.local_steps are not used (the fields below are); train.lr_schedule applies to ``lr``.

        fedtune run strategy=sfprompt model=tiny dataset=tiny model.max_length=24 num_rounds=3

    head_blocks : transformer blocks on the client before the cut (≥ 1).
    tail_blocks : blocks on the client after the server's body (≥ 0; the task head is always
        the client's).  At least one block must be left for the server.
    num_prompts : soft prompt length P (virtual tokens prepended to every input).
    local_steps : local-loss steps per round (head → tail on the client alone).
    split_steps : split-training steps per round, one batch of activations each.
    prune_ratio : the fraction ρ of each client's examples pruned (lowest EL2N) before the
        split steps; 0 = keep everything.
    lr : SGD step size of the prompts and head (local and split steps); cosine: the max.
    """

    name: str = "sfprompt"
    head_blocks: int = 1
    tail_blocks: int = 0
    num_prompts: int = 8
    local_steps: int = 4
    split_steps: int = 4
    prune_ratio: float = 0.3
    lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, low in (("head_blocks", 1), ("tail_blocks", 0), ("num_prompts", 1), ("local_steps", 0),
                         ("split_steps", 1)):
            if getattr(self, key) < low:
                raise ValueError(f"{key} must be >= {low}, got {getattr(self, key)}")
        if not 0 <= self.prune_ratio < 1:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")


def body_forward(body_model: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
                 cut: Cut) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, b)``: the received activations as a leaf that collects ``∂L/∂h``, and the body's output."""
    param = next(body_model.parameters())
    h = hidden.to(param.device, param.dtype).requires_grad_(True)
    with torch.enable_grad():
        b = run_body(body_model, h, mask.to(param.device), cut)
    return h, b


def body_backward(h: torch.Tensor, b: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """``∂L/∂h`` from the client's ``∂L/∂b`` (the frozen body collects no gradient of its own)."""
    b.backward(grad_b.to(b.device, b.dtype))
    return h.grad.detach().float().cpu()


class SFPrompt(FedtuneStrategy):
    """Drives each round's split exchange, then averages the prompts (and head)."""

    name = "sfprompt"
    config: SFPromptConfig
    client_app_needs = ("a 'train.step' handler serving SFPrompt's phases (begin, forward, tail, backward)",)

    def __init__(self, **base: Any) -> None:
        super().__init__(**base)
        self.run_config: Any = None
        self._body: torch.nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "SFPrompt":
        strategy = super().from_config(cfg)
        strategy.run_config = cfg  # the server builds the same frozen model to run the body
        return strategy  # type: ignore[return-value]

    @property
    def cut(self) -> Cut:
        return Cut(self.config.head_blocks, self.config.tail_blocks)

    def body_model(self) -> torch.nn.Module:
        if self._body is None:
            from fedtune.runtime.workspace import Workspace

            self._body = Workspace(self.run_config).model().get_base_model()
        return self._body

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Any) -> list[Message]:
        begin = list(super().configure_train(server_round, arrays, config, grid))  # the global state, each
        info = self.rounds[server_round]
        nodes = {m.metadata.dst_node_id: self._partition(m.metadata.dst_node_id) for m in begin}
        active = self._exchange(grid, server_round, {nodes[m.metadata.dst_node_id]: dict(
            m.content["arrays"].to_torch_state_dict()) for m in begin}, "begin", info)
        with metered_as(grid, SPLIT):  # the per-batch activations and gradients
            pending: dict[int, dict[str, torch.Tensor]] = {pid: {} for pid in active}
            for _ in range(self.config.split_steps):
                pending = self._split_step(grid, server_round, pending, info)
            self._exchange(grid, server_round, pending, "backward", info)
        return [self._message(server_round, pid, {}, None) for pid in sorted(pending)]

    def _split_step(self, grid: Any, server_round: int, pending: dict[int, dict[str, torch.Tensor]],
                    info: Any) -> dict[int, dict[str, torch.Tensor]]:
        """One batch for every active client: ``h`` up, ``b`` down, ``∂L/∂b`` up; returns ``∂L/∂h``."""
        sent = self._exchange(grid, server_round, pending, "forward", info)
        graphs, tails = {}, {}
        for pid, up in sent.items():
            problem = self._activation_problem(up)
            if problem:
                info.failures[pid] = f"rejected activations: {problem}"
                log(WARNING, "client %d: %s", pid, info.failures[pid])
                continue
            h, b = body_forward(self.body_model(), up["activations"], up["mask"], self.cut)
            graphs[pid] = (h, b)
            tails[pid] = {"activations": b.detach().float().cpu()}
        grads = self._exchange(grid, server_round, tails, "tail", info)
        out = {}
        for pid, up in grads.items():
            h, b = graphs[pid]
            if "gradients" not in up or tuple(up["gradients"].shape) != tuple(b.shape):
                info.failures[pid] = "rejected gradients: not the shape of the body's activations"
                continue
            out[pid] = {"gradients": body_backward(h, b, up["gradients"])}
        return out

    def _activation_problem(self, up: dict[str, torch.Tensor]) -> str:
        h, mask = up.get("activations"), up.get("mask")
        if h is None or mask is None or h.dim() != 3 or tuple(mask.shape) != tuple(h.shape[:2]):
            return "expected activations (B, T, d) and a mask (B, T)"
        hidden = self.body_model().config.hidden_size
        if h.dtype != torch.float32 or h.shape[2] != hidden or not torch.isfinite(h).all():
            return f"activations must be finite fp32 of width {hidden}"
        return ""

    def _message(self, server_round: int, pid: int, arrays: dict[str, torch.Tensor], phase: str | None) -> Message:
        cfg = {"server-round": server_round, "method": self.name, **({"phase": phase} if phase else {})}
        content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(cfg)})
        return Message(content, dst_node_id=self.node_of[pid],
                       message_type=STEP if phase else "train")

    def _exchange(self, grid: Any, server_round: int, payloads: dict[int, dict[str, torch.Tensor]], phase: str,
                  info: Any) -> dict[int, dict[str, torch.Tensor]]:
        """Send ``phase`` to every client of ``payloads``; the replies' arrays of those that answered."""
        replies = self.require_handlers(list(grid.send_and_receive(
            [self._message(server_round, pid, arrays, phase) for pid, arrays in sorted(payloads.items())])), STEP)
        out = {}
        for reply in replies:
            pid = self._partition(reply.metadata.src_node_id)
            if reply.has_error():
                info.failures[pid] = f"{phase}: {last_line(reply.error.reason)}"
                log(WARNING, "client %d failed in %s: %s", pid, phase, info.failures[pid])
            else:
                out[pid] = reply.content["arrays"].to_torch_state_dict() if "arrays" in reply.content else {}
        return out

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Arrays:
        return weighted_average([u.arrays for u in updates], weights_for(updates, self.weighting))


def sfprompt_preflight(cfg: Any, inventory: Any) -> None:
    """Before Ray starts: the cut leaves the server a block, and P prompts + the tokens fit
    the model's learned positions (rotary models have no such table)."""
    blocks: dict[str, set[int]] = {}
    for name in inventory.parameters:
        match = re.match(r"(.*?)\.(\d+)\.", name)
        if match:
            blocks.setdefault(match.group(1), set()).add(int(match.group(2)))
    n = max((len(v) for v in blocks.values()), default=0)
    head, tail = cfg.strategy.head_blocks, cfg.strategy.tail_blocks
    if head + tail >= n:
        raise ConfigError(f"strategy.head_blocks + strategy.tail_blocks must be < the model's {n} blocks (at "
                          f"least one for the server), got {head} + {tail}")
    positions = [shape[0] for name, shape in inventory.parameters.items()
                 if name.endswith(("position_embeddings.weight", "wpe.weight"))]
    check_prompt_room(cfg, positions[0] if positions else None)


def check_prompt_room(cfg: Any, positions: int | None) -> None:
    """One-line error when P prompts + ``model.max_length`` tokens exceed a learned position
    table of ``positions`` rows (``None``: rotary positions, no limit)."""
    if positions is not None and cfg.strategy.num_prompts + cfg.model.max_length > positions:
        raise ConfigError(f"strategy.num_prompts: {cfg.strategy.num_prompts} prompts + model.max_length "
                          f"{cfg.model.max_length} exceed the model's {positions} positions; lower either "
                          f"(model=tiny: model.max_length=24)")


def split_bytes_per_batch(batch: int, length: int, hidden: int) -> tuple[int, int]:
    """``(down, up)`` payload bytes of one split step: ``b`` and ``∂L/∂h`` down, ``h``, its
    mask and ``∂L/∂b`` up, fp32 activations of ``batch × length × hidden``."""
    acts = 4 * batch * length * hidden
    return 2 * acts, 2 * acts + batch * length


ACTIVATIONS_LEAVE = ("activations of every example's head and the gradients at the cut leave the client "
                     "outside any DP mechanism")
register_method(
    "sfprompt", SFPrompt, trainer="sfprompt", config_cls=SFPromptConfig,
    capabilities=Capabilities(
        example_dp=Support(False, f"{ACTIVATIONS_LEAVE}; DP-SGD would bound only the prompt updates"),
        client_dp=Support(False, f"{ACTIVATIONS_LEAVE}; clipping the uploaded prompts protects none of them",
                          (UNIFORM_WEIGHTING,)),
        sum_only=Support(True, "the prompts and head are Σ_k p_k of the uploads"),
        identical_updates_fixed_point=True,
        lr_schedule=Support(True, "η_r is the clients' SGD step of round r (local and split steps)"),
        warmup=Support(False, "its steps are spread over messages; a within-round warmup is not implemented"),
        step_size="strategy.lr",
        quantized_base=Support(False, "not verified: the frozen body's backward pass through a quantized "
                                      "base is untested; use model.quantization=none")),
    payload=Payload(down="the global soft prompts (and head), fp32; per split batch b and ∂L/∂h",
                    up="the client's prompts (and head), fp32; per split batch h, its mask and ∂L/∂b",
                    formula=state_each_way),  # train traffic; the split traffic: split_bytes_per_batch
    export=Export("peft prompt-tuning adapter (+ head)", load=load_exported), preflight=sfprompt_preflight,
    quick=("model.max_length=24", "strategy.local_steps=4", "strategy.split_steps=4", "strategy.lr=0.1"),
    tuning={"strategy.lr": Relative(1.0, 0.3, 3.0)})
