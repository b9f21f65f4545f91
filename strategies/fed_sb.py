"""Fed-SB: federated LoRA-SB, where averaging the r×r cores is exact.

Implementation of Fed-SB (Singhal, Ponkshe, Vartak, Varshney, Vepakomma, "Fed-SB: A
Silver Bullet for Extreme Communication Efficiency and Performance in (Private)
Federated LoRA Fine-Tuning", arXiv 2502.15436) on LoRA-SB (Ponkshe et al., arXiv
2411.19557); docs/methods.md#fed_sb.  The adapter is :mod:`fedtune.models.lora_sb`.

**One-time setup** (``setup``, messages ``train.setup``, metered as ``one_time``):

1. ``init_source=clients``: every client uploads the mean full-weight gradient
   ``G_{l,k}`` of each target module on ``init_samples`` of its examples (or its sign,
   as int8); ``init_source=server``: the server computes one ``G_l`` itself on a proxy
   sample of the training split it holds and nothing goes up
   (:mod:`strategies.fed_sb_init` says which data and what that costs in privacy);
2. the server forms ``ΔW_l = −η_eff · sign(Σ_k p_k G_{l,k})`` (the first AdamW step;
   ``η_eff`` = ``init_step``, default ``train.lr``) and its rank-r truncated SVD
   ``ΔW_l ≈ U S Vᵀ`` → ``B_l = U``, ``A_l = Vᵀ``, ``R0_l = S / s`` (``s = alpha/r``,
   1 by default);
3. the server broadcasts ``(B_l, A_l)`` once to every client, which keeps them in its
   persistent ``Context.state``.  ``R0`` is the global state of round 1.

**Rounds**: client k trains ``R_{l,k}`` (and the head) from the global ``R̄_l``; the
server sets ``R̄_l = Σ_k p_k R_{l,k}`` over *this round's* replies only.  Because ``B``
and ``A`` are shared and frozen, ``W0 + s·B R̄ A = Σ_k p_k (W0 + s·B R_k A)``: exact for
any number of clients and any participation.  (The official multi-round script keeps
appending R's across rounds; that bug is not reproduced.)

Bytes per client and round, each way: ``4·L·r²`` + head.  One-time: down
``4·Σ_l r(m_l+n_l)`` (B, A) per client; up ``4·Σ_l m_l n_l`` (gradients), ``1·Σ_l m_l n_l``
(int8 signs) or nothing (``init_source=server``) per client.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtune.capabilities import UNIFORM_WEIGHTING, Capabilities, Export, Payload, Support
from fedtune.config.method import MethodConfig
from fedtune.errors import ConfigError, PayloadError
from fedtune.flower.strategy import SETUP, Arrays, ClientUpdate, FedtuneStrategy, weights_for
from fedtune.models.lora_sb import set_bases, update_approximation
from fedtune.models.state import check_arrays, load_trainable_state
from fedtune.models.targets import lora_preflight, matched, resolve_targets
from fedtune.registry import register_method
from fedtune.tuning import LEARNING_RATES
from strategies.fed_sb_init import INIT_SOURCES, server_gradients, setup_note
from strategies.fedavg_lora import LOCAL_LR, state_each_way, weighted_average

GRAD_SUFFIX, CORE_SUFFIX = ".base.weight", ".sb_R.weight"


def sign_step(updates: list[ClientUpdate], weights: list[float], step: float) -> Arrays:
    """``ΔW_l = −step · sign(Σ_k p_k X_{l,k})``, ``X`` the uploaded gradients or signs."""
    out = {}
    for key in updates[0].arrays:
        direction = sum(w * u.arrays[key].to(torch.float64) for w, u in zip(weights, updates))
        out[key] = -step * torch.sign(direction)
    return out


def factorise(deltas: Arrays, rank: int, scale: float, svd: str = "exact", seed: int = 0) -> tuple[Arrays, Arrays]:
    """Per module ``<m>.base.weight → ΔW``: bases ``{<m>.sb_B, <m>.sb_A}`` and cores
    ``{<m>.sb_R.weight: R0}`` with ``s·B R0 A`` the rank-r truncation of ``ΔW``."""
    bases, cores = {}, {}
    for key in sorted(deltas):
        module = key.removesuffix(GRAD_SUFFIX)
        B, A, R0 = update_approximation(deltas[key], rank, scale, svd, seed, module)
        bases[f"{module}.sb_B"], bases[f"{module}.sb_A"] = B, A
        cores[module + CORE_SUFFIX] = R0
    return bases, cores


@dataclass
class FedSBConfig(MethodConfig):
    """``strategy=fed_sb``.  One-time setup traffic is in ledger.csv as kind ``one_time``.

        fedtune run strategy=fed_sb                                        # MiniLM, r = 32
        fedtune run strategy=fed_sb model=tiny dataset=tiny strategy.rank=8 num_rounds=3
        fedtune run strategy=fed_sb strategy.init_source=server            # no init upload

    rank : r of every module (``L·r²`` trainable scalars); at most min(m, n).
    alpha : LoRA-SB scale numerator, ``s = alpha / rank``; ``null`` means alpha = rank, s = 1.
    weighting : ``uniform`` (official Fed-SB: plain mean) or ``examples``; used for
        both the init gradients and the cores.
    init_source : who computes the init gradient: ``clients`` (each on its own data, then
        uploads it) or ``server`` (on ``init_samples × num_clients`` examples of the
        training split it holds, a stand-in for a public sample; no upload).
    init_samples, init_batch_size : examples per client for the init gradient (the server
        reads ``init_samples × num_clients``), and the batch size (the gradient is the
        mean of per-batch mean-loss gradients).
    init_upload : what a client uploads, ``gradient`` (fp32) or ``sign`` (int8, a quarter
        of the bytes); ``init_source=clients`` only.
    init_step : ``η_eff`` of ``ΔW = −η_eff·sign(G)``; ``null`` = ``train.lr``.
    svd : ``exact`` (torch.linalg.svd) or ``lowrank`` (seeded svd_lowrank, niter 10).
    """

    name: str = "fed_sb"
    weighting: str = "uniform"  # uniform (official: plain mean) | examples
    rank: int = 32  # per module; L·r² trainable scalars (<= min(out, in) of every target)
    alpha: float | None = None  # s = alpha / rank; null = rank (s = 1, as the official code)
    init_source: str = "clients"  # clients (upload init gradients) | server (proxy sample, no upload)
    init_samples: int = 32  # examples per client for the one-time init gradient (the server: × num_clients)
    init_batch_size: int = 8
    init_upload: str = "gradient"  # gradient (fp32) | sign (int8); init_source=clients only
    init_step: float | None = None  # eta_eff in dW = -eta_eff·sign(G); null = train.lr
    svd: str = "exact"  # exact (torch.linalg.svd) | lowrank (seeded svd_lowrank, niter 10)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank <= 0:
            raise ValueError(f"rank must be > 0, got {self.rank}")
        if self.alpha is not None and not 0 < self.alpha < float("inf"):
            raise ValueError(f"alpha must be a finite number > 0 (or null for alpha = rank), got {self.alpha}")
        if self.init_samples < 1:
            raise ValueError(f"init_samples must be >= 1, got {self.init_samples}")
        if self.init_batch_size < 1:
            raise ValueError(f"init_batch_size must be >= 1, got {self.init_batch_size}")
        if self.init_source not in INIT_SOURCES:
            raise ValueError(f"init_source: unknown {self.init_source!r}; accepted: {', '.join(INIT_SOURCES)}")
        if self.init_upload not in ("gradient", "sign"):
            raise ValueError(f"init_upload: unknown {self.init_upload!r}; accepted: gradient, sign")
        if self.init_source == "server" and self.init_upload != "gradient":
            raise ValueError(f"init_upload={self.init_upload} needs init_source=clients; with init_source=server "
                             "the server computes the init gradient itself and no client uploads one")
        if self.init_step is not None and not 0 < self.init_step < float("inf"):
            raise ValueError(f"init_step must be a finite number > 0 (or null for train.lr), got {self.init_step}")
        if self.svd not in ("exact", "lowrank"):
            raise ValueError(f"svd: unknown {self.svd!r}; accepted: exact, lowrank")

    @property
    def lora_alpha(self) -> float:
        """The scale numerator both halves use: ``alpha``, or ``rank`` when it is null."""
        return self.alpha if self.alpha is not None else float(self.rank)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


class FedSB(FedtuneStrategy):
    """Fed-SB: one-time gradient → SVD → (B, A) broadcast, then exact averaging of R."""

    name = "fed_sb"
    client_app_needs = (
        f"a '{SETUP}' handler that answers an empty ArrayRecord with its mean full-weight gradients "
        f"('<module>{GRAD_SUFFIX}') and 'num-examples' (init_source=clients), keeps the bases "
        "'<module>.sb_B'/'<module>.sb_A' of the message that carries them in Context.state and trains the "
        "cores R on them in every round",
    )

    config: FedSBConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bases: Arrays = {}  # <module>.sb_B / .sb_A, fixed after setup
        self.run_config: Any = None  # the whole RunConfig (from_config): the server's init data and model

    @classmethod
    def from_config(cls, cfg: Any) -> "FedSB":
        strategy = super().from_config(cfg)
        if strategy.config.init_step is None:  # Adam's first step moves each weight by ≈ lr
            strategy.config = dataclasses.replace(strategy.config, init_step=cfg.train.lr)
        strategy.run_config = cfg  # type: ignore[attr-defined]
        return strategy  # type: ignore[return-value]

    # ------------------------------------------------------------------ setup
    def setup(self, grid: Grid, server_round: int) -> None:
        """Init gradients (from every client, or the server's own), factorise, broadcast B
        and A once."""
        updates = self._server_update() if self.config.init_source == "server" else \
            self._gradient_updates(self.setup_exchange(grid, server_round, lambda pid: {}))
        if not updates:
            raise RuntimeError("Fed-SB setup: no client returned a valid init gradient")
        if self.config.init_step is None:
            raise RuntimeError("Fed-SB setup: init_step is unset (from_config sets it to train.lr)")
        deltas = sign_step(updates, weights_for(updates, self.weighting), self.config.init_step)
        self.bases, cores = factorise(deltas, self.config.rank, self.config.scale, self.config.svd, self.seed)
        missing = sorted(set(cores) - set(self.global_arrays))
        if missing:
            raise RuntimeError(f"Fed-SB setup: gradient keys match no trainable core, e.g. {missing[0]}")
        self.global_arrays.update(cores)
        self.resync(grid, server_round)

    def resync(self, grid: Grid, server_round: int) -> None:
        """Send the bases B, A to every client (once after setup; again after a resume,
        since clients keep them in process state that a restart loses)."""
        for reply in self.setup_exchange(grid, server_round, lambda pid: self.bases):
            if reply.has_error():
                log(WARNING, "Fed-SB setup: node %d did not store the bases: %s", reply.metadata.src_node_id,
                    reply.error.reason.strip().splitlines()[-1][:200])

    def _server_update(self) -> list[ClientUpdate]:
        """The server's own init gradient, as one update of weight 1 (nothing crosses the wire)."""
        if self.run_config is None:
            raise RuntimeError("Fed-SB setup: init_source=server needs the run's config (build it with from_config)")
        grads, num_examples = server_gradients(self.run_config, self.load_into)
        return [ClientUpdate(-1, num_examples, grads, {})]

    def _gradient_updates(self, replies: list[Message]) -> list[ClientUpdate]:
        """Decoded gradient replies, sorted by partition id; all must share keys and shapes."""
        updates: list[ClientUpdate] = []
        for reply in replies:
            pid = self._partition(reply.metadata.src_node_id)
            try:
                if reply.has_error():
                    raise PayloadError(reply.error.reason.strip().splitlines()[-1][:200])
                arrays = {k: v.float() for k, v in reply.content["arrays"].to_torch_state_dict().items()}
                if not arrays or any(not k.endswith(GRAD_SUFFIX) for k in arrays):
                    raise PayloadError(f"expected '<module>{GRAD_SUFFIX}' gradients, got {sorted(arrays)[:3]}")
                if updates:
                    check_arrays(arrays, {k: tuple(v.shape) for k, v in updates[0].arrays.items()})
                num_examples = int(reply.content["metrics"]["num-examples"])
                updates.append(ClientUpdate(pid, num_examples, arrays, {}))
            except (PayloadError, KeyError, TypeError, ValueError) as exc:
                log(WARNING, "Fed-SB setup: client %d left out of the init gradient: %s", pid, exc)
        return sorted(updates, key=lambda u: u.partition_id)

    # ------------------------------------------------------------------ rounds
    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Arrays:
        """``R̄ = Σ_k p_k R_k`` (and the head), over this round's replies only."""
        return weighted_average([u.arrays for u in updates], weights_for(updates, self.weighting))

    def load_into(self, model: torch.nn.Module) -> None:
        """Set B, A (once known), the global cores R̄ and the head on ``model``."""
        if self.bases:
            set_bases(model, self.bases)
        load_trainable_state(model, self.global_arrays)

    def state_dict(self) -> dict[str, Any]:
        """The base's state and the bases B, A of the one-time setup."""
        return {**super().state_dict(), "bases": dict(self.bases)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bases = dict(state["bases"])


def fed_sb_preflight(cfg: Any, inventory: Any) -> None:
    """Fed-SB's checks on the model before Ray starts: the LoRA targets match, each is an
    ``nn.Linear`` (LoRA-SB wraps no GPT-2 ``Conv1D``), and ``rank <= min(out, in)`` of each
    (the r×r core sits between an m×r and an r×n orthonormal basis)."""
    lora_preflight(cfg, inventory)
    targets = resolve_targets(cfg.model.lora.target_modules, inventory.model_type)
    for name in matched(inventory.linears, targets):
        layer = inventory.linears[name]
        if layer.kind != "Linear":
            raise ConfigError(f"model.lora.target_modules: {name} is a {layer.kind} (this architecture's transposed "
                              f"linear); Fed-SB's LoRA-SB wraps nn.Linear layers only: use a peft LoRA method")
        if cfg.strategy.rank > min(layer.out_features, layer.in_features):
            raise ConfigError(f"strategy.rank must be <= min(out, in) = {min(layer.out_features, layer.in_features)} "
                              f"of every target, got {cfg.strategy.rank} ({name} is "
                              f"{layer.out_features}×{layer.in_features})")


register_method(
    "fed_sb", FedSB, trainer="lora_sb", config_cls=FedSBConfig,
    capabilities=Capabilities(
        lr_schedule=LOCAL_LR, warmup=LOCAL_LR,
        example_dp=Support(True, "its clients train R and the head with the shared first-order loop, which "
                                 "privacy=dp_sgd turns into DP-SGD; its one-time init gradient is not noised, "
                                 "and strategy.init_source=server keeps it off the clients' data"),
        client_dp=Support(True, "its global state is the uniform mean of the uploaded r×r cores and head",
                          (UNIFORM_WEIGHTING,)),
        setup_on_client_data=setup_note,
        sum_only=Support(True, "R̄ and the head are Σ_k p_k of the uploads (the one-time ΔW is the sign of "
                               "Σ_k p_k G_k)"),
        identical_updates_fixed_point=True,
        quantized_base=Support(False, "its one-time LoRA-SB init needs the full-weight gradient ∂L/∂W0 of every "
                                      "target, which a quantized base does not have; use model.quantization=none")),
    payload=Payload(down="r×r cores R and head (fp32); once: bases B, A", up="r×r cores R and head (fp32); "
                    "once: full-weight gradients (fp32) or their signs (int8), or nothing (init_source=server)",
                    formula=state_each_way),
    export=Export("LoRA-SB adapter: bases B, A, cores R and head (safetensors)"),
    quick=("strategy.rank=8", "strategy.init_step=0.01"), preflight=fed_sb_preflight,
    # the paper tunes the lr and grows r (its r = 120-200 on 7B models); r <= min(m, n) of every target
    tuning={"train.lr": LEARNING_RATES, "strategy.rank": (32, 64, 128)})
