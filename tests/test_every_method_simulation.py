"""Every registered method runs end to end in a real Ray simulation on a classifier through
``model=hf dataset=hf`` (a user's own checkpoint and data files).

One case per registered method (peft's ``TEST_CASES`` style, read from the registry: a
method's ``quick`` overrides make it fast on the tiny model).  The classifier is the tiny
BERT of ``model=tiny`` written with ``save_pretrained`` and loaded back through
``model=hf``, on ``tiny_topics.jsonl`` read as a ``text_label`` file (the default method's
case is conftest's shared same-seed run of ``model=tiny dataset=tiny``); each run must
complete with all clients replying, its global eval loss must fall, its uplink payload must
be metered, and (methods whose export declares a loader) its exported ``adapter/`` must
reload to the final accuracy.  On a causal LM (a tiny random Llama saved with
``save_pretrained``, Alpaca-style JSON Lines) every method completes a Ray round through the
same check as ``simulations/every_method_hf.py`` (its ``overrides`` and ``check``), which
also runs alone and writes a table.
"""

import csv
import json
from pathlib import Path
from types import ModuleType

import pytest
from conftest import SIMULATION_OVERRIDES, load_script, on_shared_ray

from fedtune.config import compose
from fedtune.data.sources import TINY_FILE
from fedtune.evaluation import evaluate
from fedtune.registry import METHODS, MODELS
from fedtune.runtime.workspace import Workspace
from fedtune.runtime.simulation import simulate

pytestmark = pytest.mark.simulation
SEED = 2
BASE = ["federation.num_clients=3", "num_rounds=3", f"seed={SEED}", "train.lr=1e-2"]  # model=tiny's lr
DEFAULT = compose(SIMULATION_OVERRIDES.split()).strategy.name  # its run is conftest's shared same-seed run


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model=tiny``'s classifier (seed 2) and tokenizer, saved as a user's checkpoint folder."""
    from fedtune.models.zoo import TinyModelConfig, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    MODELS.get("tiny").build(TinyModelConfig(), 4, SEED).save_pretrained(str(folder))
    load_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def every_method_hf() -> ModuleType:
    return load_script("every_method_hf")


@pytest.fixture(scope="module")
def llama_and_alpaca(tmp_path_factory: pytest.TempPathFactory, every_method_hf: ModuleType) -> tuple[Path, Path]:
    """The script's own inputs: its tiny Llama checkpoint and Alpaca file."""
    return every_method_hf.write_inputs(tmp_path_factory.mktemp("every_method_hf"))


def _overrides(name: str, tiny_bert: Path, ray_address: str = "") -> list[str]:
    if name == DEFAULT:
        return SIMULATION_OVERRIDES.split()
    return [*on_shared_ray(ray_address).split(), "model=hf", f"model.path={tiny_bert}", "model.max_length=32",
            "model.lora.rank=4", "model.lora.alpha=8",
            "dataset=hf", f"dataset.path={TINY_FILE}", "dataset.format=text_label", *BASE, f"strategy={name}",
            *METHODS.get(name).quick]


@pytest.mark.parametrize("name", METHODS.names())
def test_method_runs_end_to_end_and_learns(name: str, tmp_path: Path, request: pytest.FixtureRequest,
                                           tiny_bert: Path, ray_address: str) -> None:
    cfg = compose(_overrides(name, tiny_bert, ray_address))
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
    uploaded: dict[tuple[str, str], int] = {}  # (round, client) -> train payload up, over its messages
    for r in train_up:
        key = (r["server_round"], r["partition_id"])
        uploaded[key] = uploaded.get(key, 0) + int(r["payload_bytes"])
    assert len(uploaded) == clients * rounds and all(n > 0 for n in uploaded.values())
    summary_file = json.loads((run_dir / "summary.json").read_text())
    assert summary_file["strategy"] == name
    load = METHODS.get(name).export.load
    if load is not None:  # the exported adapter (+ whatever the method adds) is the evaluated model
        ws = Workspace(cfg)
        model = load(MODELS.get(cfg.model.name).build(cfg.model, ws.data.num_labels, cfg.seed), run_dir / "adapter")
        _, acc = evaluate(model, ws.encoded("test"), 64, ws.device)
        assert acc == pytest.approx(summary_file["final_accuracy"], abs=5e-7)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_completes_a_ray_round_on_a_causal_lm(name: str, tmp_path: Path, every_method_hf: ModuleType,
                                                     llama_and_alpaca: tuple[Path, Path], ray_address: str) -> None:
    model_dir, data_file = llama_and_alpaca
    args = [*every_method_hf.overrides(name, model_dir, data_file, METHODS.get(name).quick),
            *on_shared_ray(ray_address).split()]
    result = every_method_hf.check(name, args, tmp_path)
    assert result["passed"], result
