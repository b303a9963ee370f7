"""Hessian curvature: products, eigenvalues, trace and density against analytic and dense answers (float64)."""

import math

import pytest
import torch
from torch import nn

from lightning_biasprobe.functional.curvature import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_trace,
    parameter_blocks,
)

METHODS = ["double_backward", "recompute", "jvp", "linearize", "vjp"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- fixtures
class Quadratic(nn.Module):
    """``forward`` returns theta; with ``loss_fn = 1/2 theta^T A theta`` the Hessian is A everywhere."""

    def __init__(self, dim, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, x):
        return self.theta


def quadratic_loss(A):
    return lambda theta, _targets: 0.5 * theta @ A @ theta


def symmetric(eigenvalues, seed=0):
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


DUMMY = torch.zeros(1, 1, dtype=torch.float64)


def tanh_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def mlp_data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def dense_hessian(model, x, y, names=None):
    """The Hessian by torch.func.hessian of the loss as a function of the flat parameter vector."""
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    keys = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(v):
        parts = [t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes)]
        out = torch.func.functional_call(model, dict(zip(keys, parts)), (x,))
        return nn.functional.cross_entropy(out, y)

    return torch.func.hessian(loss)(flat)


# ---------------------------------------------------------------------- quadratic: H = A exactly
def test_quadratic_top_and_bottom_eigenvalues_match_the_spectrum():
    spectrum = torch.cat([torch.tensor([9.0, 7.5, 6.0]), torch.linspace(-2.0, 1.0, 37)]).double()
    A = symmetric(spectrum)
    model = Quadratic(40)
    top = hessian_eigenvalues(model, DUMMY, None, loss_fn=quadratic_loss(A), k=3, tol=1e-10)
    assert top.converged
    torch.testing.assert_close(top.eigenvalues, torch.tensor([9.0, 7.5, 6.0]).double(), rtol=1e-9, atol=1e-9)
    assert top.num_products <= 40
    bottom = hessian_eigenvalues(model, DUMMY, None, loss_fn=quadratic_loss(A), k=2, which="smallest", tol=1e-10)
    torch.testing.assert_close(bottom.eigenvalues, spectrum.sort().values[:2], rtol=1e-9, atol=1e-9)


def test_quadratic_hessian_vector_products_are_A_v_for_every_method():
    A = symmetric(torch.linspace(-1, 3, 12))
    v = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for method in METHODS:
        op = HessianOperator(Quadratic(12), DUMMY, None, loss_fn=quadratic_loss(A), hvp_method=method)
        torch.testing.assert_close(op.matvec(v), A @ v, rtol=1e-12, atol=1e-12, msg=method)
        assert op.num_products == 1


def test_hutch_plus_plus_is_exact_for_a_low_rank_hessian():
    # Rank 5 <= the 5 sketch vectors of 15 products: Q spans range(A), the residual part is zero.
    spectrum = torch.cat([torch.tensor([5.0, -3.0, 2.0, 1.5, 0.5]), torch.zeros(45)]).double()
    A = symmetric(spectrum, seed=4)
    result = hessian_trace(Quadratic(50), DUMMY, None, loss_fn=quadratic_loss(A), num_products=15, seed=1)
    assert result.num_products == 15 and result.method == "hutch++"
    assert abs(result.estimate.item() - 6.0) < 1e-10
    assert result.std_error.item() < 1e-10


def test_hutchinson_with_rademacher_vectors_is_exact_for_a_diagonal_hessian():
    A = torch.diag(torch.linspace(-1.0, 4.0, 30, dtype=torch.float64))
    result = hessian_trace(Quadratic(30), DUMMY, None, loss_fn=quadratic_loss(A), num_products=2, method="hutchinson")
    assert abs(result.estimate.item() - A.trace().item()) < 1e-12 and result.std_error.item() < 1e-12


