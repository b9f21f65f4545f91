"""Every registered method completes a Ray round on a causal LM through ``model=hf dataset=hf``.

The test suite runs every method on Ray on a classifier, and on a causal LM in process; this
check runs each method's real Ray simulation on a causal LM, a user's own checkpoint and data
as fedtune sees them: a tiny random Llama saved with ``save_pretrained`` and an Alpaca-style
JSON Lines file (both written offline into a temporary folder), 2 clients, 1 round::

    .venv/bin/python simulations/every_method_hf.py --out simulations/results/every_method_hf

A method passes when its run completes, both clients reply, both uploads are metered and
metrics.csv has a Rouge-L cell.  Writes ``every_method_hf.json`` (atomically) and prints a
table; the exit status is 0 only when every method passed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the offline tiny-checkpoint builders the test suite uses


def overrides(name: str, model_dir: Path, data_file: Path, quick: tuple[str, ...]) -> list[str]:
    return ["model=hf", f"model.path={model_dir}", "model.max_length=64", "dataset=hf", f"dataset.path={data_file}",
            "dataset.format=alpaca", "partition.kind=iid", "federation.num_clients=2", "num_rounds=1",
            "train.local_steps=1", "train.batch_size=4", "eval.max_examples=4", "eval.max_new_tokens=2",
            "runtime.device=cpu", "seed=0", f"strategy={name}",
            *(q for q in quick if not q.startswith("model."))]  # quick's model.* settings are model=tiny's


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """A tiny random Llama checkpoint and a 32-example Alpaca JSON Lines file, written into ``folder``."""
    from hf_testing import save_tiny_model, write_dataset

    return save_tiny_model(folder / "llama", "llama"), write_dataset(folder / "alpaca.jsonl", "alpaca", n=32)


def check(name: str, args: list[str], out: Path) -> dict:
    from fedtune.config import compose
    from fedtune.runtime.simulation import simulate

    started = time.time()
    try:
        summary = simulate(compose(args), out / name)
    except Exception as exc:  # noqa: BLE001  (a check reports every method, failed ones included)
        return {"passed": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    with open(out / name / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(out / name / "ledger.csv", newline="") as fh:
        up = [r for r in csv.DictReader(fh) if r["kind"] == "train" and r["direction"] == "up"]
    passed = (summary.get("status") == "completed" and summary.get("client_failures") == 0
              and [int(r["num_replies"]) for r in rows[1:]] == [2] and rows[1]["rouge_l"] != ""
              and all(sum(int(r["payload_bytes"]) for r in up if r["partition_id"] == pid) > 0 for pid in "01")
              and {r["partition_id"] for r in up} == {"0", "1"})  # each client uploaded, in one message or more
    return {"passed": passed, "seconds": round(time.time() - started, 1), "eval_loss": float(rows[1]["eval_loss"]),
            "rouge_l": float(rows[1]["rouge_l"]), "bytes_up": sum(int(r["payload_bytes"]) for r in up)}


def main(argv: list[str] | None = None) -> int:
    from fedtune.registry import METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "every_method_hf")
    parser.add_argument("--methods", nargs="+", default=METHODS.names(), choices=METHODS.names())
    args = parser.parse_args(argv)

    from fedtune.results.store import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedtune-every-method-") as tmp, \
            tempfile.TemporaryDirectory(prefix="fedtune-every-method-runs-") as runs:
        model_dir, data_file = write_inputs(Path(tmp))
        results = {name: check(name, overrides(name, model_dir, data_file, METHODS.get(name).quick), Path(runs))
                   for name in args.methods}
    atomic_write_text(args.out / "every_method_hf.json", json.dumps(results, indent=2))
    print(f"{'method':<14} {'result':<7} {'seconds':>8} {'eval loss':>10} {'rouge-L':>8} {'bytes up':>10}")
    for name, r in results.items():
        if r["passed"]:
            print(f"{name:<14} {'passed':<7} {r['seconds']:>8} {r['eval_loss']:>10.4f} {r['rouge_l']:>8.4f} "
                  f"{r['bytes_up']:>10}")
        else:
            print(f"{name:<14} FAILED  {r.get('error', 'see every_method_hf.json')}")
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
