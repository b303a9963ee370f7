"""The Sobolev loss: Parseval (s = 0 is the MSE), pure modes, frequency weighting, quadrature, bad input."""

import itertools
import math

import pytest
import torch
from torch import nn

from lightning_biasprobe.nn import SobolevLoss, periodic_trapezoid_weights, sobolev_loss

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cosine(k, n, phase=0.0):
    x = torch.arange(n, dtype=F64) / n
    return torch.cos(2 * math.pi * k * x + phase)


@pytest.mark.parametrize("n", [16, 17])
@pytest.mark.parametrize("shape", [(), (3,), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_s_zero_is_the_mean_squared_error_on_a_uniform_grid(n, shape, dtype):
    a = torch.randn(n, *shape, generator=gen(0)).to(dtype)
    b = torch.randn(n, *shape, generator=gen(1)).to(dtype)
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(sobolev_loss(a, b, 0.0), nn.functional.mse_loss(a, b), rtol=tol, atol=tol)
    torch.testing.assert_close(SobolevLoss()(a, b), nn.MSELoss()(a, b), rtol=tol, atol=tol)


def test_parseval_on_two_and_three_dimensional_grids_and_flattened_grids():
    r = torch.randn(2, 3, 8, 5, dtype=F64, generator=gen(2))
    zero = torch.zeros_like(r)
    torch.testing.assert_close(sobolev_loss(r, zero, 0, dims=(-2, -1)), r.pow(2).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sobolev_loss(r, zero, 0, dims=(1, 2, 3)), r.pow(2).mean(), rtol=1e-12, atol=0)
    per_signal = sobolev_loss(r, zero, 0, dims=(-2, -1), reduction="none")
    assert per_signal.shape == (2, 3)
    torch.testing.assert_close(per_signal, r.pow(2).mean(dim=(-2, -1)), rtol=1e-12, atol=0)
    torch.testing.assert_close(sobolev_loss(r, zero, 0, dims=(-2, -1), reduction="sum"), per_signal.sum())
    # A model evaluated at the 8 x 5 points of meshgrid(indexing="ij"): (40, C) outputs.
    flat = r[0].permute(1, 2, 0).reshape(40, 3)
    torch.testing.assert_close(sobolev_loss(flat, torch.zeros_like(flat), 0.8, grid_shape=(8, 5)),
                               sobolev_loss(r[0], zero[0], 0.8, dims=(-2, -1)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("k0,n", [(1, 32), (5, 64), (7, 15)])
@pytest.mark.parametrize("s", [-1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
def test_a_pure_mode_costs_its_sobolev_weight(k0, n, s):
    r = cosine(k0, n, phase=0.3)
    expected = (1 + k0) ** (2 * s) / 2
    torch.testing.assert_close(sobolev_loss(r, torch.zeros_like(r), s), torch.tensor(expected, dtype=F64),
                               rtol=1e-10, atol=1e-14)
    bessel = (1 + k0**2) ** s / 2
    torch.testing.assert_close(sobolev_loss(r, torch.zeros_like(r), s, weight="bessel"),
                               torch.tensor(bessel, dtype=F64), rtol=1e-10, atol=1e-14)


def test_half_precision_residuals_are_transformed_in_float32():
    a = torch.randn(64, 2, generator=gen(14))
    b = torch.randn(64, 2, generator=gen(15))
    for dtype in (torch.float16, torch.bfloat16):
        value = sobolev_loss(a.to(dtype), b.to(dtype), 1.0)
        assert value.dtype == dtype
        reference = sobolev_loss(a.to(dtype).float(), b.to(dtype).float(), 1.0)
        torch.testing.assert_close(value.float(), reference, rtol=1e-2, atol=0)


def test_the_nyquist_mode_is_counted_once():
    n = 16
    r = cosine(n // 2, n)  # (-1)^j: one coefficient, of modulus 1
    torch.testing.assert_close(sobolev_loss(r, 0 * r, 1.0), torch.tensor((1 + n / 2) ** 2, dtype=F64))


@pytest.mark.parametrize("s", [-1.0, 0.5, 1.5])
def test_two_modes_of_equal_amplitude_are_weighted_by_the_ratio_of_weights(s):
    k1, k2, n = 2, 9, 64
    low, high = cosine(k1, n), cosine(k2, n)
    zero = torch.zeros(n, dtype=F64)
    ratio = sobolev_loss(high, zero, s) / sobolev_loss(low, zero, s)
    torch.testing.assert_close(ratio, torch.tensor(((1 + k2) / (1 + k1)) ** (2 * s), dtype=F64), rtol=1e-10, atol=0)
    both = sobolev_loss(low + high, zero, s)  # orthogonal modes add
    torch.testing.assert_close(both, sobolev_loss(low, zero, s) + sobolev_loss(high, zero, s), rtol=1e-12, atol=0)


def test_high_frequency_residual_costs_more_for_positive_s_with_equal_l2_norm():
    n = 128
    g = gen(3)
    # Random residuals band-limited to low (|k| <= 4) and high (20 <= |k| <= 40) frequencies,
    # rescaled to the same L2 norm.
    x = torch.arange(n, dtype=F64) / n
    low = sum(torch.randn((), generator=g, dtype=F64) * torch.cos(2 * math.pi * k * x + k) for k in range(1, 5))
    high = sum(torch.randn((), generator=g, dtype=F64) * torch.cos(2 * math.pi * k * x + k) for k in range(20, 41))
    high = high * low.norm() / high.norm()
    zero = torch.zeros(n, dtype=F64)
    assert float(sobolev_loss(low, zero, 0)) == pytest.approx(float(sobolev_loss(high, zero, 0)), rel=1e-12)
    for s in (0.25, 1.0, 2.0):
        assert sobolev_loss(high, zero, s) > sobolev_loss(low, zero, s)
        assert sobolev_loss(high, zero, -s) < sobolev_loss(low, zero, -s)
    # max_frequency drops the high band entirely.
    assert float(sobolev_loss(high, zero, 1.0, max_frequency=10)) < 1e-25


def brute_force(r, s, max_frequency=None):
    """Phi_s by explicit float64 sums over a 2-D grid: sum_k (1+|k|)^{2s} |(1/N) sum_j r_j e^{-2 pi i k.x_j}|^2."""
    n1, n2 = r.shape
    k1s = [k if k < n1 / 2 or (n1 % 2 == 1 and k <= n1 // 2) else k - n1 for k in range(n1)]
    k2s = [k if k < n2 / 2 or (n2 % 2 == 1 and k <= n2 // 2) else k - n2 for k in range(n2)]
    total = 0.0
    for k1, k2 in itertools.product(k1s, k2s):
        norm_k = math.hypot(k1, k2)
        if max_frequency is not None and norm_k > max_frequency:
            continue
        re = im = 0.0
        for j1, j2 in itertools.product(range(n1), range(n2)):
            angle = -2 * math.pi * (k1 * j1 / n1 + k2 * j2 / n2)
            re += float(r[j1, j2]) * math.cos(angle)
            im += float(r[j1, j2]) * math.sin(angle)
        total += (1 + norm_k) ** (2 * s) * (re * re + im * im) / (n1 * n2) ** 2
    return total


@pytest.mark.parametrize("max_frequency", [None, 2.5])
def test_matches_a_float64_brute_force_sum_on_a_2d_grid(max_frequency):
    r = torch.randn(6, 7, dtype=F64, generator=gen(4))
    value = sobolev_loss(r, torch.zeros_like(r), 0.7, dims=(0, 1), max_frequency=max_frequency)
    assert float(value) == pytest.approx(brute_force(r, 0.7, max_frequency), rel=1e-12)


def test_gradient_at_s_zero_is_the_mse_gradient():
    a = torch.randn(32, 2, dtype=F64, generator=gen(5), requires_grad=True)
    b = torch.randn(32, 2, dtype=F64, generator=gen(6))
    (g,) = torch.autograd.grad(sobolev_loss(a, b, 0.0), a)
    torch.testing.assert_close(g, 2 * (a - b).detach() / a.numel(), rtol=1e-12, atol=1e-15)


def test_gradcheck_uniform_and_nonuniform():
    a = torch.randn(9, dtype=F64, generator=gen(7), requires_grad=True)
    b = torch.randn(9, dtype=F64, generator=gen(8))
    pts = torch.rand(9, dtype=F64, generator=gen(9))
    assert torch.autograd.gradcheck(lambda t: sobolev_loss(t, b, 1.3), (a,))
    assert torch.autograd.gradcheck(lambda t: sobolev_loss(t, b, -0.7, points=pts, max_frequency=3), (a,))


def test_trapezoid_weights():
    n = 10
    uniform = torch.arange(n, dtype=F64) / n
    torch.testing.assert_close(periodic_trapezoid_weights(uniform), torch.full((n,), 1 / n, dtype=F64))
    pts = torch.rand(50, dtype=F64, generator=gen(10))
    w = periodic_trapezoid_weights(pts)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and bool((w > 0).all())
    # Each weight is half the arc between the point's neighbours on the circle (by brute force).
    for j in range(50):
        d_next = min(float((p - pts[j]) % 1) for i, p in enumerate(pts) if i != j)
        d_prev = min(float((pts[j] - p) % 1) for i, p in enumerate(pts) if i != j)
        assert float(w[j]) == pytest.approx((d_next + d_prev) / 2, abs=1e-12)
    torch.testing.assert_close(periodic_trapezoid_weights(pts + 3), w)  # taken modulo 1


@pytest.mark.parametrize("s", [-1.0, 0.0, 1.0])
def test_nonuniform_path_on_a_uniform_odd_grid_equals_the_fft_path(s):
    n = 15
    x = torch.arange(n, dtype=F64) / n
    r = torch.randn(n, 3, dtype=F64, generator=gen(11))
    zero = torch.zeros_like(r)
    torch.testing.assert_close(sobolev_loss(r, zero, s, points=x), sobolev_loss(r, zero, s), rtol=1e-12, atol=0)
    # The order of the samples does not matter when points travel with them.
    perm = torch.randperm(n, generator=gen(12))
    torch.testing.assert_close(sobolev_loss(r[perm], zero, s, points=x[perm]), sobolev_loss(r, zero, s),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("s", [-1.0, 1.0])
def test_nonuniform_quadrature_recovers_a_pure_mode_on_random_points(s):
    pts = torch.rand(3000, dtype=F64, generator=gen(13)) ** 1.5  # denser near 0
    r = torch.cos(2 * math.pi * 3 * pts)
    value = sobolev_loss(r, torch.zeros_like(r), s, points=pts, max_frequency=10)
    assert float(value) == pytest.approx(4 ** (2 * s) / 2, rel=0.01)
    # Weights from the known density beat plain 1/N weights, which ignore the clustering.
    density = (1 / 1.5) * pts ** (1 / 1.5 - 1)
    dens_value = sobolev_loss(r, torch.zeros_like(r), s, points=pts, quadrature_weights=1 / (3000 * density),
                              max_frequency=10)
    naive = sobolev_loss(r, torch.zeros_like(r), s, points=pts, quadrature_weights=torch.full_like(pts, 1 / 3000),
                         max_frequency=10)
    target = 4 ** (2 * s) / 2
    assert abs(float(dens_value) - target) < abs(float(naive) - target)


def test_bad_input():
    a = torch.randn(8, 1)
    with pytest.raises(ValueError, match="reshape the target"):
        sobolev_loss(a, torch.randn(8), 1.0)
    with pytest.raises(ValueError, match="at least 2 points"):
        sobolev_loss(a, a.clone(), 1.0, dims=-1)
    with pytest.raises(ValueError, match="scalar"):
        sobolev_loss(torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(TypeError, match="floating-point"):
        sobolev_loss(torch.arange(8), torch.arange(8))
    with pytest.raises(TypeError, match="real floating-point"):
        sobolev_loss(torch.randn(8, dtype=torch.complex64), torch.randn(8, dtype=torch.complex64))
    with pytest.raises(TypeError, match="tensors"):
        sobolev_loss([1.0, 2.0], torch.randn(2))
    for s in (float("nan"), float("inf"), "1", None, True):
        with pytest.raises(ValueError, match="s must"):
            sobolev_loss(a, a, s)
    with pytest.raises(ValueError, match="weight"):
        sobolev_loss(a, a, 1.0, weight="sobolev")
    with pytest.raises(ValueError, match="reduction"):
        sobolev_loss(a, a, 1.0, reduction="max")
    with pytest.raises(ValueError, match="max_frequency"):
        sobolev_loss(a, a, 1.0, max_frequency=-1)
    with pytest.raises(ValueError, match="out of range"):
        sobolev_loss(a, a, 1.0, dims=(0, 2))
    with pytest.raises(ValueError, match="same axis twice"):
        sobolev_loss(a, a, 1.0, dims=(0, -2))
    with pytest.raises(ValueError, match="holds 12 points"):
        sobolev_loss(a, a, 1.0, grid_shape=(3, 4))
    with pytest.raises(ValueError, match="single axis"):
        sobolev_loss(torch.randn(4, 4), torch.randn(4, 4), 1.0, dims=(0, 1), grid_shape=(2, 2))
    x = torch.rand(8)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        sobolev_loss(a, a, 1.0, points=x[:5])
    with pytest.raises(ValueError, match="1-D grid only"):
        sobolev_loss(torch.randn(4, 4), torch.randn(4, 4), 1.0, dims=(0, 1), points=torch.rand(4))
    with pytest.raises(ValueError, match="pass points"):
        sobolev_loss(a, a, 1.0, quadrature_weights=torch.ones(8) / 8)
    with pytest.raises(ValueError, match="max_frequency <= 3"):
        sobolev_loss(a, a, 1.0, points=x, max_frequency=4)
    with pytest.raises(ValueError, match="non-negative"):
        sobolev_loss(a, a, 1.0, points=x, quadrature_weights=-torch.ones(8))
    with pytest.raises(ValueError, match="NaN"):
        sobolev_loss(a, a, 1.0, points=torch.full((8,), float("nan")))
    with pytest.raises(ValueError, match="s must"):
        SobolevLoss(s=float("nan"))
    with pytest.raises(ValueError, match="grid_shape"):
        SobolevLoss(grid_shape=(0, 3))
    with pytest.raises(ValueError, match="dims"):
        SobolevLoss(dims=())
    with pytest.raises(ValueError, match="weight"):
        SobolevLoss(weight="h1")
