"""Seeded client sampling by partition id.

Flower's ``sample_nodes`` draws random node ids, which change from run to run and
between simulation and deployment.  fedtune instead samples *partition ids* from the
run's seeded stream ``("sampling", round)`` over the sorted ids, so the same seed
trains the same clients in every round, in simulation and across real machines.
Nodes that cannot name their partition (plain Flower ClientApps, no roll-call handler)
are numbered by their rank among the sorted node ids (:mod:`fedtune.flower.nodes`), so
the same stream samples over sorted node ids: reproducible only for the same node ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedtune.randomness import numpy_rng


def sample_partitions(seed: int, server_round: int, partition_ids: Iterable[int], k: int) -> list[int]:
    """Return ``k`` distinct partition ids (sorted) for ``server_round``."""
    pool = sorted(set(int(p) for p in partition_ids))
    if not 1 <= k <= len(pool):
        raise ValueError(f"cannot sample {k} clients from {len(pool)} available")
    rng = numpy_rng(seed, "sampling", server_round)
    return sorted(int(p) for p in rng.choice(pool, size=k, replace=False))
