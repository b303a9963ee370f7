"""Implicit gradient regularization: the IGR term, the explicit regularizer, backward error analysis (float64)."""

import pytest
import torch
from torch import nn

from lightning_biasprobe.functional.curvature import HessianOperator
from lightning_biasprobe.functional.igr import (
    explicit_gradient_regularizer,
    gradient_norm_squared,
    implicit_gradient_regularizer,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tanh_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def flat_grad(loss, params, create_graph=False):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=create_graph)])


def spd(dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.5, 3.0, dim, dtype=torch.float64)) @ q.T


def test_gradient_norm_squared_by_hand_with_none_and_sparse_entries():
    a = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    b = torch.tensor([4.0, 0.0, -1.0])
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([2.0, -2.0]), (5,),
                                     check_invariants=True)
    value = gradient_norm_squared([a, None, b, sparse])
    assert value.dtype == torch.float64 and value.dim() == 0
    assert value.item() == pytest.approx(1 + 4 + 0.25 + 9 + 16 + 1 + 4 + 4, rel=1e-7)  # float32 norms
    assert gradient_norm_squared([None]).item() == 0.0


def test_igr_term_is_lr_over_four_times_the_squared_gradient_norm():
    model, (x, y) = tanh_mlp(), data()
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    by_hand = sum(float((g.double() ** 2).sum()) for g in grads)
    for lr in (0.0, 0.1, 0.37):
        assert implicit_gradient_regularizer(grads, lr).item() == pytest.approx(lr / 4 * by_hand, rel=1e-14)
        from_norm = implicit_gradient_regularizer(torch.tensor(by_hand, dtype=torch.float64), lr)
        assert from_norm.item() == pytest.approx(lr / 4 * by_hand, rel=1e-14)
    with pytest.raises(ValueError, match="learning rate"):
        implicit_gradient_regularizer(grads, -0.1)


def test_quadratic_penalty_gradient_is_h_over_2_a_squared_theta():
    # L = 1/2 theta^T A theta: autograd of (h/4)||grad L||^2 equals (h/2) A^2 theta (METHODS.md section 10).
    A = spd(7)
    theta = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    h = 0.3
    loss = 0.5 * theta @ A @ theta
    penalty = explicit_gradient_regularizer(loss, [theta], coefficient=h / 4)
    assert penalty.detach().item() == pytest.approx(h / 4 * float((A @ theta.detach()).pow(2).sum()), rel=1e-13)
    (grad,) = torch.autograd.grad(penalty, theta)
    torch.testing.assert_close(grad, h / 2 * A @ A @ theta.detach(), rtol=1e-12, atol=1e-14)


def test_explicit_regularizer_gradient_matches_finite_differences_and_hessian_products():
    model, (x, y) = tanh_mlp(), data()
    params = list(model.parameters())
    mu = 0.05

    def objective():
        loss = nn.functional.cross_entropy(model(x), y)
        return loss + explicit_gradient_regularizer(loss, params, coefficient=mu)

    analytic = flat_grad(objective(), params)
    # central differences along every coordinate (float64; step 1e-5 gives ~1e-10 truncation error)
    eps = 1e-5
    numeric = []
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                with torch.enable_grad():
                    up = objective().item()
                flat[i] = old - eps
                with torch.enable_grad():
                    down = objective().item()
                flat[i] = old
                numeric.append((up - down) / (2 * eps))
    torch.testing.assert_close(analytic, torch.tensor(numeric, dtype=torch.float64), rtol=1e-6, atol=1e-8)
    # and it is grad L + 2 mu H grad L, with H from the Hessian-vector product
    g = flat_grad(nn.functional.cross_entropy(model(x), y), params)
    Hg = HessianOperator(model, x, y).matvec(g)
    torch.testing.assert_close(analytic, g + 2 * mu * Hg, rtol=1e-10, atol=1e-12)


def test_microbatch_form_and_the_noise_decomposition():
    # Equal-size minibatches partitioning the data, L = mean_k L_k:
    # mean_k ||grad L_k||^2 = ||grad L||^2 + mean_k ||grad L_k - grad L||^2 (METHODS.md section 10, validation 3).
    model, (x, y) = tanh_mlp(), data(n=12)
    params = list(model.parameters())
    parts = [nn.functional.cross_entropy(model(x[i:i + 3]), y[i:i + 3]) for i in range(0, 12, 3)]
    micro = explicit_gradient_regularizer(parts, params, coefficient=1.0)
    grads = [flat_grad(p, params) for p in parts]
    full = flat_grad(nn.functional.cross_entropy(model(x), y), params)
    torch.testing.assert_close(full, torch.stack(grads).mean(0), rtol=1e-12, atol=1e-14)
    by_hand = torch.stack([g.pow(2).sum() for g in grads]).mean()
    torch.testing.assert_close(micro.detach(), by_hand, rtol=1e-12, atol=0)
    noise = torch.stack([(g - full).pow(2).sum() for g in grads]).mean()
    torch.testing.assert_close(by_hand, full.pow(2).sum() + noise, rtol=1e-12, atol=0)
    assert micro.requires_grad


def test_backward_error_analysis_orders_on_a_quadratic():
    # One GD step (I - hA) theta0 is O(h^2) from the flow of L, and O(h^3) from the flow of the modified loss
    # L + (h/4)||grad L||^2, whose gradient is (A + (h/2) A^2) theta: halving h cuts the errors ~4x and ~8x.
    A = spd(5, seed=3)
    theta0 = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def modified_matrix(h):
        # build grad of L~ = L + R with our regularizer helper, column by column (it is linear in theta)
        cols = []
        for i in range(5):
            theta = torch.zeros(5, dtype=torch.float64)
            theta[i] = 1.0
            theta.requires_grad_(True)
            loss = 0.5 * theta @ A @ theta
            total = loss + explicit_gradient_regularizer(loss, [theta], coefficient=h / 4)
            cols.append(torch.autograd.grad(total, theta)[0])
        return torch.stack(cols, dim=1)

    errors = []
    for h in (0.1, 0.05, 0.025):
        step = theta0 - h * A @ theta0
        plain = torch.linalg.matrix_exp(-h * A) @ theta0
        M = modified_matrix(h)
        torch.testing.assert_close(M, A + h / 2 * A @ A, rtol=1e-12, atol=1e-12)
        modified = torch.linalg.matrix_exp(-h * M) @ theta0
        errors.append(((step - plain).norm().item(), (step - modified).norm().item()))
    for (p1, m1), (p2, m2) in zip(errors, errors[1:]):
        assert 3.5 < p1 / p2 < 4.5, errors
        assert 7.0 < m1 / m2 < 9.0, errors
        assert m1 < p1


def test_explicit_regularizer_leaves_grad_alone_and_rejects_bad_input():
    model, (x, y) = tanh_mlp(), data()
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    explicit_gradient_regularizer(loss, params)
    assert all(p.grad is None for p in params)
    with pytest.raises(ValueError, match="scalar"):
        explicit_gradient_regularizer(nn.functional.cross_entropy(model(x), y, reduction="none"), params)
    with pytest.raises(ValueError, match="require gradients"):
        explicit_gradient_regularizer(loss, [p.detach() for p in params])
    with torch.no_grad():
        detached = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="does not require gradients"):
        explicit_gradient_regularizer(detached, params)
    with pytest.raises(ValueError, match="at least one loss"):
        explicit_gradient_regularizer([], params)
