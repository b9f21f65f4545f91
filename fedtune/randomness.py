"""The one place where seeds become random streams.

Convention (docs/methods.md#notation): a stream is identified by the run seed plus a purpose
and integer ids, e.g. ``("sampling", round)`` or ``("batches", round, partition_id)``.
The ids are hashed (SHA-256) into a 63-bit seed, so streams are independent of each
other, identical in every process and on every host, and never depend on global RNG
state.  Tensors are drawn on CPU in fp32 with an explicit ``torch.Generator`` and moved
to their device afterwards, so CPU and GPU runs see bit-identical draws.

Seeded directions (FedKSeed, Ferret) are drawn here too (:func:`draw_directions`,
:func:`add_directions`, :func:`seed_pool`); :mod:`fedtune.directions` owns the sources a
run uses for a fixed seed pool (streamed, or a per-process in-memory bank of the same
rows, filled through :func:`fill_directions`), so this module stays the only place where
a seed becomes a tensor.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Union

import numpy as np
import torch

Key = Union[int, str]


def derive_seed(seed: int, *keys: Key) -> int:
    """Stable 63-bit seed for ``(seed, *keys)``."""
    text = "/".join([str(int(seed)), *(str(k) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_generator(seed: int, *keys: Key) -> torch.Generator:
    """CPU ``torch.Generator`` for the stream ``(seed, *keys)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def numpy_rng(seed: int, *keys: Key) -> np.random.Generator:
    """NumPy generator for the stream ``(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def seed_torch(seed: int, *keys: Key) -> None:
    """Seed torch's global RNG (dropout, peft init) for the stream ``(seed, *keys)``."""
    torch.manual_seed(derive_seed(seed, *keys))


# ---------------------------------------------------------------------------------------
# Seeded directions (FedKSeed arXiv 2312.06353, Ferret arXiv 2409.06277; docs/methods.md#notation)
#
# A *direction* ``z(s) ∈ R^n`` is one flat fp32 draw of length ``n`` from a CPU
# ``torch.Generator`` seeded with ``s``.  For a model, ``n = Σ numel`` of the tuned
# parameters concatenated in canonical (sorted-name) order, and parameter ``i`` reads
# its slice of ``z``; so the draw never depends on device, dtype or process.  Kinds:
# ``gaussian`` (N(0, 1) per coordinate) and ``uniform`` (U(−1/√n, 1/√n): the N(0, 1)
# truncated to ±1/√n used by Ferret, up to an O(1/n) density variation; ‖z‖ ≤ 1 and
# second moment ρ = 1/(3n)).
DIRECTION_KINDS = ("gaussian", "uniform")
_CHUNK_FLOATS = 1 << 22  # rows per chunk = this / n (16 MiB of fp32 scratch)


def seed_pool(seed: int, count: int, *keys: Key) -> torch.Tensor:
    """``count`` candidate seeds (int64) for the stream ``(seed, *keys, j)``, j < count."""
    return torch.tensor([derive_seed(seed, *keys, j) for j in range(count)], dtype=torch.int64)


def second_moment(kind: str, numel: int) -> float:
    """ρ = E[z_i²] of one coordinate of a direction of length ``numel``."""
    return 1.0 if kind == "gaussian" else 1.0 / (3.0 * numel)


def fill_directions(rows: Iterable[torch.Tensor], seeds: Iterable[int], kind: str = "gaussian") -> None:
    """Write ``z(s)`` into each row (a contiguous 1-D fp32 view whose length is ``n``).

    The single implementation of the convention: one CPU generator, re-seeded per row.
    """
    if kind not in DIRECTION_KINDS:
        raise ValueError(f"kind: unknown direction kind {kind!r}; accepted: {', '.join(DIRECTION_KINDS)}")
    gen = torch.Generator(device="cpu")
    for row, s in zip(rows, seeds):
        gen.manual_seed(int(s))
        if kind == "gaussian":
            torch.randn(row.numel(), generator=gen, out=row)
        else:
            bound = 1.0 / math.sqrt(row.numel())
            row.uniform_(-bound, bound, generator=gen)


def draw_directions(seeds: torch.Tensor | list[int], numel: int, kind: str = "gaussian",
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``z(s)`` for each seed ``s``: a ``(len(seeds), numel)`` CPU fp32 tensor.

    One generator is re-seeded per row (no allocation per seed); ``out`` is filled in
    place when given, so a caller can reuse one scratch buffer across calls.
    """
    seeds = [int(s) for s in seeds]
    if out is None:
        out = torch.empty(len(seeds), numel, dtype=torch.float32)
    fill_directions(out, seeds, kind)
    return out


def add_directions(target: torch.Tensor, seeds: torch.Tensor | list[int], coeffs: torch.Tensor,
                   kind: str = "gaussian", alpha: float = 1.0) -> torch.Tensor:
    """``target += alpha · Σ_j coeffs[j] · z(seeds[j])`` in place (``target`` is flat fp32).

    The vectorised "replay": seeds with a zero coefficient are skipped, the others are
    drawn in chunks into one reused ``(rows, n)`` buffer and applied with one
    matrix-vector product per chunk (O(K·n) RNG, no per-seed Python arithmetic).
    """
    coeffs = torch.as_tensor(coeffs, dtype=torch.float32).reshape(-1)
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
    keep = coeffs != 0
    seeds, coeffs = seeds[keep], coeffs[keep] * alpha
    numel = target.numel()
    rows = max(1, min(len(seeds), _CHUNK_FLOATS // max(numel, 1)))
    buf = torch.empty(rows, numel, dtype=torch.float32)
    for start in range(0, len(seeds), rows):
        stop = min(start + rows, len(seeds))
        block = draw_directions(seeds[start:stop], numel, kind, out=buf[: stop - start])
        target.add_(coeffs[start:stop] @ block)
    return target
