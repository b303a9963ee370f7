r"""Nearest-class-center (NCC) separability per layer, effective depth, NC1 and CDNV.

- Galanti, Galanti, Ben-Shaul (2022), "On the Implicit Bias Towards Minimal Depth of Deep Neural
  Networks", arXiv:2202.09028: the NCC classifier of a layer's embeddings, its accuracy per layer
  on training and held-out examples, and the :math:`\epsilon`-effective depth.
- Papyan, Han, Donoho (2020), "Prevalence of neural collapse during the terminal phase of deep
  learning training", PNAS 117(40): the within-class variability collapse NC1.
- Galanti, György, Hutter (2022), "On the Role of Neural Collapse in Transfer Learning", ICLR:
  the class-distance normalised variance (CDNV).

Everything is computed in float64 from ``(features, labels)`` pairs: ``features`` an ``(N, D)``
floating tensor, ``labels`` ``(N,)`` integer class indices. Classes are the label values present
in the (training) labels; a class absent from them has no mean and is never predicted.

:class:`FeatureStatistics` holds sums that are enough for class means, CDNV, NC1, the singular
values of the feature matrix and the NCC accuracy against fixed class means; sums add, so
statistics over batches (or over DDP ranks) combine exactly into those of all the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .._tree import num_rows
from ._adapters import ForwardFn
from ._layers import FeatureCapture, LayerSpec, SequencePool


def _check_pair(features: Tensor, labels: Tensor, what: str = "features") -> tuple[Tensor, Tensor]:
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"{what} must be an (N, D) tensor, got {getattr(features, 'shape', type(features))}")
    if not features.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {features.dtype}")
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype} (NCC needs classes, not "
                         "regression targets or one-hot vectors)")
    if labels.numel() != features.shape[0]:
        raise ValueError(f"labels has {labels.numel()} entries for {features.shape[0]} examples")
    if features.shape[0] == 0:
        raise ValueError(f"{what} has no examples")
    return features, labels.reshape(-1).to(features.device)


def class_means(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(classes, means, counts)``: the sorted class labels present, their ``(C, D)`` float64 means
    and their counts."""
    features, labels = _check_pair(features, labels)
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    z = features.double()
    sums = z.new_zeros(len(classes), z.shape[1]).index_add_(0, inverse, z)
    counts = torch.bincount(inverse, minlength=len(classes)).double()
    return classes, sums / counts[:, None], counts


def ncc_predict(features: Tensor, means: Tensor, classes: Optional[Tensor] = None) -> Tensor:
    r"""NCC predictions :math:`\arg\min_c \lVert z - \mu_c\rVert_2` (ties: the lowest class index).

    Uses :math:`\lVert\mu_c\rVert^2 - 2 z^T\mu_c` (the :math:`\lVert z\rVert^2` term is common) in
    float64. Returns ``classes[argmin]`` (or the row index of ``means`` without ``classes``).
    """
    z = features.double()
    m = means.to(device=z.device, dtype=torch.float64)
    index = (m.pow(2).sum(1)[None, :] - 2 * z @ m.T).argmin(dim=1)
    return index if classes is None else classes.to(z.device)[index]


def ncc_accuracy(features: Tensor, labels: Tensor, eval_features: Optional[Tensor] = None,
                 eval_labels: Optional[Tensor] = None) -> Tensor:
    r"""Accuracy of the nearest-class-center classifier built from ``(features, labels)``.

    Galanti et al. (2022): class means :math:`\mu_c` of the training embeddings, prediction
    :math:`h(x) = \arg\min_c \lVert f(x) - \mu_c \rVert_2`. Evaluated on ``(eval_features,
    eval_labels)`` (held-out embeddings against the *training* means) or, without them, on the
    training examples themselves. A float64 0-dim tensor in [0, 1]. Cost ``O(N C D)``.
    """
    classes, means, _ = class_means(features, labels)
    if (eval_features is None) != (eval_labels is None):
        raise ValueError("pass both eval_features and eval_labels, or neither")
    if eval_features is None:
        eval_features, eval_labels = features, labels
    eval_features, eval_labels = _check_pair(eval_features, eval_labels, "eval_features")
    if eval_features.shape[1] != means.shape[1]:
        raise ValueError(f"eval_features have {eval_features.shape[1]} features, the training ones {means.shape[1]}")
    predicted = ncc_predict(eval_features, means, classes)
    return (predicted == eval_labels).double().mean()


