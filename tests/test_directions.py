"""Direction banks (fedtune/directions.py): same rows, same sums, cap respected.

FedKSeed (arXiv 2312.06353) §5.4 / Ferret (arXiv 2409.06277) §6: the bank of K×d
directions must be a pure cache of :func:`fedtune.randomness.draw_directions`.
"""

import pytest
import torch

from fedtune.config import compose
from fedtune.directions import DirectionBank, SeedDirections, cached_banks, clear_banks, directions_for
from fedtune.errors import ConfigError
from fedtune.randomness import draw_directions, seed_pool

SEGMENTS = [(0, 7), (7, 40), (40, 41), (41, 300)]  # odd offsets and a 1-long block
LONG = [(0, 7), (7, 40), (40, 41), (41, 20_000)]  # long enough for the per-row (axpy) path


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_banks()
    yield
    clear_banks()


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_bank_rows_are_bit_identical_to_draw_directions(kind: str) -> None:
    seeds = seed_pool(3, 20, "bank")
    bank = DirectionBank(seeds, kind, numel=300)
    for j in (5, 0, 19, 5):
        assert torch.equal(bank.row(j), draw_directions(seeds[j:j + 1], 300, kind)[0])
    idx = torch.tensor([2, 7, 7, 11])
    assert torch.equal(bank.rows(idx), draw_directions(seeds[idx], 300, kind))
    assert int(bank.filled.sum()) == 6  # lazily filled: only the rows asked for
    block = torch.stack([seeds + i for i in range(len(SEGMENTS))], dim=1)  # (K, L) seeds, Ferret-style
    segmented = DirectionBank(block, kind, SEGMENTS)
    streamed = SeedDirections(block, kind, SEGMENTS)
    for l, (a, b) in enumerate(SEGMENTS):
        expected = draw_directions(block[idx, l], b - a, kind)
        assert torch.equal(segmented.rows(idx, l), expected) and torch.equal(streamed.rows(idx, l), expected)
    assert torch.equal(segmented.row(4), streamed.row(4))


def _naive(seeds: torch.Tensor, coeffs: torch.Tensor, segments: list[tuple[int, int]], kind: str,
           alpha: float) -> torch.Tensor:
    """Sequential per-(seed, segment) loop in fp64: the reference sum."""
    out = torch.zeros(segments[-1][1], dtype=torch.float64)
    c = coeffs.reshape(len(seeds), -1)
    for j in range(len(seeds)):
        for l, (a, b) in enumerate(segments):
            out[a:b] += alpha * float(c[j, l]) * draw_directions(seeds[j:j + 1, l], b - a, kind)[0].double()
    return out


@pytest.mark.parametrize("nonzero", [3, 40])  # few changed seeds (axpy path) / most seeds (one product)
@pytest.mark.parametrize("segments", [None, LONG])
def test_banked_add_equals_streaming_add(nonzero: int, segments) -> None:  # type: ignore[no-untyped-def]
    K, d, gen = 48, 20_000, torch.Generator().manual_seed(nonzero)
    width = 1 if segments is None else len(segments)
    seeds = seed_pool(1, K * width, "add").reshape(K, width)
    coeffs = torch.zeros(K, width)
    rows = torch.randperm(K, generator=gen)[:nonzero]
    coeffs[rows] = torch.randn(nonzero, width, generator=gen)
    bank = DirectionBank(seeds, "gaussian", segments, numel=d)
    bank.matrix.fill_(float("nan"))  # rows never generated must not leak into the product
    stream = SeedDirections(seeds, "gaussian", segments, numel=d)
    theta0 = torch.randn(d, generator=gen)
    banked = bank.add(theta0.clone(), coeffs, alpha=-0.1)
    streamed = stream.add(theta0.clone(), coeffs, alpha=-0.1)
    exact = theta0.double() + _naive(seeds, coeffs, bank.segments, "gaussian", -0.1)
    scale = float(exact.abs().max())
    assert float((banked.double() - exact).abs().max()) <= 1e-6 * scale
    torch.testing.assert_close(banked, streamed, rtol=0, atol=1e-6 * scale)
    assert int(bank.filled.sum()) == nonzero  # only seeds with a coefficient were generated
    if segments is None:  # 3 rows: one axpy each (nothing else touched); 40 rows: one product over the bank
        assert int(bank._defined.sum()) == (3 if nonzero == 3 else K)
    assert torch.isfinite(bank.add(torch.zeros(d), torch.ones(K, width))).all()  # then all rows


def test_cap_is_respected_and_banks_are_cached_per_process() -> None:
    seeds = seed_pool(0, 64, "cap")
    size_mb = 4 * 64 * 4096 / 2**20  # 1 MiB
    assert not directions_for(seeds, "gaussian", numel=4096, cache_mb=0.99 * size_mb).banked  # fallback: stream
    assert not directions_for(seeds, "gaussian", numel=4096, cache_mb=0).banked
    assert cached_banks() == []
    bank = directions_for(seeds, "gaussian", numel=4096, cache_mb=size_mb)
    assert isinstance(bank, DirectionBank)
    assert directions_for(seeds.clone(), "gaussian", numel=4096, cache_mb=size_mb) is bank  # built once
    assert directions_for(seeds, "uniform", numel=4096, cache_mb=2 * size_mb) is not bank  # other kind
    assert len(cached_banks()) == 2
    other = directions_for(seed_pool(1, 64, "cap"), "gaussian", numel=4096, cache_mb=2 * size_mb)
    assert cached_banks()[-1] is other and bank not in cached_banks()  # least recently used dropped
    assert sum(b.nbytes for b in cached_banks()) <= 2 * size_mb * 2**20


@pytest.mark.parametrize("method", ["fedkseed", "fedkseed_pro", "ferret"])
def test_direction_cache_mb_is_validated(method: str) -> None:
    cfg = compose(f"model=tiny dataset=tiny strategy={method} strategy.direction_cache_mb=256")
    assert cfg.strategy.direction_cache_mb == 256.0
    with pytest.raises(ConfigError, match=r"^strategy\.direction_cache_mb must be a number of MiB >= 0"):
        compose(f"model=tiny dataset=tiny strategy={method} strategy.direction_cache_mb=-1")
