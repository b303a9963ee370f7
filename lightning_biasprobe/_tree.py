"""Small helpers for batches that are a tensor, or a tuple/list/dict of tensors.

Probe inputs may be one tensor or several (models with several inputs); these helpers slice,
concatenate and move such nests along their first (sample) dimension without depending on
private torch utilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor


def tree_map(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nest of tuples, lists and dicts; other leaves pass through."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(tree_map(fn, v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(fn, v) for v in obj)
    return obj


def tree_leaves(obj: Any) -> list[Tensor]:
    """Every tensor in the nest, in a fixed order."""
    out: list[Tensor] = []
    tree_map(out.append, obj)
    return out


def num_rows(obj: Any) -> int:
    """Number of samples: the first dimension shared by every tensor of the nest."""
    sizes = {t.shape[0] for t in tree_leaves(obj) if t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot tell the number of samples: leading dimensions {sorted(sizes)}")
    return sizes.pop()


def slice_rows(obj: Any, start: int, stop: int) -> Any:
    return tree_map(lambda t: t[start:stop] if t.dim() > 0 else t, obj)


def index_rows(obj: Any, index: Tensor) -> Any:
    return tree_map(lambda t: t[index.to(t.device)] if t.dim() > 0 else t, obj)


def cat_rows(parts: Sequence[Any]) -> Any:
    """Concatenate nests of identical structure along the sample dimension."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(list(parts), dim=0)
    if isinstance(first, Mapping):
        return {k: cat_rows([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(cat_rows([p[i] for p in parts]) for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        return type(first)(cat_rows([p[i] for p in parts]) for i in range(len(first)))
    return first


def detach_to(obj: Any, device: torch.device | str | None = None) -> Any:
    """Detached copies (never views of the user's batch) on ``device``."""
    return tree_map(lambda t: t.detach().to(device, copy=True) if device is not None else t.detach().clone(), obj)
