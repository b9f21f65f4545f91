"""Seeded sampling by partition id and the seed → stream convention."""

import subprocess
import sys

import pytest
import torch

from fedtune.randomness import derive_seed, torch_generator
from fedtune.sampling import sample_partitions


def test_same_seed_same_clients_every_round() -> None:
    runs = [[sample_partitions(7, r, range(50), 10) for r in range(1, 6)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert all(len(set(s)) == 10 and all(0 <= p < 50 for p in s) for s in runs[0])
    assert len({tuple(s) for s in runs[0]}) > 1  # rounds differ


def test_sampling_ignores_order_of_ids_and_depends_on_seed() -> None:
    ids = list(range(30))
    assert sample_partitions(1, 3, ids, 5) == sample_partitions(1, 3, reversed(ids), 5)
    assert sample_partitions(1, 3, ids, 5) != sample_partitions(2, 3, ids, 5)


def test_sampling_bounds() -> None:
    assert sample_partitions(0, 1, range(4), 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        sample_partitions(0, 1, range(4), 5)


def test_streams_are_stable_across_processes() -> None:
    here = torch.randn(5, generator=torch_generator(3, "sampling", 2)).tolist()
    code = ("from fedtune.randomness import torch_generator; import torch;"
            "print(torch.randn(5, generator=torch_generator(3, 'sampling', 2)).tolist())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert str(here) == there.strip()
    assert derive_seed(3, "a", 1) != derive_seed(3, "a", 2) != derive_seed(4, "a", 1)
