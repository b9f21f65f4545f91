"""A strategy's ``state_dict`` as JSON plus named tensors: no pickle anywhere.

A state is a tree of dicts, lists, tuples, strings, numbers, booleans, ``None`` and
``torch.Tensor`` s.  :func:`encode` splits it into a JSON-able tree and a flat
``{name: tensor}`` map (written with safetensors); :func:`decode` rebuilds the identical
tree.  What JSON cannot say directly is tagged with a one-key object whose key starts
with ``$``: ``{"$tensor": name}``, ``{"$tuple": [...]}``, ``{"$items": [[key, value], ...]}``
(a dict whose keys are not all plain strings, e.g. round numbers), ``{"$float": "nan"}``.
Decoding only ever builds these types: whatever a file says, nothing in it is executed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

Tensors = dict[str, torch.Tensor]
_TAGS = ("$tensor", "$tuple", "$items", "$float")


def encode(tree: Any) -> tuple[Any, Tensors]:
    """``(json_tree, tensors)`` of a state tree; a ``TypeError`` names the path of anything else."""
    tensors: Tensors = {}
    return _encode(tree, tensors, "state"), tensors


def decode(tree: Any, tensors: Tensors) -> Any:
    """Inverse of :func:`encode`; a ``ValueError`` for a tag or tensor name it does not know."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1 and (tag := next(iter(tree))) in _TAGS:
        value = tree[tag]
        if tag == "$tensor":
            if value not in tensors:
                raise ValueError(f"the state names tensor {value!r}, which the tensor file lacks")
            return tensors[value]
        if tag == "$tuple":
            return tuple(decode(v, tensors) for v in value)
        if tag == "$float":
            return float(value)
        return {decode(k, tensors): decode(v, tensors) for k, v in value}
    return {k: decode(v, tensors) for k, v in tree.items()}


def _encode(value: Any, tensors: Tensors, path: str) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous().clone()  # safetensors: no shared storage
        return {"$tensor": name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"$items": [[_encode(k, tensors, f"{path} key"), _encode(v, tensors, f"{path}[{k!r}]")]
                           for k, v in value.items()]}
    raise TypeError(f"{path}: a {type(value).__name__} cannot go into a checkpoint (state_dict must hold "
                    "only dicts, lists, tuples, str, int, float, bool, None and tensors)")


def check_state_keys(state: dict[str, Any], expected: dict[str, Any], owner: str) -> None:
    """A ``ValueError`` in one line unless ``state`` has exactly the keys of ``expected``."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{owner}: the checkpoint's state does not fit this method (missing "
                         f"{', '.join(missing) or 'nothing'}; unexpected {', '.join(extra) or 'nothing'})")
