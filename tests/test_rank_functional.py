"""effective_rank, stable_rank, rankme: known spectra, brute force, streamed statistics, bad input."""

import math

import pytest
import torch

from lightning_biasprobe.functional.ncc import FeatureStatistics
from lightning_biasprobe.functional.rank import (
    effective_rank,
    erank_from_singular_values,
    rank_measures,
    rankme,
    singular_values,
    stable_rank,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def with_spectrum(sigma, n=40, d=30, seed=0):
    """An (n, d) float64 matrix with the given singular values (random orthonormal factors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(sigma), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.as_tensor(sigma, dtype=torch.float64)) @ v.T


def brute_force_erank(matrix):
    """exp of the Shannon entropy of the normalised singular values, with numpy's SVD, one term at a time."""
    s = [x for x in torch.linalg.svdvals(matrix).tolist() if x > 1e-12 * max(1.0, abs(matrix).max().item())]
    total = sum(s)
    return math.exp(-sum((x / total) * math.log(x / total) for x in s))


@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_k_equal_singular_values_give_erank_k_and_entropy_log_k(k):
    z = with_spectrum([3.5] * k)
    assert effective_rank(z).item() == pytest.approx(k, rel=1e-10)
    assert effective_rank(z, entropy=True).item() == pytest.approx(math.log(k), abs=1e-10)
    assert effective_rank(z, gram=True).item() == pytest.approx(k, rel=1e-10)  # flat: Gram erank equal
    assert stable_rank(z).item() == pytest.approx(k, rel=1e-10)
    assert rankme(z, eps=0.0).item() == pytest.approx(k, rel=1e-10)


def test_rank_one_gives_one_everywhere():
    z = torch.outer(torch.arange(1.0, 41.0, dtype=torch.float64), torch.linspace(-1, 2, 30, dtype=torch.float64))
    for value in (effective_rank(z), effective_rank(z, gram=True), stable_rank(z), rankme(z, eps=0.0)):
        assert value.item() == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(z, entropy=True).item() == pytest.approx(0.0, abs=1e-9)


def test_gram_erank_is_at_most_feature_erank_with_equality_only_for_a_flat_spectrum():
    torch.manual_seed(0)
    for trial in range(20):
        z = torch.randn(50, 20, dtype=torch.float64) * torch.rand(20, dtype=torch.float64) ** 3
        assert effective_rank(z, gram=True) < effective_rank(z) - 1e-6
        # gram=True is the erank of the N x N matrix Z Z^T itself (its singular values are sigma^2).
        torch.testing.assert_close(effective_rank(z, gram=True), effective_rank(z @ z.T), rtol=1e-9, atol=0)
    flat = with_spectrum([2.0] * 7)
    torch.testing.assert_close(effective_rank(flat, gram=True), effective_rank(flat), rtol=1e-12, atol=0)


def test_rankme_of_d_orthonormal_columns_is_d():
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(256, 64, dtype=torch.float64))
    assert rankme(q, eps=0.0).item() == pytest.approx(64, rel=1e-12)
    assert rankme(q).item() == pytest.approx(64, rel=1e-3)   # eps = 1e-7 as in the paper
    assert rankme(q).item() > 64                              # the eps terms only add entropy


def test_against_brute_force_svd_entropy_and_norms():
    torch.manual_seed(2)
    z = torch.randn(30, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64) + 3.0
    assert effective_rank(z).item() == pytest.approx(brute_force_erank(z), rel=1e-10)
    centered = z - z.mean(0, keepdim=True)
    assert effective_rank(z, centered=True).item() == pytest.approx(brute_force_erank(centered), rel=1e-10)
    expected_stable = (torch.linalg.matrix_norm(z) ** 2 / torch.linalg.matrix_norm(z, ord=2) ** 2).item()
    assert stable_rank(z).item() == pytest.approx(expected_stable, rel=1e-10)
    s = torch.linalg.svdvals(z)
    p = s / s.sum() + 1e-7
    assert rankme(z).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-12)
    # A large mean dominates the uncentered value: the centered one measures the spread.
    shifted = z + 30.0
    assert effective_rank(shifted) < 3 and effective_rank(shifted, centered=True) > 8
    torch.testing.assert_close(effective_rank(shifted, centered=True), effective_rank(z, centered=True), rtol=1e-9,
                               atol=0)


def test_scale_invariant_but_not_per_feature_scale_invariant():
    torch.manual_seed(3)
    z = torch.randn(40, 10, dtype=torch.float64)
    torch.testing.assert_close(effective_rank(7.5 * z), effective_rank(z), rtol=1e-12, atol=0)
    stretched = z * torch.logspace(0, 2, 10, dtype=torch.float64)
    assert effective_rank(stretched) < effective_rank(z) - 1


def test_streamed_statistics_over_many_batches_equal_one_svd():
    torch.manual_seed(4)
    z = torch.randn(203, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64) + 0.5
    stats = FeatureStatistics(16, 1, scatter=True)
    for part in torch.split(z, [1, 50, 7, 100, 45]):
        stats.update(part)
    torch.testing.assert_close(stats.singular_values(), singular_values(z), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.singular_values(centered=True), singular_values(z, centered=True),
                               rtol=1e-9, atol=1e-9)
    measures = rank_measures(stats.singular_values(), stats.singular_values(centered=True))
    torch.testing.assert_close(measures["erank_features"], effective_rank(z), rtol=1e-10, atol=0)
    torch.testing.assert_close(measures["erank_features_centered"], effective_rank(z, centered=True), rtol=1e-10,
                               atol=0)
    torch.testing.assert_close(measures["erank_gram"], effective_rank(z, gram=True), rtol=1e-10, atol=0)
    torch.testing.assert_close(measures["rankme"], rankme(z), rtol=1e-10, atol=0)
    torch.testing.assert_close(measures["stable_rank_features"], stable_rank(z), rtol=1e-10, atol=0)


def test_fewer_samples_than_features_keeps_min_n_d_values():
    torch.manual_seed(5)
    z = torch.randn(5, 40, dtype=torch.float64)
    stats = FeatureStatistics(40, 1, scatter=True).update(z)
    assert stats.singular_values().shape == (5,)
    torch.testing.assert_close(stats.singular_values(), singular_values(z), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rankme(z), rank_measures(stats.singular_values(), stats.singular_values())["rankme"],
                               rtol=1e-9, atol=0)


def test_zero_features_have_rank_zero():
    z = torch.zeros(6, 4, dtype=torch.float64)
    for value in (effective_rank(z), effective_rank(z, gram=True), stable_rank(z), rankme(z)):
        assert value.item() == 0.0
    assert erank_from_singular_values(torch.zeros(3), entropy=True).item() == float("-inf")


@pytest.mark.parametrize("bad, message", [
    (torch.randn(3), "matrix"),
    (torch.randn(2, 3, 4), "matrix"),
    (torch.ones(3, 4, dtype=torch.long), "floating"),
    (torch.randn(0, 4), "no singular values"),
    ([[1.0, 2.0]], "matrix"),
])
def test_bad_input_raises_a_clear_error(bad, message):
    for fn in (effective_rank, stable_rank, rankme):
        with pytest.raises(ValueError, match=message):
            fn(bad)
