r"""Function frequency along straight paths between examples.

Fridovich-Keil, Gontijo-Lopes, Roelofs (2022), "Spectral Bias in Practice: The Role of Function
Frequency in Generalization", NeurIPS 2022, arXiv:2110.02424.

The model is evaluated at ``M`` evenly spaced points of the straight line between two examples in
its input space, :math:`x(t) = x_0 + t\,(x_1 - x_0)`, ``t = j/M`` for ``j = 0 .. M-1`` (the end
point is excluded, as in the reference code). The signal along a path is the distance of the
predicted class-probability vector from its value at the start example,

.. math:: s(t) = \lVert p(x(t)) - p(x_0) \rVert_2 ,\qquad p = \mathrm{softmax}(f)\ \text{per point},

and its one-sided power spectrum (Hann window, weighted mean removed, so the DC bin is exactly
zero) is summarised per path by

- the **mean frequency** (spectral centroid) :math:`\bar k = \sum_{k\ge1} k P_k / \sum_{k\ge1} P_k`
  in *cycles per path length* (one path length is :math:`\lVert x_1 - x_0\rVert`); divided by that
  length it is in *cycles per unit input distance* (``mean_frequency_per_distance``), comparable
  between paths of different length;
- the **high-frequency fraction** :math:`\sum_{k\ge k_c} P_k / \sum_{k\ge1} P_k` with
  :math:`k_c = \lceil \text{cutoff}\cdot K\rceil` and ``K = M // 2 + 1`` rfft bins (``cutoff = 0.1``
  as the LLNL follow-up; with ``M = 64``, :math:`k_c = 4` cycles per path).

A path along which the probabilities do not change has no spectrum: both summaries are 0/0 and are
returned as NaN (never 0); averages over paths are NaN-means, and the fraction of such flat paths is
reported beside them.

Deviations from the reference code, on purpose: the softmax is taken per point (the reference's
``scipy.special.softmax(logits)`` without an axis normalises over all points and classes at once);
a fixed number of points per path instead of a fixed spacing (equal-length FFTs); a Hann window and
weighted-mean removal against leakage and the DC term; the high-frequency fraction is a fraction of
the *power* of ``s`` rather than of the amplitude of ``p``'s spectrum. Our additions: the
**high-frequency power** (the fraction times the signal's variance: scale-dependent, so a path
along which the prediction barely moves has little of it, where the scale-free fraction may be
large), the largest change ``max_t s(t)`` (logged by the reference code too), and extrapolation past
the end points (``extrapolate``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from .._tree import index_rows, num_rows, tree_leaves, tree_map
from ._adapters import ForwardFn, make_generator, model_outputs

Window = Literal["hann", "none"]
GROUPS = ("same_class", "different_class", "all")


# --------------------------------------------------------------------------------------- spectra
@dataclass
class SignalSpectrum:
    """Power spectra of path signals and their per-path summaries.

    Attributes:
        frequencies: ``(K,)`` float64, bin ``k`` in cycles per path length (``k / span``).
        power: ``(P, K)`` float64 one-sided power spectrum; bin 0 (DC) is zero.
        mean_frequency: ``(P,)`` spectral centroid in cycles per path length; NaN for flat signals.
        high_frequency_fraction: ``(P,)`` power in bins ``>= cutoff_bin`` over all power; NaN for flat ones.
        high_frequency_power: ``(P,)`` the part of the signal's (window-weighted) variance in bins
            ``>= cutoff_bin``, in squared signal units: ``high_frequency_fraction`` times the variance,
            so not scale-free; 0, not NaN, for a flat signal.
        flat: ``(P,)`` bool, signals whose range (max - min) is within ``constant_tol``.
        cutoff_bin: ``k_c``, the first bin counted as high frequency.
    """

    frequencies: Tensor
    power: Tensor
    mean_frequency: Tensor
    high_frequency_fraction: Tensor
    high_frequency_power: Tensor
    flat: Tensor
    cutoff_bin: int


def cutoff_bin(num_points: int, cutoff: float) -> int:
    """``k_c = ceil(cutoff * K)``, ``K = num_points // 2 + 1``, at least 1."""
    bins = num_points // 2 + 1
    # 0.1 * 30 is 3.0000000000000004 in floating point: do not let that round up to a whole bin.
    return max(1, math.ceil(cutoff * bins - 1e-9))


