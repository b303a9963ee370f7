"""Gradient noise, functional form: per-sample gradients, the tail index, B_simple and GSNR, the streamed statistics."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import levy_stable
from torch import nn

from lightning_biasprobe.functional.noise import (
    gradient_noise_scale,
    gradient_noise_statistics,
    minibatch_noise,
    per_sample_gradients,
    tail_index,
)


def tanh_mlp(d=5, h=7, c=3, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).to(dtype)


def data(n=13, d=5, c=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


def flat_gradients(model, inputs, targets=None, **kwargs):
    """per_sample_gradients as one (N, P) matrix."""
    return per_sample_gradients(model, inputs, targets, flatten=True, **kwargs)


def loop_gradients(model, x, y, loss=nn.functional.cross_entropy):
    """The brute force: one torch.autograd.grad per sample, flattened in named_parameters order."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss(model(x[i:i + 1]), y[i:i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------- per-sample gradients
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_per_sample_gradients_equal_a_loop_of_autograd_grad(dtype, tol):
    model = tanh_mlp(dtype=dtype)
    x, y = data(dtype=dtype)
    fast = flat_gradients(model, x, y)
    slow = loop_gradients(model, x, y)
    assert fast.shape == (13, sum(p.numel() for p in model.parameters())) and fast.dtype == dtype
    torch.testing.assert_close(fast, slow, rtol=0, atol=tol)
    assert fast.abs().max() > 1e-3  # not vacuous


def test_mean_of_per_sample_gradients_is_the_minibatch_gradient():
    model = tanh_mlp()
    x, y = data()
    grads = flat_gradients(model, x, y)
    batch = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    torch.testing.assert_close(grads.mean(0), torch.cat([g.reshape(-1) for g in batch]), rtol=1e-13, atol=1e-15)


def test_chunks_dict_output_and_loop_method_agree():
    model = tanh_mlp()
    x, y = data(n=11)
    whole = flat_gradients(model, x, y, chunk_size=None)
    for chunk in (1, 4, 11, 100):
        torch.testing.assert_close(flat_gradients(model, x, y, chunk_size=chunk), whole, rtol=0, atol=1e-14)
    torch.testing.assert_close(flat_gradients(model, x, y, method="loop"), whole, rtol=0, atol=1e-14)
    as_dict = per_sample_gradients(model, x, y, chunk_size=3)  # the default form: {name: (N, *shape)}
    assert list(as_dict) == [n for n, _ in model.named_parameters()]
    assert as_dict["0.weight"].shape == (11, 7, 5)
    torch.testing.assert_close(torch.cat([g.reshape(11, -1) for g in as_dict.values()], 1), whole, rtol=0, atol=1e-14)


def test_frozen_parameters_are_left_out_and_grads_untouched():
    model = tanh_mlp()
    model[0].weight.requires_grad_(False)
    x, y = data()
    grads = flat_gradients(model, x, y)
    assert grads.shape[1] == 7 + 7 * 3 + 3
    torch.testing.assert_close(grads, loop_gradients(model, x, y), rtol=0, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_forward_adapter_several_inputs_and_mse_loss():
    torch.manual_seed(3)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2).double(), nn.Linear(4, 2).double()

        def forward(self, u, v):
            return {"logits": torch.tanh(self.a(u)) * self.b(v)}

    model = TwoInputs()
    u, v = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    target = torch.randn(6, 2, dtype=torch.float64)
    grads = flat_gradients(model, (u, v), target)  # dict output read through "logits", MSE for float targets
    params = list(model.parameters())
    for i in range(6):
        loss = nn.functional.mse_loss(model(u[i:i + 1], v[i:i + 1])["logits"], target[i:i + 1])
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        torch.testing.assert_close(grads[i], expected, rtol=0, atol=1e-13)
    scaled = flat_gradients(model, (u, v), target, forward=lambda m, inp: 2 * m(*inp)["logits"])
    assert not torch.allclose(scaled, grads)


def test_batchnorm_in_eval_mode_works_and_in_train_mode_is_explained():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = data()
    model.train()
    model(x)  # non-trivial running statistics
    model.eval()
    torch.testing.assert_close(flat_gradients(model, x, y), loop_gradients(model, x, y), rtol=0, atol=1e-12)
    model.train()
    running = model[1].running_mean.clone()
    with pytest.raises(ValueError, match=r"BatchNorm.*train mode.*model\.eval\(\)"):
        flat_gradients(model, x, y)
    with pytest.raises(ValueError, match="BatchNorm"):
        gradient_noise_statistics(model, x, y, batch_size=2)
    assert torch.equal(model[1].running_mean, running)


