"""Read and write the trainable part of a model, the thing that travels.

Only parameters with ``requires_grad`` move between server and clients; the frozen base
never leaves a process.  Names are the model's own parameter names, in sorted order,
so every party agrees on the layout.
"""

from __future__ import annotations

import torch

from fedtune.errors import PayloadError

_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)  # seed indices, quantised codes


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU fp32 copies of the trainable parameters, by sorted name."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {n: params[n].detach().to("cpu", torch.float32).clone() for n in sorted(params)}


def load_trainable_state(model: torch.nn.Module, arrays: dict[str, torch.Tensor]) -> None:
    """Copy ``arrays`` into the trainable parameters; keys and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_arrays(arrays, {n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for name, value in arrays.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def check_arrays(arrays: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                 dtypes: dict[str, torch.dtype] | None = None) -> None:
    """Raise :class:`PayloadError` unless ``arrays`` has exactly the expected keys and
    shapes, a floating (or integer: seed indices, quantised codes) dtype and only finite values.  An
    expected dimension of ``-1`` accepts any length (variable-size sparse uploads).

    With ``dtypes`` (a client's upload, checked by the server) the dtype is strict: a key
    listed there must have exactly that dtype, any other key fp32 (the wire format of
    every trainable tensor) or an integer index dtype; a float64 or integer tensor where
    the global state is fp32 would change the global model's dtype.
    """
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise PayloadError(f"payload keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, value in arrays.items():
        want = tuple(expected[name])
        if len(value.shape) != len(want) or any(w not in (-1, v) for v, w in zip(value.shape, want)):
            raise PayloadError(f"payload {name}: shape {tuple(value.shape)}, expected {tuple(expected[name])}")
        if dtypes is not None and name in dtypes:
            if value.dtype != dtypes[name]:
                raise PayloadError(f"payload {name}: dtype {value.dtype}, expected {dtypes[name]}")
        elif dtypes is not None and not (value.dtype == torch.float32 or value.dtype in _INDEX_DTYPES):
            raise PayloadError(f"payload {name}: dtype {value.dtype}, "
                               "expected torch.float32 or an integer index dtype")
        if not (torch.is_floating_point(value) or value.dtype in _INDEX_DTYPES):
            raise PayloadError(f"payload {name}: dtype {value.dtype}, expected a floating or integer dtype")
        if not torch.isfinite(value).all():
            raise PayloadError(f"payload {name}: contains NaN or Inf")
