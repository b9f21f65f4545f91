"""``model=hf dataset=hf`` end to end: one real Ray simulation of fedavg_lora on a tiny Llama
with Alpaca data (generation metrics in metrics.csv, ``fedtune plot --metric rouge_l``), and
a tiny BERT classifier on text_label data through the real ServerApp and ClientApps in process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import on_shared_ray

from data_testing import data_files, data_path, one_torch_thread, tiny_llama  # noqa: F401  (fixtures)
from hf_testing import save_tiny_model
from method_testing import LocalGrid, task_identity  # noqa: F401  (fixture)
from fedtune.config import compose
from fedtune.results.store import METRIC_COLUMNS, read_metrics

GENERATIVE = ["rouge_l", "exact_match", "heldout_rouge_l", "heldout_exact_match", "eval_seconds"]


def test_fedavg_lora_on_a_tiny_llama_with_alpaca_data_in_ray(data_files: Path, tiny_llama: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture, ray_address: str) -> None:
    import json

    from fedtune.cli import main
    from fedtune.runtime.simulation import simulate

    cfg = compose(f"strategy=fedavg_lora model=hf model.path={tiny_llama} dataset=hf "
                  f"dataset.path={data_path(data_files, 'alpaca', '.jsonl')} dataset.format=alpaca "
                  "dataset.heldout=[music,travel] partition.kind=label partition.by=category federation.num_clients=2 "
                  f"num_rounds=3 train.lr=0.05 eval.max_new_tokens=4 runtime.device=cpu seed=0 {on_shared_ray(ray_address)}")
    summary = simulate(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    per_category = [f"heldout_{m}/{c}" for c in ("music", "travel") for m in ("exact_match", "loss", "rouge_l")]
    assert list(rows[0]) == METRIC_COLUMNS + GENERATIVE + per_category  # two held-out categories: one column each
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3] and all(int(r["num_replies"]) == 2 for r in rows[1:])
    losses = [float(r["eval_loss"]) for r in rows]
    assert losses[-1] < losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses
    for r in rows:
        for col in ("rouge_l", "exact_match", "heldout_rouge_l", "heldout_exact_match"):
            assert 0.0 <= float(r[col]) <= 1.0
        assert r["eval_accuracy"] == r["exact_match"] and float(r["eval_seconds"]) > 0
        assert not math.isnan(float(r["heldout_loss"]))
    assert summary["final_accuracy"] == float(rows[-1]["exact_match"])
    assert summary["final_rouge_l"] == float(rows[-1]["rouge_l"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
    capsys.readouterr()
    main(["plot", str(tmp_path / "run"), "--metric", "rouge_l", "--out", str(tmp_path / "plots")])
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == ["comm_vs_rouge_l.png", "rouge_l_vs_round.png"]
    assert all(Path(p).stat().st_size > 1000 for p in written)


def test_tiny_bert_classifier_on_text_label_data_in_process(data_files: Path, tmp_path: Path,
                                                            task_identity: None) -> None:  # noqa: F811
    from fedtune.flower.server_app import run_server

    bert = save_tiny_model(tmp_path / "bert", "bert")
    cfg = compose(f"strategy=fedavg_lora model=hf model.path={bert} model.lora.target_modules=[query,value] model.max_length=32 "
                  f"dataset=hf dataset.path={data_path(data_files, 'text_label', '.parquet')} dataset.format=text_label "
                  "partition.kind=iid federation.num_clients=2 num_rounds=2 train.lr=0.05 runtime.device=cpu")
    summary = run_server(LocalGrid(cfg, 2), cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert list(rows[0]) == METRIC_COLUMNS  # a classification dataset's columns are unchanged
    assert summary["status"] == "completed" and len(rows) == 3
    assert all(0.0 <= float(r["eval_accuracy"]) <= 1.0 for r in rows) and "final_rouge_l" not in summary