def test_trace_estimators_are_unbiased_and_their_error_bars_hold_on_a_general_quadratic():
    spectrum = torch.cat([torch.tensor([20.0, 12.0, 8.0]), torch.rand(57, generator=torch.Generator().manual_seed(0))])
    A = symmetric(spectrum.double(), seed=5)
    exact = spectrum.sum().item()
    model = Quadratic(60)
    for method in ("hutch++", "hutchinson"):
        runs = [hessian_trace(model, DUMMY, None, loss_fn=quadratic_loss(A), num_products=12, method=method, seed=s)
                for s in range(200)]
        estimates = torch.stack([r.estimate for r in runs])
        spread = estimates.std().item()
        # unbiased: the mean of 200 seeds within 4 standard errors of the exact trace
        assert abs(estimates.mean().item() - exact) <= 4 * spread / math.sqrt(200), method
        # the reported standard error is a fair estimate of the actual spread (within a factor 1.5)
        reported = torch.stack([r.std_error for r in runs]).pow(2).mean().sqrt().item()
        assert spread / 1.5 < reported < spread * 1.5, (method, spread, reported)
        if method == "hutchinson":
            # known variance for Rademacher vectors: 2 * sum_{i != j} A_ij^2, over 12 terms
            offdiag = (A.pow(2).sum() - A.diagonal().pow(2).sum()).item()
            assert abs(spread**2 / (2 * offdiag / 12) - 1) < 0.3  # 200 samples: ~10% sampling error
        else:
            hpp_spread = spread
    # the sketch deflates the three outliers: Hutch++ is much more accurate at the same number of products
    # (measured: about 0.35 of Hutchinson's spread with 4 sketch vectors)
    assert hpp_spread < 0.5 * spread


def test_slq_on_a_diagonal_quadratic_is_exact_gauss_quadrature():
    # Rademacher start v on a diagonal A: v^T A^p v / |v|^2 = tr(A^p)/dim exactly, and the m-node Gauss
    # rule integrates polynomials of degree < 2m exactly, so dim * sum(w * theta^p) = tr(A^p).
    a = torch.linspace(-1.0, 5.0, 25, dtype=torch.float64)
    A = torch.diag(a)
    m = 6
    sd = hessian_spectral_density(Quadratic(25), DUMMY, None, loss_fn=quadratic_loss(A), num_steps=m, num_runs=2)
    assert sd.nodes.shape == (2, m) and sd.num_products == 2 * m
    for p in range(2 * m):
        torch.testing.assert_close(25 * (sd.weights * sd.nodes**p).sum(1), a.pow(p).sum().expand(2),
                                   rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sd.trace(), a.sum(), rtol=1e-10, atol=1e-10)
    mass = torch.trapezoid(sd.density, sd.grid)
    mean = torch.trapezoid(sd.grid * sd.density, sd.grid)
    assert abs(mass.item() - 1) < 1e-6 and abs(mean.item() - a.mean().item()) < 1e-6


def test_slq_with_full_steps_recovers_every_eigenvalue():
    spectrum = torch.tensor([-2.0, -0.5, 0.1, 1.0, 3.0, 3.5, 8.0, 10.0], dtype=torch.float64)
    A = symmetric(spectrum, seed=6)
    sd = hessian_spectral_density(Quadratic(8), DUMMY, None, loss_fn=quadratic_loss(A), num_steps=8, sigma=0.05)
    torch.testing.assert_close(sd.nodes[0], spectrum, rtol=1e-8, atol=1e-8)
    assert abs(sd.weights.sum().item() - 1) < 1e-12
    # the density has a peak at each eigenvalue, and its quantile sample lies in the spectrum's range
    for lam in spectrum:
        i = int((sd.grid - lam).abs().argmin())
        assert sd.density[i] > sd.density[max(i - 8, 0)] and sd.density[i] > sd.density[min(i + 8, len(sd.grid) - 1)]
    sample = sd.sample(500)
    assert sample.shape == (500,) and sample.min() >= -2.3 and sample.max() <= 10.3
    assert torch.all(sample[1:] >= sample[:-1])


