"""Central evaluation of the global model on the held-out test split."""

from __future__ import annotations

import torch

from fedtune.data.batches import Encoded, eval_batches


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Encoded, batch_size: int, device: torch.device,
             max_examples: int = 0) -> tuple[float, float]:
    """Return ``(mean cross-entropy, accuracy)`` over the first ``max_examples`` (0 = all)."""
    n = min(len(data), max_examples) if max_examples else len(data)
    model.eval()
    loss_sum, correct = 0.0, 0
    for idx in eval_batches(n, batch_size):
        batch = data.batch(idx, device)
        out = model(**batch)
        loss_sum += float(out.loss) * len(idx)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return loss_sum / n, correct / n
