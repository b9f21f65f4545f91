"""The communication–accuracy study: table maths, Pareto front, and the runner's
skip / resume / report cycle on real (tiny) ``fedtune run`` processes."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
from conftest import load_study_main, load_study_module, study_args

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
