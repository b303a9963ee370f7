"""The shared Lanczos solver against dense eigendecompositions."""

import pytest
import torch

from lightning_biasprobe.functional._lanczos import lanczos_eigenvalues, lanczos_tridiagonal


def symmetric(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_top_and_bottom_k_match_eigvalsh():
    spectrum = torch.linspace(-3, 10, 60, dtype=torch.float64)
    A = symmetric(spectrum)
    top = lanczos_eigenvalues(lambda v: A @ v, 60, k=3, tol=1e-10, max_iter=60)
    assert top.converged
    torch.testing.assert_close(top.eigenvalues, spectrum.flip(0)[:3], rtol=1e-9, atol=1e-9)
    bottom = lanczos_eigenvalues(lambda v: A @ v, 60, k=2, which="smallest", tol=1e-10, max_iter=60)
    torch.testing.assert_close(bottom.eigenvalues, spectrum[:2], rtol=1e-9, atol=1e-9)


def test_eigenvectors_and_few_products_for_a_gapped_spectrum():
    spectrum = torch.cat([torch.tensor([100.0, 50.0]), torch.rand(198, generator=torch.Generator().manual_seed(1))])
    A = symmetric(spectrum.double(), seed=2)
    result = lanczos_eigenvalues(lambda v: A @ v, 200, k=1, tol=1e-6, return_vectors=True)
    assert result.converged and result.num_matvecs < 30
    v = result.eigenvectors[:, 0]
    torch.testing.assert_close(A @ v, 100.0 * v, rtol=0, atol=1e-3)
    assert abs(result.eigenvalues[0].item() - 100.0) < 1e-4


def test_tridiagonal_reproduces_the_spectrum_after_full_dimension():
    spectrum = torch.arange(1.0, 11.0, dtype=torch.float64)
    A = symmetric(spectrum, seed=3)
    alpha, beta, Q = lanczos_tridiagonal(lambda v: A @ v, torch.ones(10, dtype=torch.float64), 10)
    T = torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
    torch.testing.assert_close(torch.linalg.eigvalsh(T), spectrum, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Q @ Q.T, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError):
        lanczos_eigenvalues(lambda v: v, 5, k=6)
    with pytest.raises(ValueError):
        lanczos_eigenvalues(lambda v: v, 5, which="middle")


def test_warm_start_from_the_top_eigenvector_converges_at_once():
    spectrum = torch.linspace(0, 5, 80, dtype=torch.float64)
    A = symmetric(spectrum, seed=4)
    cold = lanczos_eigenvalues(lambda v: A @ v, 80, k=1, tol=1e-8, return_vectors=True, max_iter=80)
    warm = lanczos_eigenvalues(lambda v: A @ v, 80, k=1, tol=1e-8, v0=cold.eigenvectors[:, 0], max_iter=80)
    assert warm.num_matvecs <= 2 < cold.num_matvecs
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="v0"):
        lanczos_eigenvalues(lambda v: A @ v, 80, v0=torch.zeros(80))
