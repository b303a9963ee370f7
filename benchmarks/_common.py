"""Pieces every benchmark script uses: quartiles of ratios, silencing Lightning, one demo fit."""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import tempfile
import time
import warnings
from typing import Iterator, Optional


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); a single value repeated for one sample."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info logging, its advisory warnings and anything it prints."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def demo_fit_seconds(epochs: int, probes: list, limit_batches: Optional[int] = None, width: int = 128) -> float:
    """The demo (``run_demo``) in a throw-away log directory; returns its ``trainer.fit`` seconds."""
    from lightning_biasprobe.cli.demo import run_demo

    with tempfile.TemporaryDirectory() as out, quiet_lightning():
        return run_demo(out=out, epochs=epochs, probes=probes, progress=False, limit_batches=limit_batches,
                        width=width)["seconds"]


class HookClock:
    """Seconds a callback spends inside its own hooks (every ``on_*`` hook, ``setup``, ``teardown``,
    ``state_dict``), measured by wrapping them on the instance: measurements, logging, bookkeeping
    and the idle checks made at every step. Lightning's own dispatch of the hooks is not included
    (a callback that does nothing costs that too)."""

    def __init__(self, callback) -> None:
        self.seconds = 0.0
        self.calls = 0
        names = [n for n in dir(type(callback)) if n.startswith("on_") or n in ("setup", "teardown", "state_dict")]
        for name in names:
            method = getattr(callback, name, None)
            if callable(method):
                setattr(callback, name, self._timed(method))

    def _timed(self, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1
        return timed
