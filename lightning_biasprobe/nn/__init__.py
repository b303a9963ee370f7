"""Modules and losses from the seed papers: the Hat activation and the Sobolev-norm loss.

- :class:`Hat` / :func:`hat`: the piecewise-linear B-spline activation of Hong, Siegel, Tan, Xu
  (2022), which removes the spectral bias of ReLU networks.
- :class:`SobolevLoss` / :func:`sobolev_loss`: the ``H^s`` norm of the residual of Yu, Yang,
  Townsend (2023), which amplifies (``s > 0``), dampens or reverses (``s < 0``) frequency bias.

Pure torch: nothing here imports Lightning.
"""

from .hat import Hat, hat, place_hats_
from .sobolev import SobolevLoss, periodic_trapezoid_weights, sobolev_loss, sobolev_weights

__all__ = ["Hat", "SobolevLoss", "hat", "periodic_trapezoid_weights", "place_hats_", "sobolev_loss", "sobolev_weights"]
