"""Per-round checkpoints of the server, so a killed run continues where it stopped.

After every round's central evaluation the ServerApp writes ``checkpoint.pt`` in the run
directory, atomically (a temporary sibling, then ``os.replace``): a reader, or a run
resumed after a kill at any instant, sees the previous round's checkpoint or this one,
never half of one.  It holds

* ``round``: the last completed round;
* ``strategy``: :meth:`FedtuneStrategy.checkpoint_state` — the global state, the ledger,
  the per-round records and every method's own state (FedKSeed accumulators and Pro
  histories, Ferret coefficients, Fed-SB bases, FedEx/FLoRA merged base deltas, ...);
* ``rng``: the server process's Python, NumPy and torch generator states;
* ``config``: the run's config, so a resume checks it continues the same experiment.

Clients are not checkpointed: every trainer rebuilds what it needs from the message it
receives (the seeded model, the global state), except Fed-SB's bases, which the
strategy sends again on resume (:meth:`FedtuneStrategy.resync`), and an example-level
DP accountant, which is why ``privacy=dp_sgd`` runs cannot be resumed.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, server_round: int, strategy_state: dict[str, Any],
                    config: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically; return its path."""
    path = Path(run_dir) / CHECKPOINT
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, "round": server_round, "strategy": strategy_state,
                        "rng": rng_state(), "config": config}, fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The checkpoint of ``run_dir``; ``FileNotFoundError`` naming the directory if it has none."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"resume: {run_dir} has no {CHECKPOINT} (not a fedtune run directory, "
                                "or it stopped before its first round ended)")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: pickled records
    if state.get("format") != FORMAT:
        raise ValueError(f"resume: {path} has checkpoint format {state.get('format')!r}; this fedtune reads {FORMAT}")
    return state
