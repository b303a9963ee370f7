"""function_frequency: pure tones, flat paths, a sharpening logistic boundary, float64 brute force, pairs, bad input."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_biasprobe.functional.frequency import (
    cutoff_bin,
    function_frequency,
    interpolation_pairs,
    path_signals,
    signal_spectrum,
)

M = 64  # points per path: 33 rfft bins, cutoff bin ceil(0.1 * 33) = 4


def tone(k0, m=M, phase=0.0):
    j = torch.arange(m, dtype=torch.float64)
    return torch.sin(2 * math.pi * k0 * j / m + phase)


# --------------------------------------------------------------------------------------- the spectrum
def test_pure_tone_without_window_gives_its_frequency_and_a_zero_or_one_fraction_exactly():
    k_c = cutoff_bin(M, 0.1)
    assert k_c == 4
    for k0 in range(1, M // 2):
        spec = signal_spectrum(tone(k0, phase=0.3), window="none")
        assert spec.mean_frequency.item() == pytest.approx(k0, abs=1e-10)
        assert int(spec.power[0].argmax()) == k0
        assert spec.high_frequency_fraction.item() == pytest.approx(1.0 if k0 >= k_c else 0.0, abs=1e-12)


def test_pure_tone_with_hann_window_keeps_its_centroid_and_leaks_one_bin_each_side():
    k_c = cutoff_bin(M, 0.1)
    for k0 in range(2, M // 2 - 1):
        spec = signal_spectrum(tone(k0, phase=1.1))
        assert spec.mean_frequency.item() == pytest.approx(k0, abs=1e-10)
        power = spec.power[0] / spec.power[0].sum()
        # Hann on a whole-cycle tone: amplitudes 1/4, 1/2, 1/4 in bins k0 - 1, k0, k0 + 1 -> power 1:4:1.
        torch.testing.assert_close(power[k0 - 1:k0 + 2], torch.tensor([1, 4, 1], dtype=torch.float64) / 6,
                                   rtol=0, atol=1e-12)
        expected = {k_c - 1: 1 / 6, k_c: 5 / 6}.get(k0, 1.0 if k0 > k_c else 0.0)
        assert spec.high_frequency_fraction.item() == pytest.approx(expected, abs=1e-12)


def test_span_rescales_frequencies_to_cycles_per_path_length():
    spec = signal_spectrum(tone(10), span=2.0)
    assert spec.mean_frequency.item() == pytest.approx(5.0, abs=1e-10)
    assert spec.frequencies[10].item() == 5.0


def test_parseval_and_high_frequency_power_is_the_fraction_times_the_weighted_variance():
    torch.manual_seed(0)
    s = torch.randn(5, M, dtype=torch.float64).cumsum(dim=1)
    spec = signal_spectrum(s)
    w = torch.hann_window(M, periodic=True, dtype=torch.float64)
    centred = s - ((s @ w) / w.sum()).unsqueeze(1)
    torch.testing.assert_close(spec.power.sum(dim=1), M * (centred * w).square().sum(dim=1), rtol=1e-12, atol=0)
    variance = (w.square() * centred.square()).sum(dim=1) / w.square().sum()
    torch.testing.assert_close(spec.high_frequency_power, spec.high_frequency_fraction * variance, rtol=1e-12, atol=0)


def test_constant_signal_is_undefined_not_zero():
    spec = signal_spectrum(torch.full((3, M), 0.25, dtype=torch.float64))
    assert spec.flat.all()
    assert spec.mean_frequency.isnan().all() and spec.high_frequency_fraction.isnan().all()
    assert (spec.high_frequency_power == 0).all()
    # Below constant_tol a signal counts as flat; above it, it does not.
    wiggle = 1e-8 * tone(7)
    assert signal_spectrum(wiggle, constant_tol=1e-6).high_frequency_fraction.isnan().all()
    assert signal_spectrum(wiggle, constant_tol=0.0).high_frequency_fraction.item() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------- through a model
def tone_model(direction, k0, amplitude=0.2):
    """Logits log q(x) with q(x) = (1/2, 1/2) + s(x) (1, -1)/sqrt(2), s = A (1 - cos(2 pi k0 <x, e>)):
    the per-point softmax gives back q, so the path signal ||p(t) - p(0)|| is exactly s(t)."""
    u = torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2)

    def forward(model, x):
        s = amplitude * (1 - torch.cos(2 * math.pi * k0 * (x @ direction)))
        return torch.log(0.5 + s.unsqueeze(1) * u)

    return forward


@pytest.mark.parametrize("k0", [2, 5, 11])
def test_a_pure_sinusoid_along_the_path_is_recovered_exactly(k0):
    d = 6
    torch.manual_seed(1)
    e = torch.randn(d, dtype=torch.float64)
    e /= e.norm()
    x0 = torch.randn(d, dtype=torch.float64)
    x0 -= (x0 @ e) * e  # <x0, e> = 0: the path starts at a crest
    x = torch.stack([x0, x0 + 3.0 * e])  # path length 3
    result = function_frequency(nn.Identity(), x, pairs=torch.tensor([[0, 1]]), forward=tone_model(e, k0 / 3.0),
                                num_points=M)
    t = torch.arange(M, dtype=torch.float64) / M
    expected = 0.2 * (1 - torch.cos(2 * math.pi * k0 * t))
    # A softmax over the whole (points x classes) array (the reference code's axis bug) would give
    # probabilities about M times smaller and a signal that is not this one.
    torch.testing.assert_close(result.signals[0], expected, rtol=0, atol=1e-12)
    assert result.mean_frequency.item() == pytest.approx(k0, abs=1e-9)
    assert result.mean_frequency_per_distance.item() == pytest.approx(k0 / 3.0, abs=1e-9)
    assert result.path_length.item() == pytest.approx(3.0, abs=1e-12)
    assert result.max_distance.item() == pytest.approx(0.4, abs=1e-12)
    assert result.high_frequency_fraction.item() == pytest.approx(1.0 if k0 > 4 else 0.0, abs=1e-9)


def test_extrapolated_paths_keep_frequencies_in_cycles_per_path_length():
    e = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x = torch.tensor([[0.0, 0.5], [1.0, 0.5]], dtype=torch.float64)
    result = function_frequency(nn.Identity(), x, pairs=torch.tensor([[0, 1]]), forward=tone_model(e, 3),
                                num_points=M, extrapolate=0.5)  # t from -0.5 to 1.5: 6 whole cycles
    assert result.mean_frequency.item() == pytest.approx(3.0, abs=1e-9)
    assert result.spectrum.power[0].argmax().item() == 6


def test_constant_model_reports_an_undefined_fraction_not_zero():
    model = nn.Linear(5, 3)
    nn.init.zeros_(model.weight)
    torch.manual_seed(0)
    x = torch.randn(12, 5)
    y = torch.arange(12) % 3
    result = function_frequency(model, x, y, num_pairs=4)
    assert result.flat.all()
    assert result.high_frequency_fraction.isnan().all() and result.mean_frequency.isnan().all()
    summary = result.summary()
    for group in ("same_class", "different_class", "all"):
        assert math.isnan(summary[f"{group}/high_frequency_fraction"])
        assert math.isnan(summary[f"{group}/mean_frequency"])
        assert summary[f"{group}/flat_fraction"] == 1.0
        assert summary[f"{group}/max_distance"] == 0.0
        assert summary[f"{group}/high_frequency_power"] == 0.0


def logistic_forward(w, a):
    return lambda model, x: torch.stack([a * (x @ w) / 2, -a * (x @ w) / 2], dim=1)


def test_logistic_boundary_crossed_once_gets_higher_frequency_as_it_sharpens():
    torch.manual_seed(3)
    w = torch.randn(8, dtype=torch.float64)
    w /= w.norm()
    offsets = torch.randn(6, 8, dtype=torch.float64)
    offsets -= (offsets @ w).unsqueeze(1) * w
    # Three paths that cross the boundary w.x = 0 once, at different places along them.
    x = torch.cat([offsets[:3] - torch.tensor([[1.0], [1.5], [0.5]], dtype=torch.float64) * w,
                   offsets[3:] + torch.tensor([[1.0], [0.7], [1.2]], dtype=torch.float64) * w])
    pairs = torch.tensor([[0, 3], [1, 4], [2, 5]])
    fractions, centroids = [], []
    for a in (1.0, 10.0, 100.0):
        r = function_frequency(nn.Identity(), x, pairs=pairs, forward=logistic_forward(w, a))
        fractions.append(r.high_frequency_fraction)
        centroids.append(r.mean_frequency)
    for lower, higher in zip(fractions, fractions[1:]):
        assert (higher > lower).all()
    for lower, higher in zip(centroids, centroids[1:]):
        assert (higher > lower).all()
    assert (fractions[-1] > 10 * fractions[0]).all()


def test_a_single_logit_is_read_as_a_binary_classifier():
    torch.manual_seed(0)
    w = torch.randn(4, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5]])
    one = function_frequency(nn.Identity(), x, pairs=pairs, forward=lambda m, inp: (3 * inp @ w).unsqueeze(1))
    two = function_frequency(nn.Identity(), x, pairs=pairs, forward=logistic_forward(w, 3.0))
    torch.testing.assert_close(one.signals, two.signals, rtol=0, atol=1e-14)


# --------------------------------------------------------------------------------------- brute force
def tanh_mlp(d=5, h=9, c=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, c)).double()


def brute_force(model, x, pairs, m, cutoff=0.1, extrapolate=0.0):
    """One path at a time: points, per-point softmax, and the spectrum in numpy."""
    window = np.hanning(m + 1)[:-1]  # the periodic Hann window
    bins = m // 2 + 1
    k_c = math.ceil(cutoff * bins - 1e-9)
    out = []
    for i, j in pairs.tolist():
        t = -extrapolate + (1 + 2 * extrapolate) * np.arange(m) / m
        with torch.no_grad():
            pts = torch.stack([x[i] + float(tj) * (x[j] - x[i]) for tj in t])
            p = torch.softmax(model(pts), dim=1).numpy()
            p0 = torch.softmax(model(x[i:i + 1]), dim=1).numpy()[0]
        s = np.linalg.norm(p - p0, axis=1)
        centred = s - (window * s).sum() / window.sum()
        power = np.abs(np.fft.rfft(window * centred)) ** 2
        power[1:] *= 2
        power[0] = 0
        if m % 2 == 0:
            power[-1] /= 2
        freqs = np.arange(bins) / (1 + 2 * extrapolate)
        out.append((s, (power * freqs).sum() / power.sum(), power[k_c:].sum() / power.sum(),
                    float(torch.linalg.norm(x[j] - x[i]))))
    return out


@pytest.mark.parametrize("extrapolate", [0.0, 0.25])
def test_batched_chunks_match_a_per_path_loop_in_float64(extrapolate):
    model = tanh_mlp()
    torch.manual_seed(2)
    x = 2 * torch.randn(15, 5, dtype=torch.float64)
    y = torch.arange(15) % 3
    m = 20
    result = function_frequency(model, x, y, num_pairs=5, num_points=m, chunk_size=7, extrapolate=extrapolate)
    expected = brute_force(model, x, result.pairs, m, extrapolate=extrapolate)
    assert len(expected) == 10
    for i, (s, centroid, fraction, length) in enumerate(expected):
        np.testing.assert_allclose(result.signals[i].numpy(), s, rtol=1e-10, atol=1e-13)
        assert result.mean_frequency[i].item() == pytest.approx(centroid, rel=1e-9)
        assert result.high_frequency_fraction[i].item() == pytest.approx(fraction, rel=1e-9, abs=1e-13)
        assert result.path_length[i].item() == pytest.approx(length, rel=1e-12)
    # The group means are NaN-means of the per-path values.
    summary = result.summary()
    same = result.same_class
    assert summary["same_class/mean_frequency"] == pytest.approx(np.mean([e[1] for e, k in zip(expected, same) if k]))
    assert summary["different_class/high_frequency_fraction"] == pytest.approx(
        np.mean([e[2] for e, k in zip(expected, same) if not k]))
    assert summary["all/max_distance"] == pytest.approx(np.mean([e[0].max() for e in expected]))


def test_chunk_size_and_float32_agree_with_the_unchunked_float64_signals():
    model = tanh_mlp()
    x = torch.randn(10, 5, dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [2, 3], [4, 9]])
    reference, _ = path_signals(model, x, pairs, num_points=16, chunk_size=None)
    for chunk_size in (5, 40):  # one path per forward (chunk < M), and two (the last chunk holds one)
        chunked, _ = path_signals(model, x, pairs, num_points=16, chunk_size=chunk_size)
        torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-14)
    assert (reference[:, 0] == 0).all()  # t = 0 is the start itself
    single, _ = path_signals(model.float(), x.float(), pairs, num_points=16)
    assert single.dtype == torch.float64
    torch.testing.assert_close(single, reference, rtol=0, atol=1e-6)


def test_inputs_of_any_shape_and_nested_inputs_are_interpolated_elementwise():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()
    images = torch.randn(8, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    by_image = function_frequency(conv, images, y, num_pairs=3, num_points=8)
    flat = function_frequency(conv, images.flatten(1), y, num_pairs=3, num_points=8,
                              forward=lambda m, x: m(x.reshape(-1, 2, 4, 4)))
    torch.testing.assert_close(by_image.signals, flat.signals, rtol=0, atol=1e-14)
    torch.testing.assert_close(by_image.path_length, images.flatten(1)[by_image.pairs[:, 1]].sub(
        images.flatten(1)[by_image.pairs[:, 0]]).norm(dim=1), rtol=1e-12, atol=0)
    # A dict of two inputs: the same path as their concatenation.
    parts = {"a": images.flatten(1)[:, :20], "b": images.flatten(1)[:, 20:]}
    nested = function_frequency(conv, parts, y, num_pairs=3, num_points=8,
                                forward=lambda m, x: m(torch.cat([x["a"], x["b"]], 1).reshape(-1, 2, 4, 4)))
    torch.testing.assert_close(nested.signals, by_image.signals, rtol=0, atol=1e-14)
    torch.testing.assert_close(nested.path_length, by_image.path_length, rtol=1e-12, atol=0)


def test_sequence_outputs_get_a_softmax_per_position():
    model = tanh_mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [2, 3]])
    plain, _ = path_signals(model, x, pairs, num_points=8)
    doubled, _ = path_signals(model, x, pairs, num_points=8, forward=lambda m, inp: torch.stack([m(inp)] * 2, 1))
    torch.testing.assert_close(doubled, math.sqrt(2) * plain, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------- pairs
def test_pairs_are_stratified_distinct_seeded_and_leave_the_global_rng_alone():
    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 10 + [3] * 3)
    state = torch.get_rng_state()
    pairs, same = interpolation_pairs(y, 20, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(pairs) == 40 and int(same.sum()) == 20
    assert torch.equal(y[pairs[same, 0]], y[pairs[same, 1]])
    assert (y[pairs[~same, 0]] != y[pairs[~same, 1]]).all()
    assert (pairs[:, 0] != pairs[:, 1]).all()
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == 40
    # As even over classes as they allow (class 3 holds only 3 pairs: the others share its place),
    # and over the 6 class pairs (3 or 4 each).
    per_class = torch.bincount(y[pairs[same, 0]]).tolist()
    assert per_class[3] == 3 and sorted(per_class[:3]) == [5, 6, 6]
    per_class_pair = {}
    for a, b in pairs[~same].tolist():
        key = tuple(sorted((int(y[a]), int(y[b]))))
        per_class_pair[key] = per_class_pair.get(key, 0) + 1
    assert len(per_class_pair) == 6 and set(per_class_pair.values()) <= {3, 4}
    # Either end starts the path.
    starts = y[pairs[~same, 0]] < y[pairs[~same, 1]]
    assert 0 < int(starts.sum()) < len(starts)
    again, _ = interpolation_pairs(y, 20, seed=5)
    assert torch.equal(again, pairs)
    assert not torch.equal(interpolation_pairs(y, 20, seed=6)[0], pairs)


def test_small_classes_give_their_share_to_others_and_too_few_pairs_warn():
    y = torch.tensor([0] * 2 + [1] * 30)  # class 0 holds a single same-class pair
    pairs, same = interpolation_pairs(y, 10, seed=0)
    assert torch.bincount(y[pairs[same, 0]], minlength=2).tolist() == [1, 9]
    with pytest.warns(RuntimeWarning, match="fewer than num_pairs"):
        pairs, same = interpolation_pairs(torch.tensor([0, 0, 1]), 5)
    assert int(same.sum()) == 1 and int((~same).sum()) == 2


# --------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    model = tanh_mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="at least 2 points"):
        function_frequency(model, x, y, num_points=1, window="none")
    with pytest.raises(ValueError, match="at least 2 points"):
        path_signals(model, x, torch.tensor([[0, 1]]), num_points=1)
    with pytest.raises(ValueError, match="Hann"):
        function_frequency(model, x, y, num_points=3)
    with pytest.raises(ValueError, match="cutoff"):
        function_frequency(model, x, y, cutoff=1.5)
    with pytest.raises(ValueError, match="cutoff"):
        function_frequency(model, x, y, num_points=4, cutoff=0.9)
    with pytest.raises(ValueError, match="integer class labels"):
        function_frequency(model, x, y.double())
    with pytest.raises(ValueError, match="needs class labels"):
        function_frequency(model, x)
    with pytest.raises(ValueError, match="only 6"):
        function_frequency(model, x, pairs=torch.tensor([[0, 6]]))
    with pytest.raises(ValueError, match=r"\(P, 2\)"):
        function_frequency(model, x, pairs=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="extrapolate"):
        function_frequency(model, x, y, extrapolate=-0.1)
    with pytest.raises(ValueError, match="num_pairs"):
        function_frequency(model, x, y, num_pairs=0)
    with pytest.raises(ValueError, match="not floating point"):
        function_frequency(nn.Embedding(10, 3), torch.arange(6), y)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double()
    with pytest.raises(ValueError, match="model.eval"):
        function_frequency(bn, x, y)
    with pytest.raises(ValueError, match="shape"):
        signal_spectrum(torch.zeros(2, 3, 8))


def test_no_warning_when_enough_pairs_exist():
    model = tanh_mlp()
    x = torch.randn(30, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        function_frequency(model, x, torch.arange(30) % 3, num_pairs=5, num_points=8)
