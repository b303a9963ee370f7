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
from .frequency import (
    PathFrequencies,
    SignalSpectrum,
    function_frequency,
    interpolation_pairs,
    path_signals,
    signal_spectrum,
)
from .geometry import geometric_complexity
from .igr import explicit_gradient_regularizer, gradient_norm_squared, implicit_gradient_regularizer
from .ncc import FeatureStatistics, NCCProfile, cdnv, class_means, effective_depth, nc1, ncc_accuracy, ncc_profile
from .ntk import (
    NTKOperator,
    NTKPlan,
    NTKSpectrum,
    NTKStatistics,
    center_kernel,
    empirical_ntk,
    kernel_alignment,
    kernel_distance,
    ntk_plan,
    ntk_spectrum,
)
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
from .rank import LayerSpectrum, effective_rank, layer_spectra, rank_measures, rankme, stable_rank

from .simplicity import (
    SimplicityBiasResult,
    class_predictions,
    randomize_coordinates,
    randomized_accuracy,
    simplicity_bias,
)

__all__ = [
    "PathFrequencies",
    "SignalSpectrum",
    "function_frequency",
    "interpolation_pairs",
    "path_signals",
    "signal_spectrum",
    "SimplicityBiasResult",
    "class_predictions",
    "randomize_coordinates",
    "randomized_accuracy",
    "simplicity_bias",
    "DiffusionFit",
    "FeatureStatistics",
    "GradientNoiseStatistics",
    "HessianEigenvalues",
    "HessianOperator",
    "HessianTrace",
    "LayerSpectrum",
    "NCCProfile",
    "NTKOperator",
    "NTKPlan",
    "NTKSpectrum",
    "NTKStatistics",
    "NoiseScale",
    "SpectralDensity",
    "TailIndex",
    "call_model",
    "cdnv",
    "center_kernel",
    "class_means",
    "default_loss",
    "diffusion_exponent",
    "effective_depth",
    "effective_rank",
    "empirical_ntk",
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
    "kernel_alignment",
    "kernel_distance",
    "layer_spectra",
    "minibatch_noise",
    "nc1",
    "ncc_accuracy",
    "ncc_profile",
    "ntk_plan",
    "ntk_spectrum",
    "output_tensor",
    "parameter_blocks",
    "per_sample_gradients",
    "per_sample_outputs",
    "rank_measures",
    "rankme",
    "stable_rank",
    "tail_index",
]
