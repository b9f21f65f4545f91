"""Seeded directions of a fixed seed pool: streamed, or held in a per-process bank.

FedKSeed (Qin et al., arXiv 2312.06353, docs/methods.md#fedkseed) and Ferret (Shu et al., arXiv
2409.06277, §6) fix a pool of K seeds for the whole run.  Rebuilding the model
``θ = θ0 + α Σ_j c_j z(s_j)`` by regenerating every ``z(s_j)`` costs K·d random draws
each time; for a fixed pool the K×d matrix ``Z`` of directions can instead be generated
once per process and every later rebuild, sync or ZO step reads it:

* :class:`SeedDirections` streams: rows are regenerated on demand
  (:func:`~fedtune.randomness.add_directions`), O(K·d) RNG per rebuild, O(d) memory;
* :class:`DirectionBank` keeps ``Z`` (``4·K·d`` bytes), filled lazily, a row the first
  time its seed has a nonzero coefficient or is read; its rows are bit-identical to
  :func:`~fedtune.randomness.draw_directions` (same generator convention, §1.2), so
  only the summation order of a rebuild changes (fp32 rounding);
* :func:`directions_for` picks one: a bank when ``4·K·d ≤ cache_mb`` MiB, cached in this
  process under (seed pool, layout, kind) so the server and each Ray actor build it once
  per run, not per round or client (least recently used banks are dropped to stay under
  the cap); the streaming source otherwise.

A pool may be split into *segments* (Ferret's blocks): seed ``seeds[j, l]`` drives the
slice ``[a_l, b_l)`` of row j, and coefficients are ``(K, L)``.  FedKSeed has one segment.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from fedtune.randomness import DIRECTION_KINDS, add_directions, draw_directions, fill_directions

Segments = list[tuple[int, int]]
MIB = 1 << 20
AXPY_OVERHEAD = 25_000  # fixed cost of one row axpy, in floats streamed (~10 µs)


class SeedDirections:
    """Directions ``z(seeds[j, l])`` of a fixed pool, regenerated on every use (streaming).

    Parameters
    ----------
    seeds : ``(K,)`` or ``(K, L)`` int64 stream seeds (one column per segment).
    kind : ``gaussian`` or ``uniform`` (see :mod:`fedtune.randomness`).
    segments : ``L`` flat ``(start, stop)`` ranges tiling ``[0, numel)``; default one.
    numel : the direction length when ``segments`` is not given.
    """

    banked = False

    def __init__(self, seeds: torch.Tensor, kind: str, segments: Segments | None = None,
                 numel: int | None = None) -> None:
        if kind not in DIRECTION_KINDS:
            raise ValueError(f"kind: unknown direction kind {kind!r}; accepted: {', '.join(DIRECTION_KINDS)}")
        seeds = torch.as_tensor(seeds, dtype=torch.int64)
        self.seeds = seeds.reshape(seeds.shape[0], -1).contiguous()
        if segments is None:
            if numel is None:
                raise ValueError("numel: give the direction length or the segments")
            segments = [(0, int(numel))]
        self.segments = [(int(a), int(b)) for a, b in segments]
        if self.seeds.shape[1] != len(self.segments):
            raise ValueError(f"seeds: {self.seeds.shape[1]} columns for {len(self.segments)} segments")
        self.kind, self.num_seeds, self.numel = kind, self.seeds.shape[0], self.segments[-1][1]
        self._row: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Size of the full K×d fp32 matrix of directions."""
        return 4 * self.num_seeds * self.numel

    def rows(self, indices: torch.Tensor, segment: int = 0) -> torch.Tensor:
        """``(len(indices), b − a)`` fp32: segment ``segment`` of the rows ``indices`` (a new tensor)."""
        a, b = self.segments[segment]
        return draw_directions(self.seeds[torch.as_tensor(indices, dtype=torch.long), segment], b - a, self.kind)

    def row(self, j: int) -> torch.Tensor:
        """The whole row ``j`` (length ``numel``); read-only, valid until the next call."""
        if self._row is None:
            self._row = torch.empty(1, self.numel, dtype=torch.float32)
        for (a, b), s in zip(self.segments, self.seeds[j].tolist()):
            fill_directions([self._row[0, a:b]], [s], self.kind)
        return self._row[0]

    def add(self, target: torch.Tensor, coeffs: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``target += alpha · Σ_{j,l} coeffs[j, l] z_{j,l}`` in place (``coeffs`` is ``(K,)`` or ``(K, L)``)."""
        coeffs = torch.as_tensor(coeffs, dtype=torch.float32).reshape(self.num_seeds, len(self.segments))
        for l, (a, b) in enumerate(self.segments):
            self._add_segment(target[a:b], l, coeffs[:, l], alpha)
        return target

    def _add_segment(self, target: torch.Tensor, segment: int, coeffs: torch.Tensor, alpha: float) -> None:
        add_directions(target, self.seeds[:, segment], coeffs, self.kind, alpha=alpha)


class DirectionBank(SeedDirections):
    """:class:`SeedDirections` backed by the K×d matrix ``Z``, each row generated once.

    Rows are filled the first time they are needed; :meth:`add` applies the nonzero
    coefficients of a segment with one axpy per row when few are nonzero (a sync with
    ``a − a_last`` on long rows: fewer than about K/3), else with one matrix-vector
    product over all rows.
    """

    banked = True

    def __init__(self, seeds: torch.Tensor, kind: str, segments: Segments | None = None,
                 numel: int | None = None) -> None:
        super().__init__(seeds, kind, segments, numel)
        self.matrix = torch.empty(self.num_seeds, self.numel, dtype=torch.float32)  # pages committed as filled
        self.filled = np.zeros(self.num_seeds, dtype=bool)  # numpy: cheap per-row checks in ZO steps
        self._defined = np.zeros(self.num_seeds, dtype=bool)  # filled, or zeroed for a full product

    def fill(self, indices: torch.Tensor | list[int]) -> None:
        """Generate the rows ``indices`` not generated yet."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        missing = np.unique(indices[~self.filled[indices]]).tolist()
        if not missing:
            return
        for l, (a, b) in enumerate(self.segments):
            fill_directions((self.matrix[j, a:b] for j in missing), self.seeds[missing, l].tolist(), self.kind)
        self.filled[missing] = True
        self._defined[missing] = True

    def rows(self, indices: torch.Tensor, segment: int = 0) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long)
        self.fill(indices)
        a, b = self.segments[segment]
        return self.matrix[indices, a:b]

    def row(self, j: int) -> torch.Tensor:
        if not self.filled[j]:
            self.fill([j])
        return self.matrix[j]

    def _add_segment(self, target: torch.Tensor, segment: int, coeffs: torch.Tensor, alpha: float) -> None:
        nonzero = coeffs.nonzero().flatten()
        if not len(nonzero):
            return
        self.fill(nonzero)
        a, b = self.segments[segment]
        scaled = coeffs * alpha
        # an axpy reads a row and reads/writes the target (3·d_l floats) plus a fixed Python/dispatch cost
        # (~AXPY_OVERHEAD floats); the product reads all K rows once
        if len(nonzero) * (3 * (b - a) + AXPY_OVERHEAD) < self.num_seeds * (b - a):
            for j, c in zip(nonzero.tolist(), scaled[nonzero].tolist()):
                target.add_(self.matrix[j, a:b], alpha=c)
            return
        undefined = np.flatnonzero(~self._defined)
        if len(undefined):  # rows never generated take part with coefficient 0: make them 0, not garbage
            self.matrix.index_fill_(0, torch.from_numpy(undefined), 0.0)
            self._defined[undefined] = True
        # the product goes to a fresh buffer first: BLAS rounds differently with the output's
        # alignment, and a resumed run's θ (read from a checkpoint) sits elsewhere in memory
        target.add_(torch.mv(self.matrix[:, a:b].t(), scaled))


