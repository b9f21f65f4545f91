"""The study's benchmarks: each one's partitions, rounds, metric, and every run's overrides.

``study_plan.py`` turns a benchmark into runs; this file only says what each benchmark is,
so that adding a benchmark or changing a method's untuned setting touches one place.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedtune.config import compose
from fedtune.results.store import atomic_write_text
from fedtune.results.verdicts import Claim
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
