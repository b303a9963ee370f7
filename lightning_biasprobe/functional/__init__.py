"""The measurements as pure torch functions: ``(model, inputs, ...) -> tensors``.

Nothing here imports Lightning; use these from a plain PyTorch loop, a notebook or Fabric.
"""

from ._adapters import call_model, default_loss, output_tensor, per_sample_outputs
from .curvature import (
    HessianEigenvalues,
    HessianOperator,
    HessianTrace,
    SpectralDensity,
    hessian_eigenvalues,
    hessian_operator,
    hessian_spectral_density,
    hessian_trace,
    parameter_blocks,
)
from .diffusion import DiffusionFit, diffusion_exponent
from .geometry import geometric_complexity
from .igr import explicit_gradient_regularizer, gradient_norm_squared, implicit_gradient_regularizer
from .noise import (
    GradientNoiseStatistics,
    NoiseScale,
    TailIndex,
    gradient_noise_scale,
    gradient_noise_statistics,
    minibatch_noise,
    per_sample_gradients,
    tail_index,
)

__all__ = [
    "DiffusionFit",
    "GradientNoiseStatistics",
    "HessianEigenvalues",
    "HessianOperator",
    "HessianTrace",
    "NoiseScale",
    "SpectralDensity",
    "TailIndex",
    "call_model",
    "default_loss",
    "diffusion_exponent",
    "explicit_gradient_regularizer",
    "geometric_complexity",
    "gradient_noise_scale",
    "gradient_noise_statistics",
    "gradient_norm_squared",
    "hessian_eigenvalues",
    "hessian_operator",
    "hessian_spectral_density",
    "hessian_trace",
    "implicit_gradient_regularizer",
    "minibatch_noise",
    "output_tensor",
    "parameter_blocks",
    "per_sample_gradients",
    "per_sample_outputs",
    "tail_index",
]
