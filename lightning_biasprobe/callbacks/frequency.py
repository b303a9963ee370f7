"""Function frequency along interpolation paths over training (Fridovich-Keil, Gontijo-Lopes, Roelofs 2022)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..functional.frequency import (
    GROUPS,
    Window,
    _check_spectrum_args,
    _class_labels,
    function_frequency,
    interpolation_pairs,
)
from ._data import ProbeSet
from .base import ProbeLogic


class FunctionFrequencyLogic(ProbeLogic):
    r"""Logs how fast the model's prediction changes along straight paths between probe examples.

    Fridovich-Keil, Gontijo-Lopes, Roelofs (2022), "Spectral Bias in Practice: The Role of Function
    Frequency in Generalization" (NeurIPS). For each of ``num_pairs`` same-class and ``num_pairs``
    different-class pairs of probe examples ``(x0, x1)``, the model is evaluated at ``num_points``
    points :math:`x(t) = x_0 + t(x_1 - x_0)`, ``t = j/M`` (end excluded), and the signal
    :math:`s(t) = \lVert \mathrm{softmax}(f(x(t))) - \mathrm{softmax}(f(x_0))\rVert_2` (softmax per
    point, unlike the reference code's softmax over the whole array) is Hann-windowed, its weighted
    mean removed, and its power spectrum :math:`P_k` summarised per path
    (:func:`lightning_biasprobe.functional.function_frequency`). The paper finds modern classifiers
    spectrally biased, and better-generalising settings giving higher frequency overall but lower
    frequency within classes. It measures between held-out (test) images: pass ``probe_data="val"``
    for that; the default, as for every probe, is training examples.
    ``examples/function_frequency_digits.py`` shows the curves on digits.

    Logged under ``biasprobe/freq/<group>/`` for ``<group>`` in ``same_class``, ``different_class``
    and ``all`` (means over the group's paths):

    - ``mean_frequency``: spectral centroid :math:`\sum_{k\ge1} k P_k / \sum_{k\ge1} P_k`, in cycles
      per path length (the distance from ``x0`` to ``x1``);
    - ``mean_frequency_per_distance``: the same divided by :math:`\lVert x_1 - x_0\rVert`, cycles per
      unit input distance (input normalisation sets the unit);
    - ``high_frequency_fraction``: :math:`\sum_{k\ge k_c} P_k / \sum_{k\ge1} P_k`,
      :math:`k_c = \lceil\text{cutoff}\cdot(M/2+1)\rceil` (4 cycles per path with the defaults);
    - ``high_frequency_power``: :math:`\sum_{k\ge k_c} P_k / (M\sum_j w_j^2)`, the part of the
      (Hann-weighted) variance of ``s`` above the cutoff, in squared probability units; unlike the
      scale-free fraction it is small where the prediction barely moves (0 on flat paths);
    - ``max_distance``: :math:`\max_t s(t)`, how far the prediction moves from the start's;
    - ``flat_fraction``: the share of paths whose signal is constant (within ``constant_tol``).

    A flat path has no spectrum (0/0): it is left out of the first three means. When *every* path
    of a group is flat, those three values are undefined and **their keys are left out of that
    measurement** (not logged as NaN, which the failure policy would count as a failed
    measurement); ``flat_fraction`` (then 1) and ``max_distance`` are still logged. TensorBoard
    also gets histograms ``<group>/mean_frequency_hist`` of the per-path values.

    The pairs are drawn once, at the first measurement, from the probe set's class labels with
    ``seed`` (stratified over classes and class pairs, see
    :func:`~lightning_biasprobe.functional.interpolation_pairs`), so every point of the curves
    follows the same paths; they are saved in the checkpoint state.

    Default cadence: at the start, at the end of every epoch and at the end of training, on 256
    class-balanced training examples, within a 5% budget of the training steps' time
    (``max_overhead=0.05``; an explicit schedule is kept exactly). Needs integer class labels.

    Cost per measurement: ``2 * num_pairs * num_points`` single-example forwards (12,800 with the
    defaults), batched by whole paths of about ``chunk_size`` points in eval mode under ``no_grad``,
    plus one rfft of length ``num_points`` per path; memory one chunk of interpolated inputs and its
    forward. For the demo MLP on one CPU core: about 10 ms, 1.3x the bare forwards of the 12,800
    points and 2.5x faster than a per-pair loop (``benchmarks/bench_frequency.py``).

    Args:
        num_pairs: pairs of each type (fewer if the probe set holds fewer distinct pairs).
        num_points: ``M``, points per path (at least 4 with the Hann window, 2 without).
        cutoff: first high-frequency bin, as a fraction of the ``M // 2 + 1`` rfft bins.
        extrapolate: path lengths added beyond both ends (our extension, not the paper's).
        window: ``"hann"`` or ``"none"``.
        constant_tol: a path whose signal's range (max - min) is at most this (probability units)
            is flat.
        seed: of the pair draw.
        chunk_size: points per batched forward (rounded down to whole paths, at least one).
        **kwargs: probe data, adapters, cadence and failure policy, see :class:`ProbeLogic`.
    """

    name = "freq"
    default_cadence = {"every_n_epochs": 1, "max_overhead": 0.05}
    default_num_samples = 256
    requires_targets = True

    def __init__(
        self,
        num_pairs: int = 100,
        num_points: int = 64,
        cutoff: float = 0.1,
        extrapolate: float = 0.0,
        window: Window = "hann",
        constant_tol: float = 1e-6,
        seed: int = 0,
        chunk_size: Optional[int] = 1024,
        **kwargs: Any,
    ) -> None:
        if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
            raise ValueError(f"num_pairs must be a positive integer, got {num_pairs!r}")
        _check_spectrum_args(num_points, cutoff, window)
        if (not isinstance(extrapolate, (int, float)) or isinstance(extrapolate, bool)
                or not 0 <= extrapolate < math.inf):
            raise ValueError(f"extrapolate must be a finite number >= 0, got {extrapolate!r}")
        if not isinstance(constant_tol, (int, float)) or isinstance(constant_tol, bool) or not constant_tol >= 0:
            raise ValueError(f"constant_tol must be a number >= 0, got {constant_tol!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        super().__init__(**kwargs)
        self.num_pairs = num_pairs
        self.num_points = num_points
        self.cutoff = cutoff
        self.extrapolate = float(extrapolate)
        self.window = window
        self.constant_tol = float(constant_tol)
        self.seed = seed
        self.chunk_size = chunk_size
        self._pairs: Optional[Tensor] = None  # (P, 2) indices into the probe set, fixed at the first measurement

    def key_fields(self) -> dict:
        return {"num_pairs": self.num_pairs, "num_points": self.num_points, "cutoff": self.cutoff,
                "extrapolate": self.extrapolate, "window": self.window}

    @property
    def pairs(self) -> Optional[Tensor]:
        """The fixed ``(P, 2)`` probe-set index pairs (None before the first measurement)."""
        return self._pairs

    def extra_state(self) -> dict:
        return {"pairs": None if self._pairs is None else self._pairs.clone()}

    def load_extra_state(self, state: dict) -> None:
        pairs = state.get("pairs")
        self._pairs = None if pairs is None else torch.as_tensor(pairs, dtype=torch.long).cpu()

    def check_probe_set(self, probe: ProbeSet) -> None:
        try:
            labels = _class_labels(probe.targets)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{type(self).__name__} pairs examples by class, so it needs integer class labels (N,); the probe "
                f"set's targets are {probe.targets.dtype} of shape {tuple(probe.targets.shape)}. Pass "
                "`unpack_batch=lambda batch: (inputs, class_indices)`"
            ) from err
        counts = torch.bincount(labels - labels.min()) if len(labels) else labels
        if int((counts > 0).sum()) < 2 or int(counts.max()) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least two classes and a class with two examples in its probe set "
                f"(it has {len(labels)} examples of {int((counts > 0).sum())} classes); pass a larger num_samples"
            )

    def measure(self, module: nn.Module, probe: ProbeSet) -> dict:
        n = len(probe)
        if self._pairs is None or int(self._pairs.max()) >= n:
            if self._pairs is not None:
                warnings.warn(f"{type(self).__name__}: the restored pairs do not fit the probe set of {n} examples; "
                              "drawing new ones", RuntimeWarning, stacklevel=2)
            self._pairs, _ = interpolation_pairs(probe.targets, self.num_pairs, seed=self.seed)
        result = function_frequency(
            module, probe.inputs, probe.targets, pairs=self._pairs, num_points=self.num_points, cutoff=self.cutoff,
            extrapolate=self.extrapolate, window=self.window, constant_tol=self.constant_tol, forward=self.forward,
            chunk_size=self.chunk_size,
        )
        for group in GROUPS[:2]:
            values = result.mean_frequency[result.group(group)]
            values = values[values.isfinite()]
            if len(values):
                self.add_histogram(f"{group}/mean_frequency_hist", values)
        # Undefined (all paths flat: 0/0) values are left out of this point rather than logged as NaN.
        return {key: value for key, value in result.summary().items() if math.isfinite(value)}
