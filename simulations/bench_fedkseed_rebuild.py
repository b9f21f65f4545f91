"""Benchmark: FedKSeed model rebuild θ = θ0 − η Σ_j a_j z(s_j): naive, streaming, banked.

FedKSeed (arXiv 2312.06353) §5.4: a client (or the server) rebuilds the model from θ0 and
the K per-seed accumulators, or syncs a cached model with ``a − a_last``.  Compared:

* **naive**: per seed a fresh generator, a fresh draw, one axpy per parameter tensor;
* **streaming** (:class:`fedtune.directions.SeedDirections`): one generator re-seeded
  into a reused chunk buffer, one matrix-vector product per chunk (still K·d draws);
* **banked** (:class:`fedtune.directions.DirectionBank`): the K×d directions generated
  once per process (*first build*), then every rebuild is one product over the bank and
  a sync one axpy per changed seed (*steady state*).

Also timed: fetching the directions of τ ZO steps (regenerated vs read from the bank).
All variants use the same directions; errors are max |θ − θ_naive| / max |θ_naive|.

    .venv/bin/python simulations/bench_fedkseed_rebuild.py --layout tiny --seeds 4096
    .venv/bin/python simulations/bench_fedkseed_rebuild.py --layout minilm --seeds 1024
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from fedtune.directions import DirectionBank, SeedDirections
from fedtune.randomness import seed_pool

# Tuned tensors under ``trainable: head_and_norms`` (LayerNorms, pooler, 4-class head).
LAYOUTS = {
    "tiny": [(32,)] * 10 + [(32, 32), (32,), (4, 32), (4,)],      # d = 1,508
    "minilm": [(384,)] * 26 + [(384, 384), (384,), (4, 384), (4,)],  # d = 159,364
}


def naive(theta: torch.Tensor, shapes: list[tuple[int, ...]], seeds: torch.Tensor, coeffs: torch.Tensor,
          lr: float) -> torch.Tensor:
    """The per-seed loop on per-parameter tensors (skipping zero coefficients); returns flat θ."""
    sizes = [torch.Size(s).numel() for s in shapes]
    parts = [p.clone().view(s) for p, s in zip(theta.split(sizes), shapes)]
    d = theta.numel()
    for s, c in zip(seeds.tolist(), coeffs.tolist()):
        if c == 0:
            continue
        gen = torch.Generator().manual_seed(s)
        z, pos = torch.randn(d, generator=gen), 0
        for t in parts:
            t.add_(z[pos: pos + t.numel()].view_as(t), alpha=-lr * c)
            pos += t.numel()
    return torch.cat([p.reshape(-1) for p in parts])


def best(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Fastest of ``repeats`` calls (seconds) and the last result."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max()) / float(ref.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="tiny")
    ap.add_argument("--seeds", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="τ ZO steps per client")
    ap.add_argument("--clients", type=int, default=3, help="clients per round (sync: the seeds they drew)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shapes = LAYOUTS[args.layout]
    d, K, lr = sum(torch.Size(s).numel() for s in shapes), args.seeds, 1e-3
    gen = torch.Generator().manual_seed(1)
    seeds = seed_pool(0, K, "bench")
    coeffs = torch.randn(K, generator=gen)  # a after many rounds: every seed used
    drawn = torch.randint(0, K, (args.clients * args.steps,), generator=gen)
    delta = torch.zeros(K).index_add_(0, drawn, torch.randn(len(drawn), generator=gen))  # one round's a − a_last
    theta0 = torch.randn(d, generator=torch.Generator().manual_seed(2))
    stream = SeedDirections(seeds, "gaussian", numel=d)
    print(f"layout {args.layout}: d = {d:,}, K = {K:,}, {len(shapes)} tensors, 1 thread; "
          f"bank {4 * K * d / 2**20:,.0f} MiB; sync: {int((delta != 0).sum())} seeds changed "
          f"({args.clients} clients x {args.steps} steps)")

    t_naive, ref = best(lambda: naive(theta0, shapes, seeds, coeffs, lr), args.repeats)
    t_stream, out_stream = best(lambda: stream.add(theta0.clone(), coeffs, alpha=-lr), args.repeats)
    t = time.perf_counter()
    bank = DirectionBank(seeds, "gaussian", numel=d)
    out_first = bank.add(theta0.clone(), coeffs, alpha=-lr)  # generates every row, then one product
    t_first = time.perf_counter() - t
    t_bank, out_bank = best(lambda: bank.add(theta0.clone(), coeffs, alpha=-lr), args.repeats)

    t_sync_naive, ref_sync = best(lambda: naive(theta0, shapes, seeds, delta, lr), args.repeats)
    t_sync_stream, _ = best(lambda: stream.add(theta0.clone(), delta, alpha=-lr), args.repeats)
    t_sync_bank, out_sync = best(lambda: bank.add(theta0.clone(), delta, alpha=-lr), args.repeats)

    steps = drawn[: args.steps].tolist()
    t_fetch_stream, _ = best(lambda: [stream.row(j) for j in steps][-1], args.repeats)
    t_fetch_bank, _ = best(lambda: [bank.row(j) for j in steps][-1], args.repeats)
    assert all(torch.equal(bank.row(j), stream.row(j).clone()) for j in steps[:20])

    rows = [("full rebuild (K seeds)", t_naive, t_stream, t_bank),
            (f"sync ({int((delta != 0).sum())} changed seeds)", t_sync_naive, t_sync_stream, t_sync_bank),
            (f"τ={args.steps} ZO direction fetches", None, t_fetch_stream, t_fetch_bank)]
    print(f"{'':34s} {'naive':>9s} {'streaming':>10s} {'banked':>9s}  naive/stream  naive/banked")
    for name, a, b, c in rows:
        ratios = f"{a / b:11.1f}x  {a / c:11.1f}x" if a is not None else f"{'':12s}  stream/banked {b / c:.0f}x"
        print(f"{name:34s} {a if a is not None else float('nan'):9.3f} {b:10.3f} {c:9.4f}  {ratios}")
    print(f"first build (generate K rows + rebuild): {t_first:.3f} s = {t_first / t_naive:.2f}x naive")
    print(f"max rel. error vs naive: streaming {rel_err(out_stream, ref):.1e}, banked {rel_err(out_bank, ref):.1e} "
          f"(first {rel_err(out_first, ref):.1e}), banked sync {rel_err(out_sync, ref_sync):.1e}")


if __name__ == "__main__":
    main()
