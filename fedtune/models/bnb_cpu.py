"""The one place fedtune reaches into bitsandbytes' internals: its CPU weight repacking.

bitsandbytes 0.50 repacks a ``Linear4bit``'s weights in place the first time the layer
runs under ``no_grad`` in eval mode on a CPU with AVX512-BF16 (``support_avx512bf16_for_cpu``),
for a faster inference kernel.  The repacking fails for layers narrower than the
quantisation block (``shape '[n, 0]' is invalid``) and leaves a layer in another format
between fedtune's evaluation and its next training round.  fedtune evaluates and trains
the same model, so it turns the repacking off; the dequantising path it falls back to is
the one every other CPU uses.  The switch is a private attribute: it is checked for, and
when it is missing (another bitsandbytes) fedtune says so and leaves the layers alone.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
_SWITCH = "support_avx512bf16_for_cpu"


def disable_cpu_repacking(model: Any) -> int:
    """Turn bitsandbytes' CPU repacking off on every 4-bit layer; return how many layers."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if layers and not all(hasattr(m, _SWITCH) for m in layers):
        log.warning("bitsandbytes %s has no Linear4bit.%s: fedtune cannot turn its CPU weight repacking off; "
                    "4-bit layers narrower than 64 may fail in evaluation on AVX512-BF16 CPUs",
                    getattr(bnb, "__version__", "?"), _SWITCH)
        return 0
    for m in layers:
        setattr(m, _SWITCH, False)
    return len(layers)