def _pinv_rtol(c: int, d: int, dtype: torch.dtype) -> float:
    # As numpy.linalg.pinv's default: singular values below max(C, D) * eps * s_max are treated as zero;
    # eps is that of the dtype the features came in (float32 features carry float32 rounding).
    return max(c, d) * torch.finfo(dtype).eps


def _mean_span(centered_means: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """Right singular vectors ``V (D x r)`` and singular values ``s (r)`` of the ``(C, D)`` centered
    means, keeping ``s > rtol * s_max``: an orthonormal basis of the (at most C-1 dimensional) span."""
    _, s, vh = torch.linalg.svd(centered_means, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return vh[:0].T, s[:0]
    keep = s > rtol * s[0]
    return vh[keep].T, s[keep]


def nc1(features: Tensor, labels: Tensor, rtol: Optional[float] = None) -> Tensor:
    r"""Papyan et al.'s within-class variability collapse :math:`NC1 = \frac1C \mathrm{Tr}(\Sigma_W \Sigma_B^+)`.

    :math:`\Sigma_W = \frac1N\sum_i (z_i-\mu_{y_i})(z_i-\mu_{y_i})^T`, :math:`\Sigma_B = \frac1C\sum_c
    (\mu_c-\mu_G)(\mu_c-\mu_G)^T` with :math:`\mu_G` the mean of all examples and ``C`` the classes present
    (Papyan, Han, Donoho 2020). With the SVD :math:`M = U S V^T` of the ``(C, D)`` matrix of centered
    class means, :math:`\Sigma_B^+ = V\,\mathrm{diag}(C/s_j^2)\,V^T`, so

    .. math:: NC1 = \sum_j \frac{v_j^T \Sigma_W v_j}{s_j^2},\qquad
              v_j^T\Sigma_W v_j = \frac1N\sum_i \big((z_i-\mu_{y_i})^T v_j\big)^2,

    computed in the (at most ``C-1``-dimensional) span of the centered means: no ``D x D`` matrix is
    formed. Cost ``O(N D C + C^2 D)``. Singular values below ``rtol * s_max`` (default
    ``max(C, D) * eps`` of the features' dtype) are treated as zero (the pseudo-inverse). It is 0 when
    every example equals its class mean, and ``inf`` when all class means coincide while examples
    vary (no direction separates the classes); it grows without bound as class means approach each
    other (early layers, early training): clip before plotting.
    """
    features, labels = _check_pair(features, labels)
    classes, means, counts = class_means(features, labels)
    z = features.double()
    global_mean = z.mean(0)
    rtol = _pinv_rtol(len(classes), z.shape[1], features.dtype) if rtol is None else rtol
    v, s = _mean_span(means - global_mean, rtol)
    inverse = torch.searchsorted(classes, labels)
    deviations = z - means[inverse]
    if s.numel() == 0:
        return z.new_tensor(math.inf if deviations.abs().max() > 0 else 0.0)
    within = (deviations @ v).pow(2).sum(0) / z.shape[0]
    return (within / s.pow(2)).sum()


def cdnv(features: Tensor, labels: Tensor) -> Tensor:
    r"""Class-distance normalised variance, averaged over pairs of classes present.

    Galanti, György, Hutter (2022): :math:`V(c,c') = \frac{\mathrm{Var}_c + \mathrm{Var}_{c'}}{2\lVert
    \mu_c-\mu_{c'}\rVert^2}` with :math:`\mathrm{Var}_c = \frac1{n_c}\sum_{i\in c}\lVert z_i-\mu_c\rVert^2`,
    averaged over the unordered pairs :math:`c \ne c'`. A pair whose means coincide gives ``inf``. Needs
    two classes. Cost ``O(N D + C^2 D)``.
    """
    features, labels = _check_pair(features, labels)
    classes, means, counts = class_means(features, labels)
    z = features.double()
    inverse = torch.searchsorted(classes, labels)
    var = z.new_zeros(len(classes)).index_add_(0, inverse, (z - means[inverse]).pow(2).sum(1)) / counts
    return _cdnv_from(means, var)


def _cdnv_from(means: Tensor, var: Tensor) -> Tensor:
    c = means.shape[0]
    if c < 2:
        raise ValueError("CDNV needs at least two classes")
    i, j = torch.triu_indices(c, c, offset=1, device=means.device)
    dist2 = (means[i] - means[j]).pow(2).sum(1)
    ratio = (var[i] + var[j]) / (2 * dist2)
    ratio = torch.where(dist2 > 0, ratio, torch.full_like(ratio, math.inf))
    return ratio.mean()


def effective_depth(train_accuracy: Union[Sequence[float], Tensor], epsilon: float = 0.01) -> int:
    r"""The :math:`\epsilon`-effective depth: the first layer whose NCC training error is at most :math:`\epsilon`.

    Galanti, Galanti, Ben-Shaul (2022): :math:`d_\epsilon = \min\{i \in \{1..L\} : err_{train}(h_i) \le
    \epsilon\}`, and ``L + 1`` when no layer qualifies. ``train_accuracy`` are the per-layer NCC
    training accuracies, in depth order (1-based result).
    """
    if not 0 <= float(epsilon) < 1:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon!r}")
    acc = [float(a) for a in (train_accuracy.reshape(-1).tolist() if isinstance(train_accuracy, Tensor)
                              else train_accuracy)]
    for i, a in enumerate(acc, start=1):
        if 1.0 - a <= epsilon + 1e-12:  # 1e-12: accuracies are ratios of counts, rounded
            return i
    return len(acc) + 1


class FeatureStatistics:
    r"""Additive sufficient statistics of ``(features, labels)``, in float64.

    State (every entry is a sum, so statistics of batches, or of DDP ranks, add up to those of all
    the data; :meth:`state` / :meth:`from_state` expose them as a dict of tensors for reduction):

    - ``count`` ``(C,)``, ``sum`` ``(C, D)``, ``sqnorm`` ``(C,)``: per class, the number of examples,
      the sum of features and the sum of squared norms: class means and CDNV;
    - ``scatter`` ``(D, D)`` (with ``scatter=True``): :math:`\sum_i z_i z_i^T` over all examples:
      singular values of the feature matrix (uncentered and centered) and NC1. ``D`` is the
      (projected) feature dimension, so memory is ``O(D^2 + C D)`` whatever the number of examples;
    - ``correct``, ``total`` (with ``reference_means``): NCC accuracy of these examples against
      fixed class means (e.g. held-out examples against the training means).

    Labels are class indices in ``[0, num_classes)``; ``labels=None`` puts every example in class 0
    (for spectra).
    """

    def __init__(self, dim: int, num_classes: int = 1, *, scatter: bool = False,
                 reference_means: Optional[Tensor] = None, reference_classes: Optional[Tensor] = None,
                 device: Optional[torch.device] = None) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        f64 = dict(dtype=torch.float64, device=device)
        self.dim, self.num_classes = dim, num_classes
        self.reference_means = None if reference_means is None else reference_means.to(**f64)
        self.reference_classes = reference_classes
        if self.reference_means is not None and self.reference_means.shape[1] != dim:
            raise ValueError(f"reference_means have {self.reference_means.shape[1]} features, expected {dim}")
        self.input_eps = torch.finfo(torch.float64).eps
        self.tensors: dict[str, Tensor] = {
            "count": torch.zeros(num_classes, **f64),
            "sum": torch.zeros(num_classes, dim, **f64),
            "sqnorm": torch.zeros(num_classes, **f64),
        }
        if scatter:
            self.tensors["scatter"] = torch.zeros(dim, dim, **f64)
        if reference_means is not None:
            self.tensors["correct"] = torch.zeros((), **f64)
            self.tensors["total"] = torch.zeros((), **f64)

    # ------------------------------------------------------------------ accumulating
    def update(self, features: Tensor, labels: Optional[Tensor] = None) -> "FeatureStatistics":
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got {tuple(features.shape)}")
        self.input_eps = max(self.input_eps, torch.finfo(features.dtype).eps)
        t = self.tensors
        z = features.to(device=t["sum"].device, dtype=torch.float64)
        if labels is None:
            index = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        else:
            _check_pair(features, labels)
            index = labels.reshape(-1).to(z.device).long()
            if index.numel() and (index.min() < 0 or index.max() >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got values in "
                                 f"[{int(index.min())}, {int(index.max())}]")
        t["count"] += torch.bincount(index, minlength=self.num_classes).double()
        t["sum"].index_add_(0, index, z)
        t["sqnorm"].index_add_(0, index, z.pow(2).sum(1))
        if "scatter" in t:
            t["scatter"] += z.T @ z
        if "correct" in t:
            if labels is None:
                raise ValueError("accuracy against reference means needs labels")
            predicted = ncc_predict(z, self.reference_means.to(z.device), self.reference_classes)
            t["correct"] += (predicted == labels.reshape(-1).to(z.device)).sum()
            t["total"] += z.shape[0]
        return self

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        """Add ``other``'s sums into these (same layout)."""
        if set(other.tensors) != set(self.tensors):
            raise ValueError("cannot merge statistics with different fields")
        for k, v in other.tensors.items():
            self.tensors[k] += v.to(self.tensors[k].device)
        self.input_eps = max(self.input_eps, other.input_eps)
        return self

    def state(self) -> dict[str, Tensor]:
        return dict(self.tensors)

    def load_state(self, state: dict[str, Tensor]) -> "FeatureStatistics":
        if set(state) != set(self.tensors):
            raise ValueError(f"state has fields {sorted(state)}, expected {sorted(self.tensors)}")
        for k, v in state.items():
            self.tensors[k] = v.to(dtype=torch.float64, device=self.tensors[k].device).reshape(self.tensors[k].shape)
        return self

    # ------------------------------------------------------------------ reading
    @property
    def num_samples(self) -> int:
        return int(self.tensors["count"].sum().item())

    def means(self) -> tuple[Tensor, Tensor]:
        """``(classes, means)`` of the classes that have examples."""
        count = self.tensors["count"]
        present = torch.nonzero(count > 0).flatten()
        return present, self.tensors["sum"][present] / count[present, None]

    def accuracy(self) -> Tensor:
        if "correct" not in self.tensors:
            raise ValueError("no reference means were given: no accuracy was accumulated")
        return self.tensors["correct"] / self.tensors["total"]

    def cdnv(self) -> Tensor:
        """CDNV (see :func:`cdnv`), with ``Var_c`` = mean squared norm of class ``c`` minus that of its mean."""
        classes, means = self.means()
        count = self.tensors["count"][classes]
        var = (self.tensors["sqnorm"][classes] / count - means.pow(2).sum(1)).clamp_min(0)
        return _cdnv_from(means, var)

    def nc1(self, rtol: Optional[float] = None) -> Tensor:
        r"""NC1 (see :func:`nc1`) from the sums: :math:`v_j^T\Sigma_W v_j = \frac1N\big(v_j^T S v_j -
        \sum_c n_c (\mu_c^T v_j)^2\big)` with ``S`` the scatter, in the span of the centered means."""
        if "scatter" not in self.tensors:
            raise ValueError("NC1 needs the scatter: create the statistics with scatter=True")
        classes, means = self.means()
        count = self.tensors["count"][classes]
        n = count.sum()
        global_mean = self.tensors["sum"].sum(0) / n
        if rtol is None:  # as nc1(): max(C, D) * eps of the dtype the features came in
            rtol = max(len(classes), self.dim) * self.input_eps
        v, s = _mean_span(means - global_mean, rtol)
        scatter = self.tensors["scatter"]
        within_total = (scatter.diagonal().sum() - (count * means.pow(2).sum(1)).sum()) / n
        if s.numel() == 0:
            return scatter.new_tensor(math.inf if within_total > 0 else 0.0)
        quad = ((scatter @ v) * v).sum(0) - (count[:, None] * (means @ v).pow(2)).sum(0)
        return ((quad / n).clamp_min(0) / s.pow(2)).sum()

    def singular_values(self, centered: bool = False) -> Tensor:
        """Singular values of the ``(N, D)`` matrix of all features seen (descending, ``min(N, D)`` of
        them), from the eigenvalues of the scatter ``S = Z^T Z`` (``S - N m m^T`` when centered)."""
        if "scatter" not in self.tensors:
            raise ValueError("singular values need the scatter: create the statistics with scatter=True")
        s = self.tensors["scatter"]
        n = self.tensors["count"].sum()
        if centered:
            m = self.tensors["sum"].sum(0) / n
            s = s - n * torch.outer(m, m)
        return _sqrt_spectrum(torch.linalg.eigvalsh((s + s.T) / 2), int(n.item()))


def _sqrt_spectrum(eig: Tensor, n: int) -> Tensor:
    """Singular values from Gram eigenvalues: descending, ``sqrt(max(eig, 0))``, eigenvalues below the
    float64 rounding level of the largest (``D * eps * max``) set to zero, ``min(n, D)`` kept."""
    eig = eig.flip(0)
    top = eig[0].clamp_min(0) if eig.numel() else eig.new_zeros(())
    eig = torch.where(eig > eig.numel() * torch.finfo(torch.float64).eps * top, eig, torch.zeros_like(eig))
    return eig[: min(n, eig.numel())].sqrt()


# ---------------------------------------------------------------------------------------------- model level
@dataclass
class LayerClassMeans:
    """One layer's NCC classifier: the class labels present and their ``(C, D)`` means (projected space)."""

    classes: Tensor
    means: Tensor


@dataclass
class NCCProfile:
    """Per-layer NCC results of :func:`ncc_profile`, layers in depth order."""

    layers: list[str]
    train_accuracy: Tensor
    nc1: Tensor
    cdnv: Tensor
    effective_depth: int
    epsilon: float
    heldout_accuracy: Optional[Tensor] = None
    classifiers: dict[str, LayerClassMeans] = field(default_factory=dict, repr=False)


def _labels(targets: Any, n: int) -> Tensor:
    if targets is None:
        raise ValueError("NCC needs class labels (targets), got None")
    labels = targets if isinstance(targets, Tensor) else torch.as_tensor(targets)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"NCC needs integer class labels, got targets of dtype {labels.dtype}; pass "
                         "class indices (not one-hot vectors or regression targets)")
    if labels.numel() != n:
        raise ValueError(f"targets have {labels.numel()} entries for {n} examples; NCC needs one class per example")
    return labels.reshape(-1)


