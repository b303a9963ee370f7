"""geometric_complexity: analytic cases, brute force, estimator statistics, bad input."""

import math

import pytest
import torch
from torch import nn

from lightning_biasprobe.functional import geometric_complexity


def brute_force_gc(model, x):
    """Per-sample input Jacobians with torch.autograd.functional.jacobian, one sample at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda xi: model(xi.unsqueeze(0)).squeeze(0), x[i])
        total += jac.double().pow(2).sum()
    return total / x.shape[0]


def tanh_mlp(d=6, h=11, c=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, c)).double()


def test_linear_model_equals_squared_frobenius_norm_of_w():
    torch.manual_seed(1)
    model = nn.Linear(7, 5).double()
    for x in (torch.randn(13, 7, dtype=torch.float64), 100 * torch.rand(3, 7, dtype=torch.float64)):
        gc = geometric_complexity(model, x)
        torch.testing.assert_close(gc, model.weight.detach().pow(2).sum(), rtol=1e-13, atol=0)
    assert gc.dtype == torch.float64 and gc.dim() == 0


def test_homogeneity_scaling_the_function_scales_gc_by_a_squared():
    model = tanh_mlp()
    x = torch.randn(20, 6, dtype=torch.float64)
    base = geometric_complexity(model, x)
    for a in (3.0, -0.25):
        scaled = geometric_complexity(model, x, forward=lambda m, inp, a=a: a * m(inp))
        torch.testing.assert_close(scaled, a**2 * base, rtol=1e-12, atol=0)


def test_tanh_mlp_matches_per_sample_jacobian_loop_in_float64():
    model = tanh_mlp()
    x = torch.randn(17, 6, dtype=torch.float64)
    torch.testing.assert_close(geometric_complexity(model, x), brute_force_gc(model, x), rtol=1e-10, atol=1e-12)


def test_sine_on_whole_periods_gives_omega_squared_over_two():
    omega = 3.0
    n = 400
    x = (torch.arange(n, dtype=torch.float64) * (2 * math.pi / omega) / n).unsqueeze(1)  # one whole period
    gc = geometric_complexity(nn.Identity(), x, forward=lambda m, inp: torch.sin(omega * inp))
    assert abs(gc.item() - omega**2 / 2) < 1e-10


def test_chunk_size_does_not_change_the_value_and_per_sample_reduction():
    model = tanh_mlp()
    x = torch.randn(23, 6, dtype=torch.float64)
    whole = geometric_complexity(model, x, chunk_size=None)
    per_sample = geometric_complexity(model, x, chunk_size=5, reduction="none")
    assert per_sample.shape == (23,)
    torch.testing.assert_close(per_sample.mean(), whole, rtol=1e-13, atol=0)
    torch.testing.assert_close(geometric_complexity(model, x, chunk_size=1), whole, rtol=1e-13, atol=0)


def test_probs_and_log_probs_outputs_match_brute_force():
    model = tanh_mlp()
    x = torch.randn(9, 6, dtype=torch.float64)
    probs = geometric_complexity(model, x, output="probs")
    expected = brute_force_gc(lambda z: torch.softmax(model(z), -1), x)
    torch.testing.assert_close(probs, expected, rtol=1e-10, atol=1e-14)
    log_probs = geometric_complexity(model, x, output="log_probs")
    torch.testing.assert_close(log_probs, brute_force_gc(lambda z: torch.log_softmax(model(z), -1), x),
                               rtol=1e-10, atol=1e-14)


def test_several_inputs_and_sequence_outputs():
    torch.manual_seed(2)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4).double(), nn.Linear(2, 4).double()

        def forward(self, u, v):
            return torch.tanh(self.a(u) + self.b(v)).unsqueeze(1).repeat(1, 2, 1)  # (N, T=2, C=4)

    model = TwoInputs()
    u, v = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    gc = geometric_complexity(model, (u, v))
    total = torch.zeros((), dtype=torch.float64)
    for i in range(8):
        ju, jv = torch.autograd.functional.jacobian(lambda a, b: model(a[None], b[None])[0], (u[i], v[i]))
        total += ju.pow(2).sum() + jv.pow(2).sum()
    torch.testing.assert_close(gc, total / 8, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_projection_estimator_is_unbiased(distribution):
    """Mean over 400 seeds (k=5 each, 2000 projections) within 4 standard errors of the exact value,
    and within 3% of it (the spread of one estimate is far wider than that)."""
    model = tanh_mlp(c=6)
    x = torch.randn(4, 6, dtype=torch.float64)
    exact = geometric_complexity(model, x).item()
    draws = torch.stack([
        geometric_complexity(model, x, estimator="projection", num_projections=5, seed=s, distribution=distribution)
        for s in range(400)
    ])
    mean, se = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    assert abs(mean - exact) < 4 * se
    assert abs(mean - exact) / exact < 0.03
    assert draws.std().item() / exact > 0.03  # the test is not vacuous: single estimates do vary


def test_projection_estimator_is_reproducible_and_leaves_global_rng_alone():
    model = tanh_mlp()
    x = torch.randn(10, 6, dtype=torch.float64)
    state = torch.get_rng_state()
    a = geometric_complexity(model, x, estimator="projection", num_projections=3, seed=7)
    b = geometric_complexity(model, x, estimator="projection", num_projections=3, seed=7)
    c = geometric_complexity(model, x, estimator="projection", num_projections=3, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.item() == b.item() and a.item() != c.item()


def test_k_one_rademacher_is_exact_for_a_single_output():
    model = tanh_mlp(c=1)
    x = torch.randn(12, 6, dtype=torch.float64)
    torch.testing.assert_close(geometric_complexity(model, x, estimator="projection", seed=3),
                               geometric_complexity(model, x), rtol=1e-13, atol=0)


def test_bad_inputs_raise_clear_errors():
    model = tanh_mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="estimator"):
        geometric_complexity(model, x, estimator="hutch")
    with pytest.raises(ValueError, match="output"):
        geometric_complexity(model, x, output="softmax")
    with pytest.raises(ValueError, match="num_projections"):
        geometric_complexity(model, x, estimator="projection", num_projections=0)
    with pytest.raises(ValueError, match="floating point"):
        geometric_complexity(nn.Embedding(10, 3), torch.arange(5))
    bn = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).double().train()
    with pytest.raises(ValueError, match="BatchNorm"):
        geometric_complexity(bn, x)
    with pytest.raises(RuntimeError, match="differentiably"):
        geometric_complexity(model, x, forward=lambda m, inp: m(inp).detach())


def test_does_not_touch_parameter_gradients():
    model = tanh_mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    geometric_complexity(model, x)
    assert all(p.grad is None for p in model.parameters())
