"""Overhead of fedtune's Flower + Ray simulation against a bare single-process loop.

Both paths run the same local steps for the same clients: the same config, the same
seeded client sampling (:func:`fedtune.sampling.sample_partitions`), the same trainer
(``clients/``) on the same seeded batches, the same aggregation maths (the strategy's
``aggregate``) and the same evaluation rounds.  The bare loop calls them directly in
one process (no Flower messages, no serialization, no Ray); fedtune runs ``fedtune run``
in a subprocess, timed from launch to exit.  The report splits fedtune's extra time into
start-up + shutdown (imports, Hydra, Ray, actors loading the model) and per-round
overhead (messages, serialization, Ray dispatch), and checks that both paths reach the
same model (train losses and final accuracy).

Run (the issue's setting: 100 clients, 10 per round, 20 rounds)::

    .venv/bin/python simulations/bench_overhead.py --out simulations/results/bench_overhead
    .venv/bin/python simulations/bench_overhead.py --rounds 3 --out /tmp/overhead  # quick look

Writes ``overhead.json`` (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_OVERRIDES = ["federation.num_clients=100", "federation.fraction=0.1", "partition.kind=iid",
                   "partition.min_partition_size=5"]


def flower_serialization_seconds(downlink: dict, upload: dict) -> float:
    """Time Flower's own (de)serialization of one client's arrays, both ways.

    ``ArrayRecord`` turns each tensor into npy bytes and ``to_torch_state_dict`` back;
    this is the serialization a message costs on top of Ray's transport.  Measured here,
    outside the bare loop's round times, so the bare loop stays bare.
    """
    from flwr.app import ArrayRecord

    t = time.perf_counter()
    for arrays in (downlink, upload):
        if arrays:
            ArrayRecord({k: v.detach().cpu() for k, v in arrays.items()}).to_torch_state_dict()
    return time.perf_counter() - t


def bare_loop(overrides: list[str]) -> dict:
    """The federation as a plain loop over the sampled clients, in this process."""
    t0 = time.perf_counter()
    from fedtune.config import compose
    from fedtune.evaluation import evaluate
    from fedtune.flower.strategy import ClientUpdate, FedtuneStrategy
    from fedtune.registry import METHODS
    from fedtune.runtime.workspace import Workspace
    from fedtune.sampling import sample_partitions
    from fedtune.trainer import TrainContext

    cfg = compose(overrides)
    ws = Workspace(cfg)
    model, test = ws.model(), ws.encoded("test")
    strategy = METHODS.get(cfg.strategy.name).strategy_cls.from_config(cfg)
    if type(strategy).setup is not FedtuneStrategy.setup:
        raise SystemExit(f"bench_overhead: {cfg.strategy.name} has a one-time setup exchange; pick a strategy without one")
    strategy.initialize(ws.initial_arrays())
    states: dict[int, dict] = {}
    pids = range(cfg.federation.num_clients)

    def central_eval(server_round: int) -> float:
        strategy.load_into(model)
        if server_round % cfg.eval.every and server_round != cfg.num_rounds:
            return math.nan
        return evaluate(model, test, cfg.eval.batch_size, ws.device, cfg.eval.max_examples)[1]

    acc0 = central_eval(0)
    setup_s = time.perf_counter() - t0
    rounds = []
    for r in range(1, cfg.num_rounds + 1):
        t, round_serialize_s = time.perf_counter(), 0.0
        updates = []
        for pid in sample_partitions(cfg.seed, r, pids, cfg.federation.clients_per_round):
            ctx = TrainContext(server_round=r, partition_id=pid, device=ws.device, state=states.setdefault(pid, {}))
            downlink = strategy.downlink(r, pid)
            upload, metrics = ws.trainer.train(model, downlink, ws, ctx)
            round_serialize_s += flower_serialization_seconds(downlink, upload)
            updates.append(ClientUpdate(pid, int(metrics["num-examples"]), upload, dict(metrics)))
        strategy.global_arrays = strategy.aggregate(r, updates)  # as aggregate_train does
        train_loss = sum(u.metrics["train-loss"] * u.num_examples for u in updates) / sum(u.num_examples for u in updates)
        acc = central_eval(r)
        rounds.append({"round": r, "seconds": time.perf_counter() - t - round_serialize_s,  # timed apart
                       "serialization_seconds": round_serialize_s, "train_loss": train_loss, "accuracy": acc})
    import torch

    serialize_s = sum(r["serialization_seconds"] for r in rounds)
    return {"torch_threads": torch.get_num_threads(), "setup_seconds": setup_s, "initial_accuracy": acc0,
            "rounds": rounds, "total_seconds": time.perf_counter() - t0 - serialize_s}


def fedtune_run(overrides: list[str], run_dir: Path) -> dict:
    """``fedtune run`` in a subprocess; wall time from launch to exit, and its metrics."""
    from fedtune.results.store import read_metrics

    cli = Path(sys.executable).with_name("fedtune")
    t0 = time.perf_counter()
    subprocess.run([str(cli), "run", *overrides, f"hydra.run.dir={run_dir}"], check=True)
    total = time.perf_counter() - t0
    rows = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"total_seconds": total, "rows": rows, "summary": summary}


def report(bare: dict, fed: dict) -> dict:
    """Ratio, and where fedtune's extra time goes.

    fedtune's time splits into start-up + shutdown (launch to round 0's row: imports,
    Hydra, Ray, the server's model and round-0 evaluation; after the last row: Ray
    shutdown), round 1's extra over a steady round (each actor imports torch and
    transformers, loads the model and tokenizes its data once), and steady rounds
    (messages, serialization and Ray dispatch, next to the training itself).
    """
    rows = fed["rows"]
    fed_rounds = [float(r["round_seconds"]) for r in rows[1:]]
    bare_rounds = [r["seconds"] for r in bare["rounds"]]
    rounds_total = float(rows[-1]["wall_seconds"]) - float(rows[0]["wall_seconds"])
    before_round1 = fed["total_seconds"] - rounds_total
    losses = [(float(r["train_loss"]), b["train_loss"]) for r, b in zip(rows[1:], bare["rounds"])]
    # steady rounds: not round 1 (actor start-up) and not the last (the only evaluation)
    steady = fed_rounds[1:-1] or fed_rounds
    bare_steady = bare_rounds[1:-1] or bare_rounds
    return {
        "ratio": fed["total_seconds"] / bare["total_seconds"],
        "bare": {"torch_threads": bare["torch_threads"], "total_s": bare["total_seconds"],
                 "setup_and_round0_eval_s": bare["setup_seconds"],
                 "rounds_s": sum(bare_rounds), "median_steady_round_s": statistics.median(bare_steady),
                 "round_seconds": bare_rounds},
        "fedtune": {"total_s": fed["total_seconds"], "startup_shutdown_and_round0_eval_s": before_round1,
                    "rounds_s": rounds_total, "round1_s": fed_rounds[0],
                    "round1_extra_s": fed_rounds[0] - statistics.median(steady),
                    "median_steady_round_s": statistics.median(steady),
                    "aggregate_s": sum(float(r["aggregate_seconds"]) for r in rows[1:]),
                    "round_seconds": fed_rounds},
        "flower_serialization_s_per_round": statistics.fmean(r["serialization_seconds"] for r in bare["rounds"]),
        "per_round_overhead_s": (rounds_total - sum(bare_rounds)) / len(bare_rounds),
        "steady_round_ratio": statistics.median(steady) / statistics.median(bare_steady),
        "max_train_loss_difference": max(abs(a - b) for a, b in losses),
        "final_accuracy": {"bare": bare["rounds"][-1]["accuracy"], "fedtune": float(rows[-1]["eval_accuracy"])},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--strategy", default="fedavg_lora")
    p.add_argument("--out", type=Path, default=Path("simulations/results/bench_overhead"))
    p.add_argument("overrides", nargs="*", help="more fedtune overrides, e.g. model=tiny dataset=tiny")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = [*BENCH_OVERRIDES, f"strategy={args.strategy}", f"num_rounds={args.rounds}",
                 f"eval.every={args.rounds}", *args.overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    fed = fedtune_run(overrides, args.out / "fedtune_run")
    bare = bare_loop(overrides)
    res = {"overrides": overrides, "cpus": os.cpu_count(), **report(bare, fed)}
    from fedtune.results.store import atomic_write_text

    atomic_write_text(args.out / "overhead.json", json.dumps(res, indent=2) + "\n")
    b, f = res["bare"], res["fedtune"]
    print(f"bare loop : {b['total_s']:7.1f} s (setup + round-0 eval {b['setup_and_round0_eval_s']:.1f} s, "
          f"rounds {b['rounds_s']:.1f} s, steady {b['median_steady_round_s']:.2f} s/round)")
    print(f"fedtune   : {f['total_s']:7.1f} s (start-up/shutdown + round-0 eval {f['startup_shutdown_and_round0_eval_s']:.1f} s, "
          f"rounds {f['rounds_s']:.1f} s of which round 1's actor start-up {f['round1_extra_s']:.1f} s, "
          f"steady {f['median_steady_round_s']:.2f} s/round, aggregate {f['aggregate_s']:.2f} s)")
    print(f"Flower (de)serialization of the round's arrays: {res['flower_serialization_s_per_round']:.3f} s/round; "
          f"bare loop ran torch with {b['torch_threads']} threads, fedtune's actors with 1 each")
    print(f"ratio {res['ratio']:.3f} (steady rounds {res['steady_round_ratio']:.3f}); "
          f"per-round overhead {res['per_round_overhead_s']:+.2f} s; "
          f"max |train-loss difference| {res['max_train_loss_difference']:.2e}; "
          f"final accuracy bare {res['final_accuracy']['bare']:.4f} fedtune {res['final_accuracy']['fedtune']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
