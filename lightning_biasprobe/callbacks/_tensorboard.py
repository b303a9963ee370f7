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

Events for Lightning's logger are also *held* and handed to the writer a few at a time: when
``HOLD_EVENTS`` are held, when the oldest is ``HOLD_SECONDS`` old (asked every 64 training steps),
and at the end of training, at an exception and at teardown, all before Lightning closes the
logger. Each hand-over wakes TensorBoard's writer thread, which computes the events' checksums in
pure Python (CRC32C, ~30 us for a point of eight scalars) while holding the GIL, and the thread
switches cost more than that: in a demo fit, 23 points handed over one at a time took 3.1 ms of
the probe's hooks, in groups 0.5 ms. The events keep the wall time of their measurement.
TensorBoard writes its queue to disk only every ``flush_secs`` (120 s by default), so holding them
for seconds changes neither what is on disk nor when (nor what a killed process loses).
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Optional

ScalarWriter = Callable[[Mapping[str, float], int], None]

HOLD_EVENTS = 8  # below SummaryWriter's default queue of 10, so handing them over seldom waits for it
HOLD_SECONDS = 10.0

_held: list[tuple[Any, Any, int, float]] = []  # (SummaryWriter, Summary, step, wall time), in order
_held_since = 0.0

_LIGHTNING_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning")
_cache: "weakref.WeakKeyDictionary[Any, Optional[ScalarWriter]]" = weakref.WeakKeyDictionary()


def _is_lightning_tensorboard_logging(logger: Any) -> bool:
    for cls in type(logger).__mro__:
        if "log_metrics" in cls.__dict__:
            return cls.__name__ == "TensorBoardLogger" and cls.__module__.split(".")[0] in _LIGHTNING_PACKAGES
    return False


def summary_writer_scalars(writer: Any, hold: bool = False) -> Optional[ScalarWriter]:
    """``write(metrics, step)`` as one event on a ``torch.utils.tensorboard.SummaryWriter``, else None.

    With ``hold``, the event is held until :func:`release` (or the limits in the module's docstring).
    """
    if not type(writer).__module__.startswith("torch.utils.tensorboard") or not hasattr(writer, "_get_file_writer"):
        return None
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary
    except ImportError:
        return None

    def write(metrics: Mapping[str, float], step: int) -> None:
        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()])
        if not hold:
            writer._get_file_writer().add_summary(summary, step)
            return
        global _held_since
        if not _held:
            _held_since = time.monotonic()
        _held.append((writer, summary, step, time.time()))
        if len(_held) >= HOLD_EVENTS:
            release()

    return write


def release() -> None:
    """Hand every held event to its writer, in the order they were logged."""
    global _held
    if not _held:
        return
    events, _held = _held, []
    try:
        for writer, summary, step, walltime in events:
            writer._get_file_writer().add_summary(summary, step, walltime)
    except Exception as err:  # noqa: BLE001 - logging never stops training
        warnings.warn(f"biasprobe: TensorBoard did not take {len(events)} held event(s): "
                      f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)


def release_if_due() -> None:
    """:func:`release` once the oldest held event is ``HOLD_SECONDS`` old."""
    if _held and time.monotonic() - _held_since >= HOLD_SECONDS:
        release()


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
        write = summary_writer_scalars(logger.experiment, hold=True)
    try:
        _cache[logger] = write
    except TypeError:  # not weak-referenceable: decided again next time
        pass
    return write