def layer_features(capture: FeatureCapture, model: nn.Module, inputs: Any,
                   chunk_size: Optional[int] = 256) -> dict[str, Tensor]:
    """``{layer key: (N, D) features}`` of every captured layer (after pooling and projection)."""
    parts: dict[str, list[Tensor]] = {}

    def keep(features: dict[str, Tensor]) -> None:
        for key, z in features.items():
            parts.setdefault(key, []).append(z)

    keys = capture.run(model, inputs, keep, chunk_size)
    return {key: torch.cat(parts[key]) for key in keys}


def _stack(values: list[Tensor]) -> Tensor:
    return torch.stack([v.double().cpu() for v in values]) if values else torch.zeros(0, dtype=torch.float64)


def ncc_train_statistics(capture: FeatureCapture, model: nn.Module, inputs: Any, labels: Tensor,
                         epsilon: float = 0.01, chunk_size: Optional[int] = 256) -> NCCProfile:
    """NCC training accuracy, NC1 and CDNV of each captured layer over ``(inputs, labels)``, and the
    effective depth, in one forward pass.

    For each chunk and layer, the per-class sums are added up (float64) and the chunk's float32
    features are kept. Once the class means are known, a second look at the kept features, chunk by
    chunk, gives the NCC predictions, the within-class deviations' squared norms (CDNV) and their
    projections on the span of the centered means (NC1): the same formulas as :func:`ncc_accuracy`,
    :func:`cdnv` and :func:`nc1`. Memory: the ``N x k`` float32 features, one float64 chunk and one
    chunk's activations per layer (never ``N x D``, never a ``k x k`` or ``D x D`` matrix).
    """
    classes, index = torch.unique(labels, sorted=True, return_inverse=True)
    stats: dict[str, FeatureStatistics] = {}
    kept: dict[str, list[tuple[Tensor, Tensor]]] = {}
    position = [0]

    def consume(features: dict[str, Tensor]) -> None:
        n = next(iter(features.values())).shape[0]
        chunk_index = index[position[0]: position[0] + n]
        position[0] += n
        for key, z in features.items():
            if key not in stats:
                stats[key] = FeatureStatistics(z.shape[1], len(classes), device=z.device)
            idx = chunk_index.to(z.device)
            stats[key].update(z, idx)
            kept.setdefault(key, []).append((z, idx))

    layers = capture.run(model, inputs, consume, chunk_size)
    n_total = len(labels)
    acc, nc1s, cdnvs, classifiers = [], [], [], {}
    for key in layers:
        st = stats[key]
        _, means = st.means()  # every class of ``labels`` is present
        counts = st.tensors["count"]
        classifiers[key] = LayerClassMeans(classes.to(means.device), means)
        chunks = kept.pop(key)
        rtol = _pinv_rtol(len(classes), means.shape[1], chunks[0][0].dtype)
        v, s = _mean_span(means - st.tensors["sum"].sum(0) / n_total, rtol)
        correct = 0
        var_sum = means.new_zeros(len(classes))
        within = means.new_zeros(s.numel())
        for z, idx in chunks:
            zd = z.double()
            deviations = zd - means[idx]
            correct += int((ncc_predict(zd, means) == idx).sum())
            var_sum.index_add_(0, idx, deviations.pow(2).sum(1))
            within += (deviations @ v).pow(2).sum(0)
        acc.append(torch.tensor(correct / n_total, dtype=torch.float64))
        if s.numel():
            nc1s.append((within / n_total / s.pow(2)).sum())
        else:  # all class means coincide
            nc1s.append(torch.tensor(math.inf if var_sum.sum() > 0 else 0.0, dtype=torch.float64))
        cdnvs.append(_cdnv_from(means, var_sum / counts) if len(classes) > 1
                     else torch.tensor(math.nan, dtype=torch.float64))
    train_accuracy = _stack(acc)
    return NCCProfile(layers, train_accuracy, _stack(nc1s), _stack(cdnvs), effective_depth(train_accuracy, epsilon),
                      float(epsilon), None, classifiers)