# --------------------------------------------------------------------------------------- tail index
# Tolerances: about 4 standard deviations of the estimate at K = 2**20 (measured over 12 seeds:
# sd 0.008, 0.014, 0.016, 0.025 for alpha = 1.2, 1.5, 1.8, 2.0).
@pytest.mark.parametrize("alpha, tol", [(1.2, 0.04), (1.5, 0.06), (1.8, 0.07), (2.0, 0.1)])
def test_tail_index_recovers_alpha_of_symmetric_stable_samples(alpha, tol):
    samples = levy_stable.rvs(alpha, 0.0, size=2**20, random_state=np.random.default_rng(2024))
    result = tail_index(torch.from_numpy(samples))
    assert abs(result.alpha - alpha) < tol, result
    assert result.num_values == 2**20 and result.block_size == 1024 and result.num_blocks == 1024
    assert result.zeros_dropped == 0 and result.values_trimmed == 0


def test_tail_index_gaussian_and_cauchy_reference_values():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(2**20, generator=g, dtype=torch.float64)
    assert abs(tail_index(gauss).alpha - 2.0) < 0.05
    cauchy = torch.tan(math.pi * (torch.rand(2**20, generator=g, dtype=torch.float64) - 0.5))
    assert abs(tail_index(cauchy).alpha - 1.0) < 0.05


def test_standardized_control_is_two_for_a_gaussian_scale_mixture_where_pooling_is_not():
    """METHODS.md §12 pitfall 1: per-coordinate log-normal scales (sigma = 1) of Gaussian noise."""
    g = torch.Generator().manual_seed(5)
    m, p = 64, 2**14
    scales = torch.randn(p, generator=g, dtype=torch.float64).exp()
    noise = torch.randn(m, p, generator=g, dtype=torch.float64) * scales
    pooled = tail_index(noise)
    control = tail_index(noise, standardize=True)
    assert pooled.alpha < 1.75  # looks heavy-tailed (about 1.56-1.58)
    assert abs(control.alpha - 2.0) < 0.1
    assert pooled.num_values == control.num_values == m * p
    # Same noise with a common scale: both say Gaussian (the pooled estimate is fooled only by mixing).
    plain = torch.randn(m, p, generator=g, dtype=torch.float64) * 3.0
    assert abs(tail_index(plain).alpha - 2.0) < 0.1


def test_tail_index_is_scale_invariant_drops_zeros_and_clips():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 500, generator=g, dtype=torch.float64)
    base = tail_index(x)
    assert tail_index(1e-7 * x).alpha == pytest.approx(base.alpha, rel=1e-10)
    assert base.alpha_clipped == (2.0 if base.inv_alpha <= 0.5 else base.alpha)
    with_zeros = x.clone()
    with_zeros[:, :10] = 0  # ten dead coordinates
    r = tail_index(with_zeros)
    assert r.zeros_dropped == 400 and r.num_values + r.values_trimmed == 40 * 490
    rs = tail_index(with_zeros, standardize=True)
    assert rs.coordinates_dropped == 10 and rs.zeros_dropped == 0
    assert 0 < r.alpha_clipped <= 2 and 0 < rs.alpha_clipped <= 2


def test_block_size_rules():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert tail_index(x).block_size == 31 and tail_index(x).values_trimmed == 1000 - 31 * 32
    ref = tail_index(x, block_size="divisor")  # the reference code: largest divisor <= sqrt(1000)
    assert ref.block_size == 25 and ref.num_blocks == 40 and ref.values_trimmed == 0
    # The estimate by hand with K1 = 25.
    blocks = x.reshape(40, 25).sum(1)
    inv = (blocks.abs().log().mean() - x.abs().log().mean()) / math.log(25)
    assert ref.inv_alpha == pytest.approx(float(inv), rel=1e-12) and ref.alpha == pytest.approx(1 / float(inv))
    assert tail_index(x, block_size=10).num_blocks == 100
    with pytest.raises(ValueError, match="prime"):
        tail_index(x[:997], block_size="divisor")
    with pytest.raises(ValueError, match="block_size"):
        tail_index(x, block_size=1)


