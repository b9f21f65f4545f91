"""Partitioning through flwr-datasets: deterministic from the seed, disjoint, covering."""

import pytest

from fedtune.config import PartitionConfig
from fedtune.data.partition import partition_indices
from fedtune.errors import ConfigError

LABELS = [i % 4 for i in range(400)]


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partitions_are_disjoint_cover_and_repeat_with_the_seed(kind: str) -> None:
    cfg = PartitionConfig(kind=kind, alpha=0.5, min_partition_size=5)
    parts = partition_indices(LABELS, cfg, 8, seed=3)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(400))
    assert all(len(p) >= 5 for p in parts)
    assert parts == partition_indices(LABELS, cfg, 8, seed=3)
    assert parts != partition_indices(LABELS, cfg, 8, seed=4)


def test_dirichlet_skews_labels_and_iid_does_not() -> None:
    def max_share(parts: list[list[int]]) -> float:
        return max(max(sum(LABELS[i] == c for i in p) for c in range(4)) / len(p) for p in parts)

    skewed = partition_indices(LABELS, PartitionConfig(kind="dirichlet", alpha=0.1, min_partition_size=2), 8, 0)
    iid = partition_indices(LABELS, PartitionConfig(kind="iid"), 8, 0)
    assert max_share(skewed) > 0.8 and max_share(iid) < 0.5


def test_label_partitioner_gives_one_label_per_client() -> None:
    parts = partition_indices(LABELS, PartitionConfig(kind="label"), 4, 0)
    assert sorted({LABELS[i] for i in p}.pop() for p in parts) == [0, 1, 2, 3]
    assert all(len({LABELS[i] for i in p}) == 1 for p in parts)
    with pytest.raises(ConfigError, match="federation.num_clients must equal the 4 distinct values"):
        partition_indices(LABELS, PartitionConfig(kind="label"), 5, 0)


@pytest.mark.parametrize("num_clients", [1, 7, 64, 399])
@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_one_pass_partitions_equal_load_partition_per_client(kind: str, num_clients: int) -> None:
    """The shortcut of ``all_partitions`` gives what flwr-datasets' ``load_partition`` gives."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    from fedtune.data.partition import all_partitions

    labels = [(i * 7) % 5 for i in range(1003)]  # not a multiple of any num_clients here: uneven shards
    data = Dataset.from_dict({"idx": list(range(len(labels))), "label": labels}).shuffle(seed=11)  # idx != row
    if kind == "iid":
        make = lambda: IidPartitioner(num_partitions=num_clients)  # noqa: E731
    else:
        make = lambda: DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=0.5,  # noqa: E731
                                            min_partition_size=0, self_balancing=False, seed=11)
    fast, slow = make(), make()
    fast.dataset = slow.dataset = data
    expected = [sorted(slow.load_partition(pid)["idx"]) for pid in range(num_clients)]
    assert all_partitions(fast, data["idx"], num_clients) == expected