def ncc_profile(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    heldout_inputs: Any = None,
    heldout_targets: Optional[Tensor] = None,
    layers: LayerSpec = "auto",
    epsilon: float = 0.01,
    forward: Optional[ForwardFn] = None,
    conv_pool: str = "gap",
    sequence_pool: SequencePool = "mean",
    max_dim: Optional[int] = 256,
    seed: int = 0,
    chunk_size: Optional[int] = 256,
) -> NCCProfile:
    r"""Per-layer NCC accuracy (train and held-out), NC1, CDNV and the :math:`\epsilon`-effective depth.

    Galanti, Galanti, Ben-Shaul (2022), "On the Implicit Bias Towards Minimal Depth of Deep Neural
    Networks". For each layer (see :mod:`._layers` for ``layers``, ``conv_pool``, ``sequence_pool``
    and the ``max_dim`` projection), the class means of the training examples' embeddings define the
    NCC classifier; its accuracy on the training examples and on ``heldout_inputs`` (against the
    training means), Papyan's NC1 and the CDNV are reported, with
    :func:`effective_depth` over the training accuracies. Run the model in eval mode.

    Cost: one forward over the training examples and one over the held-out ones (chunks of
    ``chunk_size``), plus ``O(N C k)`` per layer. Memory: the training features, ``N x k`` float32 per
    layer (``k = min(D, max_dim)``; the NCC accuracy needs a second look at them once the means are
    known), and one chunk's activations; held-out examples are streamed.
    """
    capture = FeatureCapture(layers, conv_pool=conv_pool, sequence_pool=sequence_pool, max_dim=max_dim, seed=seed,
                             forward=forward)
    labels = _labels(targets, num_rows(inputs))
    profile = ncc_train_statistics(capture, model, inputs, labels, epsilon, chunk_size)
    if (heldout_inputs is None) != (heldout_targets is None):
        raise ValueError("pass both heldout_inputs and heldout_targets, or neither")
    if heldout_inputs is not None:
        correct = heldout_correct(capture, model, heldout_inputs, _labels(heldout_targets, num_rows(heldout_inputs)),
                                  profile.classifiers, chunk_size)
        profile.heldout_accuracy = correct / num_rows(heldout_inputs)
    return profile


