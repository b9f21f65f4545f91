"""The ``experiment=`` presets: each published setup composes as published, and runs.

As published they need the Hugging Face hub and a GPU.  Here each one is composed with
``model.path`` and ``dataset.path`` pointed at local stand-ins of the same kind and format
(a tiny random Llama checkpoint, a data file with the experiment's own column names), on
the CPU.  The composed config must keep the published settings; then one round runs through
the real ServerApp and ClientApps in process, scaled to a CPU test (the overrides are
listed in ``SCALED`` and ``COMMON``: clients, rounds, seeds, local steps, the test carve of a
160-example stand-in, which is one table (so an experiment's hub configuration and named test
split are cleared), and evaluation size only).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from data_testing import one_torch_thread, tiny_llama  # noqa: F401  (fixtures)
from hf_testing import write_dataset
from method_testing import LocalGrid, task_identity  # noqa: F401  (fixture)
from fedtune.config import CONFIG_DIR, compose
from fedtune.results.store import read_metrics

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# What each experiment sets, as its paper or template publishes it (checked on the composed config).
PUBLISHED = {
    "flowertune_general_nlp": {"strategy.name": "fedavg_lora", "model.quantization": "4bit",
                               "model.dtype": "bfloat16", "model.gradient_checkpointing": True,
                               "model.lora.rank": 32, "model.lora.alpha": 64.0, "federation.num_clients": 20,
                               "federation.fraction": 0.1, "num_rounds": 200, "train.lr": 5e-5,
                               "train.lr_schedule": "cosine", "train.lr_min": 1e-6, "partition.kind": "iid",
                               "dataset.path": "flwrlabs/alpaca-gpt4"},
    "fedkseed_dolly": {"strategy.name": "fedkseed", "strategy.num_seeds": 4096, "strategy.local_steps": 200,
                       "strategy.lr": 3e-7, "strategy.eps": 5e-4, "federation.num_clients": 200,
                       "federation.fraction": 0.05, "num_rounds": 60, "partition.alpha": 0.5,
                       "dataset.heldout": ["summarization"], "dataset.path": "databricks/databricks-dolly-15k"},
    "ferret_dolly": {"strategy.name": "ferret", "strategy.num_seeds": 200, "strategy.server_lr": 10.0,
                     "train.lr": 1e-4, "train.optimizer": "sgd", "train.local_steps": 10, "num_rounds": 12,
                     "federation.num_clients": 200, "dataset.path": "databricks/databricks-dolly-15k"},
    "fed_sb_metamath": {"strategy.name": "fed_sb", "strategy.rank": 200, "federation.num_clients": 25,
                        "num_rounds": 1, "train.lr": 1e-4, "dataset.path": "meta-math/MetaMathQA",
                        "dataset.format": "prompt_completion"},
    "one_byte_gsm8k": {"strategy.name": "one_byte", "strategy.local_steps": 30, "strategy.batch_size": 64,
                       "strategy.eps": 1e-3, "strategy.lr": 3.3333e-6, "strategy.trainable": "all",
                       "model.dtype": "float16", "federation.num_clients": 2,
                       "federation.fraction": 1.0, "num_rounds": 300, "dataset.path": "openai/gsm8k",
                       "dataset.subset": "main", "dataset.test_split": "test"},
}
# Scaled to a CPU test (the only overrides besides the stand-in paths and runtime.device).
SCALED = {
    "flowertune_general_nlp": ["federation.num_clients=4", "federation.fraction=0.5", "train.local_steps=2",
                               "train.batch_size=4"],
    "fedkseed_dolly": ["federation.num_clients=4", "federation.fraction=0.5", "strategy.num_seeds=16",
                       "strategy.local_steps=4", "partition.min_partition_size=2", "strategy.lr=1e-3"],
    "ferret_dolly": ["federation.num_clients=4", "federation.fraction=0.5", "strategy.num_seeds=8",
                     "train.local_steps=2", "partition.min_partition_size=2"],
    "fed_sb_metamath": ["federation.num_clients=2", "strategy.rank=8", "strategy.init_samples=4", "train.batch_size=4",
                        "train.local_steps=2", "model.lora.target_modules=[q_proj,v_proj,up_proj]"],
    "one_byte_gsm8k": ["strategy.local_steps=4", "strategy.batch_size=4"],
}
COMMON = ["num_rounds=1", "dataset.test_fraction=0.25", "eval.max_examples=4", "eval.max_new_tokens=4", "eval.batch_size=4", "model.max_length=96",
          "runtime.device=cpu", "seed=0"]


def _get(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def stand_in_overrides(name: str, model_dir: Path, root: Path) -> list[str]:
    """The experiment with its model and data paths pointed at local stand-ins of the same kind."""
    published = compose([f"experiment={name}", f"model.path={model_dir}"])
    fields = dataclasses.asdict(published.dataset.fields)
    columns = {k: v for k, v in fields.items() if v != k}
    data = write_dataset(root / f"{name}.jsonl", published.dataset.format, n=160, columns=columns)
    # the stand-in's categories are its own: hold out one of them, as the experiment holds out one of its own
    heldout = ["dataset.heldout=[music]"] if published.dataset.heldout else []
    # the stand-in is one table: no hub configuration to pick and no test split of its own (COMMON carves one)
    one_table = [f"dataset.{key}=''" for key in ("subset", "test_split") if getattr(published.dataset, key)]
    return [f"experiment={name}", f"model.path={model_dir}", f"dataset.path={data}", *heldout, *one_table]


def test_every_experiment_is_listed() -> None:
    assert EXPERIMENTS == sorted(PUBLISHED) == sorted(SCALED)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_as_published_and_runs_on_stand_ins(name: str, tiny_llama: Path, tmp_path: Path,
                                                                task_identity: None) -> None:  # noqa: F811
    from fedtune.flower.server_app import run_server

    published = compose([f"experiment={name}", f"model.path={tiny_llama}"])
    for key, value in PUBLISHED[name].items():
        assert _get(published, key) == value, key
    overrides = [*stand_in_overrides(name, tiny_llama, tmp_path), *COMMON, *SCALED[name]]
    cfg = compose(overrides)
    summary = run_server(LocalGrid(cfg, cfg.federation.num_clients), cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert summary["status"] == "completed" and [int(r["round"]) for r in rows] == [0, 1]
    assert int(rows[1]["num_replies"]) == cfg.federation.clients_per_round and int(rows[1]["num_failures"]) == 0
    assert math.isfinite(float(rows[1]["eval_loss"])) and rows[1]["rouge_l"] != ""
