"""What ``study.py`` runs: each benchmark's runs and trials, and one run to completion.

Kept apart from the command line so that the plan (which runs exist, with which settings)
is one piece of code that the runner, ``--status`` and the checks of what is on disk share.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from fedtune.config import compose
from fedtune.registry import METHODS
from fedtune.results.checkpoint import has_checkpoint
from fedtune.results.store import atomic_write_text
from fedtune.results.study import run_dir, run_status
from fedtune.results.tuning import REFUSED, read_record
from fedtune.runtime.processes import kill_session
from fedtune.tuning import Relative, config_value, grid, overrides_of, resolve_space, select_trials
from study_benchmarks import BENCHMARKS, VARIANTS, Benchmark, method_of


def _value(text: str) -> Any:
    """A candidate from the command line: ``xF`` stays a factor, anything else a YAML scalar."""
    loaded = yaml.safe_load(text)
    if isinstance(loaded, str):
        try:
            return float(loaded)
        except ValueError:
            return loaded
    return loaded


def parse_space(items: list[str], strategies: list[str]) -> dict[str, dict[str, Any]]:
    """``--space [STRATEGY:]KEY=V1,V2`` items -> {strategy or "*": {key: candidates or None (drop)}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, _, rest = item.rpartition(":") if ":" in item.partition("=")[0] else ("", "", item)
        key, eq, values = rest.partition("=")
        if not eq or "." not in key or (target and target not in [*METHODS.names(), *VARIANTS]):
            raise ValueError(f"--space: expected [STRATEGY:]KEY=V1,V2,... with a dotted KEY and a registered "
                             f"STRATEGY, got {item!r}")
        raw = [v for v in values.split(",") if v]
        if raw and all(v.startswith("x") for v in raw):
            candidates: Any = Relative(*(float(v[1:]) for v in raw))
        elif any(v.startswith("x") for v in raw):
            raise ValueError(f"--space: {item!r} mixes factors (xF) and values")
        else:
            candidates = tuple(_value(v) for v in raw) or None
        out.setdefault(target or "*", {})[key] = candidates
    return out


def _same(have: Any, want: Any) -> bool:
    try:
        return math.isclose(float(have), float(want), rel_tol=1e-9)
    except (TypeError, ValueError):
        return have == want


def expected_mismatch(d: Path, expected: dict[str, Any]) -> str | None:
    """For a completed run: the first of ``expected``'s settings its config.yaml does not
    have (a field it lacks has its default: 0 for a fraction), else None."""
    if run_status(d) != "completed" or not expected:
        return None
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    for key, want in expected.items():
        have: Any = cfg
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        have = 0.0 if have is None and key.endswith("_fraction") else have
        if not _same(have, want):
            return f"{d} completed with {key}={have}, but this study runs it with {key}={want}"
    return None


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


def run_one(d: Path, overrides: list[str], rounds: int) -> str:
    """Bring the run in ``d`` to completion; return what was done (``skipped``, ``resumed``,
    ``ran``, ``refused``: fedtune refused its config, recorded in ``d/refused.txt`` and not retried)."""
    status = run_status(d)
    if status == "completed":
        return "skipped"
    if (d / REFUSED).is_file():
        return "refused"
    cli = [str(Path(sys.executable).with_name("fedtune")), "run"]
    if status == "running" and has_checkpoint(d):
        cmd, done = [*cli, f"resume={d}", f"num_rounds={rounds}"], "resumed"
    else:
        shutil.rmtree(d, ignore_errors=True)  # failed or never checkpointed: start afresh
        cmd, done = [*cli, *overrides, f"num_rounds={rounds}", f"hydra.run.dir={d}"], "ran"
    log = d.parent / f"{d.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        rc = run_in_own_session(cmd, fh)
    if rc == 2 and done == "ran" and run_status(d) == "missing":
        errors = [line for line in log.read_text().splitlines() if line.startswith("fedtune: error:")]
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / REFUSED, (errors[-1] if errors else "fedtune run exited 2") + "\n")
        return "refused"
    if rc != 0 or run_status(d) != "completed":
        raise RuntimeError(f"fedtune run exited {rc}; see {log}")
    return done