def _check_spectrum_args(num_points: int, cutoff: float, window: str) -> None:
    if window not in ("hann", "none"):
        raise ValueError(f"window must be 'hann' or 'none', got {window!r}")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"a path needs at least 2 points for a spectrum, got num_points={num_points!r}")
    if window == "hann" and num_points < 4:
        raise ValueError(f"num_points={num_points} is too short for a Hann window (it zeroes the first point and "
                         "leaves no frequency to measure); pass num_points >= 4 or window='none'")
    if not isinstance(cutoff, (int, float)) or isinstance(cutoff, bool) or not 0 < cutoff < 1:
        raise ValueError(f"cutoff must be a fraction in (0, 1) of the rfft bins, got {cutoff!r}")
    bins = num_points // 2 + 1
    if cutoff_bin(num_points, cutoff) > bins - 1:
        raise ValueError(f"cutoff={cutoff} puts the high-frequency band above the last of the {bins} rfft bins of "
                         f"num_points={num_points}; pass a smaller cutoff or more points")


def signal_spectrum(
    signals: Tensor,
    *,
    cutoff: float = 0.1,
    window: Window = "hann",
    span: float = 1.0,
    constant_tol: float = 0.0,
) -> SignalSpectrum:
    r"""Power spectrum, mean frequency and high-frequency fraction of signals sampled along paths.

    ``signals`` ``(P, M)`` (or ``(M,)``) holds ``M`` evenly spaced samples of each path, its start
    included and its end excluded. Per row, in float64: the window-weighted mean is removed
    (:math:`s_c = s - \sum_j w_j s_j / \sum_j w_j`, so the windowed signal has no DC component),
    the row is multiplied by the periodic Hann window ``w`` (or by ones with ``window="none"``), and
    :math:`P_k = |\mathrm{rfft}(w s_c)_k|^2` is doubled for every bin with a negative-frequency twin
    (all but DC and, for even ``M``, the Nyquist bin). Then

    - ``mean_frequency`` :math:`= \sum_{k\ge1} f_k P_k / \sum_{k\ge1} P_k`, :math:`f_k = k/\text{span}`;
    - ``high_frequency_fraction`` :math:`= \sum_{k\ge k_c} P_k / \sum_{k\ge1} P_k`,
      :math:`k_c = \lceil \text{cutoff}\cdot K\rceil`, ``K = M // 2 + 1``;
    - ``high_frequency_power`` :math:`= \sum_{k\ge k_c} P_k / (M \sum_j w_j^2)`: by Parseval
      (:math:`\sum_k P_k = M \sum_j w_j^2 s_{c,j}^2`) the share of the :math:`w^2`-weighted variance
      of ``s`` that lies in the high band, in squared signal units (not scale-free, unlike the
      fraction: a path along which the prediction barely moves has little of it).

    A pure tone of ``k0`` whole cycles has mean frequency ``k0`` exactly (without a window; with the
    Hann window too when ``2 <= k0 <= M/2 - 2``, its leakage into ``k0 ± 1`` being symmetric). A row
    whose range :math:`\max_j s_j - \min_j s_j` is ``<= constant_tol`` is *flat*: both summaries
    are 0/0 there and are NaN (and its high-frequency power is 0).

    ``span`` is the length of the sampled segment in path lengths (``1 + 2 * extrapolate`` for
    extended paths), so that frequencies stay in cycles per path length.

    Cost: one rfft of length ``M`` per row.
    """
    if signals.dim() == 1:
        signals = signals.unsqueeze(0)
    if signals.dim() != 2:
        raise ValueError(f"signals must have shape (P, M) or (M,), got {tuple(signals.shape)}")
    num_points = signals.shape[1]
    _check_spectrum_args(num_points, cutoff, window)
    if not span > 0:
        raise ValueError(f"span must be positive, got {span!r}")
    if constant_tol < 0:
        raise ValueError(f"constant_tol must be >= 0, got {constant_tol!r}")
    s = signals.to(torch.float64)
    device = s.device
    if window == "hann":
        w = torch.hann_window(num_points, periodic=True, dtype=torch.float64, device=device)
    else:
        w = torch.ones(num_points, dtype=torch.float64, device=device)
    centred = s - (s @ w / w.sum()).unsqueeze(1)
    # The range of the raw signal, not of the centred one: a constant row stays exactly flat
    # (its centred values are rounding errors of the mean, not zeros).
    flat = (s.amax(dim=1) - s.amin(dim=1)) <= constant_tol
    spectrum = torch.fft.rfft(centred * w, dim=1)
    bins = spectrum.shape[1]
    fold = torch.full((bins,), 2.0, dtype=torch.float64, device=device)
    fold[0] = 0.0
    if num_points % 2 == 0:
        fold[-1] = 1.0
    power = (spectrum.real.square() + spectrum.imag.square()) * fold
    frequencies = torch.arange(bins, dtype=torch.float64, device=device) / span
    k_c = cutoff_bin(num_points, cutoff)
    total = power.sum(dim=1)
    # Parseval: sum_k P_k = M * sum_j (w_j s_c,j)^2, so this is the w^2-weighted variance of s in the band.
    high_power = power[:, k_c:].sum(dim=1) / (num_points * w.square().sum())
    undefined = flat | (total <= 0)
    nan = torch.full_like(total, math.nan)
    safe = torch.where(undefined, torch.ones_like(total), total)
    mean_frequency = torch.where(undefined, nan, power @ frequencies / safe)
    high = torch.where(undefined, nan, power[:, k_c:].sum(dim=1) / safe)
    high_power = torch.where(flat, torch.zeros_like(high_power), high_power)
    return SignalSpectrum(frequencies, power, mean_frequency, high, high_power, flat, k_c)


