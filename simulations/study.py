"""The tuned communication–accuracy study: every strategy × partitions, tuned, then seeds, one command.

Three benchmarks (``--benchmark``):

* ``bbc`` (default): MiniLM + LoRA on BBC News topic classification, partitions ``dir0.1``
  ``dir0.5`` ``iid``, 10 clients, 20 rounds; scored by accuracy.  Out: ``simulations/results/study``.
* ``instruct``: SmolLM2-135M-Instruct (``model=smollm2``, loaded through the ``model=hf``
  path) writing BBC News headlines (``dataset=hf``, prompt_completion, a JSON Lines file
  written offline from the packaged corpus into ``OUT/data/``), one topic per client and
  ``tech`` held out; scored by Rouge-L of greedy answers, on seen and held-out topics.
  Settings scaled to 2 CPU cores (simulations/README.md).  Out: ``simulations/results/study_instruct``.
* ``dp``: the ``bbc`` benchmark's Dir(0.5) clients under example-level DP-SGD at ε = 1 and 3
  (a "partition" per ε): FedAvg-LoRA, FFA-LoRA and Fed-SB with its server-side init, each
  tuned under DP.  Out: ``simulations/results/study_dp``.

Stages (``--stage``, default ``all``, per partition × strategy: tune, then the final runs):

* ``tune``: the method's own search space (``register_method(..., tuning=...)``), at most
  ``--trials`` points for every method (the default point, the untuned run, always among
  them; when the grid is larger, a seeded subset that tries every candidate of every knob
  first, :func:`fedtune.tuning.select_trials`), each one ``fedtune run`` on the
  validation split (``dataset.validation_fraction``, ``eval.split=validation``, seed
  ``--tune-seed``) into ``OUT/tuning/<partition>/<strategy>/trial<k>/``; then
  ``tuning.json`` / ``tuning.md`` beside them: the space, every trial, the choice (best
  final validation score, ties to fewer bytes), made once every trial has finished.
* ``final``: the seeds at the chosen settings on the test split, with the same validation
  carve (clients train on the same data as in tuning), into ``OUT/<partition>/<strategy>/seed<k>/``.
* ``untuned``: every method at its untuned settings on the test split, no validation carve
  (the study before tuning).

Every run can be stopped and started again: completed runs are skipped, a killed run
continues from its checkpoint, a failed one starts afresh, a trial whose config fedtune
refuses (exit 2: e.g. a rank above the model's width) is recorded as refused, unscored.
At the end (or alone with ``--report-only``) it writes, atomically, ``study.csv`` /
``study.md`` (final score mean ± std over seeds, held-out score, bytes per client-round,
one-time and total bytes, bytes to ``--target``, median seconds per round),
``comm_vs_<metric>.png`` (score against cumulative bytes, a panel per partition, seed
bands, the Pareto front), ``<metric>_vs_round.png``, ``tuning/choices.md`` (each
partition × strategy's choice and its validation score against the default point's) and,
for the benchmarks with claims (``study_claims.py``), ``verdicts.md``: each paper claim
re-tested on the runs, by paired tests over the seeds and the measured bytes.

Run::

    .venv/bin/python simulations/study.py                          # bbc: tune + 3 seeds, every strategy, 3 partitions
    .venv/bin/python simulations/study.py --benchmark instruct     # SmolLM2 headlines, Rouge-L
    .venv/bin/python simulations/study.py --stage tune --strategies fed_sb --partitions dir0.5
    .venv/bin/python simulations/study.py --stage final --seeds 0 1 2 3 4
    .venv/bin/python simulations/study.py --space fed_sb:strategy.rank=16,32 --space train.lr=x1,x0.3,x3
    .venv/bin/python simulations/study.py --status                 # trials and runs done / running / left; hours left
    .venv/bin/python simulations/study.py --report-only
    .venv/bin/python simulations/study.py --out /tmp/s --rounds 2 --trials 2 model=tiny dataset=tiny   # seconds per run

``--space [STRATEGY:]KEY=V1,V2,...`` replaces a knob's candidates (``xF`` = F times the
run's own value) in every method that declares KEY, or, with ``STRATEGY:``, sets it for
that one (an empty list drops it).  Extra ``key=value`` arguments are fedtune overrides
for every run; they may stand anywhere, also after ``--strategies`` / ``--partitions`` / ``--seeds``.
``--strategies`` also takes the named variants of ``VARIANTS`` (a method with fixed options,
a row and a curve of its own, e.g. ``fed_sb fed_sb_sign fed_sb_server``: Fed-SB's three
inits); the default grid is every registered method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # study_plan.py and the rest, when loaded by file path

from study_benchmarks import BENCHMARKS, VARIANTS, method_of, strategy_overrides  # noqa: E402
from study_plan import Plan, expected_mismatch, log_sitting, machine, parse_space, run_one, untuned_leftovers  # noqa: E402

from fedtune.plots import plot_study  # noqa: E402
from fedtune.registry import METHODS  # noqa: E402
from fedtune.results.store import atomic_write_text, csv_text  # noqa: E402
from fedtune.results.study import (collect, grid_cells, grid_markdown, markdown_table, measured_pace,  # noqa: E402
                                   run_dir, seconds_left, summarise)
from fedtune.results.tuning import (choices_markdown, read_records, trial_cells, trial_dir,  # noqa: E402
                                    trial_result, tuning_dir, tuning_markdown, tuning_record)
from fedtune.results.verdicts import verdicts_markdown  # noqa: E402

__all__ = ["VARIANTS", "main", "method_of", "split_overrides", "strategy_overrides"]


def tune(plan: Plan, partition: str, strategy: str, log: list[str]) -> list[str] | None:
    """Bring one (partition, strategy)'s trials to completion; the chosen overrides (None: not yet)."""
    space, values, grid_size, points = plan.trials(strategy)
    home = tuning_dir(plan.out, partition, strategy)
    try:
        plan.check_record(partition, strategy, points)
    except RuntimeError as exc:
        log.append(f"tune {partition} {strategy}: FAILED: {exc}")
        print(f"study {log[-1]}", flush=True)
        return None
    record = None
    for k, point in enumerate(points):
        d = trial_dir(plan.out, partition, strategy, k)
        started = time.perf_counter()
        try:
            done = run_one(d, plan.trial_overrides(partition, strategy, point), plan.tune_rounds)
        except RuntimeError as exc:
            done = f"FAILED: {exc}"
        log.append(f"tune {partition} {strategy} trial {k}: {done} ({time.perf_counter() - started:.0f} s)")
        print(f"study {log[-1]}", flush=True)
        results = [trial_result(trial_dir(plan.out, partition, strategy, j), plan.metric) for j in range(len(points))]
        record = tuning_record(partition, strategy, space, values, grid_size, plan.trials_budget, plan.tune_seed,
                               plan.metric, plan.base_overrides(strategy), points, results)
        atomic_write_text(home / "tuning.json", json.dumps(record, indent=1) + "\n")
        atomic_write_text(home / "tuning.md", tuning_markdown(record))
    return None if record is None or record["choice"] is None else record["choice"]["overrides"]


