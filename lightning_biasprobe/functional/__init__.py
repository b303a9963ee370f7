"""The measurements as pure torch functions: ``(model, inputs, ...) -> tensors``.

Nothing here imports Lightning; use these from a plain PyTorch loop, a notebook or Fabric.
"""

from ._adapters import call_model, default_loss, output_tensor, per_sample_outputs
from .geometry import geometric_complexity

__all__ = ["call_model", "default_loss", "geometric_complexity", "output_tensor", "per_sample_outputs"]