def test_least_squares_hessian_is_2_xtx_over_n():
    # L = mean((X theta - y)^2) has H = 2 X^T X / N for every theta (METHODS.md section 9, validation 2).
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(50, 9, generator=g, dtype=torch.float64), torch.randn(50, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(9, 1, bias=False).double()
    H = 2 * X.T @ X / 50
    result = hessian_eigenvalues(model, X, y, k=2, tol=1e-12)
    torch.testing.assert_close(result.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-10, atol=1e-12)
    exact = hessian_trace(model, X, y, num_products=27).estimate  # 9 sketch vectors span all 9 dimensions
    torch.testing.assert_close(exact, H.trace(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- small MLP against the dense Hessian
def test_mlp_products_match_the_dense_hessian_for_every_method_and_chunking():
    model, (x, y) = tanh_mlp(), mlp_data()
    H = dense_hessian(model, x, y)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for method in METHODS:
        op = HessianOperator(model, x, y, hvp_method=method)
        assert op.dim == H.shape[0] and op.method == method
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12, msg=method)
    for method in ("double_backward", "jvp"):
        chunked = HessianOperator(model, x, y, hvp_method=method, chunk_size=7)  # 24 = 7 + 7 + 7 + 3
        torch.testing.assert_close(chunked.matvec(v), H @ v, rtol=1e-10, atol=1e-12, msg=method)
        assert abs(chunked.loss - nn.functional.cross_entropy(model(x), y).item()) < 1e-12


def test_mlp_lanczos_top_k_and_most_negative_match_eigvalsh():
    model, (x, y) = tanh_mlp(), mlp_data()
    exact = torch.linalg.eigvalsh(dense_hessian(model, x, y))
    top = hessian_eigenvalues(model, x, y, k=3, tol=1e-10)
    assert top.converged
    torch.testing.assert_close(top.eigenvalues, exact.flip(0)[:3], rtol=1e-6, atol=1e-6)
    bottom = hessian_eigenvalues(model, x, y, which="smallest", tol=1e-10)
    assert exact[0] < 0  # an untrained tanh net has negative curvature
    torch.testing.assert_close(bottom.eigenvalues, exact[:1], rtol=1e-6, atol=1e-6)


def test_mlp_default_tolerance_gives_relative_error_below_1e_3_with_few_products():
    model, (x, y) = tanh_mlp(), mlp_data()
    lam = torch.linalg.eigvalsh(dense_hessian(model, x, y))[-1].item()
    for seed in range(5):
        r = hessian_eigenvalues(model, x, y, seed=seed, return_vectors=True)
        assert r.converged and abs(r.eigenvalues[0].item() / lam - 1) <= 1e-3
        # the residual bounds the error, and the Ritz vector is an eigenvector to that accuracy
        assert abs(r.eigenvalues[0].item() - lam) <= r.residuals[0].item() + 1e-12
        u = r.eigenvectors[:, 0]
        op = HessianOperator(model, x, y)
        assert (op.matvec(u) - r.eigenvalues[0] * u).norm().item() <= 1e-3 * abs(lam)


def test_mlp_trace_mean_over_seeds_matches_the_exact_trace():
    model, (x, y) = tanh_mlp(), mlp_data()
    exact = dense_hessian(model, x, y).trace().item()
    op = HessianOperator(model, x, y)  # one graph, reused by every estimate
    estimates = torch.stack([hessian_trace(op, num_products=12, seed=s).estimate for s in range(200)])
    # tolerance: 4 standard errors of the mean of 200 independent estimates
    assert abs(estimates.mean().item() - exact) <= 4 * estimates.std().item() / math.sqrt(200)
    assert op.num_products == 200 * 12


def test_block_restriction_is_the_diagonal_block_of_the_hessian():
    model, (x, y) = tanh_mlp(), mlp_data()
    assert parameter_blocks(model) == ["0", "2", "4"]
    names = ["2.weight", "2.bias"]
    block = dense_hessian(model, x, y, names=set(names))
    full = dense_hessian(model, x, y)
    start = 5 * 8 + 8
    torch.testing.assert_close(block, full[start:start + 54, start:start + 54])  # the block is H_bb, not a new H
    top = hessian_eigenvalues(model, x, y, params="2", tol=1e-10)
    torch.testing.assert_close(top.eigenvalues[0], torch.linalg.eigvalsh(block)[-1], rtol=1e-8, atol=1e-10)
    assert HessianOperator(model, x, y, params="2").dim == 54
    assert HessianOperator(model, x, y, params=["0", "4.bias"]).dim == 48 + 3
    tr = hessian_trace(model, x, y, params="2.bias", num_products=18)  # 6 sketch vectors span all 6 dims
    torch.testing.assert_close(tr.estimate, full[start + 48:start + 54, start + 48:start + 54].trace(), rtol=1e-9,
                               atol=1e-12)


def test_frozen_parameters_are_constants():
    model, (x, y) = tanh_mlp(), mlp_data()
    model[0].requires_grad_(False)
    op = HessianOperator(model, x, y)
    assert op.dim == 54 + 21
    full = dense_hessian(model, x, y)
    v = torch.randn(75, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matvec(v), full[48:, 48:] @ v, rtol=1e-10, atol=1e-12)


def test_products_never_touch_grad_requires_grad_or_parameter_hooks():
    model, (x, y) = tanh_mlp(), mlp_data()
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel):
        p.grad = s
    calls = []
    model[0].weight.register_hook(lambda g: calls.append(1))
    for method in METHODS:
        hessian_eigenvalues(model, x, y, hvp_method=method)
    hessian_trace(model, x, y, num_products=6)
    hessian_spectral_density(model, x, y, num_steps=4)
    for p, s in zip(model.parameters(), sentinel):
        assert p.grad is s and torch.all(s == 7.0) and p.requires_grad
    assert calls == []


def test_batchnorm_eval_mode_and_train_mode_with_graph_reuse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    model.eval()
    assert hessian_eigenvalues(model, x, y, tol=1e-8).converged
    model.train()  # samples are coupled; the graph-reusing product is still the batch loss's Hessian
    stats = model[1].running_mean.clone()
    op = HessianOperator(model, x, y)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.isfinite(op.matvec(v)).all()
    assert not torch.equal(stats, model[1].running_mean)  # train mode updates statistics (the guard restores them)
    with pytest.raises(ValueError, match="eval mode"):
        HessianOperator(model, x, y, hvp_method="jvp")
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        HessianOperator(model, x, y, chunk_size=4)


# ---------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    model, (x, y) = tanh_mlp(), mlp_data()
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, x, y, loss_fn=lambda out, t: nn.functional.cross_entropy(out, t, reduction="none"))
    with pytest.raises(FloatingPointError, match="not finite"):
        HessianOperator(model, x, y, loss_fn=lambda out, t: nn.functional.cross_entropy(out, t) * float("nan"))
    with pytest.raises(ValueError, match="no module or parameter named 'fc1'.*'0', '1', '2'"):
        HessianOperator(model, x, y, params="fc1")
    frozen = tanh_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian_eigenvalues(frozen, x, y)
    with pytest.raises(ValueError, match="all frozen"):
        m = tanh_mlp()
        m[0].requires_grad_(False)
        HessianOperator(m, x, y, params="0")
    with pytest.raises(ValueError, match="needs targets"):
        HessianOperator(model, x, None)
    with pytest.raises(ValueError, match="hvp_method"):
        HessianOperator(model, x, y, hvp_method="finite_difference")
    with pytest.raises(ValueError, match="cannot be combined with chunk_size"):
        HessianOperator(model, x, y, hvp_method="linearize", chunk_size=4)
    with pytest.raises(ValueError, match="k must"):
        hessian_eigenvalues(model, x, y, k=0)
    with pytest.raises(ValueError, match="exceeds"):
        hessian_eigenvalues(model, x, y, k=10_000)
    with pytest.raises(ValueError, match="which"):
        hessian_eigenvalues(model, x, y, which="magnitude")
    with pytest.raises(ValueError, match="num_products"):
        hessian_trace(model, x, y, num_products=3)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, x, y, method="girard")
    with pytest.raises(ValueError, match="num_steps"):
        hessian_spectral_density(model, x, y, num_steps=0)
    op = HessianOperator(model, x, y)
    with pytest.raises(ValueError, match="not both"):
        hessian_trace(op, x, y)
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(3))
