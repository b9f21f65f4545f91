"""The study's verdicts on the papers' claims: paired tests checked against scipy's, each
verdict rule on runs built to fall on one side of it, and the claims' names checked against
what the study can run."""

from __future__ import annotations

import pytest
from conftest import load_study_module
from scipy import stats

from fedtune.registry import METHODS
from fedtune.results.study import StudyRun
from fedtune.results.verdicts import (AGREES, DISAGREES, INCONCLUSIVE, NOT_RUN, Claim, FewerBytes, FewerRounds,
                                      Score, judge, paired_gap, rounds_to, verdicts_markdown)


def _run(strategy: str, seed: int, accs: list[float], bytes_per_round: int = 1000, one_time: int = 0,
         partition: str = "p") -> StudyRun:
    rows = [{"round": str(i), "eval_accuracy": f"{a:.6f}", "cumulative_bytes": str(one_time + i * bytes_per_round)}
            for i, a in enumerate(accs)]
    ledger = [{"server_round": str(r), "partition_id": "0", "kind": "train", "direction": d,
               "payload_bytes": str(bytes_per_round // 2), "wire_bytes": str(bytes_per_round // 2)}
              for r in range(1, len(accs)) for d in ("up", "down")]
    if one_time:
        ledger.append({"server_round": "1", "partition_id": "0", "kind": "one_time", "direction": "up",
                       "payload_bytes": str(one_time), "wire_bytes": str(one_time)})
    return StudyRun(partition, strategy, seed, rows, ledger)


def _pairs(gaps: list[float], base: float = 0.8) -> list[StudyRun]:
    """A baseline ``b`` and a method ``m`` per seed, the method's final score ``gap`` above."""
    return [r for seed, g in enumerate(gaps)
            for r in (_run("b", seed, [0.1, base + seed / 100]), _run("m", seed, [0.1, base + seed / 100 + g]))]


def _verdict(check, runs: list[StudyRun]) -> str:  # type: ignore[no-untyped-def]
    return judge(Claim("c", "paper", "m", ("p",), (check,)), "p", runs, "eval_accuracy").verdict


def test_paired_gap_matches_scipys_paired_t_test_and_interval() -> None:
    m, b = [0.91, 0.95, 0.90, 0.97], [0.90, 0.92, 0.91, 0.93]
    diffs = [x - y for x, y in zip(m, b)]
    gap, p_above, p_below, half = paired_gap(diffs)
    assert gap == pytest.approx(sum(diffs) / 4)
    assert p_above == pytest.approx(stats.ttest_rel(m, b, alternative="greater").pvalue)
    assert p_below == pytest.approx(stats.ttest_rel(m, b, alternative="less").pvalue)
    low, high = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.90)
    assert (gap - half, gap + half) == pytest.approx((low, high))


@pytest.mark.parametrize(("relation", "gaps", "want"), [
    ("at_least", [0.01, -0.005, 0.002], AGREES),        # above on the mean
    ("at_least", [-0.05, -0.052, -0.049], DISAGREES),   # below on every seed
    ("at_least", [-0.05, 0.04, -0.01], INCONCLUSIVE),   # below on the mean, within the noise
    ("above", [0.05, 0.052, 0.049], AGREES),
    ("above", [0.05, -0.04, 0.01], INCONCLUSIVE),
    ("above", [-0.05, -0.052, -0.049], DISAGREES),
    ("near", [0.0, 0.0, 0.0], AGREES),                  # the same on every seed: an interval of a point
    ("near", [0.004, -0.003, 0.001], AGREES),
    ("near", [0.06, 0.061, 0.059], DISAGREES),          # far outside ±0.02 on every seed
    ("near", [0.03, -0.03, 0.0], INCONCLUSIVE),         # the interval straddles the margin
])
def test_each_score_relation_on_paired_seeds(relation: str, gaps: list[float], want: str) -> None:
    assert _verdict(Score("b", relation, 0.02 if relation == "near" else 0.0), _pairs(gaps)) == want


def test_too_few_common_seeds_or_a_missing_baseline_give_no_verdict() -> None:
    runs = _pairs([-0.1, -0.1, -0.1])
    assert _verdict(Score("b", "at_least"), runs[:4]) == INCONCLUSIVE  # 2 paired seeds
    assert _verdict(Score("b", "at_least"), [r for r in runs if r.strategy == "m"]) == NOT_RUN
    assert judge(Claim("c", "p", "gone", ("p",), (Score("b", "near", 0.02),)), "p", runs, "eval_accuracy").verdict \
        == NOT_RUN


def test_fewer_bytes_counts_the_one_time_setup() -> None:
    base = [_run("b", s, [0.1, 0.9, 0.9], bytes_per_round=10_000) for s in range(3)]
    cheap = [_run("m", s, [0.1, 0.9, 0.9], bytes_per_round=1_000) for s in range(3)]  # 10× fewer
    assert _verdict(FewerBytes("b", 5), base + cheap) == AGREES
    assert _verdict(FewerBytes("b", 100), base + cheap) == DISAGREES
    heavy_setup = [_run("m", s, [0.1, 0.9, 0.9], bytes_per_round=1_000, one_time=18_000) for s in range(3)]
    found = judge(Claim("c", "p", "m", ("p",), (FewerBytes("b", 2),)), "p", base + heavy_setup, "eval_accuracy")
    assert found.verdict == DISAGREES  # 20,000 B vs 20,000 B in total, though 10× fewer per round
    assert "1.00× fewer in total" in found.ours and "10× per client-round" in found.ours and "18.0 kB" in found.ours


def test_fewer_rounds_to_the_target() -> None:
    slow = [_run("b", s, [0.1, 0.5, 0.7, 0.85]) for s in range(3)]
    fast = [_run("m", s, [0.1, 0.82, 0.9, 0.9]) for s in range(3)]
    never = [_run("m", s, [0.1, 0.2, 0.3, 0.4]) for s in range(3)]
    assert rounds_to(slow[0], 0.8, "eval_accuracy") == 3 and rounds_to(never[0], 0.8, "eval_accuracy") is None
    assert _verdict(FewerRounds("b", 0.8), slow + fast) == AGREES
    assert _verdict(FewerRounds("b", 0.8), slow + never) == DISAGREES
    assert _verdict(FewerRounds("b", 0.95), slow + fast) == INCONCLUSIVE  # neither reaches it
    assert _verdict(FewerRounds("b", 0.88), slow + fast) == AGREES  # only the method reaches it


def test_one_failed_check_makes_the_claim_disagree_and_the_table_has_a_row_per_partition() -> None:
    runs = _pairs([0.01, 0.01, 0.01])  # better, but not 100× cheaper
    claim = Claim("m beats b cheaply", "paper: 1 vs 2", "m", ("p", "q"), (Score("b", "at_least"), FewerBytes("b", 100)))
    assert judge(claim, "p", runs, "eval_accuracy").verdict == DISAGREES
    table = verdicts_markdown((claim,), runs, "eval_accuracy").splitlines()
    assert len(table) == 2 + 2
    assert table[2].endswith(f"**{DISAGREES}** |") and table[3].endswith(f"**{NOT_RUN}** |")


def test_every_benchmarks_claims_name_strategies_and_partitions_it_runs() -> None:
    study = load_study_module()
    known = {*METHODS.names(), *study.VARIANTS}
    claimed = 0
    for bench in study.BENCHMARKS.values():
        for claim in bench.claims:
            claimed += 1
            for name in (claim.method, *(c.baseline for c in claim.checks)):
                assert name in known, name
                assert not bench.strategies or name in bench.strategies, name
            assert set(claim.partitions) <= set(bench.partitions), claim.text
    assert claimed >= 6