def test_tail_index_bad_inputs():
    with pytest.raises(TypeError, match="floating"):
        tail_index(torch.arange(10))
    with pytest.raises(ValueError, match="NaN"):
        tail_index(torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="at least 4"):
        tail_index(torch.tensor([0.0, 0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="standardize"):
        tail_index(torch.randn(100), standardize=True)
    with pytest.raises(ValueError, match="shape"):
        tail_index(torch.randn(2, 3, 4))


# --------------------------------------------------------------------------------------- B_simple and GSNR
def test_b_simple_and_gsnr_match_a_hand_computation_on_a_tiny_model():
    """f(x) = w x + b, loss (f(x) - y)^2: per-sample gradient (2 r x, 2 r) with residual r = w x + b - y."""
    model = nn.Linear(1, 1).double()
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.bias.fill_(1.0)
    xs, ys = [1.0, 2.0, -1.0, 3.0], [0.0, 1.0, 0.5, -1.0]
    x = torch.tensor(xs, dtype=torch.float64).unsqueeze(1)
    y = torch.tensor(ys, dtype=torch.float64).unsqueeze(1)
    grads = flat_gradients(model, x, y)  # MSE over one output: (f - y)^2
    hand = []
    for xi, yi in zip(xs, ys):
        r = 2.0 * xi + 1.0 - yi
        hand.append([2 * r * xi, 2 * r])
    torch.testing.assert_close(grads, torch.tensor(hand, dtype=torch.float64), rtol=0, atol=1e-15)

    n = 4
    mean = [sum(h[j] for h in hand) / n for j in range(2)]
    var = [sum((h[j] - mean[j]) ** 2 for h in hand) / (n - 1) for j in range(2)]
    trace = var[0] + var[1]
    g2 = mean[0] ** 2 + mean[1] ** 2 - trace / n
    assert g2 > 0
    result = gradient_noise_scale(grads)
    assert result.trace_cov == pytest.approx(trace, rel=1e-14)
    assert result.grad_sq_norm == pytest.approx(g2, rel=1e-13)
    assert result.b_simple == pytest.approx(trace / g2, rel=1e-13)
    assert result.snr == pytest.approx(g2 / trace, rel=1e-13)
    assert result.mean_grad_sq_norm == pytest.approx(mean[0] ** 2 + mean[1] ** 2, rel=1e-14)
    assert result.gsnr == pytest.approx((mean[0] ** 2 / var[0] + mean[1] ** 2 / var[1]) / 2, rel=1e-13)
    assert result.num_samples == 4 and result.gsnr_coordinates == 2


def test_grad_sq_norm_is_unbiased_and_b_simple_is_inf_when_noise_hides_the_signal():
    """Gaussian 'per-sample gradients' with known G and Sigma: average over 2000 draws of N = 8."""
    g = torch.Generator().manual_seed(8)
    mean = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    std = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    draws = [gradient_noise_scale(mean + std * torch.randn(8, 3, generator=g, dtype=torch.float64))
             for _ in range(2000)]
    g2 = torch.tensor([d.grad_sq_norm for d in draws])
    tr = torch.tensor([d.trace_cov for d in draws])
    true_g2, true_tr = float(mean.square().sum()), float(std.square().sum())
    assert abs(g2.mean().item() - true_g2) < 4 * g2.std().item() / math.sqrt(2000)
    assert abs(tr.mean().item() - true_tr) < 4 * tr.std().item() / math.sqrt(2000)
    biased = torch.tensor([d.mean_grad_sq_norm for d in draws]).mean().item()
    assert biased > true_g2 + 0.5 * true_tr / 8  # the plug-in ||g_bar||^2 is biased by tr(Sigma)/N
    assert any(d.grad_sq_norm <= 0 for d in draws)
    assert all(d.b_simple == math.inf and d.snr <= 0 for d in draws if d.grad_sq_norm <= 0)
    assert all(math.isfinite(d.b_simple) and d.b_simple > 0 for d in draws if d.grad_sq_norm > 0)


def test_constant_coordinates_are_left_out_of_gsnr():
    grads = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    r = gradient_noise_scale(grads)
    assert r.gsnr_coordinates == 1 and r.gsnr == pytest.approx(4.0 / 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        gradient_noise_scale(grads[:1])


# --------------------------------------------------------------------------------------- streamed statistics
def test_streamed_statistics_equal_the_composed_functions():
    model = tanh_mlp(d=6, h=9, c=4)
    x, y = data(n=50, d=6, c=4)
    stats = gradient_noise_statistics(model, x, y, batch_size=4, chunk_size=9, shuffle=False)
    grads = flat_gradients(model, x, y)
    noise = minibatch_noise(grads, 4)
    assert noise.shape == (12, grads.shape[1]) and stats.num_minibatches == 12 and stats.num_samples == 50
    torch.testing.assert_close(noise.sum(0), torch.zeros(grads.shape[1], dtype=torch.float64), rtol=0, atol=1e-15)
    expected_tail, expected_control = tail_index(noise), tail_index(noise, standardize=True)
    assert stats.tail.alpha == pytest.approx(expected_tail.alpha, rel=1e-9)
    assert stats.tail_standardized.alpha == pytest.approx(expected_control.alpha, rel=1e-9)
    assert stats.tail.num_values == expected_tail.num_values
    expected = gradient_noise_scale(grads)
    from_dict = gradient_noise_scale(per_sample_gradients(model, x, y))  # the dict form is accepted as is
    assert from_dict.b_simple == pytest.approx(expected.b_simple, rel=1e-12)
    torch.testing.assert_close(minibatch_noise(per_sample_gradients(model, x, y), 4), noise, rtol=0, atol=1e-15)
    for field in ("b_simple", "snr", "trace_cov", "grad_sq_norm", "gsnr"):
        assert getattr(stats.noise_scale, field) == pytest.approx(getattr(expected, field), rel=1e-10), field
    # Shuffling changes the minibatches (so the tail estimate), not the per-sample moments.
    shuffled = gradient_noise_statistics(model, x, y, batch_size=4, chunk_size=9, seed=3)
    assert shuffled.noise_scale.b_simple == pytest.approx(expected.b_simple, rel=1e-10)
    assert shuffled.tail.alpha != stats.tail.alpha
    again = gradient_noise_statistics(model, x, y, batch_size=4, chunk_size=9, seed=3)
    assert again.tail.alpha == shuffled.tail.alpha


def test_coordinate_subset_bounds_the_tail_input_and_global_rng_is_untouched():
    model = tanh_mlp()
    x, y = data(n=40)
    state = torch.get_rng_state()
    stats = gradient_noise_statistics(model, x, y, batch_size=4, max_coordinates=20, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert stats.num_coordinates == 20 and stats.num_parameters == 7 * 5 + 7 + 3 * 7 + 3
    assert stats.tail.num_values + stats.tail.values_trimmed + stats.tail.zeros_dropped == 10 * 20
    full = gradient_noise_statistics(model, x, y, batch_size=4, seed=1)
    assert stats.noise_scale.b_simple == pytest.approx(full.noise_scale.b_simple, rel=1e-12)


def test_streamed_statistics_bad_inputs():
    model = tanh_mlp()
    x, y = data(n=7)
    with pytest.raises(ValueError, match="two minibatches"):
        gradient_noise_statistics(model, x, y, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        gradient_noise_statistics(model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="one row per sample"):
        gradient_noise_statistics(model, x, y[:5], batch_size=2)
    with pytest.raises(ValueError, match="chunk_size"):
        flat_gradients(model, x, y, chunk_size=0)
    with pytest.raises(ValueError, match="method"):
        flat_gradients(model, x, y, method="functorch")
    with pytest.raises(ValueError, match="requires grad"):
        flat_gradients(tanh_mlp().requires_grad_(False), x, y)
    with pytest.raises(ValueError, match="minibatches"):
        minibatch_noise(torch.randn(5, 3), 3)


def test_half_precision_gradients_are_reduced_in_float32():
    g = torch.Generator().manual_seed(9)
    grads = (torch.randn(32, 50, generator=g) + 0.3).to(torch.bfloat16)
    low = gradient_noise_scale({"w": grads})
    exact = gradient_noise_scale(grads.double())
    for field in ("trace_cov", "grad_sq_norm", "gsnr"):
        assert getattr(low, field) == pytest.approx(getattr(exact, field), rel=1e-5), field
    assert low.gsnr_coordinates == 50
