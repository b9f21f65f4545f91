"""The communication–accuracy study: table maths, Pareto front, and the runner's
skip / resume / report cycle on real (tiny) ``fedtune run`` processes."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
from conftest import load_study_main, load_study_module, study_args

from fedtune.results.study import (StudyRun, bytes_to_target, collect, grid_cells, grid_markdown, mean_curve,
                                   measured_pace, pareto_front, payload_per_client_round, run_dir, seconds_left,
                                   summarise)


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
    assert main(["--out", str(tmp_path), "--status", "--rounds", "2", "--seeds", "0", "1", "--partitions", "iid",
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


def test_overrides_may_follow_list_options() -> None:
    split = load_study_module().split_overrides
    argv = ["--strategies", "fedavg_lora", "ffa_lora", "model=tiny", "--out", "/tmp/a=b", "--partitions", "iid",
            "dataset=tiny", "--title=x=y"]
    assert split(argv) == (["--strategies", "fedavg_lora", "ffa_lora", "--out", "/tmp/a=b", "--partitions", "iid",
                            "--title=x=y"], ["model=tiny", "dataset=tiny"])
