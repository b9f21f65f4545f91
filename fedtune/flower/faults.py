"""Fault injection on clients: a wrapper around a trainer's ``train`` (``faults:`` config).

The ClientApp wraps ``train`` with :func:`with_faults` (outermost, after
:func:`~fedtune.privacy.dp_sgd.with_privacy`), so no method knows about faults.  Which
(round, client) pairs fail is a pure function of the run seed (:func:`fault_plan`), so
the server, a test or a reader of the results can recompute it:

* each round, ``round(faults.fraction · federation.num_clients)`` partitions are drawn
  without replacement from the stream ``("faults", round)``; a drawn partition that is
  also sampled for training fails;
* the j-th drawn partition of round r gets ``modes[((r − 1)·count + j) mod len(modes)]``
  (``malformed`` expands to every malformed kind), so a list of modes is covered evenly.

A faulty client trains first and fails afterwards ("mid-round": the work is done, the
reply is lost or wrong):

* ``raise``: the ClientApp raises :class:`InjectedFault`; Flower turns it into an error
  reply and the strategy records the reason.
* ``exit``: the client's process dies (``os._exit``).  In simulation that is a Ray actor.
  Flower 1.41's Ray backend answers the message with an error reply but puts the dead
  actor back in its pool, so every later message sent to it would fail too (measured:
  one death failed all 10 clients of every later round).  Hence
  :func:`fedtune.runtime.simulation.backend_config` has Ray restart dead actors
  (``max_restarts``) and retry the calls they were given (``max_task_retries``: the
  other clients' calls queued on the dead actor then wait for the restart instead of
  failing).  The dying call's own retry finds the marker file it left and raises, so the
  client is reported failed once, with its reason.  In deployment the ``flwr-clientapp``
  process dies and the SuperNode reports an error (or the round times out,
  ``federation.round_timeout``).  In any other process (the ClientApp called in the
  driver's own process) ``exit`` raises instead of killing it.
* malformed replies (:data:`~fedtune.config.FAULT_MALFORMED`): ``nan_value``/``inf_value``
  in the first floating array, ``wrong_shape`` (one extra row), ``wrong_dtype`` (float64),
  ``missing_key``, ``extra_key``, ``bad_num_examples`` (0).  The server's validation must reject each one.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedtune.config.sections import FAULT_MALFORMED
from fedtune.randomness import numpy_rng

Train = Callable[..., tuple[dict[str, torch.Tensor], dict[str, Any]]]
EXTRA_KEY = "fedtune.injected-fault"
EXIT_CODE = 75


class InjectedFault(RuntimeError):
    """The failure a ``raise`` fault (or an ``exit`` outside a client process) raises."""


def expand_modes(modes: list[str]) -> list[str]:
    """``modes`` with ``malformed`` replaced by every malformed kind, in order."""
    out: list[str] = []
    for mode in modes:
        out.extend(FAULT_MALFORMED if mode == "malformed" else (mode,))
    return out


def faulty_partitions(seed: int, server_round: int, num_clients: int, fraction: float) -> list[int]:
    """The partitions that fail in ``server_round`` (if sampled), in draw order."""
    count = int(fraction * num_clients + 0.5)
    if count == 0:
        return []
    order = numpy_rng(seed, "faults", server_round).permutation(num_clients)
    return [int(p) for p in order[:count]]


def fault_plan(cfg: Any, server_round: int) -> dict[int, str]:
    """Which clients fail in ``server_round``, and how.

    Parameters
    ----------
    cfg : the run's :class:`~fedtune.config.RunConfig` (``seed``, ``federation.num_clients``,
        ``faults``).
    server_round : the round, from 1.

    Returns
    -------
    ``{partition id: mode}`` for every faulty partition (it fails only if sampled).
    """
    faults = cfg.faults
    drawn = faulty_partitions(cfg.seed, server_round, cfg.federation.num_clients, faults.fraction)
    modes = expand_modes(list(faults.modes))
    start = (server_round - 1) * len(drawn)
    return {pid: modes[(start + j) % len(modes)] for j, pid in enumerate(drawn)}


def corrupt(upload: dict[str, torch.Tensor], metrics: dict[str, Any],
            kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A copy of the reply made malformed in the way ``kind`` names (inputs untouched)."""
    upload, metrics = dict(upload), dict(metrics)
    if kind == "bad_num_examples":
        metrics["num-examples"] = 0
        return upload, metrics
    if kind == "extra_key":
        upload[EXTRA_KEY] = torch.zeros(1)
        return upload, metrics
    floating = [k for k in sorted(upload) if torch.is_floating_point(upload[k])]
    if not floating:  # nothing to corrupt (e.g. a DP client out of budget sends no arrays)
        return upload, metrics
    key = floating[0]
    value = upload[key].detach().clone()
    if kind == "missing_key":
        del upload[key]
    elif kind in ("nan_value", "inf_value"):
        value = torch.zeros(1, dtype=value.dtype) if value.numel() == 0 else value
        value.view(-1)[0] = float("nan") if kind == "nan_value" else float("inf")
        upload[key] = value
    elif kind == "wrong_shape":
        upload[key] = torch.cat([value, value[:1]]) if value.dim() else value.reshape(1, 1)
    elif kind == "wrong_dtype":
        upload[key] = value.double()
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; accepted: {', '.join(FAULT_MALFORMED)}")
    return upload, metrics


def _ray_actor_id() -> str | None:
    """The id of the Ray actor running this code (stable across its restarts), else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_actor_id()


def _exit(reason: str, server_round: int, partition_id: int) -> None:
    """Die now, as a crashed or killed client does (no cleanup, no reply).

    In a Ray actor, Ray restarts the process and retries the call (``max_task_retries``,
    so that the other clients' calls queued on the dead actor are not lost); a marker
    file left before dying makes that retry report the death instead of dying again.
    """
    actor = _ray_actor_id()
    if actor is None and not os.path.basename(sys.argv[0] if sys.argv else "").startswith("flwr-clientapp"):
        raise InjectedFault(f"{reason}; raised instead: this process is not a client's own")
    if actor is not None:
        marker = Path(tempfile.gettempdir()) / "fedtune-faults" / f"{actor}-r{server_round}-c{partition_id}"
        if marker.exists():
            marker.unlink(missing_ok=True)
            raise InjectedFault(f"{reason}: the client process died (Ray restarted it; the retried call failed)")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    print(f"fedtune: {reason}: exiting", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


def with_faults(train: Train, cfg: Any) -> Train:
    """Wrap a trainer's ``train`` with the run's fault injection.

    Parameters
    ----------
    train : ``train(model, arrays, workspace, ctx) -> (upload, metrics)``.
    cfg : the run's :class:`~fedtune.config.RunConfig`.

    Returns
    -------
    ``train`` itself when ``faults.fraction`` is 0; else a wrapper that trains, then fails
    as :func:`fault_plan` says for ``(ctx.server_round, ctx.partition_id)``.
    """
    if cfg.faults.fraction == 0:
        return train

    @functools.wraps(train)
    def faulty_train(model: torch.nn.Module, arrays: dict[str, torch.Tensor], workspace: Any,
                     ctx: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        mode = fault_plan(cfg, ctx.server_round).get(ctx.partition_id)
        upload, metrics = train(model, arrays, workspace, ctx)
        if mode is None:
            return upload, metrics
        reason = f"injected fault {mode!r} (round {ctx.server_round}, client {ctx.partition_id})"
        if mode == "raise":
            raise InjectedFault(reason)
        if mode == "exit":
            _exit(reason, ctx.server_round, ctx.partition_id)
        return corrupt(upload, metrics, mode)

    return faulty_train
