"""Nearest-class-center separability per layer and effective depth (Galanti et al.); NC1; CDNV."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from .._tree import detach_to, num_rows
from ..functional._layers import FeatureCapture, LayerSpec, SequencePool
from ..functional.ncc import LayerClassMeans, _labels, heldout_correct, ncc_train_statistics
from ._data import ProbeSet, from_tensors
from ._shared_capture import SharedCapture, SharesCapture
from ._validation import ValidationAccumulation
from .rank import _check_chunk_size, _describe_pool
from .base import ProbeLogic, ProbeSkipped, module_device

Heldout = Union[None, str, Tensor, tuple, list, dict, Iterable]


class EffectiveDepthLogic(SharesCapture, ValidationAccumulation, ProbeLogic):
    r"""Logs each layer's nearest-class-center (NCC) accuracy and the network's effective depth.

    Galanti, Galanti, Ben-Shaul (2022), "On the Implicit Bias Towards Minimal Depth of Deep Neural
    Networks" (arXiv:2202.09028): SGD-trained networks separate the classes, as seen by an NCC
    classifier on a layer's embeddings, already at an intermediate layer; the
    :math:`\epsilon`-effective depth is the first layer whose NCC training error is at most
    :math:`\epsilon`, and it grows with the fraction of random labels. Per layer (pooled and, above
    ``max_dim``, projected features; see :mod:`lightning_biasprobe.functional._layers`):

    - ``biasprobe/ncc/<layer>/train_acc``: NCC accuracy on the probe set's training examples, with
      class means from those same examples;
    - ``biasprobe/ncc/<layer>/heldout_acc``: NCC accuracy of held-out examples against those
      training means (see ``heldout`` for where they come from);
    - ``biasprobe/ncc/<layer>/nc1``: Papyan et al.'s :math:`\mathrm{Tr}(\Sigma_W\Sigma_B^+)/C` of the training
      examples, computed in the span of the centered class means (no ``D x D`` matrix);
    - ``biasprobe/ncc/<layer>/cdnv``: the class-distance normalised variance, averaged over pairs;
    - ``biasprobe/ncc/effective_depth``: :math:`d_\epsilon = \min\{i : 1 - \mathrm{train\_acc}_i \le
      \epsilon\}` over the layers in order, ``L + 1`` when none qualifies;

    and ``biasprobe/ncc/seconds``. NC1 and CDNV grow without bound when class means nearly coincide
    (early layers, early training): they are clipped at ``clip`` (default ``1e6``) so curves stay
    plottable; a layer whose class means coincide logs the clip value. With TensorBoard (and
    matplotlib), a per-layer profile figure ``biasprobe/ncc/profile``.

    Data. The training side is the fixed, class-balanced probe set (``num_samples=1024`` training
    examples; integer class targets are required) measured on rank zero at the cadence points.
    ``heldout`` chooses the held-out side:

    - ``"val"`` (default): every validation epoch that follows a cadence point is a held-out
      measurement: rank zero computes the training class means (the probe set, at the current
      weights) and broadcasts them; every rank classifies each of its validation batches and the
      correct counts are summed by a torchmetrics ``Metric`` (DDP-reduced: 2 processes give the
      numbers of 1 process on all the data; exactly so when the validation set divides evenly
      among the ranks, since Lightning's ``DistributedSampler`` pads the last shard with repeats).
      ``heldout_acc`` is logged at the validation's global step, with ``biasprobe/ncc/val_seconds``
      (and, for an epoch-end point, the training values in the same row). With no validation data (or ``limit_val_batches=0``), held-out values are
      simply absent: a split of the probe set would be held out from the class means only, not from
      the network's training, and is not offered.
    - tensors, an ``(inputs, targets)`` tuple, or a ``DataLoader``/iterable of batches: a fixed
      held-out set, read whole at every measurement on rank zero, logged with the training values.
    - ``None``: no held-out values.

    Differences from the authors' code (github.com/lianegalanti/NC, ``analysis.py``, which this
    follows for the NCC rule and the CDNV): they take class means over the whole training loader
    and flatten conv embeddings; here the means come from the fixed, class-balanced probe set (pass
    a larger ``num_samples`` to approach the whole set) and conv maps are globally average-pooled by
    default (``conv_pool="flatten"`` with the ``max_dim`` sketch is closer to theirs). The default
    ``epsilon=0.01`` is our choice: the paper's value was not checked.

    Cost per measurement: one eval-mode forward over the probe set (and over the held-out data)
    plus ``O(N C k)`` per layer, ``k = min(D, max_dim)``; memory: the probe set's float32 features,
    ``N x k`` per layer (the NCC accuracy needs a second look at them once the class means are
    known), and one chunk's activations; never ``N x D``, ``k x k`` or ``D x D``.

    Args:
        layers: ``"auto"`` (the output of each hidden block, in order; the rule is in
            :mod:`lightning_biasprobe.functional._layers`), module names, module types, or a list, in
            depth order. An unknown name fails at setup with the list of names that exist.
        epsilon: the effective depth's error threshold (default 0.01).
        heldout: ``"val"``, fixed held-out data, or ``None`` (see above).
        conv_pool: ``"gap"`` (global average pooling, default) or ``"flatten"`` for conv maps.
        sequence_pool: ``"mean"`` (default), ``"last"``, ``"first"``, ``"flatten"`` or a callable for
            ``(N, T, D)`` outputs.
        max_dim: CountSketch layers wider than this to this many features (default 192, as
            :class:`EffectiveRank`, so that the two share one forward pass; ``None``: exact, memory
            ``N x D`` per layer). Class means and NCC decisions are distances, which the sketch
            preserves approximately (relative distortion of order ``1/sqrt(max_dim)``).
        seed: seed of the sketches (the same sketch at every measurement).
        clip: upper clip of the logged NC1 and CDNV.
        chunk_size: examples per forward.
        figures: log the per-layer profile figure where possible.
        **kwargs: probe data, adapters, cadence and failure policy, see :class:`ProbeLogic`.
    """

    name = "ncc"
    default_cadence = {"every_n_epochs": 1}
    default_num_samples = 1024
    requires_targets = True

    def __init__(
        self,
        layers: LayerSpec = "auto",
        epsilon: float = 0.01,
        heldout: Heldout = "val",
        conv_pool: Literal["gap", "flatten"] = "gap",
        sequence_pool: SequencePool = "mean",
        max_dim: Optional[int] = 192,
        seed: int = 0,
        clip: float = 1e6,
        chunk_size: Optional[int] = 256,
        figures: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
            raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")
        if isinstance(heldout, str) and heldout != "val":
            raise ValueError(f"heldout must be 'val', held-out tensors/(inputs, targets)/a DataLoader, or None; got "
                             f"{heldout!r}")
        if heldout is not None and not isinstance(heldout, (str, Tensor, tuple, list, dict, Iterable)):
            raise TypeError(f"heldout of type {type(heldout).__name__} is not supported; pass 'val', "
                            "(inputs, targets) or a DataLoader")
        if isinstance(heldout, Tensor):
            raise ValueError("heldout needs class targets: pass (inputs, targets), not an inputs tensor alone")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise ValueError(f"clip must be a positive number, got {clip!r}")
        _check_chunk_size(chunk_size)
        self.capture = FeatureCapture(layers, conv_pool=conv_pool, sequence_pool=sequence_pool, max_dim=max_dim,
                                      seed=seed, forward=kwargs.get("forward"))
        super().__init__(**kwargs)
        self.layers, self.epsilon, self.heldout = layers, float(epsilon), heldout
        self.conv_pool, self.sequence_pool, self.max_dim, self.seed = conv_pool, sequence_pool, max_dim, seed
        self.clip, self.chunk_size, self.figures = float(clip), chunk_size, figures
        self._fixed_heldout: Optional[ProbeSet] = None
        if isinstance(heldout, (tuple, list, dict)):
            self._fixed_heldout = from_tensors(heldout, 2**62, self.unpack_batch)
            if self._fixed_heldout.targets is None:
                raise ValueError("heldout needs class targets: pass (inputs, targets)")
            _labels(self._fixed_heldout.targets, len(self._fixed_heldout))
        # The last training measurement: (classifiers per layer, their values) for the validation plan.
        self._classifiers: Optional[dict[str, LayerClassMeans]] = None
        self._val_train_values: Optional[dict[str, float]] = None
        self._figure_data = None

    def key_fields(self) -> dict:
        heldout = self.heldout if self.heldout is None or isinstance(self.heldout, str) else type(self.heldout).__name__
        return {"layers": self.capture.describe(), "epsilon": self.epsilon, "heldout": heldout,
                "conv_pool": self.conv_pool, "sequence_pool": _describe_pool(self.sequence_pool),
                "max_dim": self.max_dim, "seed": self.seed}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.capture.check(pl_module)  # an unknown layer name fails here, listing the names that exist

    # --- probe set (rank zero, at cadence points) ---------------------------------------------------------
    def measure(self, module: nn.Module, probe: ProbeSet) -> dict:
        self._classifiers = None
        labels = _labels(probe.targets, len(probe))
        if torch.unique(labels).numel() < 2:
            raise ProbeSkipped("the probe set has a single class; NCC, NC1 and CDNV need at least two")
        profile = ncc_train_statistics(SharedCapture(self, module), module, probe.inputs, labels, self.epsilon,
                                       self.chunk_size)
        values: dict[str, Union[float, Tensor]] = {}
        for i, key in enumerate(profile.layers):
            values[f"{key}/train_acc"] = profile.train_accuracy[i]
            values[f"{key}/nc1"] = self._clipped(profile.nc1[i])
            values[f"{key}/cdnv"] = self._clipped(profile.cdnv[i])
        values["effective_depth"] = float(profile.effective_depth)
        heldout = None
        if self.heldout is not None and not isinstance(self.heldout, str):
            heldout = self._fixed_heldout_accuracy(module, profile.classifiers)
            for i, key in enumerate(profile.layers):
                values[f"{key}/heldout_acc"] = heldout[i]
        self._classifiers = profile.classifiers
        self._figure_data = self._figure(profile.layers, profile.train_accuracy, heldout, profile.effective_depth)
        return values

    def _clipped(self, value: Tensor) -> float:
        v = float(value)
        return self.clip if math.isnan(v) or v > self.clip else v

    def _figure(self, layers: list, train: Tensor, heldout: Optional[Tensor], depth: int) -> tuple:
        curves = {"train_acc": [float(a) for a in train]}
        if heldout is not None:
            curves["heldout_acc"] = [float(a) for a in heldout]
        return ("NCC accuracy per layer", list(layers), curves, (f"effective depth (eps={self.epsilon:g})", depth))

    def _fixed_heldout_accuracy(self, module: nn.Module, classifiers: dict[str, LayerClassMeans]) -> Tensor:
        device = next(iter(classifiers.values())).means.device
        if self._fixed_heldout is not None:
            data = self._fixed_heldout
            if data.targets is not None and data.targets.device != device:
                data = self._fixed_heldout = data.to(device)
            return heldout_correct(self.capture, module, data.inputs, _labels(data.targets, len(data)), classifiers,
                                   self.chunk_size) / len(data)
        correct = torch.zeros(len(classifiers), dtype=torch.float64)
        total = 0
        for batch in self.heldout:  # a DataLoader or iterable of batches, read whole
            inputs, targets = self.unpack_batch(batch)
            inputs = detach_to(inputs, device)
            n = num_rows(inputs)
            correct += heldout_correct(self.capture, module, inputs, _labels(targets, n).to(device), classifiers,
                                       self.chunk_size)
            total += n
        if total == 0:
            raise ValueError("the heldout data yielded no examples")
        return correct / total

    # --- held-out over the validation epoch (every rank) ---------------------------------------------------
    def _accumulates(self) -> bool:
        return self.heldout == "val"

    def _plan(self, pl_module: nn.Module, step: int) -> Optional[dict]:
        # Class means at the current weights: those of this step's training measurement if the
        # cadence already made it, else a new one (its values are logged with the held-out ones).
        self._val_train_values = None
        if not (self.measured_steps and self.measured_steps[-1] == step and self._classifiers is not None):
            values = self.run_measurement(pl_module, step)
            if values is None:  # failed (warned once by the base)
                return None
            self._val_train_values = values
        classifiers = {k: LayerClassMeans(c.classes.cpu(), c.means.cpu()) for k, c in self._classifiers.items()}
        return {"refs": list(self.capture.refs), "classifiers": classifiers}

    def _on_plan(self, plan: dict, pl_module: Any) -> None:
        self.capture.refs = list(plan["refs"])
        device = module_device(pl_module)
        plan["classifiers"] = {k: LayerClassMeans(c.classes.to(device), c.means.to(device))
                               for k, c in plan["classifiers"].items()}

    def _template(self, plan: dict) -> dict[str, Tensor]:
        return {"correct": torch.zeros(len(plan["classifiers"]), dtype=torch.float64),
                "total": torch.zeros((), dtype=torch.float64)}

    def _contribution(self, pl_module: nn.Module, plan: dict, inputs: Any, targets: Optional[Tensor]) -> dict:
        n = num_rows(inputs)
        labels = _labels(targets, n)
        classifiers = plan["classifiers"]
        correct = heldout_correct(self.capture, pl_module, inputs, labels, classifiers, self.chunk_size)
        return {"correct": correct, "total": torch.tensor(float(n), dtype=torch.float64)}

    def _finish(self, plan: dict, totals: dict[str, Tensor]) -> dict[str, float]:
        if totals["total"] <= 0:
            raise ProbeSkipped("the validation epoch had no examples")
        heldout = totals["correct"] / totals["total"]
        values = dict(self._val_train_values or {})
        self._val_train_values = None
        layers = list(plan["classifiers"])
        for i, key in enumerate(layers):
            values[f"{key}/heldout_acc"] = float(heldout[i])
        if self._figure_data is not None:
            title, names, curves, marker = self._figure_data
            self._figure_data = (title, names, dict(curves, heldout_acc=[float(a) for a in heldout]), marker)
        return values
