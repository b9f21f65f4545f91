"""Benchmark: FedKSeed model rebuild θ = θ0 − η Σ_j a_j z(s_j), vectorised vs naive.

FedKSeed (arXiv 2312.06353) §5.4: a client (or the server) rebuilds the model from θ0 and
the K per-seed accumulators.  The *naive* rebuild loops over seeds and, per seed, over
parameters (a fresh generator, a fresh draw, one axpy per parameter tensor).  The
*vectorised* one (:func:`fedtune.randomness.add_directions`) re-seeds one generator into
a reused ``(rows, d)`` buffer and applies each chunk with one matrix-vector product.
Both use the same directions, so the results agree to fp32 rounding (printed).

    .venv/bin/python simulations/bench_fedkseed_rebuild.py --layout tiny --seeds 4096
    .venv/bin/python simulations/bench_fedkseed_rebuild.py --layout minilm --seeds 1024
"""

from __future__ import annotations

import argparse
import time

import torch

from fedtune.randomness import add_directions, seed_pool

# Tuned tensors under ``trainable: head_and_norms`` (LayerNorms, pooler, 4-class head).
LAYOUTS = {
    "tiny": [(32,)] * 10 + [(32, 32), (32,), (4, 32), (4,)],      # d = 1,508
    "minilm": [(384,)] * 26 + [(384, 384), (384,), (4, 384), (4,)],  # d = 159,364
}


def naive(theta: list[torch.Tensor], seeds: torch.Tensor, coeffs: torch.Tensor, lr: float) -> None:
    d = sum(t.numel() for t in theta)
    for s, c in zip(seeds.tolist(), coeffs.tolist()):
        gen = torch.Generator().manual_seed(s)
        z, pos = torch.randn(d, generator=gen), 0
        for t in theta:
            t.add_(z[pos: pos + t.numel()].view_as(t), alpha=-lr * c)
            pos += t.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="tiny")
    ap.add_argument("--seeds", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    shapes = LAYOUTS[args.layout]
    d = sum(torch.Size(s).numel() for s in shapes)
    seeds = seed_pool(0, args.seeds, "bench")
    coeffs = torch.randn(args.seeds, generator=torch.Generator().manual_seed(1))
    theta0 = torch.randn(d, generator=torch.Generator().manual_seed(2))
    lr = 1e-3
    t_naive, t_fast = [], []
    for _ in range(args.repeats):
        parts = [p.clone() for p in theta0.split([torch.Size(s).numel() for s in shapes])]
        parts = [p.view(s) for p, s in zip(parts, shapes)]
        t = time.perf_counter()
        naive(parts, seeds, coeffs, lr)
        t_naive.append(time.perf_counter() - t)
        slow = torch.cat([p.reshape(-1) for p in parts])
        t = time.perf_counter()
        fast = add_directions(theta0.clone(), seeds, coeffs, alpha=-lr)
        t_fast.append(time.perf_counter() - t)
    err = float((fast - slow).abs().max()) / float(slow.abs().max())
    print(f"layout {args.layout}: d = {d:,}, K = {args.seeds:,}, {len(shapes)} tensors, 1 thread")
    print(f"naive per-seed loop : {min(t_naive):.3f} s")
    print(f"vectorised rebuild  : {min(t_fast):.3f} s")
    print(f"speed-up            : {min(t_naive) / min(t_fast):.1f}x   (max |diff| / max |θ| = {err:.1e})")


if __name__ == "__main__":
    main()
