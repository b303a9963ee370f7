"""Short, distinct labels for layer names (the report's axes and the probes' TensorBoard figures)."""

from __future__ import annotations

from typing import Sequence


ELLIPSIS = "…"
MAX_NAME = 22  # characters of a layer name on a profile's axis


def short_names(names: Sequence[str], max_len: int = MAX_NAME) -> tuple[list[str], str]:
    """Tick labels for layer names, and the prefix removed from all of them ('' if none).

    Names that all fit in ``max_len`` characters are kept. Otherwise the longest common prefix
    that ends at a ``.`` or ``/`` is removed (``model.encoder.layers.0`` and ``model.encoder.layers.1``
    become ``0`` and ``1``), and a name still longer than ``max_len`` keeps its end (the index and
    the pooling suffix, which tell layers apart) after ``…``, lengthened until the labels are distinct.
    """
    names = list(names)
    if not names or max(len(n) for n in names) <= max_len:
        return names, ""
    prefix = ""
    if len(names) > 1:
        common = _common_prefix(names)
        cut = max(common.rfind("."), common.rfind("/")) + 1
        if cut and all(len(n) > cut for n in names):
            prefix = names[0][:cut]
    rest = [n[len(prefix):] for n in names]
    for keep in range(max_len - 1, max(len(n) for n in rest) + 1):
        short = [n if len(n) <= max_len else ELLIPSIS + n[-keep:] for n in rest]
        if len(set(short)) == len(set(rest)):
            return short, prefix
    return rest, prefix


def _common_prefix(names: Sequence[str]) -> str:
    first, last = min(names), max(names)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]
