r"""Simplicity bias: how much a model relies on simple versus complex input coordinates.

Shah, Tamuly, Raghunathan, Jain, Netrapalli (2020), "The Pitfalls of Simplicity Bias in Neural
Networks" (NeurIPS 2020, arXiv:2006.07710); protocol of the reference code
(``scripts/lms_utils.py``, ``get_feature_deps``). On data where a simple coordinate set ``S``
(e.g. the linear coordinate of LMS-5) and its complement ``S^c`` (the slab coordinates) each
separate the classes, the model is evaluated on copies of the data with one of them destroyed:

- **S-randomized accuracy**: the ``S`` columns are permuted across the examples (one joint
  permutation of those columns), everything else kept. It falls to chance when the model uses
  ``S`` only.
- **S^c-randomized accuracy**: the ``S^c`` columns are permuted jointly, ``S`` kept. It stays at
  the clean accuracy when the model ignores ``S^c``.

Extreme simplicity bias reads as: S^c-randomized ≈ clean accuracy and S-randomized ≈ chance,
although every slab coordinate alone would classify perfectly. ``randomization="swap"`` (the paper's
stronger variant) replaces each example's chosen columns with those of a random example of
another class instead of a random example. Accuracy is against the true labels, or against
the model's own clean predictions (``reference="predictions"``, the reference code's
``use_model_pred``: agreement). For randomly rotated data (``rotation`` ``W``, inputs ``X W``),
the columns are randomized in the unrotated coordinates ``X W^T`` and rotated back.

Coordinates are indices into the flattened per-sample input (``inputs.reshape(N, -1)``), or a
boolean mask of the per-sample shape (e.g. the MNIST half of an MNIST-over-CIFAR image). Inputs
of any dtype can be permuted or swapped (token ids stay valid ids); a rotation needs floats.
Randomization draws from a private generator seeded from ``seed`` (mixed, so that it does not
replay the stream of data generated with the same seed): the same permutation at every call, so
a curve over training has no noise from it.

Cost: ``1 + 2 * num_repeats`` forward passes over the examples (no gradients), plus a copy of the
inputs per randomized evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from ._adapters import ForwardFn, model_outputs

Coords = Union[Sequence[int], Tensor]
Randomization = Literal["permute", "swap"]
Reference = Literal["targets", "predictions"]

__all__ = [
    "SimplicityBiasResult",
    "class_predictions",
    "coordinate_indices",
    "randomize_coordinates",
    "randomized_accuracy",
    "simplicity_bias",
]


@dataclass
class SimplicityBiasResult:
    """Accuracies of one model on clean, S-randomized and S^c-randomized copies of the data.

    With ``reference="predictions"`` the three are agreements with the clean predictions
    (``accuracy`` is then 1).
    """

    accuracy: Tensor
    s_randomized_accuracy: Tensor
    sc_randomized_accuracy: Tensor
    num_samples: int
    simple_coords: tuple[int, ...]
    complex_coords: tuple[int, ...]
    randomization: str
    reference: str


def _generator(seed: Optional[int], generator: Optional[torch.Generator] = None) -> torch.Generator:
    """A private CPU generator. The seed is mixed first: data made by a torch generator with the same
    small seed (``make_lms(seed=0)``) would otherwise share its random stream with the permutation,
    and labels permuted by their own stream agree more often than chance."""
    if generator is not None:
        return generator
    mixed = (int(seed or 0) * 6364136223846793005 + 1442695040888963407) % (2**63)
    return torch.Generator().manual_seed(mixed)


def coordinate_indices(coords: Coords, num_features: int, sample_shape: Optional[tuple] = None) -> Tensor:
    """``coords`` (indices into the flattened sample, or a boolean mask) as sorted unique indices."""
    if isinstance(coords, Tensor) and coords.dtype == torch.bool:
        if coords.numel() != num_features or (sample_shape is not None and coords.dim() > 1
                                              and tuple(coords.shape) != tuple(sample_shape)):
            raise ValueError(f"a coordinate mask of shape {tuple(coords.shape)} does not match samples of shape "
                             f"{tuple(sample_shape) if sample_shape else (num_features,)}")
        index = coords.reshape(-1).nonzero().reshape(-1).cpu()
    else:
        values = coords.reshape(-1).tolist() if isinstance(coords, Tensor) else list(coords)
        if any(isinstance(c, bool) or not isinstance(c, int) for c in values):
            raise TypeError(f"coordinates must be integers or a boolean mask, got {coords!r}")
        bad = [c for c in values if not 0 <= c < num_features]
        if bad:
            raise ValueError(f"coordinates {bad} are out of range for samples with {num_features} features "
                             "(coordinates index the flattened sample)")
        index = torch.tensor(sorted(set(values)), dtype=torch.long)
    if index.numel() == 0:
        raise ValueError("the coordinate set is empty")
    return index


def class_predictions(outputs: Tensor) -> Tensor:
    """Class indices from logits: argmax over ``(N, C)``, or ``output > 0`` for one logit ``(N,)``/``(N, 1)``."""
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        return (outputs.reshape(-1) > 0).long()
    if outputs.dim() == 2:
        return outputs.argmax(dim=1)
    raise ValueError(f"outputs of shape {tuple(outputs.shape)} are not class scores; pass forward= returning "
                     "(N, C) logits (or (N,) for one binary logit)")


def _labels(targets: Tensor, n: int) -> Tensor:
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor of class indices, got {type(targets).__name__}")
    targets = targets.reshape(-1) if targets.dim() == 2 and targets.shape[1] == 1 else targets
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match {n} examples; class indices of "
                         "shape (N,) are needed")
    if targets.is_floating_point():
        if not torch.equal(targets, targets.round()):
            raise ValueError("targets must be class indices (integers); got non-integral float targets")
        targets = targets.long()
    return targets


def _check_inputs(inputs: Any, rotation: Optional[Tensor]) -> None:
    if not isinstance(inputs, Tensor) or inputs.dim() < 2:
        what = type(inputs).__name__ if not isinstance(inputs, Tensor) else f"a tensor of shape {tuple(inputs.shape)}"
        raise TypeError(f"inputs must be one tensor of shape (N, ...), got {what}; for a model with several "
                        "inputs, pass unpack_batch/forward adapters so that the randomized input is one tensor")
    if rotation is not None and not inputs.is_floating_point():
        raise TypeError(f"a rotation needs floating-point inputs, got dtype {inputs.dtype}")


def _unrotated(inputs: Tensor, rotation: Optional[Tensor]) -> Tensor:
    flat = inputs.reshape(inputs.shape[0], -1)
    if rotation is None:
        return flat.clone()
    d = flat.shape[1]
    if rotation.shape != (d, d):
        raise ValueError(f"rotation of shape {tuple(rotation.shape)} does not match samples with {d} features")
    return flat @ rotation.to(flat).T


def randomize_coordinates(
    inputs: Tensor,
    coords: Coords,
    *,
    randomization: Randomization = "permute",
    targets: Optional[Tensor] = None,
    rotation: Optional[Tensor] = None,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """A copy of ``inputs`` whose ``coords`` columns come from other examples.

    ``randomization="permute"``: one random permutation of the examples, applied to all ``coords``
    columns together. ``randomization="swap"``: each example takes the columns of a uniformly random
    example of another class (needs ``targets``). With ``rotation`` ``W`` (inputs ``X W``), the
    columns are those of ``X = inputs W^T``. Draws come from ``generator``, or from a private one
    seeded from ``seed`` (mixed: see the module docstring).
    """
    _check_inputs(inputs, rotation)
    n = inputs.shape[0]
    if n < 2:
        raise ValueError("randomizing coordinates needs at least 2 examples")
    z = _unrotated(inputs, rotation)
    index = coordinate_indices(coords, z.shape[1], tuple(inputs.shape[1:])).to(z.device)
    g = _generator(seed, generator)
    if randomization == "permute":
        source = torch.randperm(n, generator=g)
    elif randomization == "swap":
        if targets is None:
            raise ValueError("randomization='swap' needs targets (each example takes columns from another class)")
        labels = _labels(targets, n).cpu()
        source = torch.empty(n, dtype=torch.long)
        for c in torch.unique(labels):
            mine = (labels == c).nonzero().reshape(-1)
            others = (labels != c).nonzero().reshape(-1)
            if others.numel() == 0:
                raise ValueError("randomization='swap' needs examples of at least two classes")
            source[mine] = others[torch.randint(others.numel(), (mine.numel(),), generator=g)]
    else:
        raise ValueError(f"randomization must be 'permute' or 'swap', got {randomization!r}")
    source = source.to(z.device)
    z[:, index] = z[source][:, index]
    if rotation is not None:
        z = z @ rotation.to(z)
    return z.reshape(inputs.shape)


def _predict(model: nn.Module, inputs: Tensor, forward: Optional[ForwardFn], chunk_size: Optional[int]) -> Tensor:
    n = inputs.shape[0]
    step = n if chunk_size is None else chunk_size
    preds = [class_predictions(model_outputs(model, inputs[i:i + step], forward)) for i in range(0, n, step)]
    return torch.cat(preds)


def _check(randomization: str, reference: str, num_repeats: int, chunk_size: Optional[int]) -> None:
    if randomization not in ("permute", "swap"):
        raise ValueError(f"randomization must be 'permute' or 'swap', got {randomization!r}")
    if reference not in ("targets", "predictions"):
        raise ValueError(f"reference must be 'targets' or 'predictions', got {reference!r}")
    if isinstance(num_repeats, bool) or not isinstance(num_repeats, int) or num_repeats < 1:
        raise ValueError(f"num_repeats must be a positive integer, got {num_repeats!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _randomized_accuracy(model, inputs, labels, reference_labels, coords, randomization, rotation, g, num_repeats,
                         forward, chunk_size) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(num_repeats):
        shuffled = randomize_coordinates(inputs, coords, randomization=randomization, targets=labels,
                                         rotation=rotation, generator=g)
        preds = _predict(model, shuffled, forward, chunk_size)
        total += (preds == reference_labels).double().mean().cpu()
    return total / num_repeats


@torch.no_grad()
def randomized_accuracy(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    coords: Coords,
    *,
    randomization: Randomization = "permute",
    rotation: Optional[Tensor] = None,
    reference: Reference = "targets",
    num_repeats: int = 1,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    forward: Optional[ForwardFn] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Accuracy (float64 scalar) of ``model`` on ``inputs`` with the ``coords`` columns randomized.

    See the module docstring for the protocol. ``num_repeats`` averages over independent draws.
    Put the model in eval mode first (dropout and batch statistics would change the predictions).
    Cost: ``num_repeats`` forwards (plus one for ``reference="predictions"``).
    """
    _check(randomization, reference, num_repeats, chunk_size)
    labels = _labels(targets, inputs.shape[0]).to(inputs.device)
    ref = labels if reference == "targets" else _predict(model, inputs, forward, chunk_size)
    g = _generator(seed, generator)
    return _randomized_accuracy(model, inputs, labels, ref, coords, randomization, rotation, g, num_repeats,
                                forward, chunk_size)


