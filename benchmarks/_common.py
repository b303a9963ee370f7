"""Pieces the benchmark scripts share: quartiles of ratios, interleaved timing, silencing Lightning,
one demo fit, a clock on a callback's hooks."""

from __future__ import annotations

import contextlib
import gc as pygc
import io
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); a single value repeated for one sample."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class Timed:
    """A function to time, how many calls make one sample, and each round's ratio and seconds."""

    name: str
    fn: Callable[[], object]
    number: int = 1
    ratios: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def time_calls(fn: Callable[[], object], number: int) -> float:
    """Seconds per call of ``fn`` over ``number`` calls, with the garbage collector off."""
    enabled = pygc.isenabled()
    pygc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number
    finally:
        if enabled:
            pygc.enable()


def interleaved(unit: Timed, candidates: list[Timed], rounds: int, sample_seconds: float) -> None:
    """Each round times every candidate right next to a sample of ``unit`` (order alternating, candidates
    rotated), so that load from other processes mostly cancels in the ratios."""
    for t in [unit, *candidates]:
        for _ in range(3):
            t.fn()
        single = min(time_calls(t.fn, 1) for _ in range(5))
        t.number = max(1, round(sample_seconds / max(single, 1e-9)))
    for r in range(rounds):
        k = r % len(candidates)
        for i, c in enumerate(candidates[k:] + candidates[:k]):
            if (r + i) % 2:
                cand, base = time_calls(c.fn, c.number), time_calls(unit.fn, unit.number)
            else:
                base, cand = time_calls(unit.fn, unit.number), time_calls(c.fn, c.number)
            c.ratios.append(cand / base)
            c.seconds.append(cand)
            unit.seconds.append(base)


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
    """Seconds a callback spends inside the hooks its class defines (``on_*``, ``setup``,
    ``teardown``, ``state_dict``; those it inherits empty from Lightning's ``Callback`` are left
    alone, since a callback that does nothing costs their dispatch too): measurements, logging,
    bookkeeping and the checks made at every step.

    The clock costs a little per call itself (two ``perf_counter`` reads, ~0.3 us inside a fit,
    thousands of calls): :meth:`with_control` also clocks a do-nothing callback with the same hooks,
    to be put in the same fit, and :meth:`net_seconds` subtracts what that one measured.
    """

    def __init__(self, callback) -> None:
        import pytorch_lightning as pl

        self.seconds = 0.0
        self.calls = 0
        self.names = [n for n in dir(type(callback)) if (n.startswith("on_") or n in ("setup", "teardown", "state_dict"))
                      and callable(getattr(type(callback), n)) and getattr(type(callback), n) is not getattr(pl.Callback, n, None)]
        for name in self.names:
            setattr(callback, name, self._timed(getattr(callback, name)))
        self.control: Optional[HookClock] = None

    def with_control(self):
        """A do-nothing callback with this callback's hooks, clocked (``self.control``); put it in the fit."""
        import pytorch_lightning as pl

        def nothing(self, *args, **kwargs):
            return None

        hooks = {name: nothing for name in self.names}
        if "state_dict" in hooks:
            hooks["state_dict"] = lambda self: {}
        cls = type("Nothing", (pl.Callback,), hooks | {"last_values": {}})
        control = cls()
        self.control = HookClock(control)
        return control

    def net_seconds(self) -> float:
        """The callback's seconds less the clock's own cost (the do-nothing control's seconds)."""
        return self.seconds - (self.control.seconds if self.control is not None else 0.0)

    def _timed(self, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1
        return timed
