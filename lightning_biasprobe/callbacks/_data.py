"""The fixed probe set, and reading (inputs, targets) out of a user's batch.

Capturing the probe set must not change training. Iterating the user's training dataloader would
create a sampler iterator (a draw from the global RNG, or from the loader's own ``generator``) and
may start workers; so examples are read by index from a map-style dataset and collated with the
loader's own ``collate_fn``. Loaders over iterable datasets (or with automatic batching off) are
read from the batches that pass through the training hooks anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, default_collate

from .._tree import cat_rows, detach_to, index_rows, num_rows, slice_rows

UnpackFn = Callable[[Any], tuple[Any, Optional[Tensor]]]

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "img", "features", "data", "input_ids")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")


class BatchFormatError(ValueError):
    """The default adapter cannot tell inputs from targets in a batch."""


def default_unpack(batch: Any) -> tuple[Any, Optional[Tensor]]:
    """``(inputs, targets)`` from a batch: a tensor, an ``(x, y)`` or ``(x,)`` tuple/list, or a dict.

    Dicts are read with the first present key of ``INPUT_KEYS`` and of ``TARGET_KEYS``.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        x_key = next((k for k in INPUT_KEYS if k in batch), None)
        if x_key is not None:
            y_key = next((k for k in TARGET_KEYS if k in batch), None)
            return batch[x_key], (batch[y_key] if y_key is not None else None)
        raise BatchFormatError(
            f"cannot find the inputs in a dict batch with keys {sorted(map(str, batch))}; known input keys are "
            f"{list(INPUT_KEYS)}. Pass `unpack_batch=lambda batch: (inputs, targets)` to the probe."
        )
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) in (1, 2):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    what = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
    raise BatchFormatError(
        f"cannot tell inputs from targets in {what}; the default reads a tensor, an (inputs, targets) "
        "pair or a dict. Pass `unpack_batch=lambda batch: (inputs, targets)` to the probe."
    )


@dataclass
class ProbeSet:
    """The fixed examples a probe measures on, on the module's device.

    ``indices`` are dataset indices when the set was read from a map-style dataset (they are saved
    in checkpoints so that a resumed run measures the same examples).
    """

    inputs: Any
    targets: Optional[Tensor]
    indices: Optional[list[int]] = None
    source: str = "tensors"

    def __len__(self) -> int:
        return num_rows(self.inputs)

    def to(self, device: torch.device) -> "ProbeSet":
        return ProbeSet(detach_to(self.inputs, device),
                        None if self.targets is None else detach_to(self.targets, device),
                        self.indices, self.source)


def _unpacked(batch: Any, unpack: UnpackFn) -> tuple[Any, Optional[Tensor]]:
    inputs, targets = unpack(batch)
    if targets is not None and not isinstance(targets, Tensor):
        targets = torch.as_tensor(targets)
    num_rows(inputs)  # raises if the inputs have no common sample dimension
    return inputs, targets


def is_map_style(loader: Any) -> bool:
    return (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_size is not None
        and hasattr(loader.dataset, "__getitem__")
        and hasattr(loader.dataset, "__len__")
    )


def stratified_positions(targets: Tensor, n: int) -> Tensor:
    """Positions of ``n`` examples taking classes in turn (round-robin), in data order.

    Classes with too few examples give their place to the others; the result is balanced whenever
    the data allow it.
    """
    targets = targets.reshape(-1).cpu()
    queues = [torch.nonzero(targets == c).flatten().tolist() for c in torch.unique(targets)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(q) for q in queues):
        picked.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    picked = picked[:n] if len(picked) > n else picked
    return torch.tensor(sorted(picked), dtype=torch.long)


def _is_class_labels(targets: Optional[Tensor]) -> bool:
    return targets is not None and not targets.is_floating_point() and not targets.is_complex() \
        and targets.dim() == 1


