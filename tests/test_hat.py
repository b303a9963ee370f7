"""The Hat activation: values, support, integral, partition of unity, its gradient, torch.func."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from lightning_biasprobe.nn import Hat, hat, place_hats_


def three_relu(x):
    """hat(x) = relu(x) - 2 relu(x - 1) + relu(x - 2), differentiated by autograd through relu."""
    return torch.relu(x) - 2 * torch.relu(x - 1) + torch.relu(x - 2)


class ThreeReLU(nn.Module):
    def forward(self, x):
        return three_relu(x)


def grid(dtype=torch.float64):
    # Dense, and containing the kinks 0, 1, 2 and points outside the support exactly.
    return torch.cat([torch.linspace(-3, 5, 8001, dtype=dtype), torch.tensor([0.0, 1.0, 2.0], dtype=dtype)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_values(dtype):
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 0.25, 1.75], dtype=dtype)
    expected = torch.tensor([0.0, 0.0, 0.5, 1.0, 0.5, 0.0, 0.0, 0.25, 0.25], dtype=dtype)
    assert torch.equal(hat(x), expected)
    assert torch.equal(Hat()(x), expected)
    assert hat(x).dtype == dtype


def test_equals_the_three_relu_identity_on_a_dense_grid():
    x = grid()
    torch.testing.assert_close(hat(x), three_relu(x), rtol=0, atol=1e-15)


def test_support_and_peak():
    x = grid()
    y = hat(x)
    outside = (x <= 0) | (x >= 2)
    assert torch.all(y[outside] == 0)
    assert torch.all(y[~outside] > 0)
    assert float(y.max()) == 1.0 and float(x[y.argmax()]) == 1.0


def test_integral_is_one_and_integer_shifts_partition_unity():
    # The trapezoid rule is exact for a piecewise-linear function whose kinks are grid points.
    x = torch.linspace(-1, 3, 4001, dtype=torch.float64)
    assert float(torch.trapezoid(hat(x), x)) == pytest.approx(1.0, abs=1e-12)
    t = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10 - 5
    total = sum(hat(t - k) for k in range(-8, 9))
    torch.testing.assert_close(total, torch.ones_like(t), rtol=0, atol=1e-12)


def test_gradient_equals_autograd_of_the_three_relu_identity_including_the_kinks():
    x1 = grid().requires_grad_()
    x2 = grid().requires_grad_()
    upstream = torch.randn(x1.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (g1,) = torch.autograd.grad(hat(x1), x1, upstream)
    (g2,) = torch.autograd.grad(three_relu(x2), x2, upstream)
    assert torch.equal(g1, g2)
    # The convention stated in the docstring: left derivatives 0, +1, -1 at the kinks 0, 1, 2.
    kinks = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(hat(kinks).sum(), kinks)
    assert g.tolist() == [0.0, 1.0, -1.0]
    # Zero gradient outside the support, slopes +-1 inside.
    x = torch.tensor([-2.0, -1e-9, 0.3, 0.999, 1.001, 1.7, 2.0 + 1e-9, 4.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(hat(x).sum(), x)
    assert g.tolist() == [0.0, 0.0, 1.0, 1.0, -1.0, -1.0, 0.0, 0.0]


def test_gradcheck_and_gradgradcheck_away_from_the_kinks():
    x = torch.tensor([-0.5, 0.2, 0.7, 1.3, 1.9, 2.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(hat, (x,))
    assert torch.autograd.gradgradcheck(hat, (x,))


def test_scale_and_centered_variants():
    x = grid()
    torch.testing.assert_close(hat(x, scale=0.5), hat(x / 0.5), rtol=0, atol=0)
    torch.testing.assert_close(Hat(scale=2.0, centered=True)(x), hat(x / 2 + 1), rtol=0, atol=0)
    y = hat(x, scale=0.5)
    assert torch.all(y[(x <= 0) | (x >= 1)] == 0) and float(hat(torch.tensor(0.5), scale=0.5)) == 1.0
    y = hat(x, centered=True)
    assert torch.all(y[(x <= -1) | (x >= 1)] == 0) and float(y[x == 0][0]) == 1.0


def networks(seed=0):
    """The same MLP weights with Hat and with the 3-ReLU identity (float64)."""
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(3, 16), Hat(), nn.Linear(16, 16), Hat(), nn.Linear(16, 2)).double()
    b = nn.Sequential(nn.Linear(3, 16), ThreeReLU(), nn.Linear(16, 16), ThreeReLU(), nn.Linear(16, 2)).double()
    b.load_state_dict(a.state_dict())
    return a, b


def test_torch_func_transforms_match_the_three_relu_network():
    a, b = networks()
    x = torch.rand(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    params = {k: v.detach() for k, v in a.named_parameters()}

    def per_sample(model):
        return lambda p, xi: functional_call(model, p, (xi[None],))[0]

    # Per-sample parameter Jacobians (the NTK probes' path): vmap over jacrev.
    ja = vmap(jacrev(per_sample(a)), in_dims=(None, 0))(params, x)
    jb = vmap(jacrev(per_sample(b)), in_dims=(None, 0))(params, x)
    for k in params:
        torch.testing.assert_close(ja[k], jb[k], rtol=0, atol=1e-12)
    # Forward mode (jvp) through the custom function.
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    _, ta = jvp(lambda p: functional_call(a, p, (x,)), (params,), (tangent,))
    _, tb = jvp(lambda p: functional_call(b, p, (x,)), (params,), (tangent,))
    torch.testing.assert_close(ta, tb, rtol=0, atol=1e-12)


def test_hessian_vector_products_match_the_three_relu_network():
    a, b = networks(seed=3)
    x = torch.rand(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
    y = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def hvp(model):
        params = list(model.parameters())
        loss = (model(x) - y).pow(2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        v = [torch.ones_like(p) for p in params]
        return torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)

    for ha, hb in zip(hvp(a), hvp(b)):
        torch.testing.assert_close(ha, hb, rtol=1e-12, atol=1e-12)


def test_place_hats_puts_a_live_hat_over_every_unit_centre():
    layer = nn.Linear(1, 64)
    place_hats_(layer, -1.0, 3.0, generator=torch.Generator().manual_seed(0))
    h = 8 * 4.0 / 64
    assert torch.allclose(layer.weight, torch.full_like(layer.weight, 1 / h))
    centres = (1 - layer.bias.detach()) * h
    assert float(centres.min()) >= -1.0 and float(centres.max()) <= 3.0
    with torch.no_grad():
        peak = hat(layer(centres[:, None].float()))  # unit i evaluated at every centre
    torch.testing.assert_close(torch.diagonal(peak), torch.ones(64), rtol=0, atol=1e-5)
    x = torch.linspace(-1, 3, 401)[:, None]
    with torch.no_grad():
        alive = (hat(layer(x)) > 0).sum(1)
    assert int(alive[20:-20].min()) >= 1  # every interior data point is inside some unit's support


def test_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        hat(torch.arange(3))
    for scale in (0, -1.0, float("inf"), "2", True):
        with pytest.raises(ValueError, match="scale"):
            Hat(scale=scale)
    with pytest.raises(ValueError, match="scale"):
        hat(torch.ones(2), scale=0.0)
    with pytest.raises(ValueError, match="in_features=1"):
        place_hats_(nn.Linear(2, 8))
    with pytest.raises(ValueError, match="low < high"):
        place_hats_(nn.Linear(1, 8), 1.0, 0.0)
    with pytest.raises(ValueError, match="bias"):
        place_hats_(nn.Linear(1, 8, bias=False))
    with pytest.raises(ValueError, match="half_width"):
        place_hats_(nn.Linear(1, 8), half_width=-0.1)