# --------------------------------------------------------------------------------------- pairs
def _class_labels(targets: Any) -> Tensor:
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor of class indices, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool or targets.dim() != 1:
        raise ValueError(
            "same- and different-class paths need integer class labels of shape (N,), got "
            f"{targets.dtype} of shape {tuple(targets.shape)}; pass `pairs=` (a (P, 2) index tensor) to choose "
            "the paths yourself"
        )
    return targets.detach().to("cpu", torch.long)


def _spread(total: int, capacities: list[int], gen: torch.Generator) -> list[int]:
    """``total`` items over groups as evenly as their capacities allow; ties broken in a seeded order."""
    quotas = [0] * len(capacities)
    order = torch.randperm(len(capacities), generator=gen).tolist()
    left = total
    while left > 0:
        given = 0
        for g in order:
            if left > 0 and quotas[g] < capacities[g]:
                quotas[g] += 1
                left -= 1
                given += 1
        if given == 0:
            break
    return quotas


def _distinct_pairs(a: Tensor, b: Optional[Tensor], m: int, gen: torch.Generator) -> Tensor:
    """``m`` distinct pairs ``(a_i, b_j)`` (unordered pairs of distinct members of ``a`` if ``b`` is None)."""
    n_a = len(a)
    n_b = n_a if b is None else len(b)
    capacity = n_a * (n_a - 1) // 2 if b is None else n_a * n_b
    if m >= capacity // 2:
        # Enumerate when most pairs are wanted (the capacity is then small, at most 2m).
        if b is None:
            i, j = torch.triu_indices(n_a, n_a, offset=1)
        else:
            i, j = torch.cartesian_prod(torch.arange(n_a), torch.arange(n_b)).unbind(1)
        keep = torch.randperm(len(i), generator=gen)[:m]
        i, j = i[keep], j[keep]
    else:
        # Rejection sampling: fewer than half the pairs are wanted, so few draws are rejected.
        seen: dict[tuple[int, int], None] = {}
        while len(seen) < m:
            ii = torch.randint(n_a, (2 * m,), generator=gen).tolist()
            jj = torch.randint(n_b, (2 * m,), generator=gen).tolist()
            for x, y in zip(ii, jj):
                if b is None and x == y:
                    continue
                key = (min(x, y), max(x, y)) if b is None else (x, y)
                if key not in seen:
                    seen[key] = None
                    if len(seen) == m:
                        break
        i = torch.tensor([k[0] for k in seen], dtype=torch.long)
        j = torch.tensor([k[1] for k in seen], dtype=torch.long)
    first, second = a[i], (a if b is None else b)[j]
    # Either end may be the start x0 (the reference of s): no class is always the reference.
    swap = torch.rand(len(first), generator=gen) < 0.5
    return torch.stack([torch.where(swap, second, first), torch.where(swap, first, second)], dim=1)


