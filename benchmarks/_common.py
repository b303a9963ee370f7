"""Pieces every benchmark script uses: quartiles of ratios, silencing Lightning, one demo fit."""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import tempfile
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


def demo_fit_seconds(epochs: int, probes: list, limit_batches: Optional[int] = None) -> float:
    """The demo (``run_demo``) in a throw-away log directory; returns its ``trainer.fit`` seconds."""
    from lightning_biasprobe.cli.demo import run_demo

    with tempfile.TemporaryDirectory() as out, quiet_lightning():
        return run_demo(out=out, epochs=epochs, probes=probes, progress=False, limit_batches=limit_batches)["seconds"]
