"""Layer selection, hooks, pooling and projection shared by the representation probes."""

import pytest
import torch
from torch import nn

from lightning_biasprobe.functional._layers import FeatureCapture, _sketch, auto_layers, resolve_layer_names
from lightning_biasprobe.functional.ncc import layer_features
from lightning_biasprobe.functional.rank import layer_spectra, singular_values


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()


class Wrapper(nn.Module):
    """A module with a metric-like child that never runs: 'auto' looks through to ``net``."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.tracker = nn.Linear(2, 2)  # never called in forward

    def forward(self, x):
        return self.net(x)


class SharedActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.act = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2), nn.ReLU()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.conv2(self.relu(self.bn1(self.conv1(x)))))))


def forward_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_auto_rule_on_common_shapes():
    x = torch.randn(3, 5, dtype=torch.float64)
    assert auto_layers(mlp(), x) == [("1", None), ("3", None)]        # post-activation outputs, head excluded
    assert auto_layers(Wrapper().double(), x) == [("net.1", None), ("net.3", None)]
    assert auto_layers(SharedActivation(), torch.randn(2, 4)) == [("act", 1), ("act", 2)]
    conv = SmallConvNet().eval()
    # conv1 opens a block that takes bn1 and relu; conv2's block takes pool and flatten; fc is the head.
    assert auto_layers(conv, torch.randn(2, 2, 5, 5)) == [("relu", None), ("flat", None)]
    with pytest.raises(ValueError, match="no hidden block"):
        auto_layers(nn.Linear(3, 2), torch.randn(2, 3))


def test_unknown_layer_name_lists_the_names_that_exist():
    listing = r"no module named 'net.9'.*Did you mean .*modules are: 'net', 'net\.0', 'net\.1'.*'tracker'"
    with pytest.raises(ValueError, match=listing):
        resolve_layer_names(Wrapper(), ["net.1", "net.9"])
    with pytest.raises(ValueError, match="module types are"):
        resolve_layer_names(mlp(), nn.Conv2d)
    assert resolve_layer_names(mlp(), [nn.ReLU, "4", "1"]) == ["1", "3", "4"][:2] + ["4"]
    with pytest.raises(TypeError):
        FeatureCapture([3])
    with pytest.raises(ValueError, match="cannot be combined"):
        FeatureCapture(["auto", "1"])


def test_hooks_exist_only_during_a_run_even_when_the_forward_fails():
    model = mlp()
    capture = FeatureCapture("auto")
    features = layer_features(capture, model, torch.randn(7, 5, dtype=torch.float64), chunk_size=3)
    assert list(features) == ["1", "3"] and features["1"].shape == (7, 8)
    assert forward_hooks(model) == 0
    with pytest.raises(RuntimeError):
        layer_features(capture, model, torch.randn(4, 9, dtype=torch.float64))  # wrong input width
    assert forward_hooks(model) == 0


def test_batchnorm_in_train_mode_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match=r"BatchNorm.*train mode.*model\.eval\(\)"):
        layer_features(FeatureCapture("auto"), model, torch.randn(5, 3))
    assert torch.equal(model[1].running_mean, before)
    assert list(layer_features(FeatureCapture("auto"), model.eval(), torch.randn(5, 3))) == ["2"]


def test_features_equal_the_layer_outputs_and_chunks_do_not_matter():
    model = mlp()
    x = torch.randn(23, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = {"1": model[:2](x), "3": model[:4](x)}
    for chunk in (None, 1, 5, 100):
        got = layer_features(FeatureCapture("auto", max_dim=None), model, x, chunk_size=chunk)
        for key, z in expected.items():
            torch.testing.assert_close(got[key], z, rtol=0, atol=1e-15)
    spectra = layer_spectra(model, x, chunk_size=4)
    torch.testing.assert_close(spectra["3"].singular_values, singular_values(expected["3"]), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(spectra["3"].centered_singular_values, singular_values(expected["3"], centered=True),
                               rtol=1e-9, atol=1e-10)


def test_conv_maps_are_pooled_or_flattened_and_the_key_says_which():
    model = SmallConvNet().double().eval()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        relu_out = model.relu(model.bn1(model.conv1(x)))
    gap = layer_features(FeatureCapture("relu"), model, x)
    torch.testing.assert_close(gap["relu-gap"], relu_out.mean(dim=(2, 3)), rtol=0, atol=1e-15)
    flat = layer_features(FeatureCapture("relu", conv_pool="flatten", max_dim=None), model, x)
    torch.testing.assert_close(flat["relu-flat"], relu_out.reshape(4, -1), rtol=0, atol=0)


def test_sequences_are_pooled_by_a_documented_overridable_rule():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(5, 7, 3, dtype=torch.float64)  # (N, T, D)
    with torch.no_grad():
        hidden = model[:2](x)
    assert torch.allclose(layer_features(FeatureCapture("1"), model, x)["1-mean"], hidden.mean(1))
    assert torch.equal(layer_features(FeatureCapture("1", sequence_pool="last"), model, x)["1-last"], hidden[:, -1])
    custom = layer_features(FeatureCapture("1", sequence_pool=lambda t: t.amax(1)), model, x)
    assert torch.equal(custom["1-pooled"], hidden.amax(1))
    with pytest.raises(ValueError, match="sequence_pool"):
        FeatureCapture("1", sequence_pool="max")
    with pytest.raises(ValueError, match=r"sequence_pool returned .*\(N, D\) with N=5"):
        layer_features(FeatureCapture("1", sequence_pool=lambda t: t.transpose(0, 1)), model, x)
    with pytest.raises(ValueError, match="leading sample dimension of 5"):  # a time-major output
        layer_features(FeatureCapture("1", forward=lambda m, inp: m(inp.transpose(0, 1))), model, x)


def test_projection_is_the_seeded_count_sketch_and_preserves_means_and_gram_on_average():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 2)).double().eval()
    x = torch.randn(30, 6, dtype=torch.float64)
    with torch.no_grad():
        z = model[:2](x)
    got = layer_features(FeatureCapture("auto", max_dim=8, seed=3), model, x)["1"]
    buckets, signs = _sketch(40, 8, 3, "1")
    dense = torch.zeros(40, 8, dtype=torch.float64)
    dense[torch.arange(40), buckets] = signs.double()
    torch.testing.assert_close(got, z @ dense, rtol=1e-12, atol=1e-12)                  # the sketch, exactly
    again = layer_features(FeatureCapture("auto", max_dim=8, seed=3), model, x)["1"]
    assert torch.equal(got, again)                                                       # same seed, same sketch
    torch.testing.assert_close(got.mean(0), z.mean(0) @ dense, rtol=1e-12, atol=1e-12)  # means map exactly
    # E[S S^T] = I: the sketched Gram matrix is unbiased; averaged over 400 seeds it is within 5%.
    gram = torch.zeros(30, 30, dtype=torch.float64)
    for seed in range(400):
        b, s = _sketch(40, 8, seed, "1")
        projected = torch.zeros(30, 8, dtype=torch.float64).index_add_(1, b, z * s.double())
        gram += projected @ projected.T / 400
    exact = z @ z.T
    assert (gram - exact).norm() / exact.norm() < 0.05
    narrow = layer_features(FeatureCapture("auto", max_dim=64), model, x)["1"]
    assert torch.equal(narrow, z)  # not wider than max_dim: no projection