def interpolation_pairs(
    targets: Tensor,
    num_pairs: int,
    *,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Stratified pairs of examples: ``num_pairs`` same-class and ``num_pairs`` different-class pairs.

    Same-class pairs are spread as evenly as possible over the classes with at least two examples,
    different-class pairs over the unordered class pairs ``(a, b)``; within a group pairs are
    distinct and drawn uniformly, and either example may be the start. Groups that cannot hold
    their share give it to the others; when the data hold fewer distinct pairs than asked, fewer are
    returned (with a warning). The result depends only on ``targets`` and the seed (a private
    generator; the global RNG is never used).

    Returns:
        ``pairs`` ``(P, 2)`` long indices into ``targets`` (start, end), same-class pairs first, and
        ``same_class`` ``(P,)`` bool.
    """
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive integer, got {num_pairs!r}")
    y = _class_labels(targets)
    gen = make_generator(seed, generator)
    members = [torch.nonzero(y == c).flatten() for c in torch.unique(y)]
    same_groups = [m for m in members if len(m) >= 2]
    quotas = _spread(num_pairs, [len(m) * (len(m) - 1) // 2 for m in same_groups], gen)
    same = [_distinct_pairs(m, None, q, gen) for m, q in zip(same_groups, quotas) if q]
    class_pairs = [(a, b) for a in range(len(members)) for b in range(a + 1, len(members))]
    quotas = _spread(num_pairs, [len(members[a]) * len(members[b]) for a, b in class_pairs], gen)
    different = [_distinct_pairs(members[a], members[b], q, gen) for (a, b), q in zip(class_pairs, quotas) if q]
    empty = torch.zeros(0, 2, dtype=torch.long)
    same_t = torch.cat(same) if same else empty
    diff_t = torch.cat(different) if different else empty
    if len(same_t) < num_pairs or len(diff_t) < num_pairs:
        warnings.warn(
            f"interpolation_pairs: the {len(y)} examples hold {len(same_t)} distinct same-class and {len(diff_t)} "
            f"different-class pairs, fewer than num_pairs={num_pairs} of each; using those", RuntimeWarning,
            stacklevel=2,
        )
    pairs = torch.cat([same_t, diff_t])
    same_class = torch.cat([torch.ones(len(same_t), dtype=torch.bool), torch.zeros(len(diff_t), dtype=torch.bool)])
    return pairs, same_class


# --------------------------------------------------------------------------------------- paths
def _rebuild(template: Any, leaves: list[Tensor]) -> Any:
    """``template``'s nest with its tensors replaced, in ``tree_leaves`` order, by ``leaves``."""
    it = iter(leaves)
    return tree_map(lambda _: next(it), template)


def _check_model(model: nn.Module) -> None:
    noisy = [name for name, m in model.named_modules()
             if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))]
    if noisy:
        raise ValueError(
            "function_frequency needs a deterministic per-example function, but BatchNorm/Dropout modules are in "
            f"train mode: {noisy[:3]}; call model.eval() first"
        )


