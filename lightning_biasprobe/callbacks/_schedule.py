"""When a probe measures: a cadence over Lightning's global step and epochs, and an overhead budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

# Baratin et al. measure at step 0 and at floor(5 * 1.15**k): dense early, where kernels and
# curvature change most, sparse late.
LOG_START = 5
LOG_FACTOR = 1.15


def log_spaced_steps(max_step: int, start: int = LOG_START, factor: float = LOG_FACTOR) -> list[int]:
    """The distinct steps ``floor(start * factor**k) <= max_step``, k = 0, 1, ..., in order."""
    if start < 1 or factor <= 1:
        raise ValueError(f"need start >= 1 and factor > 1, got start={start}, factor={factor}")
    steps: list[int] = []
    k = 0
    while (s := math.floor(start * factor**k)) <= max_step:
        if not steps or s != steps[-1]:
            steps.append(s)
        k += 1
    return steps


def _next_log_step(step: int, start: int = LOG_START, factor: float = LOG_FACTOR) -> int:
    """The smallest ``floor(start * factor**k) >= step``."""
    if step <= start:
        return start
    k = max(0, math.floor(math.log(step / start, factor)) - 1)  # one below: safe from rounding
    while (s := math.floor(start * factor**k)) < step:
        k += 1
    return s


@dataclass
class Cadence:
    """Which global steps and epoch ends a probe measures at.

    Args:
        every_n_steps: measure after every n-th optimizer step (global step divisible by n).
        every_n_epochs: measure at the end of every n-th training epoch.
        log_spaced: measure at global steps ``floor(5 * f**k)``, k = 0, 1, ...: ``True`` for
            f = 1.15 (Baratin et al. 2021; about 16 steps per decade), a float > 1 for another
            growth factor f (e.g. 1.25: about 10 per decade), ``False`` for none.
        at_start: measure before the first optimizer step (global step 0).
        at_end: measure when training ends.
        max_overhead: if set, a fraction of training-step time (e.g. 0.05): a scheduled
            measurement is skipped whenever this probe has already spent more than that
            fraction of the time spent in training steps so far. ``at_end`` is always measured.
    """

    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None
    log_spaced: Union[bool, float] = False
    at_start: bool = True
    at_end: bool = True
    max_overhead: Optional[float] = None
    _log_window: tuple[int, int] = field(default=(0, 0), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "every_n_epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        spaced = self.log_spaced
        if not isinstance(spaced, bool) and (not isinstance(spaced, (int, float)) or not spaced > 1):
            raise ValueError(f"log_spaced must be True, False or a growth factor > 1, got {spaced!r}")
        if self.max_overhead is not None and not (0 < float(self.max_overhead)):
            raise ValueError(f"max_overhead must be a positive fraction (e.g. 0.05) or None, got {self.max_overhead!r}")

    def due_at_step(self, step: int) -> bool:
        if step <= 0:
            return False
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return True
        if self.log_spaced is False:
            return False
        # Asked at every training step: between two log-spaced steps the answer is an integer
        # comparison (no logarithm), since no log-spaced step lies in [low, high).
        low, high = self._log_window
        if low <= step < high:
            return False
        if step != high:
            high = _next_log_step(step, factor=self.log_factor)
            self._log_window = (step, high)
        return step == high

    def next_due_step(self, step: int) -> Optional[int]:
        """The first global step after ``step`` at which :meth:`due_at_step` is true (None: none is;
        epoch ends are not steps)."""
        candidates = []
        if self.every_n_steps is not None:
            candidates.append((max(step, 0) // self.every_n_steps + 1) * self.every_n_steps)
        if self.log_spaced is not False:
            candidates.append(_next_log_step(max(step + 1, 1), factor=self.log_factor))
        return min(candidates) if candidates else None

    @property
    def log_factor(self) -> float:
        """The growth factor of the log-spaced steps (1.15 for ``log_spaced=True``)."""
        return LOG_FACTOR if isinstance(self.log_spaced, bool) else float(self.log_spaced)

    def due_at_epoch_end(self, epoch: int) -> bool:
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def within_budget(self, probe_seconds: float, train_seconds: float) -> bool:
        if self.max_overhead is None:
            return True
        return probe_seconds <= self.max_overhead * train_seconds
