"""Anomalous diffusion of the weights: the exponent of ‖θ_t − θ_ref‖ ∝ t^c and the distances it is fitted to.

Kunin, Sagastuy-Brena, Gillespie, Margalit, Tanaka, Ganguli, Yamins (2021/2023), "Limiting Dynamics
of SGD: Modified Loss, Phase Space Oscillations, and Anomalous Diffusion", Neural Computation,
arXiv:2107.09133. Long after the loss has converged the weights keep moving; their distance from a
reference point grows as a power of time whose exponent depends on the hyperparameters.

Convention. The exponent here is that of the *distance* ``‖θ_t − θ_ref‖``: a random walk gives
1/2 and a straight (ballistic) path 1. Kunin et al. fit the *squared* distance
``Δ(t) = ‖θ_t − θ_ref‖²``, whose exponent is twice this one (Brownian motion: 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from operator import mul
from typing import Optional, Union

import numpy as np
from torch import Tensor

Numbers = Union[Sequence[float], Tensor]


@dataclass
class DiffusionFit:
    """Least-squares line through ``(log t, log distance)``: slope ``exponent``, fit quality ``r2``.

    ``distance ≈ exp(intercept) * t ** exponent`` over ``t_start <= t <= t_end`` (``num_points``
    points). ``stderr`` is the slope's standard error (NaN with two points).
    """

    exponent: float
    intercept: float
    r2: float
    stderr: float
    num_points: int
    t_start: float
    t_end: float


def _as_array(values: Numbers, what: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().double().cpu().reshape(-1).numpy()
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(out).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return out


_PYTHON_POINTS = 256  # up to here a Python loop beats NumPy's per-call overhead


def loglog_line(x: Union[Sequence[float], np.ndarray], y: Union[Sequence[float], np.ndarray]
                ) -> tuple[float, float, float, float]:
    """Least squares ``y ≈ intercept + slope x``: ``(slope, intercept, r2, stderr)``, in float64.

    Centred two-pass sums. Up to a few hundred points (a WeightDiffusion fit window, refitted at
    every point it adds) the sums are exactly rounded ``math.fsum`` over Python floats, where NumPy
    would spend ten times the arithmetic on per-call overhead; longer inputs use NumPy. Inputs are
    trusted here (finite, same length, at least two) and checked by the callers.
    """
    n = len(x)
    if n > _PYTHON_POINTS:
        xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        x_mean, y_mean = float(xa.mean()), float(ya.mean())
        xc, yc = xa - x_mean, ya - y_mean
        sxx, sxy, syy = float(xc @ xc), float(xc @ yc), float(yc @ yc)
        slope = sxy / sxx if sxx > 0 else 0.0
        residual = yc - slope * xc
        ss_res = float(residual @ residual)
    else:  # map(mul, ...) feeds fsum without a Python frame per term
        x_mean, y_mean = math.fsum(x) / n, math.fsum(y) / n
        xc = [float(v) - x_mean for v in x]
        yc = [float(v) - y_mean for v in y]
        sxx = math.fsum(map(mul, xc, xc))
        sxy = math.fsum(map(mul, xc, yc))
        syy = math.fsum(map(mul, yc, yc))
        slope = sxy / sxx if sxx > 0 else 0.0
        residual = [b - slope * a for a, b in zip(xc, yc)]
        ss_res = math.fsum(map(mul, residual, residual))
    if sxx <= 0:
        raise ValueError("the points must span more than one time t to fit an exponent")
    r2 = 1.0 - ss_res / syy if syy > 0 else 1.0
    stderr = math.sqrt(ss_res / (n - 2) / sxx) if n > 2 else math.nan
    return slope, y_mean - slope * x_mean, r2, stderr


def diffusion_exponent(
    steps: Numbers,
    distances: Numbers,
    *,
    window: Optional[float] = None,
    t_min: float = 1.0,
    min_points: int = 3,
) -> DiffusionFit:
    r"""Exponent :math:`c` of :math:`\lVert\theta_t - \theta_\text{ref}\rVert \propto t^c`, fitted in log-log.

    Kunin et al. (2021), "Limiting Dynamics of SGD: Modified Loss, Phase Space Oscillations, and
    Anomalous Diffusion". Ordinary least squares of :math:`\log d_k` on :math:`\log t_k` over the
    points with :math:`t_k \ge` ``t_min`` and :math:`d_k > 0`; with ``window`` (in decades of
    :math:`t`), only the points with :math:`t_k \ge t_\text{last} / 10^\text{window}` — a sliding
    window over the latest stretch of the curve, so the exponent can change over training (the
    exponent depends on the fit window: it is returned with the window it used). Fit quality is
    the coefficient of determination :math:`R^2` of the log-log line.

    References: a pure random walk gives :math:`c = 1/2`, a ballistic path
    :math:`\theta_t = \theta_0 + u t` exactly :math:`c = 1`, saturation (an Ornstein–Uhlenbeck
    process at late times) :math:`c \to 0`. Kunin et al.'s exponent of the squared distance is
    :math:`2c`. Fit log-spaced measurements, or late times dominate the fit.

    Cost: :math:`O(\text{points})`.

    Args:
        steps: times :math:`t_k` since the reference point (steps after it), any order.
        distances: :math:`\lVert\theta_{t_k} - \theta_\text{ref}\rVert`, same length, non-negative.
        window: decades of :math:`t` to fit, ending at the latest usable point; None for all points.
        t_min: smallest :math:`t` used (``t = 0`` is the reference itself, log 0 is undefined).
        min_points: fewer usable points than this raise ``ValueError`` (at least 2).

    Returns:
        :class:`DiffusionFit`.
    """
    t = _as_array(steps, "steps")
    d = _as_array(distances, "distances")
    if t.shape != d.shape:
        raise ValueError(f"steps and distances must have the same length, got {t.size} and {d.size}")
    if (d < 0).any():
        raise ValueError("distances must be non-negative (they are norms)")
    if isinstance(min_points, bool) or not isinstance(min_points, int) or min_points < 2:
        raise ValueError(f"min_points must be an integer >= 2, got {min_points!r}")
    if not (t_min > 0):
        raise ValueError(f"t_min must be positive (log t), got {t_min!r}")
    if window is not None and not (window > 0):
        raise ValueError(f"window must be a positive number of decades or None, got {window!r}")
    keep = (t >= t_min) & (d > 0)
    t, d = t[keep], d[keep]
    if window is not None and t.size:
        keep = t >= t.max() / 10.0**window
        t, d = t[keep], d[keep]
    n = int(t.size)
    if n < min_points:
        raise ValueError(f"need at least {min_points} points with t >= {t_min} and a positive distance"
                         f"{' in the window' if window is not None else ''}, got {n}")
    slope, intercept, r2, stderr = loglog_line(np.log(t), np.log(d))
    return DiffusionFit(exponent=slope, intercept=intercept, r2=r2, stderr=stderr, num_points=n,
                        t_start=float(t.min()), t_end=float(t.max()))
