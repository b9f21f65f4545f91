"""Tokenised tensors and the batches clients train on.

Each process tokenises a split once (padding to ``max_length``) and keeps it on CPU;
clients index into it with their partition's example ids.  Local batches are drawn
from the stream ``("batches", round, partition_id)`` so a client's data order does not
depend on which worker ran it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedtune.data.sources import Split


@dataclass
class Encoded:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[idx].to(device),
            "attention_mask": self.attention_mask[idx].to(device),
            "labels": self.labels[idx].to(device),
        }


def encode(tokenizer, split: Split, max_length: int) -> Encoded:  # type: ignore[no-untyped-def]
    enc = tokenizer(split.texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(split.labels, dtype=torch.long))


def local_batches(indices: list[int], steps: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches of example ids, epoch after epoch over a fresh permutation."""
    pool = torch.as_tensor(indices, dtype=torch.long)
    size = min(batch_size, len(pool))
    order = pool[torch.randperm(len(pool), generator=generator)]
    pos = 0
    for _ in range(steps):
        if pos + size > len(order):
            order, pos = pool[torch.randperm(len(pool), generator=generator)], 0
        yield order[pos: pos + size]
        pos += size


def eval_batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(start + batch_size, n))
