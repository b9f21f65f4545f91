"""End to end: a real Flower simulation on Ray with the tiny model (issue 2's acceptance).

One session-scoped pair of runs (same seed, conftest.py) serves several assertions, so
the suite pays for two Ray start-ups, not one per test.
"""

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from conftest import SIMULATION_OVERRIDES as OVERRIDES
from conftest import without_control

from fedtune.config import compose
from fedtune.results.store import METRIC_COLUMNS, TIMING_COLUMNS

pytestmark = pytest.mark.simulation
P_LORA_TINY = 2 * 2 * 4 * (32 + 32)  # layers × (query, value) × r × (m + n)
HEAD_TINY = 4 * 32 + 4  # 4 topics × hidden 32 + bias


@pytest.fixture
def runs(same_seed_runs: list[Path]) -> list[Path]:
    return same_seed_runs  # conftest.py: two runs of OVERRIDES, same seed


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_learns_and_writes_results(runs: list[Path]) -> None:
    run_dir = runs[0]
    rows = _rows(run_dir)
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert list(rows[0]) == METRIC_COLUMNS
    lr = float(OmegaConf.load(run_dir / "config.yaml").train.lr)  # train.lr_schedule=constant: every round at lr
    assert rows[0]["lr"] == "" and [float(r["lr"]) for r in rows[1:]] == [lr] * 3
    assert float(rows[-1]["eval_accuracy"]) > float(rows[0]["eval_accuracy"])
    assert all(int(r["num_replies"]) == 4 and int(r["num_failures"]) == 0 for r in rows[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["strategy"] == "fedavg_lora"
    assert summary["final_accuracy"] == pytest.approx(float(rows[-1]["eval_accuracy"]))
    assert "model" in (run_dir / "config.yaml").read_text()
    cumulative = [int(r["cumulative_bytes"]) for r in rows]
    assert cumulative == sorted(cumulative) and cumulative[-1] == summary["total_bytes"]
    assert not list(run_dir.glob(".*.tmp")), "no temporary files are left behind"


def test_payload_bytes_are_exactly_the_lora_factors_and_head(runs: list[Path]) -> None:
    with open(runs[0] / "ledger.csv", newline="") as fh:
        ledger = list(csv.DictReader(fh))
    train = [r for r in ledger if r["kind"] == "train"]
    assert len(train) == 3 * 4 * 2  # rounds × clients × directions
    n_arrays = 2 * 2 * 2 + 2  # A and B per module + head weight and bias
    for r in train:
        assert int(r["payload_bytes"]) == 4 * (P_LORA_TINY + HEAD_TINY)
        framing = int(r["wire_bytes"]) - int(r["payload_bytes"])
        if r["direction"] == "up":  # trained factors are all distinct: nothing deduplicated
            assert 0 < framing <= 700 * n_arrays + 2000
    control = [r for r in ledger if r["kind"] == "control"]  # runs[0] is on Flower's path: a roll-call
    assert len(control) == 4 * 2 and all(int(r["payload_bytes"]) == 0 for r in control)
    assert sorted(int(r["partition_id"]) for r in control) == [0, 0, 1, 1, 2, 2, 3, 3]  # roll-call attributed
    engine_map = list(csv.DictReader(open(runs[1] / "ledger.csv", newline="")))  # read the engine's node map
    assert not [r for r in engine_map if r["kind"] in ("control", "resume")]
    rows = _rows(runs[0])
    assert int(rows[1]["payload_up"]) == 4 * 4 * (P_LORA_TINY + HEAD_TINY)


WIRE_COLUMNS = ("bytes_up", "bytes_down", "cumulative_bytes")


def test_same_seed_same_metrics(runs: list[Path]) -> None:
    """Identical except wall time and the message envelopes' random 64-bit node/run ids,
    although the second run went through the CLI, was killed and resumed mid-way, and
    used fedtune's engine node map and message pump where the first used Flower's
    roll-call and loop (whose control traffic is taken out of the byte counts).

    Flower draws node and run ids at random; protobuf encodes them as varints, so an
    envelope can differ by a byte or two.  Everything the seed controls is identical: a
    wrong node map would have trained other partitions and changed every metric.
    """
    a, b = without_control(runs[0]), without_control(runs[1])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_COLUMNS + WIRE_COLUMNS} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    messages_per_round = 4 * 2
    for ra, rb in zip(a[1:], b[1:]):
        for key in ("bytes_up", "bytes_down"):
            assert abs(int(ra[key]) - int(rb[key])) <= 3 * messages_per_round
    # the second run was killed and resumed (conftest.py): its restart's records (kind "resume") are extra
    ledger = [[x for x in csv.DictReader(open(r / "ledger.csv", newline="")) if x["kind"] not in ("resume", "control")]
              for r in runs]
    assert [(x["server_round"], x["partition_id"], x["direction"], x["kind"], x["payload_bytes"]) for x in ledger[0]] == \
        [(x["server_round"], x["partition_id"], x["direction"], x["kind"], x["payload_bytes"]) for x in ledger[1]]


def test_adapter_loads_with_peft_and_reproduces_final_accuracy(runs: list[Path]) -> None:
    from peft import PeftModel

    from fedtune.evaluation import evaluate
    from fedtune.registry import MODELS
    from fedtune.runtime.workspace import Workspace

    cfg = compose(OVERRIDES)
    ws = Workspace(cfg)
    base = MODELS.get("tiny").build(cfg.model, ws.data.num_labels, cfg.seed)
    model = PeftModel.from_pretrained(base, str(runs[0] / "adapter"))
    _, acc = evaluate(model, ws.encoded("test"), 64, ws.device)
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert acc == pytest.approx(summary["final_accuracy"], abs=5e-7)  # metrics.csv keeps 6 decimals


def test_plot_command_writes_pngs(runs: list[Path], tmp_path: Path) -> None:
    from fedtune.cli import main

    main(["plot", str(runs[0]), str(runs[1]), "--out", str(tmp_path)])
    for name in ("comm_vs_accuracy.png", "accuracy_vs_round.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
