"""One forward pass for every representation probe that measures the same layers at the same point.

``EffectiveRank`` and ``EffectiveDepth`` both run the probe set through the model with hooks on
the chosen layers; the forward is nearly all of their cost. When both are attached with the same
capture (layers, pooling, sketch, seed, forward adapter, mode, chunking) and the same probe set
(by default they are: 1024 class-balanced training examples, ``max_dim=256``), the first to
measure at a step records the per-chunk features (``N x k`` float32 per layer, what
``EffectiveDepth`` keeps anyway) and the second replays them instead of running the forward
again. Features are reused only for the same weights: the key holds the global step and every
parameter's version counter (an optimizer step bumps them), so a replay is bit-for-bit the
features the second probe would have computed itself.

A probe subscribes when training starts; features are recorded only while at least two live
probes share a signature, and the slot is freed once each of them has read it (or replaced at the
next point), so memory stays one probe set's features.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import Tensor, nn

from .._tree import tree_leaves

_SUBSCRIBERS: dict[tuple, "weakref.WeakSet"] = {}
_SLOTS: dict[tuple, "_Slot"] = {}


@dataclass
class _Slot:
    module: "weakref.ref"
    state: tuple
    refs: list
    keys: list
    chunks: list = field(default_factory=list)
    served: "weakref.WeakSet" = field(default_factory=weakref.WeakSet)


def signature(probe: Any, module: nn.Module) -> tuple:
    """What two probes must agree on to share features (the capture and how it is run)."""
    capture = probe.capture
    pool = capture.sequence_pool if isinstance(capture.sequence_pool, str) else id(capture.sequence_pool)
    return (id(module), capture.describe(), capture.conv_pool, pool, capture.max_dim, capture.seed,
            id(probe.forward) if probe.forward is not None else None, probe.mode, probe.chunk_size)


def subscribe(probe: Any, module: nn.Module) -> None:
    _SUBSCRIBERS.setdefault(signature(probe, module), weakref.WeakSet()).add(probe)


def unsubscribe(probe: Any, module: nn.Module) -> None:
    sig = signature(probe, module)
    subscribers = _SUBSCRIBERS.get(sig)
    if subscribers is not None:
        subscribers.discard(probe)
    _SLOTS.pop(sig, None)
    for key in [k for k, v in _SUBSCRIBERS.items() if not v]:  # emptied, also by garbage collection
        del _SUBSCRIBERS[key]


def _point(probe: Any, module: nn.Module) -> tuple:
    """The probe set and the weights: features of equal points are equal."""
    probe_set = probe.probe_set
    if probe_set.indices is not None:  # read by index from a dataset
        data: tuple = (probe_set.source, tuple(probe_set.indices))
    else:  # explicit tensors: the same memory (views of one tensor share it), unchanged since
        data = tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version)
                     for t in tree_leaves(probe_set.inputs))
    return (probe.current_step, data, tuple(p._version for p in module.parameters()))


class SharedCapture:
    """A stand-in for ``probe.capture`` whose ``run`` records or replays a shared forward pass."""

    def __init__(self, probe: Any, module: nn.Module) -> None:
        self.probe = probe
        self.capture = probe.capture
        self.sig = signature(probe, module)
        self.point = _point(probe, module)

    def __getattr__(self, name: str) -> Any:  # everything else is the probe's own capture
        return getattr(self.capture, name)

    def run(self, model: nn.Module, inputs: Any, consume: Callable[[dict[str, Tensor]], None],
            chunk_size: Optional[int] = 256) -> list[str]:
        subscribers = _SUBSCRIBERS.get(self.sig)
        if subscribers is None or len(subscribers) < 2:
            return self.capture.run(model, inputs, consume, chunk_size)
        slot = _SLOTS.get(self.sig)
        if slot is not None and slot.module() is model and slot.state == self.point and self.probe not in slot.served:
            for features in slot.chunks:
                consume(features)
            self.capture.refs = list(slot.refs)
            slot.served.add(self.probe)
            if all(p in slot.served for p in subscribers):
                del _SLOTS[self.sig]
            return list(slot.keys)
        chunks: list[dict[str, Tensor]] = []

        def record(features: dict[str, Tensor]) -> None:
            chunks.append(features)
            consume(features)

        _SLOTS.pop(self.sig, None)  # a stale point's features go before this pass allocates its own
        keys = self.capture.run(model, inputs, record, chunk_size)
        slot = _Slot(weakref.ref(model), self.point, list(self.capture.refs), list(keys), chunks)
        slot.served.add(self.probe)
        _SLOTS[self.sig] = slot
        return keys


class SharesCapture:
    """Mixin (before :class:`ProbeLogic`) for probes whose ``measure`` runs ``self.capture``:
    subscribed from setup to teardown of a fit; ``measure`` passes ``SharedCapture(self, module)``."""

    def _shares_probe_set_capture(self) -> bool:
        return True

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # type: ignore[misc]
        # At setup, so that every probe has subscribed before the first measures (at train start).
        if stage == "fit" and trainer.is_global_zero and self._shares_probe_set_capture():
            subscribe(self, pl_module)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # teardown runs also when the fit raises: no stale subscription or features are left.
        parent = getattr(super(), "teardown", None)
        if parent is not None:
            parent(trainer, pl_module, stage)
        if stage == "fit":
            unsubscribe(self, pl_module)