_BANKS: OrderedDict[tuple, DirectionBank] = OrderedDict()


def directions_for(seeds: torch.Tensor, kind: str, *, cache_mb: float, segments: Segments | None = None,
                   numel: int | None = None) -> SeedDirections:
    """This process's direction source for a pool: its cached bank if ``4·K·d ≤ cache_mb`` MiB.

    Banks are cached under (seeds, segments, kind); making room for a new one drops the
    least recently used until all banks together fit in ``cache_mb``.  Above the cap (or
    with ``cache_mb = 0``) the streaming :class:`SeedDirections` is returned.
    """
    source = SeedDirections(seeds, kind, segments, numel)
    cap = cache_mb * MIB
    if source.nbytes > cap:
        return source
    key = (hashlib.sha256(source.seeds.numpy().tobytes()).hexdigest(), tuple(source.segments), kind)
    if key in _BANKS:
        _BANKS.move_to_end(key)
        return _BANKS[key]
    while _BANKS and sum(b.nbytes for b in _BANKS.values()) + source.nbytes > cap:
        _BANKS.popitem(last=False)
    bank = _BANKS[key] = DirectionBank(source.seeds, kind, source.segments)
    return bank


def clear_banks() -> None:
    """Drop every cached bank of this process (tests, benchmarks)."""
    _BANKS.clear()


def cached_banks() -> list[DirectionBank]:
    """The banks this process holds, least recently used first."""
    return list(_BANKS.values())