@dataclass
class Plan:
    """Every run of one study: its overrides, rounds and where it lives."""

    out: Path
    bench: Benchmark
    rounds: int
    tune_rounds: int
    trials_budget: int
    tune_seed: int
    validation_fraction: float
    metric: str
    target: float
    title: str
    extra: list[str]
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    _trials: dict[str, tuple] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: Any) -> "Plan":
        bench = BENCHMARKS[args.benchmark]
        rounds = args.rounds or bench.rounds
        return cls(Path(args.out or bench.out), bench, rounds, args.tune_rounds or rounds, args.trials, args.tune_seed,
                   args.validation_fraction, bench.metric, bench.target if args.target is None else args.target,
                   bench.title, list(args.overrides), args.space)

    def prepare(self) -> None:
        self.bench.prepare(self.out)

    def base_overrides(self, strategy: str) -> list[str]:
        """The untuned run of ``strategy`` (no partition, seed or split)."""
        method, options = method_of(strategy)
        return [f"strategy={method}", *options, *self.bench.per_strategy(method, self.extra),
                *self.bench.overrides(self.out), *self.extra]

    def _cell(self, partition: str, strategy: str, seed: int) -> list[str]:
        base = self.base_overrides(strategy)
        return [base[0], f"seed={seed}", *self.bench.partitions[partition], *base[1:]]

    def search_space(self, strategy: str) -> dict[str, Any]:
        """The method's declared space with ``--space``'s replacements (an empty one drops a knob)."""
        space = dict(METHODS.get(method_of(strategy)[0]).tuning)
        for key, candidates in self.space.get("*", {}).items():
            if key in space:
                space[key] = candidates
        space.update(self.space.get(strategy, {}))
        return {k: v for k, v in space.items() if v is not None}

    def trials(self, strategy: str) -> tuple[dict[str, Any], dict[str, list[Any]], int, list[dict[str, Any]]]:
        """(space, candidates, grid size, the trials) of ``strategy``: the same on every call and partition."""
        if strategy not in self._trials:
            space = self.search_space(strategy)
            cfg = compose(self.base_overrides(strategy)) if space else None
            values = resolve_space(space, {k: config_value(cfg, k) for k in space})
            points = select_trials(values, self.trials_budget, self.tune_seed, strategy)
            self._trials[strategy] = (space, values, len(grid(values)), points)
        return self._trials[strategy]

    def trial_overrides(self, partition: str, strategy: str, point: dict[str, Any]) -> list[str]:
        last_only = [f"eval.every={self.tune_rounds}"] if self.bench.trial_eval_last_only else []
        return [*self._cell(partition, strategy, self.tune_seed), f"dataset.validation_fraction={self.validation_fraction}",
                "eval.split=validation", *last_only, *overrides_of(point)]

    def final_overrides(self, partition: str, strategy: str, seed: int, chosen: list[str] | None) -> list[str]:
        """A final run: the chosen settings and the tuning's validation carve (None: untuned, no carve)."""
        tuned = [] if chosen is None else [f"dataset.validation_fraction={self.validation_fraction}", *chosen]
        return [*self._cell(partition, strategy, seed), *tuned]

    def final_expected(self, chosen: list[str] | None) -> dict[str, Any]:
        """The settings a completed final run must have to count (a run of another study does not)."""
        if chosen is None:
            return {}
        return {"dataset.validation_fraction": self.validation_fraction,
                **{o.partition("=")[0]: _value(o.partition("=")[2]) for o in chosen}}

    def check_record(self, partition: str, strategy: str, points: list[dict[str, Any]]) -> None:
        """Refuse to mix trials of two plans in one folder (another --trials, --space or --tune-seed)."""
        record = read_record(self.out, partition, strategy)
        if record is not None and [t["overrides"] for t in record["trials"]] != [overrides_of(p) for p in points]:
            raise RuntimeError(f"{self.out}/tuning/{partition}/{strategy}/tuning.json holds the trials of another "
                               "search space, budget or tuning seed; move it away or use another --out")

    def recorded_choice(self, partition: str, strategy: str) -> list[str] | None:
        """The chosen overrides in ``tuning.json``, if it holds this plan's trials and a choice."""
        record = read_record(self.out, partition, strategy)
        if record is None or record["choice"] is None:
            return None
        self.check_record(partition, strategy, self.trials(strategy)[3])
        return list(record["choice"]["overrides"])


def machine() -> dict[str, Any]:
    """What ran the study: CPU model and count, memory, torch and the commit (the wall times
    of each run are in its metrics.csv; ``sittings.jsonl`` says on which machine)."""
    import os
    import platform

    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0") if Path("/proc/meminfo").is_file() else "0"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"host": platform.node(), "cpu": model or platform.processor(), "cpus": os.cpu_count(),
            "memory_gib": round(int(mem) / 2**20, 1), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "commit": commit}


def log_sitting(out: Path, record: dict[str, Any]) -> None:
    """Append one line to ``OUT/sittings.jsonl`` (a study is filled over many sittings)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sittings.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def untuned_leftovers(plan: Plan, partitions: list[str], strategies: list[str], seeds: list[int]) -> list[Path]:
    """Completed final-run folders of the grid without the tuned study's validation carve."""
    want = {"dataset.validation_fraction": plan.validation_fraction}
    return [d for p in partitions for s in strategies for k in seeds
            if expected_mismatch(d := run_dir(plan.out, p, s, k), want) is not None]