def final(plan: Plan, partition: str, strategy: str, seeds: list[int], chosen: list[str] | None,
          log: list[str]) -> None:
    """Bring the final runs of one (partition, strategy) to completion (``chosen`` None: untuned)."""
    for seed in seeds:
        d = run_dir(plan.out, partition, strategy, seed)
        started = time.perf_counter()
        try:
            if (problem := expected_mismatch(d, plan.final_expected(chosen))) is not None:
                raise RuntimeError(problem)
            done = run_one(d, plan.final_overrides(partition, strategy, seed, chosen), plan.rounds)
        except RuntimeError as exc:
            done = f"FAILED: {exc}"
        log.append(f"final {partition} {strategy} seed {seed}: {done} ({time.perf_counter() - started:.0f} s)")
        print(f"study {log[-1]}", flush=True)


def report(plan: Plan, title: str | None, need_runs: bool = True) -> int:
    """Write the tuning choices, the study table and the plots (atomically) from what is on disk."""
    if records := read_records(plan.out):
        atomic_write_text(plan.out / "tuning" / "choices.md", choices_markdown(records))
        print(f"study: {len(records)} tuned partition × strategy -> {plan.out / 'tuning' / 'choices.md'}")
    runs = collect(plan.out)
    if not runs:
        print(f"study: no completed runs under {plan.out}", file=sys.stderr)
        return 1 if need_runs else 0
    table = summarise(runs, plan.target, plan.metric)
    atomic_write_text(plan.out / "study.csv", csv_text(list(dict.fromkeys(k for r in table for k in r)), table))
    atomic_write_text(plan.out / "study.md", markdown_table(table))
    stem = "accuracy" if plan.metric == "eval_accuracy" else plan.metric
    figures = [plot_study(runs, plan.out / f"comm_vs_{stem}.png", title, plan.metric),
               plot_study(runs, plan.out / f"{stem}_vs_round.png", title, plan.metric, x="round")]
    print(markdown_table(table), end="")
    if plan.bench.claims:
        atomic_write_text(plan.out / "verdicts.md", verdicts_markdown(plan.bench.claims, runs, plan.metric))
        figures.append(plan.out / "verdicts.md")
    print(f"study: {len(runs)} runs -> {plan.out / 'study.md'}, {plan.out / 'study.csv'}, "
          + ", ".join(str(f) for f in figures))
    return 0


