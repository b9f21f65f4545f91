"""What ``study.py`` runs: the benchmarks, each run's overrides, the trials, one run to completion.

Kept apart from the command line so that the plan (which runs exist, with which settings)
is one piece of code that the runner, ``--status`` and the checks of what is on disk share.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import yaml

from fedtune.config import compose
from fedtune.registry import METHODS
from fedtune.results.checkpoint import has_checkpoint
from fedtune.results.store import atomic_write_text
from fedtune.results.study import run_dir, run_status
from fedtune.results.tuning import REFUSED, read_record
from fedtune.results.verdicts import Claim
from fedtune.runtime.processes import kill_session
from fedtune.tuning import Relative, config_value, grid, overrides_of, resolve_space, select_trials
from study_claims import BBC_CLAIMS, DP_CLAIMS

PARTITIONS = {
    "dir0.1": ["partition.kind=dirichlet", "partition.alpha=0.1"],
    "dir0.5": ["partition.kind=dirichlet", "partition.alpha=0.5"],
    "iid": ["partition.kind=iid"],
}
# Per-strategy settings of the study on the default model, MiniLM (README, "Seed-based
# methods"): FedKSeed's lr 1e-3 diverges there, 1e-4 is the largest stable value; K=1024
# keeps its direction bank in memory.  Another model (model=tiny) uses the configs' defaults.
# These are the untuned settings: tuning scales FedKSeed's lr and K from them.
# one_byte: its 64 projected gradients a round at batch 4, not its config's 16, keep its forward
# passes a round near FedKSeed's 200 × 1 and a run under 15 minutes (simulations/README.md).
MINILM_STRATEGY_OVERRIDES = {
    "fedkseed": ["strategy.num_seeds=1024", "strategy.lr=1e-4"],
    "fedkseed_pro": ["strategy.num_seeds=1024", "strategy.lr=1e-4"],
    "one_byte": ["strategy.batch_size=4"],
}
# The private benchmark: the bbc benchmark's Dir(0.5) clients under DP-SGD (privacy=dp_sgd: each
# client's sigma calibrated to spend exactly the target epsilon over its planned steps), one
# "partition" per epsilon.  Fed-SB runs with its server-side init (nothing un-noised leaves a
# client; the paper's public-data init), FFA-LoRA as the other DP-minded LoRA variant.
DP_PARTITIONS = {f"dir0.5-eps{e}": [*PARTITIONS["dir0.5"], "privacy=dp_sgd", f"privacy.target_epsilon={e}"]
                 for e in (1, 3)}
DP_STRATEGIES = ("fedavg_lora", "ffa_lora", "fed_sb_server")
HEADLINES_FILE = "data/bbc_headlines.jsonl"
# The instruction benchmark, scaled to 2 CPU cores (simulations/README.md): one seen topic per
# client and 'tech' held out; prompts of 96 tokens (an article's first 30 words), 4 local steps of
# batch 4; greedy headlines of at most 16 tokens, scored on 32 seen + 32 held-out examples every
# 2 rounds (generation is most of a run's time on a CPU: a tuning trial scores round 0 and its last only).
HEADLINE_LEAD_WORDS = 30
INSTRUCT_OVERRIDES = [
    "model=smollm2", "model.max_length=96", "dataset=hf", "dataset.format=prompt_completion", "dataset.heldout=[tech]",
    "federation.num_clients=4", "train.batch_size=4", "train.local_steps=4", "eval.max_examples=32",
    "eval.max_new_tokens=16", "eval.every=2"]
# FedKSeed on SmolLM2's norms (35k scalars): 20 ZO steps of batch 2 per round keep its round near a
# first-order one on 2 cores (its paper: 200 of batch 1); K = 1024 and lr 1e-4 as on MiniLM.
_ZO_INSTRUCT = ["strategy.num_seeds=1024", "strategy.lr=1e-4", "strategy.local_steps=20", "strategy.batch_size=2"]
INSTRUCT_STRATEGY_OVERRIDES = {"fedkseed": _ZO_INSTRUCT, "fedkseed_pro": _ZO_INSTRUCT,
                               "one_byte": ["strategy.local_steps=20", "strategy.batch_size=2"]}


@functools.lru_cache(maxsize=8)
def _model_name(extra: tuple[str, ...]) -> str:
    return compose(list(extra)).model.name  # the config decides the default model, not this script


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


def strategy_overrides(strategy: str, extra: list[str]) -> list[str]:
    """The bbc benchmark's untuned settings of ``strategy`` on MiniLM ([] on another model)."""
    if strategy not in MINILM_STRATEGY_OVERRIDES or _model_name(tuple(extra)) != "minilm":
        return []
    return MINILM_STRATEGY_OVERRIDES[strategy]


def write_headlines(out: Path) -> None:
    """``OUT/data/bbc_headlines.jsonl`` from the packaged corpus (rewritten only when it differs)."""
    from fedtune.data.instruct import bbc_headline_rows

    path = out / HEADLINES_FILE
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bbc_headline_rows(HEADLINE_LEAD_WORDS))
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its partitions, rounds, metric and the overrides of every run."""

    partitions: dict[str, list[str]]
    out: str
    rounds: int
    metric: str
    target: float
    title: str
    overrides: Callable[[Path], list[str]]
    per_strategy: Callable[[str, list[str]], list[str]]
    prepare: Callable[[Path], None] = lambda out: None
    trial_eval_last_only: bool = False  # a trial scores round 0 and its last only (generation is costly)
    strategies: tuple[str, ...] = ()  # the default --strategies (empty: every registered method)
    claims: tuple[Claim, ...] = ()  # the papers' claims its runs re-test (study_claims.py)


BENCHMARKS = {
    "bbc": Benchmark(PARTITIONS, "simulations/results/study", 20, "eval_accuracy", 0.8,
                     "MiniLM + BBC News, 10 clients, tuned per method", lambda out: [], strategy_overrides,
                     claims=BBC_CLAIMS),
    "instruct": Benchmark(
        {"category": ["partition.kind=label", "partition.by=category"]}, "simulations/results/study_instruct", 8,
        "rouge_l", 0.25, "SmolLM2-135M-Instruct, BBC headlines, one topic per client, tech held out",
        lambda out: [*INSTRUCT_OVERRIDES, f"dataset.path={(out / HEADLINES_FILE).resolve()}"],
        lambda strategy, extra: INSTRUCT_STRATEGY_OVERRIDES.get(strategy, []), write_headlines, True),
    "dp": Benchmark(DP_PARTITIONS, "simulations/results/study_dp", 20, "eval_accuracy", 0.5,
                    "MiniLM + BBC News under example-level DP-SGD, Dir(0.5), tuned per method and ε",
                    lambda out: [], strategy_overrides, strategies=DP_STRATEGIES, claims=DP_CLAIMS),
}


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
