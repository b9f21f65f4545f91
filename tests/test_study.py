"""The communication–accuracy study: table maths, Pareto front, and the runner's
skip / resume / report cycle on real (tiny) ``fedtune run`` processes."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
from conftest import load_study_main, load_study_module, on_shared_ray, study_args

from fedtune.config import compose
from fedtune.plots import SETUP_LABEL, plot_runs, plot_study, setup_point
from fedtune.results.store import csv_text
from fedtune.results.study import (StudyRun, bytes_to_target, collect, grid_cells, grid_markdown, markdown_table,
                                   mean_curve, measured_pace, one_time_bytes, pareto_front, payload_per_client_round,
                                   run_dir, seconds_left, summarise)


def _rows(accs: list[float], per_round_bytes: int, seconds: float = 2.0) -> list[dict[str, str]]:
    return [{"round": str(i), "eval_accuracy": f"{a:.6f}", "cumulative_bytes": str(i * per_round_bytes),
             "round_seconds": f"{seconds:.3f}"} for i, a in enumerate(accs)]


def _ledger(up: int, down: int, clients: int, rounds: int, one_time: int = 0) -> list[dict[str, str]]:
    out = [{"server_round": "1", "partition_id": "0", "direction": "up", "kind": "one_time",
            "wire_bytes": str(one_time), "payload_bytes": str(one_time)}] if one_time else []
    for r in range(1, rounds + 1):
        for pid in range(clients):
            for direction, n in (("down", down), ("up", up)):
                out.append({"server_round": str(r), "partition_id": str(pid), "direction": direction, "kind": "train",
                            "wire_bytes": str(n + 100), "payload_bytes": str(n)})
            out.append({"server_round": str(r), "partition_id": str(pid), "direction": "down", "kind": "control",
                        "wire_bytes": "300", "payload_bytes": "0"})
    return out


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(10.0, 0.5, "a"), (20.0, 0.4, "b"), (20.0, 0.7, "c"), (5.0, 0.3, "d"), (30.0, 0.7, "e"), (40.0, 0.9, "f")]
    assert pareto_front(points) == [(5.0, 0.3, "d"), (10.0, 0.5, "a"), (20.0, 0.7, "c"), (40.0, 0.9, "f")]
    assert pareto_front([]) == []


def test_bytes_to_target_is_the_first_crossing() -> None:
    rows = _rows([0.2, 0.5, 0.85, 0.7, 0.9], per_round_bytes=1000)
    assert bytes_to_target(rows, 0.8) == 2000
    assert bytes_to_target(rows, 0.95) is None
    rows[2]["eval_accuracy"] = ""  # not evaluated that round: the next evaluated round counts
    assert bytes_to_target(rows, 0.8) == 4000


def test_summary_over_seeds() -> None:
    runs = [StudyRun("iid", "m", 0, _rows([0.2, 0.6, 0.8], 500, seconds=3.0), _ledger(40, 60, 3, 2)),
            StudyRun("iid", "m", 1, _rows([0.2, 0.5, 0.7], 500, seconds=5.0), _ledger(40, 60, 3, 2)),
            StudyRun("iid", "n", 0, _rows([0.2, 0.9, 0.9], 10, seconds=1.0), _ledger(8, 4, 3, 2, one_time=7))]
    table = summarise(runs, target=0.75)
    assert [(r["strategy"], r["seeds"]) for r in table] == [("m", 2), ("n", 1)]
    m, n = table
    assert m["final_accuracy_mean"] == pytest.approx(0.75)
    assert m["final_accuracy_std"] == pytest.approx(statistics.stdev([0.8, 0.7]))
    assert (m["seeds_reaching_target"], m["bytes_to_target_mean"]) == (1, 1000)
    assert (m["payload_up_per_client_round"], m["payload_down_per_client_round"]) == (40, 60)
    assert m["seconds_per_round_median"] == pytest.approx(4.0) and m["one_time_bytes"] == 0
    assert (n["bytes_to_target_mean"], n["one_time_bytes"], n["final_accuracy_std"]) == (10, 7, 0.0)
    assert payload_per_client_round(runs[2].ledger, "up") == 8  # one-time traffic is not a round's payload
    curve = mean_curve(runs[:2])
    assert [c[0] for c in curve] == [0, 500, 1000]
    assert curve[1][1] == pytest.approx(0.55) and curve[1][2] == pytest.approx(statistics.stdev([0.6, 0.5]))


# Fed-SB's three init options on 2 clients: (one-time wire bytes up, down) per client
FED_SB_OPTIONS = {"fed_sb": (400_000, 12_000), "fed_sb_sign": (100_000, 12_000), "fed_sb_server": (40, 12_000)}


def _with_setup(up: int, down: int, clients: int = 2) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """metrics rows and ledger of a 2-round run whose round 1 also carries a one-time setup."""
    one_time = [{"server_round": "1", "partition_id": str(pid), "direction": d, "kind": "one_time",
                 "wire_bytes": str(n), "payload_bytes": str(n if n > 40 else 0)}
                for pid in range(clients) for d, n in (("up", up), ("down", down))]
    setup = clients * (up + down)
    rows = [{"round": str(i), "eval_accuracy": f"{a:.6f}", "round_seconds": "1.000",
             "cumulative_bytes": str(setup + 1000 * i if i else 0)} for i, a in enumerate([0.25, 0.5, 0.7])]
    return rows, one_time + _ledger(8, 8, clients, 2)


def test_one_time_bytes_of_each_option_in_the_table_and_apart_in_both_plots(tmp_path, monkeypatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [StudyRun("iid", name, 0, *_with_setup(up, down)) for name, (up, down) in FED_SB_OPTIONS.items()]
    runs.append(StudyRun("iid", "fedavg_lora", 0, _rows([0.25, 0.6, 0.8], 1000), _ledger(8, 8, 2, 2)))
    by = {r["strategy"]: r for r in summarise(runs, target=0.6)}
    for name, (up, down) in FED_SB_OPTIONS.items():
        assert (by[name]["one_time_up_bytes"], by[name]["one_time_down_bytes"]) == (2 * up, 2 * down)
        assert by[name]["one_time_bytes"] == 2 * (up + down) and by[name]["payload_up_per_client_round"] == 8
    assert by["fedavg_lora"]["one_time_bytes"] == one_time_bytes(runs[-1].ledger) == 0
    table = markdown_table(list(by.values()))
    assert "| `fed_sb` | 1 | 0.700 ± 0.000 | 8 / 8 B | 0.82 MB (up 0.80 MB, down 24.0 kB) |" in table
    assert "| `fed_sb_sign` | 1 | 0.700 ± 0.000 | 8 / 8 B | 0.22 MB (up 0.20 MB, down 24.0 kB) |" in table
    assert "| `fed_sb_server` | 1 | 0.700 ± 0.000 | 8 / 8 B | 24.1 kB (up 0.1 kB, down 24.0 kB) |" in table
    assert "| `fedavg_lora` | 1 | 0.800 ± 0.000 | 8 / 8 B | 0 |" in table
    assert setup_point(runs[0].rows, runs[0].ledger, "eval_accuracy") == (824_000.0, 0.25)
    assert setup_point(runs[-1].rows, runs[-1].ledger, "eval_accuracy") is None

    figures: list = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to read them back

    def diamonds(ax) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
        return sorted((float(x), float(y)) for line in ax.lines if line.get_marker() == "D"
                      for x, y in zip(line.get_xdata(), line.get_ydata()))

    def legend(ax) -> list[str]:  # type: ignore[no-untyped-def]
        return [t.get_text() for t in ax.get_legend().get_texts()]

    setups = sorted((2.0 * (up + down), 0.25) for up, down in FED_SB_OPTIONS.values())
    plot_study(runs, tmp_path / "study.png")
    (ax,) = figures.pop().axes
    assert diamonds(ax) == setups and legend(ax)[-1] == SETUP_LABEL

    dirs = []
    for run in (runs[0], runs[-1]):
        d = tmp_path / run.strategy
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"strategy": run.strategy}))
        (d / "metrics.csv").write_text(csv_text(list(run.rows[0]), run.rows))
        (d / "ledger.csv").write_text(csv_text(list(run.ledger[0]), run.ledger))
        dirs.append(d)
    plot_runs(dirs, tmp_path / "plots")
    by_bytes, by_round = (fig.axes[0] for fig in figures)
    assert diamonds(by_bytes) == [(824_000.0, 0.25)] and SETUP_LABEL in legend(by_bytes)
    assert diamonds(by_round) == [] and SETUP_LABEL not in legend(by_round)
    monkeypatch.undo()
    plt.close("all")


def _cell(root, partition: str, strategy: str, seed: int, status: str, walls: list[float]) -> None:
    d = run_dir(root, partition, strategy, seed)
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"status": status}))
    with open(d / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["round", "wall_seconds"])
        writer.writeheader()
        writer.writerows({"round": str(i), "wall_seconds": f"{w:.3f}"} for i, w in enumerate(walls))


def test_grid_status_and_the_time_left_at_the_measured_pace(tmp_path, capsys) -> None:
    _cell(tmp_path, "iid", "fedavg_lora", 0, "completed", [1.0, 61.0, 120.0])  # 60 s per round
    _cell(tmp_path, "iid", "ffa_lora", 0, "running", [2.0, 90.0])  # killed after round 1 of 2: 90 s per round
    cells = grid_cells(tmp_path, ["iid"], ["fedavg_lora", "ffa_lora", "fed_sb"], [0, 1])
    assert [(c.strategy, c.seed, c.status, c.rounds_done) for c in cells] == [
        ("fedavg_lora", 0, "completed", 2), ("fedavg_lora", 1, "missing", 0), ("ffa_lora", 0, "running", 1),
        ("ffa_lora", 1, "missing", 0), ("fed_sb", 0, "missing", 0), ("fed_sb", 1, "missing", 0)]
    _cell(tmp_path, "dir0.5", "fedavg_lora", 0, "completed", [1.0, 41.0, 80.0])  # outside the grid: 40 s per round
    pace = measured_pace(tmp_path)
    assert pace == pytest.approx({"fedavg_lora": 50.0, "ffa_lora": 90.0})
    left, unknown = seconds_left(cells, 2, pace)
    assert left == pytest.approx(50 * 2 + 90 * 1 + 90 * 2) and unknown == ["fed_sb"]
    table = grid_markdown(cells, rounds=2)
    assert "| iid | `fedavg_lora` | done (2 min) | – |" in table
    assert "| iid | `ffa_lora` | running, round 1/2 | – |" in table

    main = load_study_main()
    assert main(["--out", str(tmp_path), "--status", "--stage", "untuned", "--rounds", "2", "--seeds", "0", "1", "--partitions", "iid",
                 "--strategies", "fedavg_lora", "ffa_lora", "fed_sb"]) == 0
    out = capsys.readouterr().out
    assert table in out and "study: 1 of 6 runs completed; about 0.1 h of runs left" in out
    assert "(+ fed_sb: no round measured yet)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir0.5", "iid"]  # --status writes nothing


@pytest.mark.simulation
def test_study_resumes_a_killed_run_skips_finished_ones_and_reports(killed_then_resumed: dict, capsys) -> None:
    root, run = killed_then_resumed["root"], killed_then_resumed["dir"]  # conftest.py: killed, then resumed
    assert "seed 3: FAILED" in killed_then_resumed["killed"]["stdout"]
    assert killed_then_resumed["killed"]["summary"]["status"] == "running"
    # the killed server never shut Ray down: study.py reaps the agents it orphaned
    assert killed_then_resumed["killed"]["ray_left_behind"] == []
    assert killed_then_resumed["resumed"]["ray_left_behind"] == []
    assert killed_then_resumed["resumed"]["rc"] == 0
    assert "seed 3: resumed" in killed_then_resumed["resumed"]["stdout"]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["resumed_from_round"]) == ("completed", 2)
    with open(root / "study.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["partition"], row["strategy"], row["seeds"], row["rounds"]) == ("dir0.5", "fedavg_lora", "1", "3")
    assert float(row["final_accuracy_mean"]) == pytest.approx(summary["final_accuracy"])
    assert float(row["total_bytes"]) == summary["total_bytes"]
    accs = [float(r["eval_accuracy"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    reached = [float(r["cumulative_bytes"]) for r in csv.DictReader(open(run / "metrics.csv"))
               if float(r["eval_accuracy"]) >= 0.3]
    assert row["bytes_to_target_mean"] == (str(reached[0]) if reached else ""), accs
    assert (root / "comm_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dir0.5 | `fedavg_lora` | 1 |" in (root / "study.md").read_text()
    verdicts = (root / "verdicts.md").read_text().splitlines()  # every claim × partition, none testable yet
    assert len(verdicts) == 2 + sum(len(c.partitions) for c in load_study_module().BENCHMARKS["bbc"].claims)
    assert all(line.endswith("| **not run yet** |") for line in verdicts[2:]), verdicts

    before = (run / "metrics.csv").stat().st_mtime_ns
    assert load_study_main()(study_args(root)) == 0  # a third call: nothing left to run
    assert "seed 3: skipped" in capsys.readouterr().out
    assert (run / "metrics.csv").stat().st_mtime_ns == before
    assert [r.seed for r in collect(root)] == [3]


def test_study_refuses_an_unknown_strategy(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_study_main()(["--strategies", "fedavg", "--report-only"])
    assert exc.value.code == 2
    assert "--strategies: unknown fedavg; accepted:" in capsys.readouterr().err


def test_study_tunes_fedkseed_for_minilm_only() -> None:
    """FedKSeed's MiniLM settings (lr 1e-4: 1e-3 diverges there) must not leak into a study
    on another model, which keeps the strategy config's defaults."""
    overrides = load_study_module().strategy_overrides
    assert "strategy.lr=1e-4" in overrides("fedkseed", [])
    assert "strategy.lr=1e-4" in overrides("fedkseed_pro", ["model=minilm", "seed=3"])
    assert overrides("fedkseed", ["model=tiny", "dataset=tiny"]) == []
    assert overrides("fedavg_lora", []) == []


