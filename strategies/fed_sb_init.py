"""Where Fed-SB's one-time init gradient comes from: the clients, or the server itself.

Fed-SB (Singhal et al., arXiv 2502.15436) initialises LoRA-SB (Ponkshe et al., arXiv
2411.19557) from the truncated SVD of an approximate first full-weight step, which needs
a mean full-weight gradient ``G`` of every target module (docs/methods.md#fed_sb).
``strategy.init_source`` says who computes it and so what crosses the wire once:

``clients``  every client computes ``G_k`` on ``init_samples`` of its own examples and
             uploads it (``init_upload``: fp32, or its int8 sign): ``4·Σ m_l n_l`` (or
             ``1·Σ m_l n_l``) bytes up per client; the gradient is client data without DP.
``server``   the server computes ``G`` itself, as the paper's official code does once on
             the pooled training set: on ``init_samples × num_clients`` examples (what
             the clients' option reads in all when each holds that many; capped by the
             pool) drawn, seeded, from the training split of the run's ``dataset``, which
             the server holds.  No client uploads anything for the init.  In simulation that split is the
             clients' own pool, so the option models a public sample from the clients'
             population (it is never evaluated on: the test and validation splits are
             disjoint from it); in a deployment it is whatever file the server's
             ``dataset`` names.

Both options then send the same bases ``B, A`` down once.  Both read examples through
:func:`init_batches`, so with the same examples they give the same ``G`` (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.models.lora_sb import base_gradients
from fedtune.randomness import seed_torch, torch_generator

INIT_SOURCES = ("clients", "server")
SERVER_KEY = "server"  # the server's stream in ("fed-sb-init", key); clients use their partition id


def init_batches(workspace: Any, pool: list[int], count: int, key: int | str) -> list[dict[str, torch.Tensor]]:
    """``count`` examples of the training split drawn from ``pool`` (seeded by ``key``), as
    batches of ``strategy.init_batch_size`` on the workspace's device."""
    cfg = workspace.cfg
    indices = torch.as_tensor(pool, dtype=torch.long)
    chosen = indices[torch.randperm(len(indices), generator=torch_generator(cfg.seed, "fed-sb-init", key))[:count]]
    encoded = workspace.encoded("train")
    return [encoded.batch(idx, workspace.device) for idx in chosen.split(cfg.strategy.init_batch_size)]


def server_batches(workspace: Any) -> list[dict[str, torch.Tensor]]:
    """The server's proxy sample: ``init_samples × num_clients`` examples of the whole
    training split of its ``dataset`` (every example once at most)."""
    cfg = workspace.cfg
    count = cfg.strategy.init_samples * cfg.federation.num_clients
    return init_batches(workspace, list(range(len(workspace.encoded("train")))), count, SERVER_KEY)


def server_gradients(cfg: Any, load: Any) -> tuple[dict[str, torch.Tensor], int]:
    """The server's init gradients ``{<module>.base.weight: G}`` and the examples they
    average, on its own copy of the model; ``load(model)`` first sets the global state
    (the head enters the loss), as the clients' copies hold it before round 1."""
    from fedtune.runtime.workspace import Workspace

    workspace = Workspace(cfg)
    model = workspace.model()
    load(model)
    batches = server_batches(workspace)
    cuda = [torch.cuda.current_device()] if workspace.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # seeded dropout, the server's own RNG untouched
        seed_torch(cfg.seed, "fed-sb-init", SERVER_KEY)
        grads, _ = base_gradients(model, batches)
    return grads, sum(len(b["labels"]) for b in batches)


def setup_note(section: Any) -> str:
    """summary.json's ``privacy.not_accounted`` for the run's ``strategy`` section."""
    if getattr(section, "init_source", "clients") == "server":
        return ("Fed-SB's one-time init gradient is computed by the server on init_samples × num_clients "
                "examples of the training split it holds (in simulation the clients' pool, standing for a public "
                "sample of their population): no client uploads an un-noised gradient, but DP does not cover "
                "those examples")
    return "Fed-SB's one-time init gradients are computed on client data and uploaded without DP"
