"""Split the training set among clients with flwr-datasets partitioners.

The partitioners run on an in-memory ``datasets.Dataset`` of (index, label) rows, so
nothing touches the hub, and every process computes the same partition from the seed.
"""

from __future__ import annotations

from fedtune.config import PartitionConfig
from fedtune.errors import ConfigError
from fedtune.randomness import derive_seed


def partition_indices(labels: list[int], cfg: PartitionConfig, num_clients: int, seed: int) -> list[list[int]]:
    """Return, for each partition id, the (sorted) indices of its training examples."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    n = len(labels)
    if num_clients * max(cfg.min_partition_size, 1) > n:
        raise ConfigError(
            f"federation.num_clients: {num_clients} clients × partition.min_partition_size "
            f"{max(cfg.min_partition_size, 1)} exceeds the {n} training examples"
        )
    data = Dataset.from_dict({"idx": list(range(n)), "label": list(labels)})
    columns = [c for c in data.column_names if c != "idx"]
    if cfg.kind != "iid" and cfg.by not in columns:
        raise ConfigError(f"partition.by: unknown column {cfg.by!r}; accepted: {', '.join(columns)}")
    part_seed = derive_seed(seed, "partition") % (2**32)
    if cfg.kind == "iid":
        data = data.shuffle(seed=part_seed)
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif cfg.kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by=cfg.by, alpha=cfg.alpha,
            min_partition_size=cfg.min_partition_size, self_balancing=False, seed=part_seed,
        )
    else:  # one value of `by` per client
        distinct = len(set(data[cfg.by]))
        if distinct != num_clients:
            raise ConfigError(
                f"federation.num_clients must equal the {distinct} distinct values of "
                f"partition.by={cfg.by!r} for partition.kind=label, got {num_clients}"
            )
        partitioner = NaturalIdPartitioner(partition_by=cfg.by)
    partitioner.dataset = data
    try:
        return [sorted(partitioner.load_partition(pid)["idx"]) for pid in range(num_clients)]
    except ValueError as exc:
        raise ConfigError(
            f"partition: {exc} (try a larger partition.alpha or a smaller partition.min_partition_size)"
        ) from None
