"""Papers' claims re-tested on a study's runs: a verdict per claim from paired seeds and bytes.

A :class:`Claim` compares a method with baselines on some partitions of a study through
checks: its score against a baseline's (:class:`Score`: at least, above, or near it), its
total wire bytes (:class:`FewerBytes`) and the rounds it takes to reach a target
(:class:`FewerRounds`).  The study runs every method at the same seeds, and a seed fixes
the clients' data and the validation carve, so score gaps are *paired* by seed: a paired
t-test over the common seeds removes the variance two methods share through their data.
Fewer than :data:`MIN_SEEDS` common seeds give no verdict; a check whose runs are missing
says "not run yet".  Reads results only (:func:`fedtune.results.study.collect`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

from fedtune.results.study import (StudyRun, final_value, first_reaching, format_bytes, metric_name, one_time_bytes,
                                   payload_per_client_round)

ALPHA = 0.05  # one-sided level of every test (the "near" check: two one-sided tests, a 90% interval)
MIN_SEEDS = 3
AGREES, DISAGREES, INCONCLUSIVE, NOT_RUN = "agrees", "disagrees", "inconclusive", "not run yet"


@dataclass(frozen=True)
class Score:
    """The method's final score against ``baseline``'s: ``at_least`` (≥ on the mean, not
    significantly below), ``above`` (significantly above) or ``near`` (the paired gap's 90%
    interval inside ±``margin``, an equivalence test)."""

    baseline: str
    relation: str
    margin: float = 0.0


@dataclass(frozen=True)
class FewerBytes:
    """The baseline's mean total wire bytes (one-time set-up included) are ≥ ``factor`` × the method's."""

    baseline: str
    factor: float


@dataclass(frozen=True)
class FewerRounds:
    """The method first reaches ``target`` in fewer rounds (mean over seeds) than ``baseline``."""

    baseline: str
    target: float


Check = Score | FewerBytes | FewerRounds


@dataclass(frozen=True)
class Claim:
    """A paper's claim: its words, the paper's own figure, and the checks that test it here."""

    text: str
    paper: str
    method: str
    partitions: tuple[str, ...]
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Finding:
    verdict: str
    ours: str


def _runs(runs: list[StudyRun], partition: str, strategy: str) -> dict[int, StudyRun]:
    return {r.seed: r for r in runs if r.partition == partition and r.strategy == strategy}


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def paired_gap(diffs: list[float]) -> tuple[float, float, float, float]:
    """(mean gap, one-sided p of gap > 0, one-sided p of gap < 0, half-width of its 90% interval)."""
    n, mean = len(diffs), statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    if sd == 0.0:  # every seed moved by the same amount: the sign is certain, the interval a point
        return mean, float(mean <= 0), float(mean >= 0), 0.0
    t = mean / (sd / math.sqrt(n))
    half = stats.t.ppf(1 - ALPHA, n - 1) * sd / math.sqrt(n)
    return mean, float(stats.t.sf(t, n - 1)), float(stats.t.cdf(t, n - 1)), float(half)


def _missing(check: Check, method: dict[int, StudyRun], base: dict[int, StudyRun]) -> Finding | None:
    return None if method and base else Finding(NOT_RUN, f"no completed runs of `{check.baseline}`")


def check_score(check: Score, method: dict[int, StudyRun], base: dict[int, StudyRun], metric: str) -> Finding:
    seeds = sorted(set(method) & set(base))
    if len(seeds) < MIN_SEEDS:
        return _missing(check, method, base) or Finding(INCONCLUSIVE, f"{len(seeds)} of {MIN_SEEDS} paired seeds")
    m = [final_value(method[s].rows, metric) for s in seeds]
    b = [final_value(base[s].rows, metric) for s in seeds]
    gap, p_above, p_below, half = paired_gap([x - y for x, y in zip(m, b)])
    ours = (f"{metric_name(metric)} {_mean_std(m)} vs `{check.baseline}` {_mean_std(b)} ({len(seeds)} seeds; "
            f"paired gap {gap:+.3f}")
    if check.relation == "near":
        low, high = gap - half, gap + half
        ours += f", 90% interval [{low:+.3f}, {high:+.3f}], margin ±{check.margin:.3f})"
        if -check.margin <= low and high <= check.margin:
            return Finding(AGREES, ours)
        return Finding(DISAGREES if low > check.margin or high < -check.margin else INCONCLUSIVE, ours)
    if check.relation == "above":
        ours += f", p = {p_above:.3f} for above)"
        return Finding(AGREES if p_above < ALPHA else DISAGREES if p_below < ALPHA else INCONCLUSIVE, ours)
    if check.relation == "at_least":
        ours += f", p = {p_below:.3f} for below)"
        return Finding(AGREES if gap >= 0 else DISAGREES if p_below < ALPHA else INCONCLUSIVE, ours)
    raise ValueError(f"Score.relation: {check.relation!r}; accepted: at_least, above, near")


def _total(run: StudyRun) -> int:
    return int(run.rows[-1]["cumulative_bytes"])


def _per_round(run: StudyRun) -> float:
    return payload_per_client_round(run.ledger, "up") + payload_per_client_round(run.ledger, "down")


def _times(x: float) -> str:
    return f"{x:.2f}×" if x < 10 else f"{x:,.0f}×"


def check_bytes(check: FewerBytes, method: dict[int, StudyRun], base: dict[int, StudyRun]) -> Finding:
    if missing := _missing(check, method, base):
        return missing
    m, b = statistics.fmean(map(_total, method.values())), statistics.fmean(map(_total, base.values()))
    per_round = statistics.fmean(map(_per_round, base.values())) / statistics.fmean(map(_per_round, method.values()))
    once = statistics.fmean(one_time_bytes(r.ledger) for r in method.values())
    ours = (f"{format_bytes(m)} vs `{check.baseline}` {format_bytes(b)}: {_times(b / m)} fewer in total (asked ≥ {check.factor:g}×), "
            f"{_times(per_round)} per client-round" + (f"; one-time set-up {format_bytes(once)}" if once else ""))
    return Finding(AGREES if b / m >= check.factor else DISAGREES, ours)


def rounds_to(run: StudyRun, target: float, metric: str) -> int | None:
    """The first evaluated round whose ``metric`` is ≥ ``target`` (None: never)."""
    row = first_reaching(run.rows, target, metric)
    return None if row is None else int(row["round"])


def check_rounds(check: FewerRounds, method: dict[int, StudyRun], base: dict[int, StudyRun], metric: str) -> Finding:
    if missing := _missing(check, method, base):
        return missing
    m = [rounds_to(r, check.target, metric) for r in method.values()]
    b = [rounds_to(r, check.target, metric) for r in base.values()]

    def said(values: list[int | None]) -> str:
        reached = [v for v in values if v is not None]
        mean = f"{statistics.fmean(reached):.1f} rounds" if reached else "never"
        return f"{mean} ({len(reached)}/{len(values)} seeds reach it)"

    ours = f"to {metric_name(metric)} ≥ {check.target:g}: {said(m)} vs `{check.baseline}` {said(b)}"
    if None in m:
        return Finding(DISAGREES if all(v is not None for v in b) else INCONCLUSIVE, ours)
    if None in b:
        return Finding(AGREES, ours)
    return Finding(AGREES if statistics.fmean(m) < statistics.fmean(b) else DISAGREES, ours)


def judge(claim: Claim, partition: str, runs: list[StudyRun], metric: str) -> Finding:
    """Every check of ``claim`` on ``partition``; disagrees if one disagrees, agrees if all agree."""
    method = _runs(runs, partition, claim.method)
    if not method:
        return Finding(NOT_RUN, f"no completed runs of `{claim.method}`")
    findings = []
    for c in claim.checks:
        base = _runs(runs, partition, c.baseline)
        findings.append(check_score(c, method, base, metric) if isinstance(c, Score) else
                        check_bytes(c, method, base) if isinstance(c, FewerBytes) else
                        check_rounds(c, method, base, metric))
    verdicts = {f.verdict for f in findings}
    verdict = (DISAGREES if DISAGREES in verdicts else AGREES if verdicts == {AGREES} else
               NOT_RUN if verdicts == {NOT_RUN} else INCONCLUSIVE)
    return Finding(verdict, "; ".join(dict.fromkeys(f.ours for f in findings)))


def verdicts_markdown(claims: tuple[Claim, ...], runs: list[StudyRun], metric: str) -> str:
    """A row per claim × partition: the claim, the paper's figure, ours, the verdict."""
    lines = ["| claim | paper | partition | ours (tuned) | verdict |", "| --- | --- | --- | --- | --- |"]
    for claim in claims:
        for partition in claim.partitions:
            found = judge(claim, partition, runs, metric)
            lines.append(f"| {claim.text} | {claim.paper} | {partition} | {found.ours} | **{found.verdict}** |")
    return "\n".join(lines) + "\n"
