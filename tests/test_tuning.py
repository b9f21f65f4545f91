"""The study's tuning stage: each method's search space, an equal trial budget, the choice
on the validation carve, and a tune stage that resumes and feeds the final runs."""

from __future__ import annotations

import csv
import json
import math

import pytest
from conftest import load_study_main, load_study_module, on_shared_ray

from fedtune.config import compose
from fedtune.registry import METHODS
from fedtune.results.study import run_dir, run_status
from fedtune.results.tuning import choose, trial_dir, tuning_markdown, tuning_record
from fedtune.tuning import LEARNING_RATES, Relative, config_value, grid, resolve_space, select_trials


def test_a_space_resolves_around_the_untuned_value() -> None:
    assert resolve_space({"train.lr": LEARNING_RATES}, {"train.lr": 1e-3}) == {"train.lr": [1e-3, 3e-4, 3e-3, 1e-2]}
    assert resolve_space({"train.lr": LEARNING_RATES}, {"train.lr": 5e-4})["train.lr"] == [5e-4, 1.5e-4, 1.5e-3, 5e-3]
    assert resolve_space({"k": Relative(1, 0.5, 0.25)}, {"k": 1024}) == {"k": [1024, 512, 256]}  # ints stay ints
    assert resolve_space({"r": (64, 32, 128, 64)}, {"r": 32}) == {"r": [32, 64, 128]}  # base first, once each
    assert resolve_space({"r": (64, 128)}, {"r": 32}) == {"r": [32, 64, 128]}  # the untuned value is always a point
    with pytest.raises(ValueError, match="factor 1"):
        Relative(0.5, 2)
    with pytest.raises(KeyError, match="train.momentum"):
        resolve_space({"train.momentum": (0.9,)}, {})


def test_every_method_declares_its_space_on_its_own_config() -> None:
    """Each method names its knobs in its registration, on fields its config has; an absolute
    candidate list starts with the config's default, so the default point adds no point."""
    for spec in METHODS.values():
        assert spec.tuning, f"{spec.name} declares no tuning space"
        cfg = compose(f"strategy={spec.name} model=tiny dataset=tiny")
        for key, candidates in spec.tuning.items():
            value = config_value(cfg, key)  # AttributeError: a knob its config does not have
            if not isinstance(candidates, Relative):
                assert candidates[0] == value, (spec.name, key, candidates, value)


def test_trials_keep_an_equal_budget_and_the_default_point_and_are_seeded() -> None:
    base = {"strategy.rank": 32, "strategy.num_seeds": 200, "strategy.lam": 0.01, "strategy.eps": 1e-3}
    spaces = {s.name: resolve_space(s.tuning, {k: 1e-3 if k.endswith("lr") else base[k] for k in s.tuning})
              for s in METHODS.values()}
    for budget in (1, 3, 6, 20):
        for name, values in spaces.items():
            points = select_trials(values, budget, 100, name)
            full = grid(values)
            assert len(points) == min(budget, len(full)) and points[0] == full[0]  # default point first
            assert all(p in full for p in points) and len({tuple(p.items()) for p in points}) == len(points)
            assert points == select_trials(values, budget, 100, name)  # deterministic
            if len(full) <= budget:
                assert points == full
            if budget >= max(map(len, values.values())):  # every candidate of every knob is tried
                assert all({p[k] for p in points} == set(v) for k, v in values.items()), (name, budget, points)
    values = spaces["fed_sb"]  # 4 lr x 3 ranks = 12 points
    subsets = {tuple(map(str, select_trials(values, 4, seed, "fed_sb"))) for seed in range(6)}
    assert len(subsets) > 1  # the seed picks the subset
    with pytest.raises(ValueError, match="budget"):
        select_trials(values, 0, 0, "fed_sb")


def _trial(status: str, score: float | None, nbytes: int | None = 100) -> dict:
    return {"status": status, "score": score, "bytes": nbytes, "wall_seconds": 1.0}


