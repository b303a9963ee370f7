r"""A Sobolev-norm loss on the residual's Fourier coefficients (Yu, Yang, Townsend 2023).

Yu, Yang, Townsend, "Tuning Frequency Bias in Neural Network Training with Nonuniform Data"
(ICLR 2023, arXiv:2205.14300). Gradient descent on the mean squared error fits the low-frequency
part of the residual first. Training on a Sobolev ``H^s`` norm of the residual instead reweights
its frequencies: ``s > 0`` amplifies high frequencies (they are learned sooner), ``s < 0`` damps
them (robust to high-frequency noise), and a large enough ``|s|`` can counterbalance or reverse
the network's own bias.

The residual ``r = input - target`` lives on a periodic domain, the unit circle ``[0, 1)`` (or the
unit torus in higher dimensions). Its Fourier coefficients are taken with a quadrature rule,

.. math::  \hat r_k = \sum_j c_j\, r(x_j)\, e^{-2\pi i\, k\cdot x_j},
           \qquad \Phi_s = \sum_{|k|\le K} (1 + |k|)^{2s}\, |\hat r_k|^2 .

- **Uniform grids** (any number of grid axes): ``x_j = j / N`` along each axis, ``c_j = 1/N``
  per axis, every discrete frequency (``|k|`` the Euclidean norm of the integer frequency vector;
  on even axes the Nyquist mode ``-N/2`` once). Computed with an FFT. By Parseval, ``s = 0`` gives
  exactly the mean squared residual: **``sobolev_loss(input, target, 0) == mse_loss(input, target)``**.
- **Nonuniform 1-D samples** ``x_j`` (``points``): the periodic trapezoid rule on the sorted circle,
  ``c_j = (x_{j+1} - x_{j-1}) / 2`` with cyclic neighbours (:func:`periodic_trapezoid_weights`), or
  weights you pass (e.g. ``1 / (N p(x_j))`` for a known density ``p``), and frequencies
  ``|k| <= K``. Computed as a ``(K+1) x N`` cosine/sine product, ``O(NK)``; ``K`` should stay below
  about half the local sampling density, beyond which aliasing breaks the quadrature.

Weight convention: ``(1 + |k|)^{2s}`` (``weight="shifted"``, the default) or ``(1 + |k|^2)^s``
(``weight="bessel"``); they differ only by bounded factors. Which one the paper writes, and its
exact quadrature rule, are from recollection of the paper (METHODS.md §13, [paper-recall]).

Cost: one FFT of the residual (uniform), or ``O(N K)`` (nonuniform), forward and backward; the
loss is linear in ``r`` before the square, so gradients flow through the coefficients. The norm is
a global, non-separable functional of all residuals: use it full-batch on low-dimensional
problems (the paper's setting), or recompute the quadrature weights for each minibatch's points.
``s > 0`` raises the effective step size on high modes; lower the learning rate accordingly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["SobolevLoss", "periodic_trapezoid_weights", "sobolev_loss", "sobolev_weights"]

Weight = Literal["shifted", "bessel"]
Reduction = Literal["mean", "sum", "none"]
Dims = Union[int, Sequence[int]]


def sobolev_weights(abs_k: Tensor, s: float, weight: Weight = "shifted") -> Tensor:
    """``(1 + |k|)^{2s}`` (``"shifted"``) or ``(1 + |k|^2)^s`` (``"bessel"``) for frequencies ``|k|``."""
    if weight == "shifted":
        return (1 + abs_k).pow(2 * s)
    if weight == "bessel":
        return (1 + abs_k * abs_k).pow(s)
    raise ValueError(f"weight must be 'shifted' or 'bessel', got {weight!r}")


def periodic_trapezoid_weights(points: Tensor) -> Tensor:
    """Quadrature weights ``c_j = (x_{j+1} - x_{j-1}) / 2`` on the circle ``[0, 1)`` (cyclic, sorted).

    Points are taken modulo 1. The weights sum to 1 and equal ``1/N`` on a uniform grid; each is
    half the arc between the point's two neighbours (its Voronoi cell on the circle).
    """
    if not isinstance(points, Tensor) or points.dim() != 1 or not points.is_floating_point():
        raise ValueError("points must be a 1-D floating-point tensor of sample locations on [0, 1)")
    if points.numel() < 2:
        raise ValueError(f"the trapezoid rule needs at least 2 points, got {points.numel()}")
    if not torch.isfinite(points).all():
        raise ValueError("points contain NaN or infinite values")
    x = points.detach().remainder(1.0)
    order = torch.argsort(x)
    xs = x[order]
    following = torch.roll(xs, -1)
    following[-1] = following[-1] + 1
    preceding = torch.roll(xs, 1)
    preceding[0] = preceding[0] - 1
    weights = torch.empty_like(x)
    weights[order] = (following - preceding) / 2
    return weights


def _as_dims(dims: Dims, ndim: int) -> tuple[int, ...]:
    dims = (dims,) if isinstance(dims, int) and not isinstance(dims, bool) else tuple(dims)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        raise ValueError(f"dims must be an axis or a non-empty sequence of axes, got {dims!r}")
    if any(not -ndim <= d < ndim for d in dims):
        raise ValueError(f"dims {dims} are out of range for a residual with {ndim} axes")
    normal = tuple(d % ndim for d in dims)
    if len(set(normal)) != len(normal):
        raise ValueError(f"dims {dims} name the same axis twice")
    return normal


def _check_options(s: float, weight: str, reduction: str, max_frequency: Optional[float]) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ValueError(f"s must be a finite real number, got {s!r}")
    if weight not in ("shifted", "bessel"):
        raise ValueError(f"weight must be 'shifted' or 'bessel', got {weight!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if max_frequency is not None and (isinstance(max_frequency, bool) or not isinstance(max_frequency, (int, float))
                                      or not max_frequency >= 0 or not math.isfinite(max_frequency)):
        raise ValueError(f"max_frequency must be a non-negative number or None, got {max_frequency!r}")
    return float(s)


def _grid_residual(input: Tensor, target: Tensor, dims: Dims, grid_shape: Optional[Sequence[int]]):
    """The residual with its grid axes moved last, and how many grid axes there are."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("input and target must be tensors")
    if not input.is_floating_point() or input.is_complex():
        raise TypeError(f"input must be a real floating-point tensor, got dtype {input.dtype}")
    if input.shape != target.shape:
        raise ValueError(
            f"input of shape {tuple(input.shape)} and target of shape {tuple(target.shape)} differ; the loss does "
            "not broadcast (a (N, 1) output against (N,) targets would compare every pair): reshape the target"
        )
    if input.dim() == 0:
        raise ValueError("the residual is a scalar; a grid of at least 2 points along each grid axis is needed")
    residual = input - target.to(input.dtype)
    axes = _as_dims(dims, residual.dim())
    if grid_shape is not None:
        shape = tuple(grid_shape)
        if len(axes) != 1:
            raise ValueError("grid_shape unflattens one axis: pass a single axis in dims with it")
        if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
            raise ValueError(f"grid_shape must be a sequence of positive integers, got {grid_shape!r}")
        if math.prod(shape) != residual.shape[axes[0]]:
            raise ValueError(f"grid_shape {shape} holds {math.prod(shape)} points, but axis {axes[0]} of the "
                             f"residual has {residual.shape[axes[0]]}")
        residual = residual.movedim(axes[0], -1)
        residual = residual.reshape(*residual.shape[:-1], *shape)
        num_grid = len(shape)
    else:
        residual = residual.movedim(axes, tuple(range(-len(axes), 0)))
        num_grid = len(axes)
    for n in residual.shape[residual.dim() - num_grid:]:
        if n < 2:
            raise ValueError(
                f"a grid axis has length {n}: at least 2 points are needed to see any frequency (grid shape "
                f"{tuple(residual.shape[residual.dim() - num_grid:])}; pass dims= the axes that hold the grid)"
            )
    return residual, num_grid


