"""Every registered method runs end to end in a real Ray simulation on the tiny model.

One case per registered method (peft's ``TEST_CASES`` style, read from the registry: a
method's ``quick`` overrides make it fast on the tiny model); each run must complete with
all clients replying, its global eval loss must fall, its uplink payload must be metered,
and (methods whose export declares a loader) its exported ``adapter/`` must reload to the
final accuracy.
"""

import csv
import json
from pathlib import Path

import pytest
from conftest import SIMULATION_OVERRIDES

from fedtune.config import compose
from fedtune.evaluation import evaluate
from fedtune.registry import METHODS, MODELS
from fedtune.runtime.workspace import Workspace
from fedtune.runtime.simulation import simulate

pytestmark = pytest.mark.simulation
BASE = ["model=tiny", "dataset=tiny", "federation.num_clients=3", "num_rounds=3", "seed=2"]
DEFAULT = compose(SIMULATION_OVERRIDES.split()).strategy.name  # its run is conftest's shared same-seed run


def _overrides(name: str) -> list[str]:
    if name == DEFAULT:
        return SIMULATION_OVERRIDES.split()
    return [*BASE, f"strategy={name}", *METHODS.get(name).quick]


@pytest.mark.parametrize("name", METHODS.names())
def test_method_runs_end_to_end_and_learns(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    cfg = compose(_overrides(name))
    if name == DEFAULT:
        run_dir = request.getfixturevalue("same_seed_runs")[0]
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        run_dir = tmp_path
        summary = simulate(cfg, run_dir)
    clients, rounds = cfg.federation.num_clients, cfg.num_rounds
    assert summary["status"] == "completed" and summary["client_failures"] == 0
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["num_replies"]) for r in rows[1:]] == [clients] * rounds
    assert float(rows[-1]["eval_loss"]) < float(rows[0]["eval_loss"]), rows
    with open(run_dir / "ledger.csv", newline="") as fh:
        train_up = [r for r in csv.DictReader(fh) if r["kind"] == "train" and r["direction"] == "up"]
    assert len(train_up) == clients * rounds and all(int(r["payload_bytes"]) > 0 for r in train_up)
    summary_file = json.loads((run_dir / "summary.json").read_text())
    assert summary_file["strategy"] == name
    load = METHODS.get(name).export.load
    if load is not None:  # the exported adapter (+ whatever the method adds) is the evaluated model
        ws = Workspace(cfg)
        model = load(MODELS.get("tiny").build(cfg.model, ws.data.num_labels, cfg.seed), run_dir / "adapter")
        _, acc = evaluate(model, ws.encoded("test"), 64, ws.device)
        assert acc == pytest.approx(summary_file["final_accuracy"], abs=5e-7)


@pytest.fixture(scope="module")
def causal_lm_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Llama checkpoint and an Alpaca file, as a user's own model and data."""
    from hf_testing import save_tiny_model, write_dataset

    root = tmp_path_factory.mktemp("causal_lm")
    return save_tiny_model(root / "llama", "llama"), write_dataset(root / "alpaca.jsonl", "alpaca", n=32)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_completes_a_ray_round_on_a_causal_lm_through_hf(name: str, causal_lm_files: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    """``model=hf dataset=hf``: one Ray round of each method on a tiny Llama with Alpaca data,
    every client replying, generation metrics written."""
    model_dir, data_file = causal_lm_files
    cfg = compose(["model=hf", f"model.path={model_dir}", "model.max_length=64", "dataset=hf",
                   f"dataset.path={data_file}", "dataset.format=alpaca", "partition.kind=iid",
                   "federation.num_clients=2", "num_rounds=1", "train.local_steps=1", "train.batch_size=4",
                   "eval.max_examples=4", "eval.max_new_tokens=2", "runtime.device=cpu", "seed=0",
                   f"strategy={name}", *METHODS.get(name).quick])
    summary = simulate(cfg, tmp_path)
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert summary["status"] == "completed" and summary["client_failures"] == 0
    assert [int(r["num_replies"]) for r in rows[1:]] == [2] and rows[1]["rouge_l"] != ""
    with open(tmp_path / "ledger.csv", newline="") as fh:
        up = [r for r in csv.DictReader(fh) if r["kind"] == "train" and r["direction"] == "up"]
    assert len(up) == 2 and all(int(r["payload_bytes"]) > 0 for r in up)