def test_the_choice_is_the_best_score_then_fewer_bytes_once_every_trial_finished() -> None:
    assert choose([_trial("completed", 0.7), _trial("completed", 0.9), _trial("completed", 0.8)]) == 1
    assert choose([_trial("completed", 0.9, 300), _trial("completed", 0.9, 200), _trial("completed", 0.9, 200)]) == 1
    assert choose([_trial("completed", 0.5), _trial("refused", None), _trial("completed", math.nan)]) == 0
    assert choose([_trial("completed", 0.9), _trial("running", None)]) is None  # a missing trial could win
    assert choose([_trial("failed", None), _trial("completed", 0.1)]) is None
    assert choose([_trial("refused", None)]) is None
    values = {"train.lr": [1e-3, 3e-4, 3e-3]}
    points = grid(values)
    results = [_trial("completed", 0.6, 50), _trial("completed", 0.8, 50), _trial("refused", None, None)]
    results[2].update(error="fedtune: error: strategy.rank must be <= 32", wall_seconds=None)
    record = tuning_record("iid", "fedavg_lora", {"train.lr": LEARNING_RATES}, values, 3, 6, 100, "eval_accuracy",
                           ["strategy=fedavg_lora"], points, results)
    assert record["search_space"] == {"train.lr": {"relative_factors": [1.0, 0.3, 3.0, 10.0]}}
    assert (record["grid_size"], record["budget"], record["trials_run"]) == (3, 6, 3)
    assert "fewer than the budget of 6" in record["note"] and record["default_point"] == {"train.lr": 1e-3}
    assert [t["overrides"] for t in record["trials"]] == [["train.lr=0.001"], ["train.lr=0.0003"], ["train.lr=0.003"]]
    assert record["choice"]["trial"] == 1 and record["choice"]["overrides"] == ["train.lr=0.0003"]
    assert json.loads(json.dumps(record)) == record  # what tuning.json holds
    table = tuning_markdown(record)
    assert "| 1 | 0.0003 | completed | 0.8000 | 50 | 1 | **chosen** |" in table
    assert "| 2 | 0.003 | refused | – | – | – |  |" in table and "Choice: `train.lr=0.0003`" in table


def _fake_run(calls: list, kill_first_attempt_of: str):  # type: ignore[no-untyped-def]
    """A stand-in for ``fedtune run`` (study_plan.run_one): scores a trial by its lr (best at
    3e-2), writes what the study reads, and is killed once in the middle of one run."""
    attempted: set = set()

    def run(d, overrides, rounds):  # type: ignore[no-untyped-def]
        if run_status(d) == "completed":
            return "skipped"
        calls.append((d, list(overrides)))
        lr = float([o for o in overrides if o.startswith("train.lr=")][-1].partition("=")[2])  # the last one wins
        d.mkdir(parents=True, exist_ok=True)
        score = 1.0 - abs(math.log10(lr / 3e-2)) / 4
        with open(d / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["round", "eval_accuracy", "cumulative_bytes", "round_seconds", "wall_seconds"])
            writer.writeheader()
            writer.writerows({"round": str(r), "eval_accuracy": f"{score * r / rounds:.6f}",
                              "cumulative_bytes": str(1000 * r), "round_seconds": "1.0", "wall_seconds": f"{r:.1f}"}
                             for r in range(rounds + 1))
        (d / "ledger.csv").write_text("server_round,partition_id,direction,kind,wire_bytes,payload_bytes\n")
        fraction = [o for o in overrides if o.startswith("dataset.validation_fraction=")]
        (d / "config.yaml").write_text(f"train:\n  lr: {lr}\ndataset:\n  validation_fraction: "
                                       f"{fraction[-1].partition('=')[2] if fraction else 0.0}\n")
        killed = d.name == kill_first_attempt_of and d not in attempted
        attempted.add(d)
        (d / "summary.json").write_text(json.dumps({"status": "running" if killed else "completed"}))
        if killed:
            raise RuntimeError(f"fedtune run exited -9; see {d}.log")
        return "ran"

    return run


