"""Example-level DP-SGD on a client, with Opacus, for every first-order trainer.

Two pieces, both cross-cutting (no per-method subclass):

* :func:`run_private_steps` replaces the body of the shared local loop
  (:func:`clients.local_steps.run_local_steps`) when ``privacy=dp_sgd``, so FedAvg-LoRA,
  LoRA-FAIR, FFA-LoRA, FedEx-LoRA, FLoRA, Fed-SB (R and head) and Ferret's local steps
  are all private the same way.
* :func:`with_privacy` wraps a trainer's ``train`` (the ClientApp applies it): it refuses
  to train a client whose next round would exceed ``target_epsilon`` — the reply then
  carries no arrays and ``dp-budget-spent = 1``, which the strategy counts as "no
  contribution" — and adds ``dp-epsilon`` (ε spent so far by this client) to the metrics.

Why the Opacus parts are assembled here rather than through
``PrivacyEngine.make_private``: it would replace our batches with its ``DPDataLoader``,
whose rate is ``1/len(loader)`` and whose randomness is not fedtune's seeded stream.  We
use the same three components it wires — per-sample-gradient hooks
(:class:`opacus.grad_sample.GradSampleHooks`, attached *without* wrapping the model, and
removed after the round because the model is cached and shared by every client of the
process), :class:`opacus.optimizers.DPOptimizer` (flat clipping to ``max_grad_norm``,
Gaussian noise ``σ·C``, division by the expected batch) and the accountant's optimizer
hook — and sample the batches ourselves:

* ``sampling=poisson`` (default): each step includes each of the client's ``n`` examples
  independently with ``q = batch_size / n`` (stream ``("dp-poisson", round, pid)``), the
  sampling the accountant assumes; an empty draw is still a (noise-only) step.
* ``sampling=shuffle``: exactly the batches of the non-private loop.  ε is then nominal
  (Opacus' ``poisson_sampling=False`` caveat); the mode exists so that σ = 0 with a huge
  clip can be checked to reproduce the non-private run bit for bit up to float error.

Grad-sample mode: ``hooks`` (default) — peft's ``lora_A``/``lora_B``, LoRA-SB's core ``R``
and the classifier are plain ``nn.Linear`` layers, which Opacus' hooks support natively
(``functorch`` also works).  Only ``requires_grad`` parameters get per-sample gradients,
so the frozen base costs nothing and never moves.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fedtune.data.batches import local_batches
from fedtune.privacy.accounting import (check_delta, check_supported, epsilon, extended, load_history,
                                        noise_multiplier, sample_rate, save_history)
from fedtune.privacy.options import DPSGDConfig, PrivacySpec
from fedtune.randomness import derive_seed, seed_torch, torch_generator
from fedtune.registry import PRIVACY

Train = Callable[..., tuple[dict[str, torch.Tensor], dict[str, float]]]


def private_batches(indices: list[int], cfg: Any, server_round: int, partition_id: int) -> Iterator[torch.Tensor]:
    """The ``train.local_steps`` batches of example ids of one client round (see module doc)."""
    steps, batch_size = cfg.train.local_steps, cfg.train.batch_size
    if cfg.privacy.sampling == "shuffle":
        yield from local_batches(indices, steps, batch_size,
                                 torch_generator(cfg.seed, "batches", server_round, partition_id))
        return
    pool = torch.as_tensor(indices, dtype=torch.long)
    q = sample_rate(batch_size, len(pool))
    gen = torch_generator(cfg.seed, "dp-poisson", server_round, partition_id)
    for _ in range(steps):
        yield pool[torch.rand(len(pool), generator=gen) < q]


def per_example_positions(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Explicit ``(B, T)`` position and token-type ids when an embedding is trained.

    HF BERT otherwise feeds buffers of shape ``(1, T)``, so a trainable position
    embedding gets a per-sample gradient of batch 1 and Opacus fails to stack them
    (in Opacus' per-sample hooks).  Only full-parameter methods (Ferret ``trainable=all``) need it.
    """
    trains_embedding = any(p.requires_grad for m in model.modules() if isinstance(m, torch.nn.Embedding)
                           for p in m.parameters(recurse=False))
    if not trains_embedding:
        return {}
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return {"position_ids": positions, "token_type_ids": torch.zeros_like(ids)}


def _release(params: list[torch.nn.Parameter]) -> None:
    """Drop what DPOptimizer left on the (shared) parameters."""
    for p in params:
        p.grad = None
        if hasattr(p, "summed_grad"):
            delattr(p, "summed_grad")


