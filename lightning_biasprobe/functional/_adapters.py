"""How a model is called and how its output is read: the defaults every measurement shares.

- ``call_model``: a tensor input is passed as ``model(x)``, a tuple or list as ``model(*x)``,
  a dict as ``model(**x)``.
- ``output_tensor``: a tensor output is used as is; a dict gives its ``"logits"`` entry (else its
  first tensor); an object with a ``logits`` attribute (Hugging Face style) gives that; a tuple or
  list gives its first element.
- ``per_sample_outputs``: outputs of shape ``(N, *)`` are flattened to ``(N, C)``, so a sequence
  output ``(N, T, C)`` counts every position and class as one output. Pass a ``forward`` callable
  that reduces it differently (e.g. keeps the last position) to change that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

ForwardFn = Callable[[nn.Module, Any], Any]


def call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output and isinstance(output["logits"], Tensor):
            return output["logits"]
        for value in output.values():
            if isinstance(value, Tensor):
                return value
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot read a tensor from a model output of type {type(output).__name__}; pass "
        "`forward=lambda model, inputs: ...` returning a tensor of shape (N, C)"
    )


def model_outputs(model: nn.Module, inputs: Any, forward: Optional[ForwardFn] = None) -> Tensor:
    """The model's output tensor for ``inputs`` through ``forward`` (default: ``call_model``)."""
    return output_tensor((forward or call_model)(model, inputs))


def per_sample_outputs(outputs: Tensor) -> Tensor:
    """Flatten ``(N, *)`` outputs to ``(N, C)``."""
    if outputs.dim() == 0:
        raise ValueError("the model returned a scalar; per-sample outputs of shape (N, ...) are needed")
    return outputs.reshape(outputs.shape[0], -1)


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for integer targets (class indices), mean squared error for float targets."""
    if not targets.is_floating_point():
        if outputs.dim() > 2:  # (N, T, C) sequences against (N, T) labels
            return nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
        return nn.functional.cross_entropy(outputs, targets)
    return nn.functional.mse_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))


def batchnorm_in_train_mode(model: nn.Module) -> list[str]:
    """Names of BatchNorm modules in train mode: they couple the samples of a batch."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]


def make_generator(seed: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Generator:
    """A private CPU generator, so estimators never draw from (or advance) the global RNG."""
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g
