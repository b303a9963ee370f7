"""Simplicity bias over training: S- and S^c-randomized accuracy (Shah et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from ..functional.simplicity import simplicity_bias
from ._data import ProbeSet
from .base import ProbeLogic

Coords = Union[Sequence[int], Tensor]


def _check_coords(coords: Any, arg: str) -> Union[tuple[int, ...], Tensor]:
    if isinstance(coords, Tensor) and coords.dtype == torch.bool:
        if not bool(coords.any()):
            raise ValueError(f"{arg} is an all-False mask: the coordinate set is empty")
        return coords.detach().cpu().clone()
    if isinstance(coords, int) and not isinstance(coords, bool):
        coords = (coords,)
    if isinstance(coords, Tensor):
        coords = coords.reshape(-1).tolist()
    if isinstance(coords, (str, bytes)) or not isinstance(coords, Sequence):
        raise TypeError(f"{arg} must be a sequence of coordinate indices or a boolean mask, got {coords!r}")
    values = list(coords)
    if not values:
        raise ValueError(f"{arg} is empty")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in values):
        raise ValueError(f"{arg} must hold non-negative integer indices into the flattened sample, got {coords!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{arg} repeats a coordinate: {coords!r}")
    return tuple(values)


class SimplicityBiasLogic(ProbeLogic):
    r"""Logs how much the model relies on a simple coordinate set ``S`` versus the rest, ``S^c``.

    Shah, Tamuly, Raghunathan, Jain, Netrapalli (2020), "The Pitfalls of Simplicity Bias in Neural
    Networks" (NeurIPS). On a fixed probe set the probe logs the clean accuracy and the accuracy
    after randomizing the ``S`` columns (``s_randomized_accuracy``: one joint permutation of those
    columns across the probe set) or the ``S^c`` columns (``sc_randomized_accuracy``), as in the
    reference code's ``get_feature_deps``. A model with extreme simplicity bias on LMS-5 data keeps
    its accuracy when ``S^c`` (the slab coordinates) is randomized and falls to chance when ``S``
    (the linear coordinate) is, although each slab coordinate alone would classify perfectly.

    Logs ``biasprobe/simplicity/accuracy``, ``s_randomized_accuracy``, ``sc_randomized_accuracy``
    and ``seconds`` (with ``reference="predictions"``: ``s_randomized_agreement`` and
    ``sc_randomized_agreement``, agreement with the model's clean predictions, and no accuracy).

    Defaults: ``S`` is coordinate 0 of the flattened input (the linear coordinate of
    :func:`lightning_biasprobe.data.make_lms` data) and ``S^c`` every other coordinate; for other
    data pass the coordinates that matter (``LMSDataModule.simplicity_kwargs()`` gives them for
    LMS data, rotation included). The permutation comes from a private generator seeded with
    ``seed``, the same at every measurement, so the curves carry no noise from it; the global RNG
    is never touched. Shah et al. evaluate on held-out data: pass ``probe_data="val"`` (or explicit
    tensors) for that; the default probe set is 1024 training examples (class-balanced). Cadence:
    at the start, every epoch and at the end.

    Cost per measurement: ``1 + 2 * num_repeats`` eval-mode forward passes over the probe set, no
    backward.

    Args:
        simple_coords: ``S``, indices into the flattened sample or a boolean mask of its shape.
        complex_coords: ``S^c``; default every coordinate not in ``S``.
        randomization: ``"permute"`` or ``"swap"`` (columns from a random example of another class).
        rotation: the orthonormal ``W`` of rotated data (inputs ``X W``); randomization happens in
            the unrotated coordinates.
        reference: ``"targets"`` (accuracy) or ``"predictions"`` (agreement with clean predictions).
        num_repeats: independent randomizations averaged per value.
        seed: the randomization's seed.
        chunk_size: examples per forward pass (bounds memory).
        **kwargs: probe data, adapters, cadence and failure policy, see :class:`ProbeLogic`.
    """

    name = "simplicity"
    default_cadence = {"every_n_epochs": 1}
    default_num_samples = 1024
    requires_targets = True

    def __init__(
        self,
        simple_coords: Coords = (0,),
        complex_coords: Optional[Coords] = None,
        randomization: Literal["permute", "swap"] = "permute",
        rotation: Optional[Tensor] = None,
        reference: Literal["targets", "predictions"] = "targets",
        num_repeats: int = 1,
        seed: int = 0,
        chunk_size: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        simple = _check_coords(simple_coords, "simple_coords")
        complex_ = None if complex_coords is None else _check_coords(complex_coords, "complex_coords")
        if isinstance(simple, tuple) and isinstance(complex_, tuple) and set(simple) & set(complex_):
            raise ValueError(f"coordinates {sorted(set(simple) & set(complex_))} are in both simple_coords and "
                             "complex_coords")
        if randomization not in ("permute", "swap"):
            raise ValueError(f"randomization must be 'permute' or 'swap', got {randomization!r}")
        if reference not in ("targets", "predictions"):
            raise ValueError(f"reference must be 'targets' or 'predictions', got {reference!r}")
        if rotation is not None:
            if not isinstance(rotation, Tensor) or not rotation.is_floating_point() or rotation.dim() != 2 \
                    or rotation.shape[0] != rotation.shape[1]:
                raise ValueError("rotation must be a square floating-point matrix W (the data are X W)")
            w = rotation.detach().double().cpu()
            error = float((w.T @ w - torch.eye(w.shape[0], dtype=torch.float64)).abs().max())
            if error > 1e-4:
                raise ValueError(f"rotation is not orthonormal (max |W^T W - I| = {error:.2g}); pass the orthonormal "
                                 "matrix the data were rotated with")
            rotation = rotation.detach().cpu().clone()
        if isinstance(num_repeats, bool) or not isinstance(num_repeats, int) or num_repeats < 1:
            raise ValueError(f"num_repeats must be a positive integer, got {num_repeats!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        super().__init__(**kwargs)
        self.simple_coords = simple
        self.complex_coords = complex_
        self.randomization = randomization
        self.rotation = rotation
        self.reference = reference
        self.num_repeats = num_repeats
        self.seed = seed
        self.chunk_size = chunk_size

    def key_fields(self) -> dict:
        def describe(coords):
            if coords is None or isinstance(coords, tuple):
                return coords
            return f"mask{tuple(coords.shape)}:{int(coords.sum())}"

        return {"simple": describe(self.simple_coords), "complex": describe(self.complex_coords),
                "randomization": self.randomization, "reference": self.reference, "rotated": self.rotation is not None}

    def measure(self, module: nn.Module, probe: ProbeSet) -> dict:
        result = simplicity_bias(
            module, probe.inputs, probe.targets, self.simple_coords, self.complex_coords,
            randomization=self.randomization, rotation=self.rotation, reference=self.reference,
            num_repeats=self.num_repeats, seed=self.seed, forward=self.forward, chunk_size=self.chunk_size,
        )
        if self.reference == "predictions":
            return {"s_randomized_agreement": result.s_randomized_accuracy,
                    "sc_randomized_agreement": result.sc_randomized_accuracy}
        return {"accuracy": result.accuracy, "s_randomized_accuracy": result.s_randomized_accuracy,
                "sc_randomized_accuracy": result.sc_randomized_accuracy}