def _descend(model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
             encoded: Any, batches: Iterator[torch.Tensor], device: torch.device,
             before_step: Callable[[torch.optim.Optimizer, int], None]) -> list[float]:
    """The DP-SGD steps themselves; the batch losses."""
    losses = []
    for step, idx in enumerate(batches):
        before_step(optimizer, step)  # the step's lr (warmup), on the wrapped optimizer's param groups
        optimizer.zero_grad(set_to_none=True)
        if len(idx):
            batch = encoded.batch(idx, device)
            loss = model(**batch, **per_example_positions(model, batch)).loss
            loss.backward()
            losses.append(float(loss.detach()))
        else:  # an empty Poisson draw: no example, but a noisy step the accountant counts
            for p in params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        optimizer.step()
    return losses


def run_private_steps(model: torch.nn.Module, workspace: Any, ctx: Any,
                      make_optimizer: Callable[[list[torch.nn.Parameter], Any], torch.optim.Optimizer],
                      before_step: Callable[[torch.optim.Optimizer, int], None]) -> float:
    """``train.local_steps`` DP-SGD steps on the trainable parameters; return the mean loss.

    ``make_optimizer(params, cfg)`` builds the optimizer at the round's lr and
    ``before_step(optimizer, step)`` sets each step's (:class:`clients.local_steps.StepLR`).

    The client's accountant history is read from and written back to ``ctx.state``.
    Dropout is seeded from ``("train", round, pid)`` and the noise from
    ``("dp-noise", round, pid)``, so a private round is as reproducible as any other.
    """
    from opacus.accountants import create_accountant
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

    cfg, pc = workspace.cfg, workspace.cfg.privacy
    encoded = workspace.encoded("train")
    indices = workspace.partitions()[ctx.partition_id]
    n = len(indices)
    sigma, q = noise_multiplier(cfg, n), sample_rate(cfg.train.batch_size, n)
    params = [p for p in model.parameters() if p.requires_grad]
    accountant = create_accountant(mechanism=pc.accountant)
    accountant.history = load_history(ctx.state)
    seed_torch(cfg.seed, "train", ctx.server_round, ctx.partition_id)
    noise = torch.Generator(device=ctx.device)
    noise.manual_seed(derive_seed(cfg.seed, "dp-noise", ctx.server_round, ctx.partition_id))
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean",
                            force_functorch=pc.grad_sample_mode == "functorch")
    try:
        optimizer = DPOptimizer(make_optimizer(params, cfg), noise_multiplier=sigma,
                                max_grad_norm=pc.max_grad_norm, expected_batch_size=min(cfg.train.batch_size, n),
                                loss_reduction="mean", generator=noise)
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
        model.train()
        with warnings.catch_warnings():  # hooks after a frozen first layer: torch warns every step, harmlessly
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses = _descend(model, optimizer, params, encoded, private_batches(indices, cfg, ctx.server_round,
                                                                                 ctx.partition_id), ctx.device,
                              before_step)
    finally:
        hooks.cleanup()
        _release(params)
        model.eval()
    save_history(ctx.state, accountant.history)
    return sum(losses) / len(losses) if losses else math.nan


def with_privacy(train: Train, cfg: Any) -> Train:
    """``train`` itself unless ``privacy=dp_sgd``; else the budget-checked, ε-reporting wrapper."""
    if cfg.privacy.name != "dp_sgd":
        return train
    pc = cfg.privacy

    @functools.wraps(train)
    def private_train(model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
                      ctx: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        sizes = [len(p) for p in workspace.partitions()]
        check_delta(cfg, sizes)
        n = sizes[ctx.partition_id]
        sigma, q = noise_multiplier(cfg, n), sample_rate(cfg.train.batch_size, n)
        history = load_history(ctx.state)
        base = {"num-examples": n, "dp-delta": pc.delta, "dp-noise-multiplier": sigma, "dp-sample-rate": q}
        if pc.target_epsilon is not None:
            after = epsilon(extended(history, pc.accountant, sigma, q, cfg.train.local_steps), pc.delta,
                            pc.accountant)
            if after > pc.target_epsilon:  # this round would overspend: send nothing, ever again
                return {}, {**base, "dp-budget-spent": 1, "dp-epsilon": epsilon(history, pc.delta, pc.accountant)}
        upload, metrics = train(model, arrays, workspace, ctx)
        new = load_history(ctx.state)
        if sum(t for _, _, t in new) != sum(t for _, _, t in history) + cfg.train.local_steps:
            raise RuntimeError(f"privacy={pc.name}: the trainer did not run the private local loop "
                               f"(accountant steps {sum(t for _, _, t in history)} -> {sum(t for _, _, t in new)})")
        return upload, {**metrics, **base, "dp-budget-spent": 0, "dp-epsilon": epsilon(new, pc.delta, pc.accountant)}

    return private_train


PRIVACY.register("dp_sgd", PrivacySpec(DPSGDConfig, check=check_supported))