def heldout_correct(capture: FeatureCapture, model: nn.Module, inputs: Any, labels: Tensor,
                    classifiers: dict[str, LayerClassMeans], chunk_size: Optional[int] = 256) -> Tensor:
    """Per layer (in ``classifiers`` order), how many examples the training means classify correctly (float64)."""
    keys = list(classifiers)
    correct = torch.zeros(len(keys), dtype=torch.float64)
    position = [0]

    def count(features: dict[str, Tensor]) -> None:
        n = next(iter(features.values())).shape[0]
        y = labels[position[0]: position[0] + n]
        position[0] += n
        if list(features) != keys:
            raise ValueError(f"held-out examples gave layers {list(features)}, the training ones {keys}")
        for i, key in enumerate(keys):
            c = classifiers[key]
            correct[i] += (ncc_predict(features[key], c.means, c.classes) == y.to(features[key].device)).sum().cpu()

    capture.run(model, inputs, count, chunk_size)
    return correct


__all__ = [
    "FeatureStatistics",
    "LayerClassMeans",
    "NCCProfile",
    "cdnv",
    "class_means",
    "effective_depth",
    "heldout_correct",
    "layer_features",
    "nc1",
    "ncc_accuracy",
    "ncc_predict",
    "ncc_profile",
    "ncc_train_statistics",
]
