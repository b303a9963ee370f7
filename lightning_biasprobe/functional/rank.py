r"""Effective rank, RankMe and stable rank of representations.

- Roy, Vetterli (2007), "The effective rank: a measure of effective dimensionality", EUSIPCO:
  :math:`\mathrm{erank}(A) = \exp H(p)`, :math:`p_k = \sigma_k / \sum_j \sigma_j` over the singular
  values of ``A``; it lies in ``[1, rank A]``.
- Huh, Mobahi, Zhang, Cheung, Agrawal, Isola (2023), "The Low-Rank Simplicity Bias in Deep
  Networks", TMLR: deeper networks find embeddings whose Gram matrix :math:`G = Z Z^T` has a lower
  effective rank. Their published helper returns the entropy :math:`H(p)` (nats), not its
  exponential: ``entropy=True`` gives that scale.
- Garrido, Balestriero, Najman, LeCun (2023), "RankMe: Assessing the Downstream Performance of
  Pretrained Self-Supervised Representations by Their Rank", ICML: :math:`\exp H(p)` with
  :math:`p_k = \sigma_k/\lVert\sigma\rVert_1 + \varepsilon` over the ``min(N, D)`` singular values of
  the *uncentered* embeddings, :math:`\varepsilon = 10^{-7}`.
- Stable rank :math:`\lVert Z\rVert_F^2 / \lVert Z\rVert_2^2 = \sum_k\sigma_k^2/\sigma_1^2`
  (Rudelson & Vershynin 2007), a smooth lower bound of the rank.

Which matrix (the traps, METHODS.md §6): ``Z`` is the ``(N, D)`` matrix of ``N`` examples'
features. ``erank(Z)`` uses :math:`\sigma_k(Z)`; the Gram matrix has :math:`\sigma_k(G) = \sigma_k(Z)^2`,
which concentrates ``p``, so :math:`\mathrm{erank}(Z Z^T) \le \mathrm{erank}(Z)` (equality iff the
non-zero spectrum is flat). Uncentered values are dominated by the mean embedding
(:math:`\sigma_1 \approx \sqrt N \lVert\mu\rVert`): a large mean alone gives a low uncentered
erank; ``centered=True`` subtracts the mean example first and measures the spread. All are
invariant to a global scale of ``Z`` but not to per-feature scaling. A matrix of zeros has rank 0:
every measure returns 0 for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._adapters import ForwardFn
from ._layers import FeatureCapture, LayerSpec, SequencePool
from .ncc import FeatureStatistics

RANKME_EPS = 1e-7


def _matrix(features: Tensor) -> Tensor:
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"features must be an (N, D) matrix, got {getattr(features, 'shape', type(features))}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if min(features.shape) == 0:
        raise ValueError(f"features of shape {tuple(features.shape)} have no singular values")
    return features.double()


def singular_values(features: Tensor, *, centered: bool = False) -> Tensor:
    """The ``min(N, D)`` singular values of the ``(N, D)`` features, descending, in float64.

    ``centered=True``: of ``Z - 1 mean(Z)`` (the mean example subtracted). Cost ``O(N D min(N, D))``.
    """
    z = _matrix(features)
    if centered:
        z = z - z.mean(0, keepdim=True)
    return torch.linalg.svdvals(z)


def _entropy_of(weights: Tensor) -> Tensor:
    p = weights / weights.sum()
    return -torch.special.xlogy(p, p).sum()


def erank_from_singular_values(sigma: Tensor, *, gram: bool = False, entropy: bool = False) -> Tensor:
    r"""Roy–Vetterli effective rank from singular values: :math:`\exp H(p)`, :math:`p \propto \sigma` (or
    :math:`\sigma^2`, the Gram matrix's singular values, with ``gram=True``); :math:`H(p)` in nats with
    ``entropy=True``. 0 (and entropy ``-inf``) for an all-zero spectrum."""
    sigma = sigma.double().clamp_min(0)
    weights = sigma.pow(2) if gram else sigma
    if not bool((weights > 0).any()):
        return sigma.new_tensor(float("-inf") if entropy else 0.0)
    h = _entropy_of(weights)
    return h if entropy else h.exp()


def stable_rank_from_singular_values(sigma: Tensor) -> Tensor:
    r""":math:`\sum_k \sigma_k^2 / \max_k \sigma_k^2` (0 for an all-zero spectrum)."""
    sq = sigma.double().pow(2)
    top = sq.max() if sq.numel() else sq.new_zeros(())
    return sq.sum() / top if top > 0 else sq.new_zeros(())


def rankme_from_singular_values(sigma: Tensor, eps: float = RANKME_EPS) -> Tensor:
    r"""RankMe from the ``min(N, D)`` singular values: :math:`\exp(-\sum_k p_k\log p_k)`,
    :math:`p_k = \sigma_k/\lVert\sigma\rVert_1 + \varepsilon` (Garrido et al. 2023). 0 for zeros."""
    sigma = sigma.double().clamp_min(0)
    total = sigma.sum()
    if total <= 0:
        return sigma.new_zeros(())
    p = sigma / total + eps
    return (-torch.special.xlogy(p, p).sum()).exp()


def effective_rank(features: Tensor, *, centered: bool = False, gram: bool = False, entropy: bool = False) -> Tensor:
    r"""Effective rank (Roy & Vetterli 2007) of the ``(N, D)`` features ``Z``, or of their Gram matrix.

    ``gram=False``: :math:`\mathrm{erank}(Z)`, :math:`p_k = \sigma_k(Z)/\sum_j\sigma_j(Z)`.
    ``gram=True``: :math:`\mathrm{erank}(Z Z^T)` (the ``N x N`` Gram matrix Huh et al. study), from
    :math:`\sigma_k(Z)^2` without forming it. ``centered=True``: of ``Z`` minus its mean example.
    ``entropy=True``: :math:`H(p)` in nats (the scale of Huh et al.'s published helper) instead of
    :math:`\exp H(p)`. Float64 0-dim tensor in ``[1, rank]``. Cost: one SVD, ``O(N D min(N, D))``.
    """
    return erank_from_singular_values(singular_values(features, centered=centered), gram=gram, entropy=entropy)


def stable_rank(features: Tensor, *, centered: bool = False) -> Tensor:
    r"""Stable rank :math:`\lVert Z\rVert_F^2/\lVert Z\rVert_2^2` of the features (``centered``: of ``Z``
    minus its mean example). In ``[1, rank]``; cost one SVD."""
    return stable_rank_from_singular_values(singular_values(features, centered=centered))


def rankme(features: Tensor, *, eps: float = RANKME_EPS) -> Tensor:
    r"""RankMe (Garrido et al. 2023) of the uncentered, unnormalised ``(N, D)`` embeddings.

    :math:`\exp(-\sum_{k\le\min(N,D)} p_k\log p_k)` with :math:`p_k = \sigma_k/\lVert\sigma\rVert_1 +
    \varepsilon`; ``eps = 1e-7`` as in the paper (for float32 embeddings). The ``eps`` terms add about
    ``min(N, D) * eps * log`` to the entropy: RankMe of ``D`` orthonormal columns is ``D`` up to
    ~1e-5 relative. Cost one SVD.
    """
    return rankme_from_singular_values(singular_values(features), eps)


def rank_measures(sigma: Tensor, centered_sigma: Tensor) -> dict[str, Tensor]:
    """The five quantities the :class:`EffectiveRank` probe logs per layer, from the uncentered and
    centered singular values of the features (names say which matrix and whether centered)."""
    return {
        "erank_features": erank_from_singular_values(sigma),
        "erank_features_centered": erank_from_singular_values(centered_sigma),
        "erank_gram": erank_from_singular_values(sigma, gram=True),
        "rankme": rankme_from_singular_values(sigma),
        "stable_rank_features": stable_rank_from_singular_values(sigma),
    }


@dataclass
class LayerSpectrum:
    """Singular values of one layer's ``(N, D)`` feature matrix (after pooling and projection)."""

    singular_values: Tensor
    centered_singular_values: Tensor
    num_samples: int
    dim: int


def layer_spectra(
    model: nn.Module,
    inputs: Any,
    *,
    layers: LayerSpec = "auto",
    forward: Optional[ForwardFn] = None,
    conv_pool: str = "gap",
    sequence_pool: SequencePool = "mean",
    max_dim: Optional[int] = 192,
    seed: int = 0,
    chunk_size: Optional[int] = 256,
    capture: Optional[FeatureCapture] = None,
) -> dict[str, LayerSpectrum]:
    r"""Uncentered and centered singular values of each chosen layer's features over ``inputs``.

    Streams: each chunk's (pooled, projected) features ``z`` are added to the per-layer sums
    :math:`\sum z`, :math:`\sum z z^T` (float64); the singular values are the square roots of the
    eigenvalues of :math:`S = Z^T Z` (centered: :math:`S - N m m^T`). So memory is ``O(k^2)`` per layer
    with ``k = min(D, max_dim)`` whatever ``N`` (see :mod:`._layers` for the projection and what it
    preserves; ``max_dim=192`` by default, as :class:`EffectiveRank`), and singular values below
    ``sqrt(k * eps_64)`` of the largest read as zero. Cost: one forward over ``inputs`` plus
    ``O(N k^2 + k^3)`` per layer. Run the model in eval mode. ``capture`` (a configured
    :class:`FeatureCapture`) replaces the selection, pooling and projection arguments.
    """
    capture = capture or FeatureCapture(layers, conv_pool=conv_pool, sequence_pool=sequence_pool, max_dim=max_dim,
                                        seed=seed, forward=forward)
    stats: dict[str, FeatureStatistics] = {}

    def accumulate(features: dict[str, Tensor]) -> None:
        for key, z in features.items():
            if key not in stats:
                stats[key] = FeatureStatistics(z.shape[1], 1, scatter=True, device=z.device)
            stats[key].update(z)

    keys = capture.run(model, inputs, accumulate, chunk_size)
    return {key: spectrum_of(stats[key]) for key in keys}


def spectrum_of(stats: FeatureStatistics) -> LayerSpectrum:
    """:class:`LayerSpectrum` of accumulated (scatter) statistics."""
    return LayerSpectrum(stats.singular_values().cpu(), stats.singular_values(centered=True).cpu(),
                         stats.num_samples, stats.dim)


__all__ = [
    "LayerSpectrum",
    "effective_rank",
    "erank_from_singular_values",
    "layer_spectra",
    "rank_measures",
    "rankme",
    "rankme_from_singular_values",
    "singular_values",
    "spectrum_of",
    "stable_rank",
    "stable_rank_from_singular_values",
]