def status(plan: Plan, partitions: list[str], strategies: list[str], seeds: list[int], stage: str) -> str:
    """The trial and run grids, and ``k of n … completed; about h hours left`` at the measured pace."""
    pace, out, left, unknown, done, total = measured_pace(plan.out), [], 0.0, [], 0, 0
    stages = [("tune", "trial"), ("final", "seed")] if stage == "all" else [(stage, "seed" if stage != "tune" else "trial")]
    for name, column in stages:
        if name == "tune":
            counts = {s: len(plan.trials(s)[3]) for s in strategies}
            cells = trial_cells(plan.out, partitions, strategies, counts)
            rounds = plan.tune_rounds
        else:
            cells, rounds = grid_cells(plan.out, partitions, strategies, seeds), plan.rounds
        more, unknown_here = seconds_left(cells, rounds, pace)
        left, unknown = left + more, unknown + unknown_here
        done, total = done + sum(c.status in ("completed", "refused") for c in cells), total + len(cells)
        out.append(f"{'tuning trials' if name == 'tune' else 'runs'} ({name}):\n" + grid_markdown(cells, rounds, column))
    line = f"study: {done} of {total} runs completed"
    if left > 0:
        line += f"; about {left / 3600:.1f} h of runs left at the measured pace"
    if unknown:
        note = f"{', '.join(sorted(set(unknown)))}: no round measured yet"
        line += f" (+ {note})" if left > 0 else f"; {note}"
    return "\n".join(out) + line + "\n"