def _reduce(per_signal: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_signal.mean()
    if reduction == "sum":
        return per_signal.sum()
    return per_signal


def _uniform(residual: Tensor, num_grid: int, s: float, weight: str, max_frequency: Optional[float]) -> Tensor:
    grid = residual.shape[residual.dim() - num_grid:]
    axes = tuple(range(-num_grid, 0))
    coefficients = torch.fft.fftn(residual, dim=axes, norm="forward")  # = (1/N) sum_j r_j e^{-2 pi i k x_j}
    power = torch.view_as_real(coefficients).pow(2).sum(-1)
    ks = torch.meshgrid(*[torch.fft.fftfreq(n, d=1.0 / n, dtype=residual.dtype, device=residual.device)
                          for n in grid], indexing="ij")
    abs_k = torch.sqrt(sum(k * k for k in ks))
    w = sobolev_weights(abs_k, s, weight)
    if max_frequency is not None:
        w = torch.where(abs_k <= max_frequency, w, torch.zeros_like(w))
    return (power * w).sum(dim=axes)


def _nonuniform(residual: Tensor, points: Tensor, quadrature_weights: Optional[Tensor], s: float, weight: str,
                max_frequency: Optional[float]) -> Tensor:
    n = residual.shape[-1]
    if not isinstance(points, Tensor) or not points.is_floating_point() or points.shape != (n,):
        raise ValueError(f"points must be a floating-point tensor of shape ({n},), one location per grid sample; "
                         f"got {tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__}")
    if quadrature_weights is None:
        c = periodic_trapezoid_weights(points)
    else:
        c = quadrature_weights
        if not isinstance(c, Tensor) or c.shape != (n,) or not c.is_floating_point():
            raise ValueError(f"quadrature_weights must be a floating-point tensor of shape ({n},)")
        if not torch.isfinite(c).all() or (c < 0).any():
            raise ValueError("quadrature_weights must be finite and non-negative")
        if not torch.isfinite(points).all():
            raise ValueError("points contain NaN or infinite values")
    K = (n - 1) // 2 if max_frequency is None else int(math.floor(max_frequency))
    if 2 * K + 1 > n:
        raise ValueError(f"max_frequency={max_frequency} asks for {2 * K + 1} Fourier modes from {n} points; the "
                         f"coefficients are then not determined by the samples: pass max_frequency <= {(n - 1) // 2}")
    dtype, device = residual.dtype, residual.device
    k = torch.arange(K + 1, dtype=dtype, device=device)
    phase = 2 * math.pi * k[:, None] * points.detach().to(device=device, dtype=dtype)[None, :]
    weighted = residual * c.detach().to(device=device, dtype=dtype)
    real = weighted @ torch.cos(phase).T  # (..., K+1)
    imag = weighted @ torch.sin(phase).T
    power = real * real + imag * imag
    w = sobolev_weights(k, s, weight)
    w = torch.cat([w[:1], 2 * w[1:]])  # frequencies +k and -k have the same |coefficient| for a real residual
    return (power * w).sum(-1)


def sobolev_loss(
    input: Tensor,
    target: Tensor,
    s: float = 0.0,
    *,
    dims: Dims = 0,
    grid_shape: Optional[Sequence[int]] = None,
    points: Optional[Tensor] = None,
    quadrature_weights: Optional[Tensor] = None,
    max_frequency: Optional[float] = None,
    weight: Weight = "shifted",
    reduction: Reduction = "mean",
) -> Tensor:
    r"""The Sobolev ``H^s`` loss :math:`\sum_{|k|\le K}(1+|k|)^{2s}|\hat r_k|^2` of ``r = input - target``.

    Args:
        input, target: tensors of the same shape (no broadcasting).
        s: Sobolev order; ``0`` is the quadrature ``L^2`` loss (the mean squared error on a uniform grid),
            ``> 0`` weights high frequencies up, ``< 0`` down.
        dims: the axis (or axes, for a 2-D or higher grid) of the residual that hold the grid samples.
            Default ``0``, the sample axis: a model evaluated at the grid points returns ``(N,)`` or
            ``(N, C)``; for image-shaped ``(B, C, H, W)`` tensors pass ``dims=(-2, -1)``. Every other axis
            indexes separate signals, each with its own loss.
        grid_shape: read the single grid axis as a flattened row-major grid of this shape (e.g. a model
            evaluated at the ``N1 * N2`` points of ``meshgrid(..., indexing="ij")``).
        points: for nonuniform 1-D samples, their locations on ``[0, 1)`` (taken modulo 1), shape ``(N,)``.
            Without it the samples are a uniform grid ``j / N``.
        quadrature_weights: ``c_j`` for ``points``; default the periodic trapezoid rule.
        max_frequency: keep ``|k| <= max_frequency`` only. Default: every grid frequency (uniform), or
            ``(N - 1) // 2`` (nonuniform).
        weight: ``"shifted"`` ``(1+|k|)^{2s}`` or ``"bessel"`` ``(1+|k|^2)^s``.
        reduction: ``"mean"`` (default) or ``"sum"`` over the signals, or ``"none"``: one value per signal.

    Returns:
        The loss, differentiable in ``input``, in the input's dtype (half-precision residuals are
        transformed in float32). Points and quadrature weights are data: no gradient.
    """
    s = _check_options(s, weight, reduction, max_frequency)
    residual, num_grid = _grid_residual(input, target, dims, grid_shape)
    low_precision = residual.dtype in (torch.float16, torch.bfloat16)
    if low_precision:  # FFTs and weights of (1 + |k|)^{2s} need at least single precision
        residual = residual.float()
    if points is None:
        if quadrature_weights is not None:
            raise ValueError("quadrature_weights are for nonuniform samples: pass points with them")
        per_signal = _uniform(residual, num_grid, s, weight, max_frequency)
    else:
        if num_grid != 1:
            raise ValueError("nonuniform points are supported on a 1-D grid only (one grid axis, no grid_shape)")
        per_signal = _nonuniform(residual, points, quadrature_weights, s, weight, max_frequency)
    out = _reduce(per_signal, reduction)
    return out.to(input.dtype) if low_precision else out


class SobolevLoss(nn.Module):
    r"""The Sobolev ``H^s`` loss of the residual as a module; see :func:`sobolev_loss`.

    Yu, Yang, Townsend (2023), "Tuning Frequency Bias in Neural Network Training with Nonuniform
    Data". ``SobolevLoss(s=0)`` equals ``nn.MSELoss()`` on a uniform grid; ``s = 1`` makes a network
    learn high frequencies sooner, ``s = -1`` later.

    Example (a 1-D function fitted on 256 uniform points, full batch)::

        x = torch.arange(256.)[:, None] / 256
        loss = SobolevLoss(s=1.0)(model(x), y)              # y of shape (256, 1)
        loss = SobolevLoss(s=1.0, max_frequency=40)(model(x_nonuniform), y, points=x_nonuniform[:, 0])
    """

    def __init__(
        self,
        s: float = 0.0,
        *,
        dims: Dims = 0,
        grid_shape: Optional[Sequence[int]] = None,
        max_frequency: Optional[float] = None,
        weight: Weight = "shifted",
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.s = _check_options(s, weight, reduction, max_frequency)
        if grid_shape is not None:
            grid_shape = tuple(grid_shape)
            if not grid_shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in grid_shape):
                raise ValueError(f"grid_shape must be a sequence of positive integers, got {grid_shape!r}")
        _as_dims(dims, 64)  # type and duplicate checks now; the range is checked against the tensor
        self.dims = dims
        self.grid_shape = grid_shape
        self.max_frequency = max_frequency
        self.weight = weight
        self.reduction = reduction

    def forward(self, input: Tensor, target: Tensor, points: Optional[Tensor] = None,
                quadrature_weights: Optional[Tensor] = None) -> Tensor:
        return sobolev_loss(input, target, self.s, dims=self.dims, grid_shape=self.grid_shape, points=points,
                            quadrature_weights=quadrature_weights, max_frequency=self.max_frequency,
                            weight=self.weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"s={self.s}, weight={self.weight!r}, max_frequency={self.max_frequency}"
