"""The communication–accuracy study: every strategy × seeds × partitions, one command.

Each (partition, strategy, seed) is one ``fedtune run`` into
``OUT/<partition>/<strategy>/seed<k>/`` with the same clients, rounds and local steps;
only the partition, the strategy and the seed change.  The study can be stopped and
started again at any time: completed runs are skipped, a run that was killed is
continued from its last checkpoint (``fedtune run resume=…``), and a failed one is
started afresh.  At the end (or alone with ``--report-only``) it writes, atomically:

* ``study.csv`` / ``study.md``: per partition × strategy, final accuracy mean ± std
  over seeds, payload bytes per client-round, one-time and total bytes, the bytes to
  first reach ``--target`` accuracy, median seconds per round;
* ``comm_vs_accuracy.png``: accuracy against cumulative bytes, a panel per partition,
  seed bands and the Pareto front.

Run::

    .venv/bin/python simulations/study.py                      # all strategies, seeds 0 1 2, dir0.1 dir0.5 iid, 20 rounds
    .venv/bin/python simulations/study.py --strategies fedavg_lora ffa_lora fed_sb --partitions dir0.5 --rounds 10
    .venv/bin/python simulations/study.py --strategies fed_sb fed_sb_sign fed_sb_server   # Fed-SB's three inits
    .venv/bin/python simulations/study.py --out /tmp/s --rounds 2 model=tiny dataset=tiny   # seconds per run
    .venv/bin/python simulations/study.py --report-only
    .venv/bin/python simulations/study.py --status             # which runs are done, running, left; time left

Extra arguments of the form ``key=value`` are fedtune overrides applied to every run; they
may stand anywhere, also after ``--strategies`` / ``--partitions`` / ``--seeds``.
``--strategies`` also takes the named variants of :data:`VARIANTS` (a method with fixed
options, a row and a curve of its own); the default grid is every registered method.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from fedtune.config import compose
from fedtune.plots import plot_study
from fedtune.registry import METHODS
from fedtune.results.checkpoint import has_checkpoint
from fedtune.results.store import atomic_write_text, csv_text
from fedtune.results.study import (collect, grid_cells, grid_markdown, markdown_table, measured_pace, run_dir,
                                   run_status, seconds_left, summarise)
from fedtune.runtime.processes import kill_session

PARTITIONS = {
    "dir0.1": ["partition.kind=dirichlet", "partition.alpha=0.1"],
    "dir0.5": ["partition.kind=dirichlet", "partition.alpha=0.5"],
    "iid": ["partition.kind=iid"],
}
# Per-strategy settings of the study on the default model, MiniLM (README, "Seed-based
# methods"): FedKSeed's lr 1e-3 diverges there, 1e-4 is the largest stable value; K=1024
# keeps its direction bank in memory.  Another model (model=tiny) uses the configs' defaults.
MINILM_STRATEGY_OVERRIDES = {
    "fedkseed": ["strategy.num_seeds=1024", "strategy.lr=1e-4"],
    "fedkseed_pro": ["strategy.num_seeds=1024", "strategy.lr=1e-4"],
}


# Named variants: OUT/<partition>/<variant>/ runs the method with these options.  Fed-SB's
# one-time init (docs/methods.md#fed_sb): `fed_sb` uploads fp32 client gradients, these
# upload int8 signs or nothing (the server's own init on a proxy sample).
VARIANTS = {
    "fed_sb_sign": ("fed_sb", ["strategy.init_upload=sign"]),
    "fed_sb_server": ("fed_sb", ["strategy.init_source=server"]),
}


def method_of(strategy: str) -> tuple[str, list[str]]:
    """The registered method a ``--strategies`` name runs, and the overrides it adds."""
    method, options = VARIANTS.get(strategy, (strategy, []))
    return method, list(options)


@functools.lru_cache(maxsize=8)
def _model_name(extra: tuple[str, ...]) -> str:
    return compose(list(extra)).model.name  # the config decides the default model, not this script


def strategy_overrides(strategy: str, extra: list[str]) -> list[str]:
    if strategy not in MINILM_STRATEGY_OVERRIDES or _model_name(tuple(extra)) != "minilm":
        return []
    return MINILM_STRATEGY_OVERRIDES[strategy]


def run_in_own_session(cmd: list[str], log: IO[str]) -> int:
    """Run ``cmd`` in a session of its own; when it ends, kill whatever it left behind.

    A run that dies without shutting Ray down (a kill, an OOM, ``faults.server_kill_round``)
    orphans Ray's agents and workers, which live on and hold memory while the study goes
    on to the next run.  They stay in the run's session (Ray may give workers process
    groups of their own, never sessions), so killing the session once the run has ended,
    and waiting until its members have died, reaps them.  Stopping the study (Ctrl-C,
    SIGTERM) kills the run too; it continues from its checkpoint on the next call.
    """
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        survivors = kill_session(proc.pid)
        proc.wait()
        if survivors:
            print(f"study: {len(survivors)} process(es) of the run survived SIGKILL: "
                  + ", ".join(f"{p.pid} {p.cmdline[:60]}" for p in survivors), file=sys.stderr)


def run_one(out: Path, partition: str, strategy: str, seed: int, rounds: int, extra: list[str]) -> str:
    """Bring one run to completion; return what was done (``skipped``, ``resumed``, ``ran``)."""
    d = run_dir(out, partition, strategy, seed)
    status = run_status(d)
    if status == "completed":
        return "skipped"
    cli = [str(Path(sys.executable).with_name("fedtune")), "run"]
    if status == "running" and has_checkpoint(d):
        cmd, done = [*cli, f"resume={d}", f"num_rounds={rounds}"], "resumed"
    else:
        shutil.rmtree(d, ignore_errors=True)  # failed or never checkpointed: start afresh
        method, options = method_of(strategy)
        cmd = [*cli, f"strategy={method}", *options, f"seed={seed}", f"num_rounds={rounds}", *PARTITIONS[partition],
               *strategy_overrides(method, extra), *extra, f"hydra.run.dir={d}"]
        done = "ran"
    log = d.parent / f"seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        rc = run_in_own_session(cmd, fh)
    if rc != 0 or run_status(d) != "completed":
        raise RuntimeError(f"fedtune run exited {rc}; see {log}")
    return done


def report(out: Path, target: float, title: str | None) -> int:
    runs = collect(out)
    if not runs:
        print(f"study: no completed runs under {out}", file=sys.stderr)
        return 1
    table = summarise(runs, target)
    atomic_write_text(out / "study.csv", csv_text(list(table[0]), table))
    atomic_write_text(out / "study.md", markdown_table(table))
    plot_study(runs, out / "comm_vs_accuracy.png", title)
    print(markdown_table(table), end="")
    print(f"study: {len(runs)} runs -> {out / 'study.md'}, {out / 'study.csv'}, {out / 'comm_vs_accuracy.png'}")
    return 0


def progress_line(out: Path, cells: list, rounds: int) -> str:
    """``k of n runs completed; about h hours of runs left`` at the pace measured so far."""
    done = sum(c.status == "completed" for c in cells)
    left, unknown = seconds_left(cells, rounds, measured_pace(out))
    line = f"study: {done} of {len(cells)} runs completed"
    if left > 0:
        line += f"; about {left / 3600:.1f} h of runs left at the measured pace"
    if unknown:
        note = f"{', '.join(unknown)}: no round measured yet"
        line += f" (+ {note})" if left > 0 else f"; {note}"
    return line


VALUE_OPTIONS = ("--out", "--rounds", "--target", "--title")  # options that take exactly one value


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Run::")[1])
    p.add_argument("--out", type=Path, default=Path("simulations/results/study"))
    p.add_argument("--strategies", nargs="+", default=None,
                   help=f"default: every registered strategy; variants: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--target", type=float, default=0.8, help="accuracy for the bytes-to-target column")
    p.add_argument("--title", default=None)
    p.add_argument("--report-only", action="store_true", help="only (re)write the table and plot")
    p.add_argument("--status", action="store_true",
                   help="only print which runs of the grid are done, running or left, and the time left")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="fedtune overrides for every run, e.g. model=tiny dataset=tiny")
    options, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = p.parse_args(options)
    args.overrides = [*args.overrides, *overrides]
    strategies = args.strategies or METHODS.names()
    accepted = [*METHODS.names(), *VARIANTS]
    unknown = sorted(set(strategies) - set(accepted))
    if unknown:
        p.error(f"--strategies: unknown {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.status:
        cells = grid_cells(args.out, args.partitions, strategies, args.seeds)
        print(grid_markdown(cells, args.rounds), end="")
        print(progress_line(args.out, cells, args.rounds))
        return 0
    if not args.report_only:
        cells = grid_cells(args.out, args.partitions, strategies, args.seeds)  # the grid, in the order it runs
        print(progress_line(args.out, cells, args.rounds), flush=True)
        failed, t0 = [], time.perf_counter()
        for i, c in enumerate(cells, 1):
            t = time.perf_counter()
            try:
                done = run_one(args.out, c.partition, c.strategy, c.seed, args.rounds, args.overrides)
            except RuntimeError as exc:
                failed.append(str(exc))
                done = f"FAILED: {exc}"
            print(f"study [{i}/{len(cells)}] {c.partition} {c.strategy} seed {c.seed}: {done} "
                  f"({time.perf_counter() - t:.0f} s, {(time.perf_counter() - t0) / 60:.1f} min so far)", flush=True)
        if failed:
            print(f"study: {len(failed)} of {len(cells)} runs failed; run the same command again to retry them "
                  "(killed runs continue from their checkpoint)", file=sys.stderr)
    rc = report(args.out, args.target, args.title)
    return 1 if (not args.report_only and failed) else rc


if __name__ == "__main__":
    sys.exit(main())
