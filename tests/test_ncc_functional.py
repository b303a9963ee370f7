"""ncc_accuracy, nc1, cdnv, effective_depth, FeatureStatistics: analytic cases, brute force, accumulation."""

import math

import pytest
import torch
from torch import nn

from lightning_biasprobe.functional.ncc import (
    FeatureStatistics,
    cdnv,
    class_means,
    effective_depth,
    nc1,
    ncc_accuracy,
    ncc_profile,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def two_gaussians(n, d, m, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = sigma * torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 0] += m * (2 * y - 1).double()
    return x, y


def brute_force(features, labels):
    """NCC accuracy by explicit distances, NC1 with D x D matrices and pinv, CDNV by a double loop."""
    z = features.double()
    classes = sorted(set(labels.tolist()))
    means = {c: z[labels == c].mean(0) for c in classes}
    correct = 0
    for i in range(len(z)):
        dists = [((z[i] - means[c]) ** 2).sum().item() for c in classes]
        correct += classes[min(range(len(classes)), key=lambda j: dists[j])] == labels[i].item()
    mu_g = z.mean(0)
    deviations = [z[i] - means[labels[i].item()] for i in range(len(z))]
    sw = sum(torch.outer(d, d) for d in deviations) / len(z)
    sb = sum(torch.outer(means[c] - mu_g, means[c] - mu_g) for c in classes) / len(classes)
    nc1_value = torch.trace(sw @ torch.linalg.pinv(sb, rtol=1e-10)).item() / len(classes)
    var = {c: ((z[labels == c] - means[c]) ** 2).sum(1).mean().item() for c in classes}
    pairs = [(a, b) for a in classes for b in classes if a < b]
    cdnv_value = sum((var[a] + var[b]) / (2 * ((means[a] - means[b]) ** 2).sum().item()) for a, b in pairs) / len(pairs)
    return correct / len(z), nc1_value, cdnv_value


def test_features_equal_to_their_class_means_give_accuracy_one_and_zero_collapse_measures():
    centers = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 3.0, 0.0], [0.0, -2.0, 1.0], [4.0, 4.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3] * 25)
    z = centers[labels]
    assert ncc_accuracy(z, labels).item() == 1.0
    assert nc1(z, labels).item() == 0.0
    assert cdnv(z, labels).item() == 0.0
    stats = FeatureStatistics(3, 4, scatter=True).update(z, labels)
    assert stats.nc1().item() == pytest.approx(0.0, abs=1e-12)
    assert stats.cdnv().item() == pytest.approx(0.0, abs=1e-12)


def test_two_gaussian_classes_match_the_population_values_within_two_percent():
    m, sigma, d, n = 1.0, 0.8, 5, 100_000
    x, y = two_gaussians(n, d, m, sigma)
    error = 1 - ncc_accuracy(x, y).item()
    assert error == pytest.approx(normal_cdf(-m / sigma), rel=0.02)           # 0.1056
    assert nc1(x, y).item() == pytest.approx(sigma**2 / (2 * m**2), rel=0.02)   # 0.32
    assert cdnv(x, y).item() == pytest.approx(sigma**2 * d / (4 * m**2), rel=0.02)  # 0.8
    held_x, held_y = two_gaussians(n, d, m, sigma, seed=1)
    held_error = 1 - ncc_accuracy(x, y, held_x, held_y).item()
    assert held_error == pytest.approx(normal_cdf(-m / sigma), rel=0.02)


def test_against_brute_force_on_a_small_imbalanced_problem():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 7 + [1] * 4 + [3] * 9 + [5] * 3)  # imbalanced, with gaps in the labels
    z = torch.randn(len(labels), 6, dtype=torch.float64) + 1.5 * torch.randn(6, 6, dtype=torch.float64)[labels % 6]
    accuracy, nc1_value, cdnv_value = brute_force(z, labels)
    assert ncc_accuracy(z, labels).item() == pytest.approx(accuracy, abs=0)
    assert nc1(z, labels).item() == pytest.approx(nc1_value, rel=1e-9)
    assert cdnv(z, labels).item() == pytest.approx(cdnv_value, rel=1e-12)


def test_nc1_in_a_wide_space_never_needs_the_d_by_d_matrix_and_matches_pinv():
    torch.manual_seed(1)
    labels = torch.arange(40) % 4
    z = torch.randn(40, 300, dtype=torch.float64) + 2 * torch.randn(4, 300, dtype=torch.float64)[labels]
    _, nc1_value, _ = brute_force(z, labels)
    assert nc1(z, labels).item() == pytest.approx(nc1_value, rel=1e-8)


def test_coinciding_class_means():
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])  # both classes have mean 0: nothing separates them
    assert math.isinf(nc1(z, y).item()) and math.isinf(cdnv(z, y).item())
    assert ncc_accuracy(z, y).item() == 0.5  # ties go to the lowest class


@pytest.mark.parametrize("accuracies, epsilon, depth", [
    ([0.5, 0.995, 1.0], 0.01, 2),
    ([0.5, 0.98, 1.0], 0.01, 3),
    ([0.5, 0.98, 0.97], 0.01, 4),     # no layer qualifies: L + 1
    ([0.5, 0.98, 0.97], 0.05, 2),
    ([1.0, 0.2], 0.0, 1),
    (torch.tensor([0.9, 0.99]), 0.01, 2),  # exactly at the threshold counts
])
def test_effective_depth_is_the_first_layer_within_epsilon(accuracies, epsilon, depth):
    assert effective_depth(accuracies, epsilon) == depth


