"""The one place where seeds become random streams.

Convention (algorithms.md §1.2): a stream is identified by the run seed plus a purpose
and integer ids, e.g. ``("sampling", round)`` or ``("batches", round, partition_id)``.
The ids are hashed (SHA-256) into a 63-bit seed, so streams are independent of each
other, identical in every process and on every host, and never depend on global RNG
state.  Tensors are drawn on CPU in fp32 with an explicit ``torch.Generator`` and moved
to their device afterwards, so CPU and GPU runs see bit-identical draws.
"""

from __future__ import annotations

import hashlib
from typing import Union

import numpy as np
import torch

Key = Union[int, str]


def derive_seed(seed: int, *keys: Key) -> int:
    """Stable 63-bit seed for ``(seed, *keys)``."""
    text = "/".join([str(int(seed)), *(str(k) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_generator(seed: int, *keys: Key) -> torch.Generator:
    """CPU ``torch.Generator`` for the stream ``(seed, *keys)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def numpy_rng(seed: int, *keys: Key) -> np.random.Generator:
    """NumPy generator for the stream ``(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def seed_torch(seed: int, *keys: Key) -> None:
    """Seed torch's global RNG (dropout, peft init) for the stream ``(seed, *keys)``."""
    torch.manual_seed(derive_seed(seed, *keys))