def _check_inputs(model: nn.Module, inputs: Any) -> list[Tensor]:
    leaves = tree_leaves(inputs)
    if not leaves:
        raise ValueError("inputs hold no tensor")
    if not all(t.is_floating_point() for t in leaves):
        raise ValueError(
            "function_frequency interpolates between inputs, but some input tensors are not floating point "
            "(token ids?); pass `forward` that maps embeddings to outputs and give the embeddings as inputs"
        )
    _check_model(model)
    return leaves


def _probabilities(outputs: Tensor) -> Tensor:
    """Per-point class probabilities ``(n, Q)`` in float64: a softmax over the last dimension of each
    point's output (positions of a sequence each get their own), or ``(sigmoid, 1 - sigmoid)`` for a
    single binary logit."""
    z = outputs.to(torch.float64)
    if z.dim() == 0:
        raise ValueError("the model returned a scalar; outputs of shape (N, C) are needed")
    if z.dim() == 1 or (z.dim() == 2 and z.shape[1] == 1):
        q = torch.sigmoid(z.reshape(-1, 1))
        return torch.cat([q, 1 - q], dim=1)
    # exp(z - max) / sum: the same softmax as torch.softmax, about 3x faster for a handful of classes.
    e = (z - z.amax(dim=-1, keepdim=True)).exp_()
    return (e / e.sum(dim=-1, keepdim=True)).reshape(z.shape[0], -1)