def test_the_tune_stage_resumes_records_every_trial_and_feeds_the_final_runs(tmp_path, capsys, monkeypatch) -> None:
    module, calls = load_study_module(), []
    monkeypatch.setattr(module, "run_one", _fake_run(calls, kill_first_attempt_of="trial1"))
    argv = ["--out", str(tmp_path), "--trials", "3", "--rounds", "2", "--seeds", "0", "--partitions", "iid",
            "--strategies", "fedavg_lora", "model=tiny", "dataset=tiny"]
    assert module.main(argv) == 1  # trial 1 was killed: no choice yet, so no final run either
    out = capsys.readouterr().out
    assert "tune iid fedavg_lora trial 1: FAILED" in out and "final iid fedavg_lora: FAILED: not tuned yet" in out
    record = json.loads((tmp_path / "tuning/iid/fedavg_lora/tuning.json").read_text())
    assert record["choice"] is None and [t["status"] for t in record["trials"]] == ["completed", "running", "completed"]
    assert record["trials"][0]["point"] == {"train.lr": 0.01}  # model=tiny's untuned lr: the default point
    for d, overrides in calls:  # every trial scores on the validation carve, at the tuning seed
        assert d.parent == tmp_path / "tuning/iid/fedavg_lora" and "eval.split=validation" in overrides
        assert {"seed=100", "dataset.validation_fraction=0.15", "partition.kind=iid"} <= set(overrides)
    assert module.main([*argv, "--status"]) == 0
    status = capsys.readouterr().out
    assert "| iid | `fedavg_lora` | done (0 min) | running, round 2/2 | done (0 min) |" in status
    assert "study: 2 of 4 runs completed; about 0.0 h of runs left" in status

    calls.clear()
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "trial 0: skipped" in out and "trial 1: ran" in out and "trial 2: skipped" in out
    record = json.loads((tmp_path / "tuning/iid/fedavg_lora/tuning.json").read_text())
    scores = [t["score"] for t in record["trials"]]
    assert record["choice"]["trial"] == scores.index(max(scores)) and all(s is not None for s in scores)
    (final_dir, final_overrides), = [c for c in calls if c[0].name == "seed0"]
    assert final_dir == run_dir(tmp_path, "iid", "fedavg_lora", 0) and "eval.split=validation" not in final_overrides
    assert final_overrides[-2:] == ["dataset.validation_fraction=0.15", *record["choice"]["overrides"]]
    assert "| `train.lr` | 0.01, 0.003, 0.03, 0.1 |" in (tmp_path / "tuning/iid/fedavg_lora/tuning.md").read_text()
    assert (tmp_path / "study.md").is_file() and (tmp_path / "accuracy_vs_round.png").is_file()
    choice = record["choice"]
    assert (f"| iid | `fedavg_lora` | 3 (3, 4) | {record['trials'][0]['score']:.4f} | {choice['score']:.4f} (trial "
            f"{choice['trial']}) | `{choice['overrides'][0]}` |") in (tmp_path / "tuning/choices.md").read_text()

    assert module.main([*argv, "--trials", "2"]) == 1  # another budget: the recorded trials are another plan
    assert "holds the trials of another search space" in capsys.readouterr().out


def test_a_tuned_study_refuses_final_runs_of_an_untuned_one(tmp_path, capsys) -> None:
    d = run_dir(tmp_path, "iid", "fedavg_lora", 0)
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"status": "completed"}))
    (d / "config.yaml").write_text("dataset:\n  name: tiny\n  test_fraction: 0.2\n")  # no validation carve
    argv = ["--out", str(tmp_path), "--partitions", "iid", "--strategies", "fedavg_lora", "--seeds", "0",
            "model=tiny", "dataset=tiny"]
    assert load_study_main()([*argv, "--stage", "final"]) == 2
    assert "1 completed run(s)" in capsys.readouterr().err
    assert load_study_module().expected_mismatch(d, {"dataset.validation_fraction": 0.0}) is None


@pytest.mark.simulation
def test_a_tuning_trial_through_the_cli_scores_the_validation_carve(tmp_path, capsys, ray_address) -> None:
    """One trial (the default point) as a real ``fedtune run``: it trains on the carved
    training split and scores the validation split, and tuning.json holds its real score
    (the final runs' wiring is the test above; their CLI path is the untuned run's)."""
    import yaml

    argv = ["--stage", "tune", "--out", str(tmp_path), "--trials", "1", "--rounds", "1", "--partitions", "iid",
            "--strategies", "fedavg_lora", "model=tiny", "dataset=tiny", "federation.num_clients=2",
            "train.local_steps=2", *on_shared_ray(ray_address).split()]  # the CLI process reuses the warm actor
    main = load_study_main()
    assert main(argv) == 0
    assert "trial 0: ran" in capsys.readouterr().out
    trial = trial_dir(tmp_path, "iid", "fedavg_lora", 0)
    cfg = yaml.safe_load((trial / "config.yaml").read_text())
    assert (cfg["eval"]["split"], cfg["seed"], cfg["dataset"]["validation_fraction"]) == ("validation", 100, 0.15)
    rows = list(csv.DictReader(open(trial / "metrics.csv")))
    record = json.loads((trial.parent / "tuning.json").read_text())
    assert record["choice"]["trial"] == 0 and record["choice"]["point"] == {"train.lr": cfg["train"]["lr"]}
    assert record["choice"]["score"] == pytest.approx(float(rows[-1]["eval_accuracy"]))
    assert record["choice"]["bytes"] == int(rows[-1]["cumulative_bytes"]) > 0
    main(argv)
    assert "trial 0: skipped" in capsys.readouterr().out  # done: not run again
    assert list(csv.DictReader(open(trial / "metrics.csv"))) == rows