def read_map_dataset(
    loader: DataLoader,
    num_samples: int,
    unpack: UnpackFn,
    *,
    stratify: bool = True,
    indices: Optional[Sequence[int]] = None,
    scan_factor: int = 4,
    source: str = "train",
) -> ProbeSet:
    """Read examples by index from ``loader.dataset`` and collate them with ``loader.collate_fn``.

    Without ``indices``: the first ``num_samples`` examples, or, with ``stratify`` and integer
    class targets, a class-balanced choice among the first ``scan_factor * num_samples``.
    """
    dataset, collate = loader.dataset, loader.collate_fn
    size = len(dataset)

    # Datasets that fetch many items at once (``__getitems__``, as torch's DataLoader uses) are read
    # that way; the result is the same list of examples the loader would collate. A TensorDataset
    # with the default collate is indexed directly: the same batch, without per-example Python calls.
    fetch = getattr(dataset, "__getitems__", None) or (lambda ids: [dataset[i] for i in ids])
    if isinstance(dataset, TensorDataset) and collate is default_collate:
        read = lambda ids: [t[torch.as_tensor(ids, dtype=torch.long)] for t in dataset.tensors]  # noqa: E731
    else:
        read = lambda ids: collate(fetch(ids))  # noqa: E731

    def collated(idx: Sequence[int]) -> tuple[Any, Optional[Tensor]]:
        parts = [_unpacked(read(list(idx[s:s + 256])), unpack) for s in range(0, len(idx), 256)]
        xs = cat_rows([p[0] for p in parts])
        ys = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return xs, ys

    if indices is not None:
        idx = [int(i) for i in indices]
        xs, ys = collated(idx)
        return ProbeSet(xs, ys, idx, source)
    scan = min(size, num_samples * (scan_factor if stratify else 1))
    idx = list(range(scan))
    if not idx:
        raise ValueError(f"the {source} dataset is empty; there is nothing to probe")
    xs, ys = collated(idx)
    if stratify and _is_class_labels(ys) and scan > num_samples:
        pos = stratified_positions(ys, num_samples)
        return ProbeSet(index_rows(xs, pos), ys[pos], [idx[p] for p in pos.tolist()], source)
    keep = min(num_samples, scan)
    return ProbeSet(slice_rows(xs, 0, keep), None if ys is None else ys[:keep], idx[:keep], source)


def read_loader(loader: Any, num_samples: int, unpack: UnpackFn, source: str = "dataloader") -> ProbeSet:
    """Iterate a probe-only loader until ``num_samples`` examples are read (call under an RNG fork)."""
    collector = BatchCollector(num_samples, unpack, source)
    for batch in loader:
        if collector.add(batch):
            break
    if collector.count == 0:
        raise ValueError(f"the {source} yielded no examples; there is nothing to probe")
    return collector.result()


def from_tensors(data: Any, num_samples: int, unpack: UnpackFn) -> ProbeSet:
    """A probe set from explicit data: a tensor, ``(inputs, targets)`` or a dict batch."""
    inputs, targets = _unpacked(data, unpack)
    n = min(num_samples, num_rows(inputs))
    return ProbeSet(slice_rows(inputs, 0, n), None if targets is None else targets[:n], None, "tensors")


class BatchCollector:
    """Accumulates the first examples of the batches it is shown (detached copies)."""

    def __init__(self, num_samples: int, unpack: UnpackFn, source: str = "train_batches"):
        self.num_samples, self.unpack, self.source = num_samples, unpack, source
        self.inputs: list[Any] = []
        self.targets: list[Optional[Tensor]] = []
        self.count = 0

    def add(self, batch: Any) -> bool:
        """Take examples from ``batch``; True once the set is full."""
        if self.count >= self.num_samples:
            return True
        inputs, targets = _unpacked(batch, self.unpack)
        take = min(self.num_samples - self.count, num_rows(inputs))
        self.inputs.append(detach_to(slice_rows(inputs, 0, take)))
        self.targets.append(None if targets is None else targets[:take].detach().clone())
        self.count += take
        return self.count >= self.num_samples

    @property
    def full(self) -> bool:
        return self.count >= self.num_samples

    def result(self) -> ProbeSet:
        targets = None if any(t is None for t in self.targets) else torch.cat(self.targets)
        return ProbeSet(cat_rows(self.inputs), targets, None, self.source)