def _check_path_args(num_points: Any, extrapolate: Any, chunk_size: Any) -> None:
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"a path needs at least 2 points, got num_points={num_points!r}")
    if not isinstance(extrapolate, (int, float)) or isinstance(extrapolate, bool) or not 0 <= extrapolate < math.inf:
        raise ValueError(f"extrapolate must be a finite number >= 0 (path lengths beyond each end), "
                         f"got {extrapolate!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def path_signals(
    model: nn.Module,
    inputs: Any,
    pairs: Tensor,
    *,
    num_points: int = 64,
    extrapolate: float = 0.0,
    forward: Optional[ForwardFn] = None,
    chunk_size: Optional[int] = 1024,
) -> tuple[Tensor, Tensor]:
    r"""The signals :math:`s_j = \lVert p(x(t_j)) - p(x_0)\rVert_2` along the paths of ``pairs``.

    ``t_j = -e + (1 + 2e) j / M``, ``j = 0 .. M-1`` (``e = extrapolate``; ``e = 0`` is the segment from
    ``x0`` to ``x1``, end excluded), :math:`x(t) = x_0 + t (x_1 - x_0)` for every floating tensor of
    ``inputs`` (a tensor ``(N, ...)`` of any shape, or a tuple/list/dict of them). ``p`` is the
    softmax of each point's output over its last dimension, in float64.

    Cost: ``P * M`` forwards of single points (``P`` more for the starts when extrapolating),
    batched by whole paths, ``chunk_size // M`` paths (at least one) per forward (peak memory: one
    chunk of interpolated inputs and its forward), under ``torch.no_grad``.

    Returns:
        ``signals`` ``(P, M)`` float64 and ``path_length`` ``(P,)`` float64 (:math:`\lVert x_1 - x_0\rVert`
        over all floating input tensors).
    """
    _check_path_args(num_points, extrapolate, chunk_size)
    leaves = _check_inputs(model, inputs)
    n = num_rows(inputs)
    pairs = _check_pairs(pairs, n)
    device = leaves[0].device
    idx = pairs.to(device)
    num_pairs = len(pairs)
    # Whole paths per forward: broadcasting start + t * delta needs no gather of per-point indices.
    per_chunk = num_pairs if chunk_size is None else max(1, chunk_size // num_points)
    t = -extrapolate + (1 + 2 * extrapolate) * torch.arange(num_points, dtype=torch.float64, device=device) / num_points

    def evaluate(points: Any) -> Tensor:
        return _probabilities(model_outputs(model, points, forward))

    signals = torch.empty(num_pairs, num_points, dtype=torch.float64, device=device)
    path_length = torch.zeros(num_pairs, dtype=torch.float64, device=device)
    with torch.no_grad():
        for p0 in range(0, num_pairs, per_chunk):
            p1 = min(p0 + per_chunk, num_pairs)
            # Ends are gathered per chunk, so memory stays one chunk's worth for large inputs too.
            starts = tree_leaves(index_rows(inputs, idx[p0:p1, 0]))
            ends = tree_leaves(index_rows(inputs, idx[p0:p1, 1]))
            points = []
            for s, e in zip(starts, ends):
                d = e - s
                path_length[p0:p1] += d.reshape(p1 - p0, -1).to(torch.float64).square().sum(dim=1)
                tj = t.to(s.dtype).reshape(1, num_points, *([1] * (s.dim() - 1)))
                path = (s.unsqueeze(1) + tj * d.unsqueeze(1)).reshape(-1, *s.shape[1:])
                # t_0 = 0 is the start itself (x0 + 0 * delta == x0), so s(0) = 0 exactly; extended
                # paths add the starts to the same forward.
                points.append(path if extrapolate == 0 else torch.cat([path, s]))
            p = evaluate(_rebuild(inputs, points))
            rows = (p1 - p0) * num_points
            expected = rows + (0 if extrapolate == 0 else p1 - p0)
            if p.shape[0] != expected:
                raise ValueError(f"the model returned {p.shape[0]} outputs for {expected} points: outputs must have "
                                 "one row per input example")
            along = p[:rows].view(p1 - p0, num_points, -1)
            reference = along[:, :1] if extrapolate == 0 else p[rows:].unsqueeze(1)
            signals[p0:p1] = (along - reference).norm(dim=2)
    path_length = path_length.sqrt()
    return signals, path_length


def _check_pairs(pairs: Any, n: int) -> Tensor:
    if not isinstance(pairs, Tensor) or pairs.is_floating_point() or pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be an integer tensor of shape (P, 2) (start, end indices), got "
                         f"{getattr(pairs, 'dtype', type(pairs).__name__)} {tuple(getattr(pairs, 'shape', ()))}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty: there is no path to measure")
    pairs = pairs.to("cpu", torch.long)
    if int(pairs.min()) < 0 or int(pairs.max()) >= n:
        raise ValueError(f"pairs index examples {int(pairs.min())}..{int(pairs.max())}, but there are only {n}")
    return pairs