VALUE_OPTIONS = ("--out", "--rounds", "--target", "--title", "--benchmark", "--stage", "--trials", "--tune-seed",
                 "--tune-rounds", "--validation-fraction", "--space")  # options that take exactly one value


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(options, fedtune overrides): every ``key=value`` token that is not an option's own
    value is an override, wherever it stands, so that ``--strategies a b model=tiny`` does
    not take ``model=tiny`` for a strategy (no strategy or partition name holds ``=``)."""
    options: list[str] = []
    overrides: list[str] = []
    for i, token in enumerate(argv):
        is_value = i > 0 and argv[i - 1] in VALUE_OPTIONS
        (overrides if "=" in token and not token.startswith("-") and not is_value else options).append(token)
    return options, overrides


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Run::")[1])
    p.add_argument("--benchmark", choices=list(BENCHMARKS), default="bbc")
    p.add_argument("--stage", choices=["all", "tune", "final", "untuned"], default="all")
    p.add_argument("--out", type=Path, default=None, help="default: the benchmark's (simulations/results/study...)")
    p.add_argument("--strategies", nargs="+", default=None,
                   help=f"default: the benchmark's (bbc, instruct: every registered strategy); "
                        f"variants: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the final runs' seeds")
    p.add_argument("--partitions", nargs="+", default=None, help="default: every partition of the benchmark")
    p.add_argument("--rounds", type=int, default=None, help="default: the benchmark's")
    p.add_argument("--trials", type=int, default=6, help="the trial budget of every method (default 6)")
    p.add_argument("--tune-seed", type=int, default=100, help="the tuning runs' seed (not a final seed)")
    p.add_argument("--tune-rounds", type=int, default=None, help="rounds of a tuning trial (default: --rounds)")
    p.add_argument("--validation-fraction", type=float, default=0.15,
                   help="share of the training split carved as the validation split (tuning and final runs)")
    p.add_argument("--space", action="append", default=[], metavar="[STRATEGY:]KEY=V1,V2",
                   help="replace a knob's candidates (xF: F times the untuned value); repeatable")
    p.add_argument("--target", type=float, default=None, help="score for the bytes-to-target column")
    p.add_argument("--title", default=None)
    p.add_argument("--report-only", action="store_true", help="only (re)write the table and plots")
    p.add_argument("--status", action="store_true",
                   help="only print which trials and runs are done, running or left, and the time left")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="fedtune overrides for every run, e.g. model=tiny dataset=tiny")
    options, overrides = split_overrides(list(argv))
    args = p.parse_args(options)
    args.overrides = [*args.overrides, *overrides]
    bench = BENCHMARKS[args.benchmark]
    args.strategies = args.strategies or list(bench.strategies) or METHODS.names()
    args.partitions = args.partitions or list(bench.partitions)
    accepted = [*METHODS.names(), *VARIANTS]
    unknown = sorted(set(args.strategies) - set(accepted))
    if unknown:
        p.error(f"--strategies: unknown {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    if bad := sorted(set(args.partitions) - set(bench.partitions)):
        p.error(f"--partitions: unknown {', '.join(bad)} for --benchmark {args.benchmark}; "
                f"accepted: {', '.join(bench.partitions)}")
    for name in ("rounds", "tune_rounds", "trials"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.validation_fraction < 1:
        p.error(f"--validation-fraction must be in (0, 1), got {args.validation_fraction}")
    try:
        args.space = parse_space(args.space, args.strategies)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = Plan.from_args(args)
    if args.status:
        print(status(plan, args.partitions, args.strategies, args.seeds, args.stage), end="")
        return 0
    log: list[str] = []
    if not args.report_only:
        if args.stage in ("all", "final") and (left := untuned_leftovers(plan, args.partitions, args.strategies,
                                                                          args.seeds)):
            print(f"study: {len(left)} completed run(s) under {plan.out} were not run by a tuned study "
                  f"(e.g. {left[0]}); move them away (git mv {plan.out} {plan.out}_untuned) or use --out", file=sys.stderr)
            return 2
        plan.prepare()
        started = time.time()
        log_sitting(plan.out, {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": list(sys.argv[1:] if argv is None else argv),
                               "machine": machine()})
        print(status(plan, args.partitions, args.strategies, args.seeds, args.stage).splitlines()[-1], flush=True)
        for partition in args.partitions:
            for strategy in args.strategies:
                if args.stage == "untuned":
                    final(plan, partition, strategy, args.seeds, None, log)
                    continue
                try:
                    chosen = tune(plan, partition, strategy, log) if args.stage in ("all", "tune") else \
                        plan.recorded_choice(partition, strategy)
                except RuntimeError as exc:  # tuning.json of another plan
                    log.append(f"final {partition} {strategy}: FAILED: {exc}")
                    print(f"study {log[-1]}", flush=True)
                    continue
                if args.stage == "tune":
                    continue
                if chosen is None:
                    log.append(f"final {partition} {strategy}: FAILED: not tuned yet (no choice in "
                               f"{tuning_dir(plan.out, partition, strategy) / 'tuning.json'})")
                    print(f"study {log[-1]}", flush=True)
                    continue
                final(plan, partition, strategy, args.seeds, chosen, log)
        failed = [line for line in log if "FAILED" in line]
        log_sitting(plan.out, {"finished": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                               "hours": round((time.time() - started) / 3600, 3), "steps": log})
        if failed:
            print(f"study: {len(failed)} of {len(log)} steps failed; run the same command again to retry them "
                  "(killed runs continue from their checkpoint)", file=sys.stderr)
    rc = report(plan, args.title or plan.title, need_runs=args.stage != "tune")
    return 1 if any("FAILED" in line for line in log) else rc


if __name__ == "__main__":
    sys.exit(main())
