"""The GPU path, end to end: CUDA clients sharing one GPU, bf16, then 4-bit (QLoRA).

CI has no GPU, so this is the check to run on a machine that has one::

    .venv/bin/python simulations/gpu_check.py --out simulations/results/gpu_check

It writes a tiny random Llama checkpoint and an Alpaca-style JSON Lines file into a
temporary folder (offline, nothing downloaded), then runs ``fedtune run``'s simulation
twice through ``model=hf dataset=hf`` with 2 clients that share the GPU through
``runtime.client_num_gpus=0.5``, 2 rounds of FedAvg-LoRA each:

``bf16``   ``model.dtype=bfloat16`` on CUDA;
``4bit``   ``model.quantization=4bit`` (bitsandbytes NF4) with bf16 compute.

A case passes when the run completes with no client failure, every client replied in
every round, and the eval loss is finite.  ``result.json`` (written atomically) holds each
case's outcome, the device name and the metrics rows; the exit status is 0 only when every
case passed.  On a machine without CUDA it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the offline tiny-checkpoint builders the test suite uses

CASES = {
    "bf16": ["model.dtype=bfloat16"],
    "4bit": ["model.dtype=bfloat16", "model.quantization=4bit"],
}


def base_overrides(model_dir: Path, data_file: Path) -> list[str]:
    return ["model=hf", f"model.path={model_dir}", "model.max_length=96", "dataset=hf", f"dataset.path={data_file}",
            "dataset.format=alpaca", "strategy=fedavg_lora", "federation.num_clients=2", "num_rounds=2",
            "train.local_steps=4", "train.batch_size=4", "eval.max_examples=16", "runtime.device=cuda",
            "runtime.client_num_gpus=0.5", "runtime.ray_num_cpus=4", "seed=0"]


def run_case(name: str, overrides: list[str], out: Path) -> dict:
    from fedtune.config import compose
    from fedtune.results.store import read_metrics
    from fedtune.runtime.simulation import simulate

    started = time.time()
    try:
        summary = simulate(compose(overrides), out / name)
        rows = read_metrics(out / name)
    except Exception as exc:  # noqa: BLE001  (a check reports every case, failed ones included)
        return {"passed": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(),
                "seconds": round(time.time() - started, 1)}
    replies = [int(r["num_replies"]) for r in rows[1:]]
    losses = [float(r["eval_loss"]) for r in rows]
    passed = (summary.get("status") == "completed" and summary.get("client_failures") == 0
              and replies == [2] * (len(rows) - 1) and all(math.isfinite(v) for v in losses))
    return {"passed": passed, "overrides": overrides, "seconds": round(time.time() - started, 1),
            "replies": replies, "eval_loss": losses, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "simulations" / "results" / "gpu_check")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    from hf_testing import save_tiny_model, write_dataset

    from fedtune.results.store import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedtune-gpu-check-") as tmp:
        model_dir = save_tiny_model(Path(tmp) / "llama", "llama")
        data_file = write_dataset(Path(tmp) / "alpaca.jsonl", "alpaca", n=64)
        results = {name: run_case(name, [*base_overrides(model_dir, data_file), *CASES[name]], args.out)
                   for name in args.cases}
    report = {"device": torch.cuda.get_device_name(0), "bf16_supported": torch.cuda.is_bf16_supported(),
              "torch": torch.__version__, "cases": results}
    atomic_write_text(args.out / "result.json", json.dumps(report, indent=2, default=str))
    for name, result in results.items():
        print(f"{name:>5}: {'passed' if result['passed'] else 'FAILED'} in {result['seconds']} s"
              + ("" if result["passed"] else f"  ({result.get('error', 'see result.json')})"))
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