# --------------------------------------------------------------------------------------- the measure
@dataclass
class PathFrequencies:
    """Per-path results of :func:`function_frequency`; :meth:`summary` averages them by pair type.

    Frequencies are in cycles per path length (the distance from ``x0`` to ``x1``);
    ``mean_frequency_per_distance`` is in cycles per unit input distance.

    Attributes:
        pairs: ``(P, 2)`` start and end indices into the inputs.
        same_class: ``(P,)`` bool, or None when the pairs were given without targets.
        path_length: ``(P,)`` :math:`\\lVert x_1 - x_0 \\rVert`.
        signals: ``(P, M)`` the distance signals ``s``.
        mean_frequency, high_frequency_fraction: ``(P,)``, NaN on flat paths.
        high_frequency_power: ``(P,)`` variance of ``s`` in the high band (0 on flat paths).
        max_distance: ``(P,)`` :math:`\\max_t s(t)`, how far the prediction moves from the start's.
        flat: ``(P,)`` bool, paths whose signal is constant (within ``constant_tol``).
        spectrum: the :class:`SignalSpectrum` (power spectra, frequencies, cutoff bin).
    """

    pairs: Tensor
    same_class: Optional[Tensor]
    path_length: Tensor
    signals: Tensor
    mean_frequency: Tensor
    high_frequency_fraction: Tensor
    high_frequency_power: Tensor
    max_distance: Tensor
    flat: Tensor
    spectrum: SignalSpectrum

    @property
    def mean_frequency_per_distance(self) -> Tensor:
        """Mean frequency in cycles per unit input distance (NaN on flat or zero-length paths)."""
        length = self.path_length
        return torch.where(length > 0, self.mean_frequency / length.clamp_min(1e-300),
                           torch.full_like(length, math.nan))

    def group(self, name: str) -> Tensor:
        """Boolean mask of the paths of ``"same_class"``, ``"different_class"`` or ``"all"``."""
        if name == "all":
            return torch.ones(len(self.pairs), dtype=torch.bool, device=self.path_length.device)
        if name not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {name!r}")
        if self.same_class is None:
            raise ValueError("the pairs were given without targets: only the group 'all' is known")
        mask = self.same_class.to(self.path_length.device)
        return mask if name == "same_class" else ~mask

    def summary(self) -> dict[str, float]:
        """``{"<group>/<quantity>": value}``: NaN-means over each group's paths.

        Quantities: ``mean_frequency`` (cycles per path length), ``mean_frequency_per_distance``
        (cycles per unit input distance), ``high_frequency_fraction``, ``high_frequency_power``,
        ``max_distance`` and ``flat_fraction`` (the share of the group's paths with a constant
        signal, which are left out of the first three means and count 0 in the fourth). The first
        three are NaN when every path of their group is flat; every value is NaN for an empty group.
        """
        groups = GROUPS if self.same_class is not None else ("all",)
        per_path = {
            "mean_frequency": self.mean_frequency,
            "mean_frequency_per_distance": self.mean_frequency_per_distance,
            "high_frequency_fraction": self.high_frequency_fraction,
            "high_frequency_power": self.high_frequency_power,
            "max_distance": self.max_distance,
            "flat_fraction": self.flat.to(torch.float64),
        }
        out: dict[str, float] = {}
        for g in groups:
            mask = self.group(g)
            for quantity, values in per_path.items():
                chosen = values[mask]
                out[f"{g}/{quantity}"] = float(chosen.nanmean()) if len(chosen) else math.nan
        return out


