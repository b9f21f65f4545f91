"""Which parameters a full-parameter method tunes: a preset name or regular expressions.

FedKSeed and Ferret (``strategy.trainable``) tune the parameters whose names match a
list of Python regular expressions, each tried with :func:`re.search` (so a plain
substring such as ``LayerNorm`` matches anywhere, and ``^score\\.`` anchors at the
start).  A preset is a named list of such patterns covering the naming schemes users
bring: BERT (``encoder.``, ``LayerNorm``), Llama / Qwen2 (``model.layers.``,
``input_layernorm``, ``post_attention_layernorm``, ``model.norm``) and GPT-2
(``transformer.h.``, ``ln_1``, ``ln_2``, ``ln_f``).  A model with tied input and output
embeddings (SmolLM2, GPT-2) names them once, as the embedding, so its head is tuned
only under ``all``; ``lm_head.`` matches an untied head.

:func:`select_trainable` is pure (names in, names out) so a check before Ray can run it
on a model's parameter names without loading weights; :func:`check_trainable` is the
one-line error when a pattern list matches nothing.
"""

from __future__ import annotations

import re
from typing import Any

from fedtune.errors import ConfigError

_HEADS = (r"pooler\.", r"classifier\.", r"^score\.", r"lm_head\.")
_NORMS = (r"LayerNorm", r"layernorm\.", r"model\.norm\.", r"(^|\.)ln_[12f]\.")

TRAINABLE_PRESETS: dict[str, tuple[str, ...]] = {
    "all": (r"",),  # the empty pattern matches every name
    "no_embeddings": (r"encoder\.", r"embeddings\.LayerNorm", r"model\.layers\.", r"model\.norm\.",
                      r"transformer\.h\.", r"transformer\.ln_f\.", *_HEADS),
    "bias_and_head": (r"bias", *_NORMS, *_HEADS),
    "head_and_norms": (*_NORMS, *_HEADS),
}


def patterns_of(trainable: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The regular expressions of ``trainable``: a preset's, or the list itself."""
    return TRAINABLE_PRESETS[trainable] if isinstance(trainable, str) else tuple(trainable)


def validate_trainable(value: Any) -> str | list[str]:
    """A preset name, or a non-empty list of valid regular expressions (``ValueError`` otherwise)."""
    accepted = f"a preset ({', '.join(TRAINABLE_PRESETS)}) or a list of regular expressions over parameter names"
    if isinstance(value, str):
        if value not in TRAINABLE_PRESETS:
            raise ValueError(f"trainable: unknown preset {value!r}; accepted: {accepted}")
        return value
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(p, str) for p in value):
        raise ValueError(f"trainable must be {accepted}, got {value!r}")
    for p in value:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"trainable: {p!r} is not a regular expression ({exc})") from None
    return list(value)


def select_trainable(names: list[str], trainable: str | list[str] | tuple[str, ...]) -> list[str]:
    """The names (in the given order) matched by at least one pattern of ``trainable``."""
    compiled = [re.compile(p) for p in patterns_of(trainable)]
    return [n for n in names if any(c.search(n) for c in compiled)]


def check_trainable(names: list[str], trainable: str | list[str] | tuple[str, ...],
                    field: str = "strategy.trainable") -> list[str]:
    """:func:`select_trainable`, or a one-line :class:`ConfigError` when it selects nothing."""
    chosen = select_trainable(names, trainable)
    if not chosen:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ConfigError(f"{field}={trainable!r} matches no parameter of the model "
                          f"({len(names)} parameters, e.g. {shown})")
    return chosen