def test_accumulated_statistics_over_many_batches_equal_the_single_batch_computation():
    torch.manual_seed(2)
    labels = torch.randint(0, 5, (301,))
    z = torch.randn(301, 8, dtype=torch.float64) + 3 * torch.randn(5, 8, dtype=torch.float64)[labels]
    classes, means, _ = class_means(z[:100], labels[:100])
    whole = FeatureStatistics(8, 5, scatter=True, reference_means=means, reference_classes=classes).update(z, labels)
    parts = [FeatureStatistics(8, 5, scatter=True, reference_means=means, reference_classes=classes)
             for _ in range(3)]
    bounds = [0, 1, 2, 90, 91, 200, 250, 301]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        parts[i % 3].update(z[a:b], labels[a:b])  # like 3 DDP ranks, each with several batches
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for key in whole.state():
        torch.testing.assert_close(merged.state()[key], whole.state()[key], rtol=1e-12, atol=1e-9)
    # ... and the statistics give the direct computations.
    torch.testing.assert_close(whole.nc1(), nc1(z, labels), rtol=1e-9, atol=0)
    torch.testing.assert_close(merged.nc1(), nc1(z, labels), rtol=1e-9, atol=0)
    torch.testing.assert_close(merged.cdnv(), cdnv(z, labels), rtol=1e-9, atol=0)
    assert merged.accuracy().item() == ncc_accuracy(z[:100], labels[:100], z, labels).item()
    torch.testing.assert_close(merged.means()[1], class_means(z, labels)[1], rtol=1e-12, atol=1e-12)


def test_statistics_state_round_trip_and_bad_labels():
    stats = FeatureStatistics(3, 2).update(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    copy = FeatureStatistics(3, 2).load_state({k: v.clone() for k, v in stats.state().items()})
    assert all(torch.equal(copy.state()[k], v) for k, v in stats.state().items())
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        stats.update(torch.randn(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="scatter"):
        stats.nc1()
    with pytest.raises(ValueError, match="different fields"):
        stats.merge(FeatureStatistics(3, 2, scatter=True))


def test_bad_input_raises_a_clear_error():
    z = torch.randn(6, 3)
    with pytest.raises(ValueError, match="integer class"):
        ncc_accuracy(z, torch.randn(6))
    with pytest.raises(ValueError, match="6 examples"):
        nc1(z, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        cdnv(torch.randn(6), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="two classes"):
        cdnv(z, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="epsilon"):
        effective_depth([0.5], epsilon=1.5)
    with pytest.raises(ValueError, match="integer class labels"):
        ncc_profile(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), z, torch.randn(6, 2))


class AbsBlock(nn.Module):
    """|x| = relu(x) + relu(-x), with parameters: one block that separates |x| < 1 from |x| > 2."""

    def __init__(self):
        super().__init__()
        self.split = nn.Linear(1, 2)
        self.merge = nn.Linear(2, 1)
        with torch.no_grad():
            self.split.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.split.bias.zero_()
            self.merge.weight.copy_(torch.tensor([[1.0, 1.0]]))
            self.merge.bias.zero_()

    def forward(self, x):
        return self.merge(torch.relu(self.split(x)))


def identity_linear():
    layer = nn.Linear(1, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    return layer


def test_constructed_network_whose_first_block_separates_has_effective_depth_one():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(400) % 2
    radius = torch.where(y == 0, torch.rand(400, generator=g), 2 + torch.rand(400, generator=g))
    sign = torch.where(torch.rand(400, generator=g) < 0.5, -1.0, 1.0)
    x = (radius * sign).unsqueeze(1).double()
    model = nn.Sequential(AbsBlock(), identity_linear(), identity_linear(), nn.Linear(1, 2)).double().eval()
    assert ncc_accuracy(x, y).item() < 0.8  # the raw inputs are not NCC-separable (both means near 0)
    profile = ncc_profile(model, x, y)
    assert profile.layers == ["0", "1", "2"]  # "auto": three hidden blocks, the head excluded
    assert profile.train_accuracy.tolist() == [1.0, 1.0, 1.0]
    assert profile.effective_depth == 1
    # Deeper-but-identical layers keep the same geometry.
    assert profile.nc1[0].item() == pytest.approx(profile.nc1[2].item(), rel=1e-12)


def test_random_labels_give_chance_ncc_accuracy_at_every_layer():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4)).double().eval()
    x, held_x = torch.randn(4000, 20, dtype=torch.float64), torch.randn(4000, 20, dtype=torch.float64)
    y, held_y = torch.randint(0, 4, (4000,)), torch.randint(0, 4, (4000,))
    profile = ncc_profile(model, x, y, heldout_inputs=held_x, heldout_targets=held_y)
    assert len(profile.layers) == 3
    assert ((profile.heldout_accuracy - 0.25).abs() < 0.03).all(), profile.heldout_accuracy
    assert ((profile.train_accuracy - 0.25).abs() < 0.05).all(), profile.train_accuracy
    assert profile.effective_depth == 4


def test_ncc_profile_matches_per_layer_brute_force_with_chunks():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(37, 4, dtype=torch.float64), torch.arange(37) % 3
    hx, hy = torch.randn(11, 4, dtype=torch.float64), torch.arange(11) % 3
    profile = ncc_profile(model, x, y, heldout_inputs=hx, heldout_targets=hy, chunk_size=5)
    layers = [model[:2], model[:4]]
    for i, prefix in enumerate(layers):
        with torch.no_grad():
            z, hz = prefix(x), prefix(hx)
        accuracy, nc1_value, cdnv_value = brute_force(z, y)
        assert profile.train_accuracy[i].item() == pytest.approx(accuracy, abs=0)
        assert profile.nc1[i].item() == pytest.approx(nc1_value, rel=1e-9)
        assert profile.cdnv[i].item() == pytest.approx(cdnv_value, rel=1e-10)
        assert profile.heldout_accuracy[i].item() == ncc_accuracy(z, y, hz, hy).item()