def function_frequency(
    model: nn.Module,
    inputs: Any,
    targets: Optional[Tensor] = None,
    *,
    num_pairs: int = 100,
    num_points: int = 64,
    pairs: Optional[Tensor] = None,
    seed: Optional[int] = 0,
    cutoff: float = 0.1,
    extrapolate: float = 0.0,
    window: Window = "hann",
    constant_tol: float = 1e-6,
    forward: Optional[ForwardFn] = None,
    chunk_size: Optional[int] = 1024,
) -> PathFrequencies:
    r"""How fast the model's prediction changes along straight paths between examples.

    Fridovich-Keil, Gontijo-Lopes, Roelofs (2022), "Spectral Bias in Practice: The Role of Function
    Frequency in Generalization". For each pair ``(x0, x1)`` the model is evaluated at ``M =
    num_points`` points of :math:`x(t) = x_0 + t (x_1 - x_0)`, ``t = j/M`` (end excluded), the signal
    :math:`s(t) = \lVert \mathrm{softmax}(f(x(t))) - \mathrm{softmax}(f(x_0))\rVert_2` is formed with a
    softmax per point, and its Hann-windowed power spectrum is summarised by the mean frequency (the
    spectral centroid, DC excluded) and the fraction of power at or above bin
    :math:`k_c = \lceil \text{cutoff}\cdot(M/2 + 1)\rceil` (see :func:`signal_spectrum`). Frequencies
    are in cycles per path length; per unit input distance, divide by :math:`\lVert x_1 - x_0\rVert`
    (input normalisation therefore sets that unit).

    Pairs: ``num_pairs`` same-class and ``num_pairs`` different-class pairs of the examples, drawn by
    :func:`interpolation_pairs` from ``targets`` (integer class labels ``(N,)``) with ``seed``, or
    given as ``pairs`` ``(P, 2)`` (start, end indices; ``targets`` then only labels them).

    ``extrapolate = e > 0`` extends every path by ``e`` path lengths beyond both ends (``t`` from
    ``-e`` to ``1 + e``, still ``M`` points; the signal's reference stays :math:`p(x_0)`): the
    function away from the data, our extension of the paper's protocol. Frequencies stay in cycles
    per (unextended) path length.

    A single output per example is read as a binary logit (probabilities ``sigmoid, 1 - sigmoid``);
    for sequence outputs ``(N, T, C)`` the softmax is per position and ``s`` is over all positions.
    Paths whose signal's range (max - min) is at most ``constant_tol`` (probability units; float32
    softmax resolves about 1e-7) are flat: their frequency and fraction are NaN (0/0), not 0.

    Cost: ``P * M`` single-example forwards (``2 * num_pairs * num_points``, 12,800 with the
    defaults; ``P`` more for the starts when extrapolating), about ``chunk_size`` points (whole paths) per batched
    forward, no backward; an rfft of length ``M`` per path.

    Args:
        model: the network, in eval mode (BatchNorm or Dropout in train mode is refused).
        inputs: ``(N, ...)`` floating tensor, or a tuple/list/dict of them (every tensor is
            interpolated; integer inputs are refused).
        targets: ``(N,)`` integer class labels (needed unless ``pairs`` is given).
        num_pairs: pairs of each type (same-class, different-class).
        num_points: ``M``, points per path (at least 2; 4 with the Hann window).
        pairs: explicit ``(P, 2)`` index pairs instead of drawing them.
        seed: of the pair draw.
        cutoff: first high-frequency bin as a fraction of the ``M // 2 + 1`` rfft bins.
        extrapolate: path lengths added beyond each end.
        window: ``"hann"`` (default) or ``"none"``.
        constant_tol: largest range (max - min) of a flat signal.
        forward: ``(model, inputs) -> outputs``; default ``model(inputs)``.
        chunk_size: points per forward, rounded down to whole paths (at least one; bounds memory);
            None for all at once.

    Returns:
        :class:`PathFrequencies` (per-path values; ``.summary()`` for the group means).
    """
    _check_spectrum_args(num_points, cutoff, window)
    _check_path_args(num_points, extrapolate, chunk_size)
    if constant_tol < 0:
        raise ValueError(f"constant_tol must be >= 0, got {constant_tol!r}")
    _check_inputs(model, inputs)
    n = num_rows(inputs)
    if pairs is None:
        if targets is None:
            raise ValueError("function_frequency needs class labels to draw same- and different-class pairs; pass "
                             "targets=(N,) integer labels, or pairs=(P, 2) indices")
        if num_rows(targets) != n:
            raise ValueError(f"targets has {num_rows(targets)} labels for {n} examples")
        pairs, same_class = interpolation_pairs(targets, num_pairs, seed=seed)
        if len(pairs) == 0:
            raise ValueError(f"the {n} examples hold no pair to interpolate between")
    else:
        pairs = _check_pairs(pairs, n)
        same_class = None
        if targets is not None:
            y = _class_labels(targets)
            if len(y) != n:
                raise ValueError(f"targets has {len(y)} labels for {n} examples")
            same_class = y[pairs[:, 0]] == y[pairs[:, 1]]
    signals, path_length = path_signals(model, inputs, pairs, num_points=num_points, extrapolate=extrapolate,
                                        forward=forward, chunk_size=chunk_size)
    spectrum = signal_spectrum(signals, cutoff=cutoff, window=window, span=1 + 2 * extrapolate,
                               constant_tol=constant_tol)
    return PathFrequencies(
        pairs=pairs,
        same_class=same_class,
        path_length=path_length,
        signals=signals,
        mean_frequency=spectrum.mean_frequency,
        high_frequency_fraction=spectrum.high_frequency_fraction,
        high_frequency_power=spectrum.high_frequency_power,
        max_distance=signals.amax(dim=1),
        flat=spectrum.flat,
        spectrum=spectrum,
    )
