"""Per-round checkpoints of the server, so a killed run continues where it stopped.

After every round the end-of-round hook (:mod:`fedtune.flower.run_record`) writes two
files in the run directory, and no pickle:

``checkpoint-<sha256[:16]>.safetensors``
    every tensor of the state (safetensors: a JSON header and raw bytes), named by the
    start of its own SHA-256;
``checkpoint.json``
    the manifest: ``format``, the tensor file's name and SHA-256, and ``content`` with
    ``round`` (the last completed round), ``strategy`` (the method's
    :meth:`~fedtune.flower.strategy.FedtuneStrategy.state_dict`: global state, ledger,
    round records and its own accumulators, histories, bases, merged deltas...),
    ``privacy`` (the accountant histories of example-level DP, or client-level DP's
    released rounds; empty without DP), ``rng`` (the server's Python, NumPy and torch
    generator states) and ``config`` (so a resume checks it continues the same
    experiment), plus ``content_sha256`` over that content.

Writing is atomic: the tensor file first (temporary name, fsync, rename), then the
manifest the same way; replacing the manifest is the one commit point, so a reader or a
resume after a kill at any instant sees the previous round's checkpoint or this one.
Tensor files no manifest names are removed afterwards.  Reading checks both digests
before it decodes anything (:mod:`fedtune.results.state_codec`): a truncated, edited or
swapped file is refused with one line naming the file, and decoding JSON and safetensors
builds data only, never runs code.

Clients are not checkpointed: every trainer rebuilds what it needs from the message it
receives, Fed-SB's bases are sent again on resume (``FedtuneStrategy.resync``) and a DP
client's accountant history is given back by the server (:mod:`fedtune.privacy.histories`).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedtune.results.state_codec import decode, encode
from fedtune.results.store import atomic_write_bytes

CHECKPOINT = "checkpoint.json"
TENSORS_GLOB = "checkpoint-*.safetensors"
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted (truncated, edited, of another format)."""


def rng_state() -> dict[str, Any]:
    """The server process's generator states, as plain data (no pickle)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT).is_file()


def save_checkpoint(run_dir: Path, server_round: int, strategy_state: dict[str, Any], config: dict[str, Any],
                    privacy_state: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of ``run_dir`` atomically (module doc); return the manifest's path."""
    run_dir = Path(run_dir)
    content = {"round": server_round, "strategy": strategy_state, "privacy": privacy_state or {},
               "rng": rng_state(), "config": config}
    tree, tensors = encode(content)
    blob = save_tensors(tensors)
    digest = hashlib.sha256(blob).hexdigest()
    name = f"checkpoint-{digest[:16]}.safetensors"
    atomic_write_bytes(run_dir / name, blob, durable=True)
    manifest = {"format": FORMAT, "tensors": name, "tensors_sha256": digest,
                "content_sha256": _digest(tree), "content": tree}
    atomic_write_bytes(run_dir / CHECKPOINT, json.dumps(manifest, allow_nan=False).encode(), durable=True)
    for stale in run_dir.glob(TENSORS_GLOB):
        if stale.name != name:
            stale.unlink(missing_ok=True)
    return run_dir / CHECKPOINT


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The checkpoint's content; ``FileNotFoundError`` if there is none, :class:`CheckpointError`
    (one line) if it is not exactly what fedtune wrote."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"resume: {run_dir} has no {CHECKPOINT} (not a fedtune run directory, "
                                "or it stopped before its first round ended)")
    try:
        manifest = json.loads(path.read_bytes())
        fmt, name, digest, tree = (manifest["format"], manifest["tensors"], manifest["tensors_sha256"],
                                   manifest["content"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"resume: {path} is not a readable checkpoint (truncated or corrupt: "
                              f"{type(exc).__name__}); refusing it") from None
    if fmt != FORMAT:
        raise CheckpointError(f"resume: {path} has checkpoint format {fmt!r}; this fedtune reads {FORMAT}")
    if manifest.get("content_sha256") != _digest(tree):
        raise CheckpointError(f"resume: {path} was changed after it was written (its content digest "
                              "does not match); refusing it")
    tensor_path = path.parent / str(name)
    if Path(str(name)).name != name or not tensor_path.is_file():
        raise CheckpointError(f"resume: {path} names tensor file {name!r}, which {run_dir} lacks; refusing it")
    blob = tensor_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != digest:
        raise CheckpointError(f"resume: {tensor_path} is truncated or was changed (its SHA-256 is not the "
                              f"one in {CHECKPOINT}); refusing it")
    try:
        content = decode(tree, load_tensors(blob))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise CheckpointError(f"resume: {path} cannot be decoded ({exc}); refusing it") from None
    return content


def _digest(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()

