"""One TensorBoard event per logged point, not one per scalar.

Lightning's ``TensorBoardLogger.log_metrics`` calls ``SummaryWriter.add_scalar`` once per key, and
each call builds, serializes and queues its own event: about 30-40 us per scalar on a CPU, 0.3 ms
for a probe's eight quantities, which on a small model is more than the measurement itself. A
TensorBoard ``Summary`` holds any number of values, so a point's scalars go out as one event with
the same tags, step and (float32) values that ``add_scalar`` would write; readers
(TensorBoard, ``EventAccumulator``, the report) see no difference.

Used only where the result is known to be identical: a logger whose ``log_metrics`` is Lightning's
own ``TensorBoardLogger.log_metrics`` (not a subclass's override), without a key prefix, writing
through ``torch.utils.tensorboard.SummaryWriter``; or a writer that asks for it (the runner's
sink). Every other logger gets ``log_metrics``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, Callable, Optional

ScalarWriter = Callable[[Mapping[str, float], int], None]

_LIGHTNING_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning")
_cache: "weakref.WeakKeyDictionary[Any, Optional[ScalarWriter]]" = weakref.WeakKeyDictionary()


def _is_lightning_tensorboard_logging(logger: Any) -> bool:
    for cls in type(logger).__mro__:
        if "log_metrics" in cls.__dict__:
            return cls.__name__ == "TensorBoardLogger" and cls.__module__.split(".")[0] in _LIGHTNING_PACKAGES
    return False


def summary_writer_scalars(writer: Any) -> Optional[ScalarWriter]:
    """``write(metrics, step)`` as one event on a ``torch.utils.tensorboard.SummaryWriter``, else None."""
    if not type(writer).__module__.startswith("torch.utils.tensorboard") or not hasattr(writer, "_get_file_writer"):
        return None
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary
    except ImportError:
        return None

    def write(metrics: Mapping[str, float], step: int) -> None:
        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()])
        writer._get_file_writer().add_summary(summary, step)

    return write


def scalar_writer(logger: Any) -> Optional[ScalarWriter]:
    """The one-event writer for ``logger``, or None where ``logger.log_metrics`` must be used."""
    try:
        return _cache[logger]
    except (KeyError, TypeError):
        pass
    write = None
    own = getattr(logger, "biasprobe_scalar_writer", None)  # the runner's sink offers its own
    if own is not None:
        write = own
    elif _is_lightning_tensorboard_logging(logger) and getattr(logger, "_prefix", None) == "":
        write = summary_writer_scalars(logger.experiment)
    try:
        _cache[logger] = write
    except TypeError:  # not weak-referenceable: decided again next time
        pass
    return write