@torch.no_grad()
def simplicity_bias(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    simple_coords: Coords = (0,),
    complex_coords: Optional[Coords] = None,
    *,
    randomization: Randomization = "permute",
    rotation: Optional[Tensor] = None,
    reference: Reference = "targets",
    num_repeats: int = 1,
    seed: Optional[int] = 0,
    forward: Optional[ForwardFn] = None,
    chunk_size: Optional[int] = None,
) -> SimplicityBiasResult:
    """Clean, S-randomized and S^c-randomized accuracy (Shah et al. 2020).

    Args:
        model: the classifier; eval mode is the caller's business.
        inputs: ``(N, ...)`` examples, one tensor (held-out data in the paper).
        targets: ``(N,)`` class indices.
        simple_coords: ``S``; default ``(0,)``, the linear coordinate of LMS data.
        complex_coords: ``S^c``; default every other coordinate of the flattened sample.
        randomization: ``"permute"`` (random examples) or ``"swap"`` (random examples of another class).
        rotation: ``W`` when the data were rotated (``inputs = X W``).
        reference: ``"targets"`` (accuracy) or ``"predictions"`` (agreement with clean predictions).
        num_repeats: independent randomizations averaged per accuracy.
        seed: the private generator's seed (S then S^c draw from it in turn).
        forward: ``(model, inputs) -> outputs`` adapter; outputs ``(N, C)`` logits or ``(N,)`` one logit.
        chunk_size: examples per forward (bounds memory).

    Cost: ``1 + 2 * num_repeats`` forwards over ``N`` examples.
    """
    _check(randomization, reference, num_repeats, chunk_size)
    _check_inputs(inputs, rotation)
    n = inputs.shape[0]
    num_features = inputs[0].numel()
    simple = coordinate_indices(simple_coords, num_features, tuple(inputs.shape[1:]))
    if complex_coords is None:
        keep = torch.ones(num_features, dtype=torch.bool)
        keep[simple] = False
        complex_ = keep.nonzero().reshape(-1)
        if complex_.numel() == 0:
            raise ValueError("every coordinate is in the simple set, so the complex set is empty; pass complex_coords")
    else:
        complex_ = coordinate_indices(complex_coords, num_features, tuple(inputs.shape[1:]))
        overlap = sorted(set(simple.tolist()) & set(complex_.tolist()))
        if overlap:
            raise ValueError(f"coordinates {overlap} are in both the simple and the complex set")
    labels = _labels(targets, n).to(inputs.device)
    clean = _predict(model, inputs, forward, chunk_size)
    ref = labels if reference == "targets" else clean
    g = _generator(seed)
    args = (randomization, rotation, g, num_repeats, forward, chunk_size)
    s_randomized = _randomized_accuracy(model, inputs, labels, ref, simple.tolist(), *args)
    sc_randomized = _randomized_accuracy(model, inputs, labels, ref, complex_.tolist(), *args)
    return SimplicityBiasResult(
        accuracy=(clean == ref).double().mean().cpu(),
        s_randomized_accuracy=s_randomized,
        sc_randomized_accuracy=sc_randomized,
        num_samples=n,
        simple_coords=tuple(simple.tolist()),
        complex_coords=tuple(complex_.tolist()),
        randomization=randomization,
        reference=reference,
    )
