"""diffusion_exponent: random walk, ballistic path, saturation, the sliding window, bad input."""

import math

import pytest
import torch

from lightning_biasprobe.functional.diffusion import diffusion_exponent

LOG_STEPS = sorted({math.floor(5 * 1.15**k) for k in range(80) if 5 * 1.15**k <= 2000})


def random_walk_distances(dim: int, steps: int, seed: int) -> torch.Tensor:
    """||theta_t - theta_0|| of theta_{t+1} = theta_t + xi_t, xi_t ~ N(0, I_dim), t = 1..steps."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.zeros(dim, dtype=torch.float64)
    out = torch.empty(steps, dtype=torch.float64)
    for t in range(steps):
        theta += torch.randn(dim, generator=g, dtype=torch.float64)
        out[t] = theta.norm()
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_pure_random_walk_gives_one_half(seed):
    """E||theta_t||^2 = t * dim, so the distance grows as t^(1/2); with dim = 4096 the relative
    fluctuation of one point is ~2 %, and the fitted slope stays within 0.05 of 1/2."""
    d = random_walk_distances(4096, 2000, seed)
    t = torch.tensor(LOG_STEPS)
    fit = diffusion_exponent(t, d[t - 1])
    assert abs(fit.exponent - 0.5) < 0.05
    assert fit.r2 > 0.99 and fit.num_points == len(LOG_STEPS)
    last_decade = diffusion_exponent(t, d[t - 1], window=1.0)
    assert abs(last_decade.exponent - 0.5) < 0.05
    assert last_decade.t_end == LOG_STEPS[-1] and last_decade.t_start >= LOG_STEPS[-1] / 10
    assert last_decade.num_points < fit.num_points


def test_ballistic_path_gives_exactly_one():
    g = torch.Generator().manual_seed(2)
    theta0, u = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    t = torch.tensor(LOG_STEPS, dtype=torch.float64)
    d = [float(((theta0 + u * s) - theta0).norm()) for s in t]
    fit = diffusion_exponent(t.tolist(), d)
    assert fit.exponent == pytest.approx(1.0, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.stderr < 1e-12
    assert math.exp(fit.intercept) == pytest.approx(float(u.norm()), rel=1e-10)  # d = ||u|| t


def test_power_law_exponent_and_prefactor_are_recovered_exactly():
    t = torch.tensor([3.0, 10, 30, 100, 300, 1000], dtype=torch.float64)
    fit = diffusion_exponent(t, 0.7 * t**0.37)
    assert fit.exponent == pytest.approx(0.37, abs=1e-12) and math.exp(fit.intercept) == pytest.approx(0.7, rel=1e-12)


def test_sliding_window_follows_saturation():
    """An Ornstein-Uhlenbeck-like curve: sqrt(1 - exp(-t/tau)) grows as t^(1/2) early and saturates."""
    tau = 50.0
    t = torch.tensor(LOG_STEPS, dtype=torch.float64)
    d = (1 - torch.exp(-t / tau)).sqrt()
    early = diffusion_exponent(t[t <= 20], d[t <= 20])
    late = diffusion_exponent(t, d, window=0.5)  # t in [1771 / sqrt(10), 1771]
    assert abs(early.exponent - 0.5) < 0.1
    assert abs(late.exponent) < 1e-3
    assert late.t_end == LOG_STEPS[-1] and late.t_start >= LOG_STEPS[-1] / 10**0.5


def test_points_before_t_min_and_zero_distances_are_ignored():
    t = [0, 1, 2, 4, 8]
    d = [0.0, 1.0, 2.0, 4.0, 8.0]
    fit = diffusion_exponent(t, d)
    assert fit.num_points == 4 and fit.exponent == pytest.approx(1.0, abs=1e-12)
    assert diffusion_exponent(t, d, t_min=2).num_points == 3
    r2 = diffusion_exponent([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0]).r2
    assert 0 < r2 < 1


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="same length"):
        diffusion_exponent([1, 2, 3], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        diffusion_exponent([1, 2, 3], [1.0, -2.0, 3.0])
    with pytest.raises(ValueError, match="at least 3 points"):
        diffusion_exponent([0, 1, 2], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="more than one time"):
        diffusion_exponent([2, 2, 2], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        diffusion_exponent([1, 2, 3], [1.0, float("nan"), 3.0])
    with pytest.raises(ValueError, match="window"):
        diffusion_exponent([1, 2, 3], [1.0, 2.0, 3.0], window=0)
    with pytest.raises(ValueError, match="min_points"):
        diffusion_exponent([1, 2, 3], [1.0, 2.0, 3.0], min_points=1)
    with pytest.raises(ValueError, match="t_min"):
        diffusion_exponent([1, 2, 3], [1.0, 2.0, 3.0], t_min=0)
