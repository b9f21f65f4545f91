"""Run a Hugging Face transformer one segment of blocks at a time (split learning).

Split learning cuts a model between parties: a client runs the first blocks (the head),
the server the middle ones (the body), the client again the last ones and the task head
(the tail).  transformers has no public API to run a slice of a model, so this module
does it through the model's own ``forward``, which keeps every architecture's masking,
positions and head exactly as the library computes them:

* the model's block list (the one ``nn.ModuleList`` of ``config.num_hidden_layers``
  blocks of one class: ``encoder.layer``, ``model.layers``, ``transformer.h``) is swapped,
  for the call, for a list holding only the segment's blocks;
* a segment that starts after the embeddings begins with :class:`_Inject`, which ignores
  the hidden state it is handed and returns the received activations instead;
* a segment that ends before the model's end stops with a forward hook on its last
  block that raises :class:`_Stop` carrying that block's output.

This touches the model's structure (not its private functions): it assumes the blocks
are called in list order and return the hidden state as a tensor, as transformers 5
does.  :func:`check_split` runs the split forward against the unsplit one on a small
batch, so a model for which that assumption fails is refused before training, loudly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedtune.errors import ConfigError


@dataclass(frozen=True)
class Cut:
    """Where the model is cut: ``head`` blocks before the server's body, ``tail`` after it."""

    head: int
    tail: int

    def body(self, num_blocks: int) -> range:
        return range(self.head, num_blocks - self.tail)


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("segment end")
        self.hidden = hidden


class _Inject(nn.Module):
    """Stands in for the blocks before a segment: returns the received activations."""

    def __init__(self, hidden: torch.Tensor, attention_type: str) -> None:
        super().__init__()
        self.hidden, self.attention_type = hidden, attention_type

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hidden


def block_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """``(parent, attribute, blocks)``: the model's list of transformer blocks."""
    n = int(getattr(model.config, "num_hidden_layers", 0))
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n and n > 0 \
                    and len({type(b) for b in child}) == 1:
                return parent, attr, child
    raise ConfigError(f"model: no list of {n} transformer blocks found in {type(model).__name__}; "
                      "strategy=sfprompt needs a model whose blocks sit in one ModuleList")


def num_blocks(model: nn.Module) -> int:
    return len(block_list(model)[2])


@contextmanager
def _segment(found: tuple[nn.Module, str, nn.ModuleList], modules: Sequence[nn.Module],
             stop_after: nn.Module | None) -> Iterator[None]:
    """Run the model with ``modules`` as its block list (``found``: :func:`block_list`'s answer)."""
    parent, attr, blocks = found
    hook = None
    if stop_after is not None:
        def stop(module: nn.Module, args: Any, output: Any) -> None:
            raise _Stop(output[0] if isinstance(output, tuple) else output)
        hook = stop_after.register_forward_hook(stop)
    parent._modules[attr] = nn.ModuleList(modules)
    try:
        yield
    finally:
        parent._modules[attr] = blocks
        if hook is not None:
            hook.remove()


def _blank(hidden: torch.Tensor) -> torch.Tensor:
    """What the model embeds before :class:`_Inject` replaces it (its values never matter)."""
    return torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)


def _attention_type(block: nn.Module | None) -> str:
    return getattr(block, "attention_type", "full_attention") if block is not None else "full_attention"


def run_head(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, cut: Cut) -> torch.Tensor:
    """The activations after the first ``cut.head`` blocks (what the client sends)."""
    found = block_list(model)
    blocks = list(found[2])[:cut.head]
    with _segment(found, blocks, blocks[-1]):
        try:
            model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        except _Stop as stop:
            return stop.hidden
    raise RuntimeError("split: the head segment ran to the model's end")


def run_body(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, cut: Cut) -> torch.Tensor:
    """The server's blocks applied to the client's activations."""
    found = block_list(model)
    all_blocks = list(found[2])
    blocks = [all_blocks[i] for i in cut.body(len(all_blocks))]
    with _segment(found, [_Inject(hidden, _attention_type(blocks[0])), *blocks], blocks[-1]):
        try:
            model(inputs_embeds=_blank(hidden), attention_mask=mask, use_cache=False)
        except _Stop as stop:
            return stop.hidden
    raise RuntimeError("split: the body segment ran to the model's end")


def run_tail(model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, cut: Cut, **labels: Any) -> Any:
    """The model's output (logits, and the loss given ``labels=``) from the body's activations."""
    found = block_list(model)
    all_blocks = list(found[2])
    blocks = all_blocks[len(all_blocks) - cut.tail:] if cut.tail else []
    first = blocks[0] if blocks else None
    with _segment(found, [_Inject(hidden, _attention_type(first)), *blocks], None):
        return model(inputs_embeds=_blank(hidden), attention_mask=mask, use_cache=False, **labels)


def run_local(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, cut: Cut, **labels: Any) -> Any:
    """The client's own model, head then tail with the body skipped (SFPrompt's local loss)."""
    found = block_list(model)
    all_blocks = list(found[2])
    blocks = all_blocks[:cut.head] + (all_blocks[len(all_blocks) - cut.tail:] if cut.tail else [])
    with _segment(found, blocks, None):
        return model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **labels)


def check_cut(model: nn.Module, cut: Cut) -> None:
    """One-line error unless the head and body hold at least one block each."""
    n = num_blocks(model)
    if cut.head < 1 or cut.tail < 0 or cut.head + cut.tail >= n:
        raise ConfigError(f"strategy.head_blocks / strategy.tail_blocks: the model has {n} blocks; the client "
                          f"needs head_blocks >= 1, tail_blocks >= 0 and head_blocks + tail_blocks < {n} "
                          f"(at least one for the server), got {cut.head} and {cut.tail}")


def check_split(model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, cut: Cut) -> None:
    """Refuse a model whose split forward is not its unsplit forward (see the module note)."""
    with torch.no_grad():
        whole = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        hidden = run_body(model, run_head(model, embeds, mask, cut), mask, cut)
        split = run_tail(model, hidden, mask, cut).logits
    if split.shape != whole.shape or not torch.allclose(split, whole, rtol=1e-4, atol=1e-5):
        raise ConfigError(f"model: {type(model).__name__} cannot be run block by block (its split forward "
                          "differs from its forward); strategy=sfprompt does not support this architecture")
