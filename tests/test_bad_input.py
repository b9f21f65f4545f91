"""Bad input gets one clear line naming the field and what is accepted."""

from pathlib import Path

import pytest
from cli_testing import fedtune_run

from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.runtime.workspace import Workspace

CASES = [
    ("strategy=fedavg", "strategy: unknown option 'fedavg'; accepted: "),
    ("model=bert_huge", "model: unknown option 'bert_huge'"),
    ("dataset=imagenet", "dataset: unknown option 'imagenet'"),
    ("model.lora.rank=0", "model.lora.rank must be a positive integer, got 0"),
    ("model.lora.rank=-3", "model.lora.rank must be a positive integer, got -3"),
    ("federation.fraction=1.5", "federation.fraction must be in (0, 1], got 1.5"),
    ("federation.fraction=0", "federation.fraction must be in (0, 1], got 0.0"),
    ("federation.num_clients=0", "federation.num_clients must be >= 1, got 0"),
    ("federation.min_clients=12", "federation.min_clients (12) exceeds num_clients (10)"),
    ("num_rounds=0", "num_rounds must be >= 1, got 0"),
    ("train.lr=-1", "train.lr must be a positive number, got -1.0"),
    ("train.optimizer=lion", "train.optimizer: unknown 'lion'; accepted: adamw, sgd"),
    ("partition.kind=shards", "partition.kind: unknown partitioner 'shards'; accepted: iid, dirichlet, label"),
    ("strategy.weighting=median", "strategy.weighting: unknown 'median'; accepted: examples, uniform"),
    ("+strategy.mu=0.1", "strategy.mu is not a known field; accepted: name, weighting"),
    ("federation.num_clients=ten", "federation.num_clients must be an integer, got 'ten'"),
]


@pytest.mark.parametrize("override,message", CASES)
def test_config_errors_name_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(["model=tiny", "dataset=tiny", override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    if override.startswith(("strategy=", "model=", "dataset=")):
        group = override.split("=")[0]
        assert {"strategy": "fedavg_lora", "model": "minilm", "dataset": "bbc_news"}[group] in str(info.value)


def test_missing_data_file() -> None:
    cfg = compose(["model=tiny", "dataset=csv", "dataset.path=/nonexistent/data.csv"])
    with pytest.raises(ConfigError, match=r"^dataset.path: no such file or folder: /nonexistent/data.csv$"):
        Workspace(cfg).partitions()


def test_more_clients_than_data() -> None:
    cfg = compose(["model=tiny", "dataset=tiny", "federation.num_clients=500"])
    with pytest.raises(ConfigError, match=r"federation.num_clients: 500 clients × partition.min_partition_size"):
        Workspace(cfg).partitions()


@pytest.mark.parametrize("override,field,child", [("strategy=nope", "strategy", True),  # the real process exit
                                                  ("model.lora.rank=0", "model.lora.rank", False),
                                                  ("dataset=csv", "dataset.path", False),
                                                  ("strategy=fed_sb strategy.rank=1000", "strategy.rank", False)])
def test_cli_exits_nonzero_with_one_line_and_no_run_dir(tmp_path: Path, override: str, field: str, child: bool) -> None:
    run_dir = tmp_path / "run"
    proc = fedtune_run(["model=tiny", "dataset=tiny", *override.split(), f"hydra.run.dir={run_dir}"], tmp_path, child)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedtune: error:")]
    assert len(errors) == 1 and field in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()
