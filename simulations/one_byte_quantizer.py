"""The one-byte quantiser's error against the fp32 projected gradients it replaces.

Real projected gradients: the ``one_byte`` client's own SPSA measurements (``model=tiny
dataset=tiny``, in process, round 1 of every client), then quantised at the adaptive step
(``strategy.scale=0``) and at fixed steps, with nearest and stochastic rounding::

    .venv/bin/python simulations/one_byte_quantizer.py --out simulations/results/one_byte_quantizer

Prints a table of ‖q s − g‖ / ‖g‖, max |q s − g| and the share of saturated codes, and
writes ``quantizer.json`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedtune.config import compose  # noqa: E402
from fedtune.randomness import torch_generator  # noqa: E402
from fedtune.runtime.workspace import Workspace  # noqa: E402
from fedtune.trainer import TrainContext  # noqa: E402
from strategies.one_byte import QMAX, dequantize, empty_log, quantize  # noqa: E402

SCALES = (0.0, 0.03, 0.1, 0.3)


def projected_gradients(clients: int, steps: int) -> torch.Tensor:
    cfg = compose(["model=tiny", "dataset=tiny", f"federation.num_clients={clients}", "strategy=one_byte",
                   f"strategy.local_steps={steps}", "strategy.batch_size=8", "runtime.device=cpu"])
    ws = Workspace(cfg)
    model, trainer = ws.model(), ws.trainer
    grads = []
    for pid in range(clients):
        ctx = TrainContext(server_round=1, partition_id=pid, device=ws.device)
        grads.append(trainer.run(model, empty_log(steps), ws, ctx)["grads"])
    return torch.stack(grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "simulations/results/one_byte_quantizer")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    grads = projected_gradients(args.clients, args.steps)
    rows = []
    for scale in SCALES:
        for rounding in ("nearest", "stochastic"):
            errors, worst, saturated, steps = [], 0.0, 0, []
            for k, g in enumerate(grads):
                codes, s = quantize(g, scale, rounding, torch_generator(0, "bench", k))
                e = dequantize(codes, s) - g
                errors.append(float(e.norm() / g.norm()))
                worst, steps = max(worst, float(e.abs().max())), steps + [s]
                saturated += int((codes.abs() == QMAX).sum()) if scale > 0 else 0
            rows.append({"scale": scale or "adaptive", "rounding": rounding,
                         "rel_error": sum(errors) / len(errors), "max_abs_error": worst,
                         "mean_step": sum(steps) / len(steps), "saturated": saturated / grads.numel()})
    print(f"|g|: mean {float(grads.abs().mean()):.4g}, max {float(grads.abs().max()):.4g} "
          f"({args.clients} clients x {args.steps} steps)")
    print("| scale | rounding | ‖qs − g‖/‖g‖ | max |qs − g| | saturated |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['scale']} | {r['rounding']} | {r['rel_error']:.4f} | {r['max_abs_error']:.4g} | "
              f"{r['saturated']:.1%} |")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "quantizer.json.tmp"
    tmp.write_text(json.dumps({"gradients": {"mean_abs": float(grads.abs().mean()),
                                             "max_abs": float(grads.abs().max())}, "rows": rows}, indent=1))
    os.replace(tmp, args.out / "quantizer.json")


if __name__ == "__main__":
    main()
