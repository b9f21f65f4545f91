"""Split the training set among clients with flwr-datasets partitioners.

The partitioners run on an in-memory ``datasets.Dataset`` of (index, label, other named
columns) rows, so nothing touches the hub, and every process computes the same partition
from the seed.  ``partition.by`` names the column: ``label``, or one of the dataset's own
(``dataset=hf``: ``category``, a task id, ...), whose values are coded as integers in
sorted order.  A client left with no examples is a one-line error, before Ray starts.
"""

from __future__ import annotations

from typing import Any

from fedtune.config.sections import PartitionConfig
from fedtune.errors import ConfigError
from fedtune.randomness import derive_seed


def _codes(values: list[Any]) -> list[int]:
    index = {v: i for i, v in enumerate(sorted(set(values), key=str))}
    return [index[v] for v in values]


def partition_indices(labels: list[int], cfg: PartitionConfig, num_clients: int, seed: int,
                      columns: dict[str, list[Any]] | None = None) -> list[list[int]]:
    """Return, for each partition id, the (sorted) indices of its training examples.

    ``columns``: the training split's other named columns, each as long as ``labels``."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    n = len(labels)
    if num_clients * max(cfg.min_partition_size, 1) > n:
        raise ConfigError(
            f"federation.num_clients: {num_clients} clients × partition.min_partition_size "
            f"{max(cfg.min_partition_size, 1)} exceeds the {n} training examples"
        )
    named = {"label": list(labels), **{k: v for k, v in (columns or {}).items() if k not in ("idx", "label")}}
    if cfg.kind != "iid" and cfg.by not in named:
        raise ConfigError(f"partition.by: unknown column {cfg.by!r}; accepted: {', '.join(named)}")
    table = {"idx": list(range(n))}
    if cfg.kind != "iid":
        table[cfg.by] = named[cfg.by] if cfg.by == "label" else _codes(named[cfg.by])
    data = Dataset.from_dict(table)
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
        parts = all_partitions(partitioner, data["idx"], num_clients)
    except ValueError as exc:
        raise ConfigError(
            f"partition: {exc} (try a larger partition.alpha or a smaller partition.min_partition_size)"
        ) from None
    empty = [pid for pid, p in enumerate(parts) if not p]
    if empty:
        raise ConfigError(f"partition: client {empty[0]} gets no examples ({len(empty)} of {num_clients} clients "
                          f"are empty with partition.kind={cfg.kind}); raise partition.min_partition_size or "
                          "partition.alpha, or use fewer federation.num_clients")
    return parts


def all_partitions(partitioner: Any, idx: list[int], num_clients: int) -> list[list[int]]:
    """Every partition's sorted example indices, as ``partitioner.load_partition`` gives them.

    Why not just call ``load_partition`` for each client: each call builds a ``datasets``
    view, which at thousands of clients dominates start-up in every process that
    partitions (the server and each client actor, ``simulations/bench_scale.py``).  ``idx`` is the ``idx``
    column in the order the partitioner sees the rows.  IID shards are cut as
    ``Dataset.shard(n, i, contiguous=True)`` cuts them; Dirichlet partitions are read from
    the partitioner's own assignment once it is drawn; anything else (and a partitioner
    without that assignment) goes through ``load_partition``.  ``tests/test_partition.py``
    checks both shortcuts against ``load_partition``.
    """
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if isinstance(partitioner, IidPartitioner):
        div, mod = divmod(len(idx), num_clients)
        starts = [div * i + min(i, mod) for i in range(num_clients + 1)]
        return [sorted(idx[starts[i]:starts[i + 1]]) for i in range(num_clients)]
    if isinstance(partitioner, DirichletPartitioner):
        partitioner.load_partition(0)  # draws (and checks) every partition at once
        assigned = getattr(partitioner, "_partition_id_to_indices", None)
        if isinstance(assigned, dict) and len(assigned) == num_clients:
            return [sorted(idx[row] for row in assigned[pid]) for pid in range(num_clients)]
    return [sorted(partitioner.load_partition(pid)["idx"]) for pid in range(num_clients)]
