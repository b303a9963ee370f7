"""The Hat activation: the piecewise-linear cardinal B-spline (Hong, Siegel, Tan, Xu 2022).

Hong, Siegel, Tan, Xu, "On the Activation Function Dependence of the Spectral Bias of Neural
Networks" (2022, arXiv:2208.04924) explain the spectral bias of ReLU networks with finite-element
theory (a ReLU basis is like an ill-conditioned stiffness matrix, whose small eigenvalues belong to
high frequencies) and predict that the Hat function, the nodal basis of linear finite elements,
removes it:

    hat(x) = x        for 0 <= x <= 1
           = 2 - x    for 1 <= x <= 2
           = 0        otherwise
           = max(0, 1 - |x - 1|) = relu(x) - 2 relu(x - 1) + relu(x - 2)

Support [0, 2], peak 1 at x = 1, slopes +-1, integral 1, and its integer shifts sum to one
(partition of unity). The explicit formula is the standard cardinal linear B-spline; the paper's
abstract names "a piecewise linear B-spline, namely the Hat function".

Gradient convention at the kinks 0, 1, 2: the left derivative (0, +1, -1), which is what autograd
gives for the 3-ReLU identity with PyTorch's relu'(0) = 0. Away from the kinks it is the derivative.
The derivative is piecewise constant, so second derivatives are zero (as for ReLU networks).

Cost: one elementwise pass forward and one backward; the input is saved for the backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["Hat", "hat", "place_hats_"]


def _slope(x: Tensor) -> Tensor:
    # +1 on (0, 1], -1 on (1, 2], 0 elsewhere: the left derivative at each kink.
    rising = (x > 0) & (x <= 1)
    falling = (x > 1) & (x <= 2)
    return rising.to(x.dtype) - falling.to(x.dtype)


class _HatFunction(torch.autograd.Function):
    # Written in the setup_context form with a vmap rule and a jvp so that torch.func transforms
    # (vmap, jacrev, jvp, functional_call), which the NTK and curvature probes use, accept it.
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return (1 - (x - 1).abs()).clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * _slope(x)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return tangent * _slope(x)


def hat(x: Tensor, scale: float = 1.0, centered: bool = False) -> Tensor:
    """The Hat function ``max(0, 1 - |x - 1|)`` of ``x / scale`` (shifted by +1 when ``centered``).

    ``scale = a`` stretches the support to ``[0, 2a]`` (slopes ``+-1/a``); ``centered=True`` moves it
    to ``[-a, a]``. Both can be absorbed in the previous layer's weights and bias, but they change
    what a given initialization puts inside the support. The default is the paper's ``[0, 2]`` form.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"hat expects a floating-point tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if scale != 1.0:
        x = x / scale
    if centered:
        x = x + 1
    return _HatFunction.apply(x)


@torch.no_grad()
def place_hats_(linear: nn.Linear, low: float = 0.0, high: float = 1.0, half_width: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> nn.Linear:
    """Initialise a 1-input ``linear`` layer so that each unit's Hat is a finite-element node on ``[low, high]``.

    Unit ``i`` gets ``hat(w x + b)`` with ``w = 1 / h`` and ``b = 1 - t_i / h``: a hat centred at
    ``t_i ~ U[low, high]`` with support ``[t_i - h, t_i + h]``, so no unit starts dead on the data
    and the hats cover the interval at resolution ``h`` (default ``h = 8 (high - low) / units``,
    about 16 hats over every point). For the default :class:`Hat` (``scale=1``, not centred).
    Returns ``linear``.
    """
    if not isinstance(linear, nn.Linear) or linear.in_features != 1:
        raise ValueError("place_hats_ places hats along one input coordinate: pass an nn.Linear with in_features=1")
    if linear.bias is None:
        raise ValueError("place_hats_ needs a layer with a bias (the hat centres live in it)")
    if not high > low:
        raise ValueError(f"need low < high, got low={low!r}, high={high!r}")
    h = 8 * (high - low) / linear.out_features if half_width is None else half_width
    if not h > 0:
        raise ValueError(f"half_width must be positive, got {half_width!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    centres = low + (high - low) * torch.rand(linear.out_features, generator=g, dtype=torch.float64)
    linear.weight.fill_(1.0 / h)
    linear.bias.copy_((1 - centres / h).to(linear.bias.dtype))
    return linear


class Hat(nn.Module):
    """The Hat activation as a module (Hong, Siegel, Tan, Xu 2022); see :func:`hat`.

    Units whose pre-activations leave the support ``(0, 2)`` (times ``scale``) get no gradient and
    die, so initialise the previous layer so that pre-activations fall inside it on the data (for
    1-D inputs, place the hats over the data range, as finite-element nodes).

    Args:
        scale: support ``[0, 2 * scale]`` (``[-scale, scale]`` when centered), peak value 1.
        centered: shift the support to be symmetric about 0.
    """

    def __init__(self, scale: float = 1.0, centered: bool = False) -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or scale == float("inf"):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)
        self.centered = bool(centered)

    def forward(self, x: Tensor) -> Tensor:
        return hat(x, self.scale, self.centered)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, centered={self.centered}"
