"""Scale: peak memory and seconds per round for 10, 1,000 and 10,000 virtual clients.

Each setting is one ``fedtune run`` (Flower simulation on Ray, tiny model, IID partition
of one synthetic topic dataset of 31,252 sentences, the same for every N) with 10 clients
sampled per round, so the work per round is the same and only the number of virtual
clients changes.  While it runs, the whole process tree (the driver, Ray's GCS and raylet,
the client actors) is sampled every 0.2 s; its memory is the sum of the processes'
proportional set sizes (PSS: shared pages divided among their users, so nothing is
counted twice).  Round 1 (the actors' start-up, and on Flower's own path a roll-call of
one query per virtual client) is reported apart from the steady rounds.

Each N runs twice (``--engine both``): on fedtune's defaults (the server reads the
engine's node map, :mod:`fedtune.runtime.roster`, and messages move with
:mod:`fedtune.runtime.message_pump`) and on Flower's own path (a roll-call and Flower's
per-node message loop), so the table shows what each costs on the same machine.

Run::

    .venv/bin/python simulations/bench_scale.py --out simulations/results/bench_scale
    .venv/bin/python simulations/bench_scale.py --clients 10 1000 --rounds 3 --engine fedtune --out /tmp/scale

Writes ``scale.json`` (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedtune.runtime.processes import family

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_dataset import make_rows  # noqa: E402  (a sibling script, not a package)

ROWS_PER_TOPIC = 7_813  # 31,252 rows: 25,001 for training after the 20 % test split, > 2 per client at 10,000


def tree_pss_bytes(root: int) -> int:
    """Sum of PSS over ``root`` and all its descendants (0 for processes gone meanwhile)."""
    total = 0
    for pid in family([root]):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration):
            pass
    return total


ENGINES = {  # fedtune's defaults, and Flower's own simulation path (tests/conftest.py STOCK_ENGINE)
    "fedtune": ["runtime.node_map=engine", "runtime.fast_message_pump=true"],
    "flower": ["runtime.node_map=rollcall", "runtime.fast_message_pump=false"],
}


def run_one(num_clients: int, rounds: int, data: Path, out: Path, engine: str) -> dict:
    overrides = [*ENGINES[engine], "model=tiny", "dataset=csv", f"dataset.path={data}",
                 f"federation.num_clients={num_clients}", f"federation.fraction={10 / num_clients}",
                 "federation.min_clients=10", "partition.kind=iid", "partition.min_partition_size=1",
                 f"num_rounds={rounds}", f"eval.every={rounds}", f"hydra.run.dir={out}"]
    cli = Path(sys.executable).with_name("fedtune")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(cli), "run", *overrides])
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_pss_bytes(proc.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    done.set()
    sampler.join()
    row = {"num_clients": num_clients, "engine": engine, "total_s": time.perf_counter() - t0,
           "peak_pss_mb": peak / 2**20}
    if rc != 0:  # recorded, not raised: Flower's own path may not get through the roll-call at 10,000
        summary = out / "summary.json"
        error = json.loads(summary.read_text()).get("error", "") if summary.is_file() else ""
        print(f"bench_scale: {engine} with {num_clients} clients exited {rc}: {error}", flush=True)
        return {**row, "status": "failed", "error": error}
    from fedtune.results.store import read_metrics

    rows = read_metrics(out)
    secs = [float(r["round_seconds"]) for r in rows[1:]]
    return {**row, "status": "completed", "round1_s": secs[0],
            "median_round_s_after_1": statistics.median(secs[1:]) if len(secs) > 1 else None,
            "final_accuracy": float(rows[-1]["eval_accuracy"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 1_000, 10_000])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("simulations/results/bench_scale"))
    p.add_argument("--engine", choices=[*ENGINES, "both"], default="both",
                   help="fedtune: the engine's node map and one-pass message pump (the default); "
                        "flower: a roll-call and Flower's own message loop; both: each in turn")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "topics_31k.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in make_rows(per_topic=ROWS_PER_TOPIC, seed=11))
    engines = list(ENGINES) if args.engine == "both" else [args.engine]
    results = [run_one(n, args.rounds, data, args.out / f"{engine}_{n}", engine)
               for engine in engines for n in args.clients]
    data.unlink()
    from fedtune.results.store import atomic_write_text

    atomic_write_text(args.out / "scale.json", json.dumps({"rounds": args.rounds, "cpus": os.cpu_count(),
                                                           "results": results}, indent=2) + "\n")
    print(f"{'engine':>8} {'clients':>8} {'peak PSS MB':>12} {'x first':>8} {'round 1 s':>10} "
          f"{'s/round (2..)':>14} {'total s':>8}")
    for r in results:
        base = next(b for b in results if b["engine"] == r["engine"])
        if r["status"] != "completed":
            print(f"{r['engine']:>8} {r['num_clients']:>8}  failed after {r['total_s']:.0f} s: {r['error']}")
            continue
        steady = r["median_round_s_after_1"]
        print(f"{r['engine']:>8} {r['num_clients']:>8} {r['peak_pss_mb']:>12.0f} "
              f"{r['peak_pss_mb'] / base['peak_pss_mb']:>8.2f} "
              f"{r['round1_s']:>10.2f} {steady if steady is None else f'{steady:.2f}':>14} {r['total_s']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