def test_study_variants_are_valid_runs_of_their_method(tmp_path, capsys) -> None:
    """Fed-SB's init options run as rows of their own (``--strategies fed_sb_server``), each a
    config that composes; the study names them in its grid like any method."""
    study = load_study_module()
    assert study.method_of("fed_sb") == ("fed_sb", [])
    for variant in study.VARIANTS:
        method, options = study.method_of(variant)
        cfg = compose([f"strategy={method}", *options])
        assert cfg.strategy.name == method and options
    assert compose(["strategy=fed_sb", *study.method_of("fed_sb_server")[1]]).strategy.init_source == "server"
    assert study.main(["--out", str(tmp_path), "--status", "--rounds", "2", "--seeds", "0", "--partitions", "iid",
                       "--strategies", "fed_sb", "fed_sb_sign", "fed_sb_server"]) == 0
    assert "| iid | `fed_sb_server` | – |" in capsys.readouterr().out


def test_overrides_may_follow_list_options() -> None:
    split = load_study_module().split_overrides
    argv = ["--strategies", "fedavg_lora", "ffa_lora", "model=tiny", "--out", "/tmp/a=b", "--partitions", "iid",
            "dataset=tiny", "--title=x=y"]
    assert split(argv) == (["--strategies", "fedavg_lora", "ffa_lora", "--out", "/tmp/a=b", "--partitions", "iid",
                            "--title=x=y"], ["model=tiny", "dataset=tiny"])


# ----------------------------------------------------------------------------- the tuning stage
from fedtune.registry import METHODS  # noqa: E402
from fedtune.results.tuning import choose, trial_dir, tuning_markdown, tuning_record  # noqa: E402
from fedtune.tuning import LEARNING_RATES, Relative, config_value, grid, resolve_space, select_trials  # noqa: E402


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
    from fedtune.config import compose

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
    from fedtune.results.study import run_status

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
