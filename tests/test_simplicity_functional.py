"""S- and S^c-randomized accuracy: oracle models with known answers, a by-hand check, bad input."""

import math

import pytest
import torch
from torch import nn

from lightning_biasprobe.data import make_lms, slab_labels
from lightning_biasprobe.functional.simplicity import (
    class_predictions,
    randomize_coordinates,
    randomized_accuracy,
    simplicity_bias,
)

N = 4000


class ReadsCoordinate(nn.Module):
    """An oracle that reads one coordinate of (optionally un-rotated) inputs: x0 > 0, or the 5-slab rule."""

    def __init__(self, coord=0, slabs=None, rotation=None):
        super().__init__()
        self.coord, self.slabs, self.rotation = coord, slabs, rotation

    def forward(self, x):
        if self.rotation is not None:
            x = x @ self.rotation.T
        v = x[:, self.coord]
        positive = (v > 0).long() if self.slabs is None else slab_labels(v, self.slabs)
        score = positive.double() * 2 - 1
        return torch.stack([-score, score], dim=1)


def chance_band(p=0.5, n=N, sigmas=4):
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_model_reading_only_the_linear_coordinate():
    data = make_lms(N, dim=10, seed=0)
    result = simplicity_bias(ReadsCoordinate(0), data.inputs, data.targets)
    assert float(result.accuracy) == 1.0
    assert float(result.sc_randomized_accuracy) == 1.0  # it never looks at the slabs
    assert abs(float(result.s_randomized_accuracy) - 0.5) < chance_band()
    assert result.simple_coords == (0,) and result.complex_coords == tuple(range(1, 10))
    assert result.num_samples == N and result.randomization == "permute" and result.reference == "targets"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_same_seed_for_data_and_probe_does_not_bias_the_chance_level(seed):
    # Labels drawn by a torch generator seeded with s, permuted by a generator seeded with s too:
    # without mixing the probe's seed the two streams coincide and agree more often than chance.
    data = make_lms(N, dim=3, seed=seed)
    result = simplicity_bias(ReadsCoordinate(0), data.inputs, data.targets, seed=seed)
    p = float(data.targets.double().mean())
    assert abs(float(result.s_randomized_accuracy) - (p * p + (1 - p) ** 2)) < chance_band()


def test_model_reading_only_one_slab_coordinate():
    data = make_lms(N, dim=10, seed=1)
    result = simplicity_bias(ReadsCoordinate(3, slabs=5), data.inputs, data.targets)
    assert float(result.accuracy) == 1.0
    assert float(result.s_randomized_accuracy) == 1.0
    assert abs(float(result.sc_randomized_accuracy) - 0.5) < chance_band()


def test_swap_drives_a_reliant_model_to_zero():
    # Each example takes the linear coordinate of an example of the other class: always wrong.
    data = make_lms(N, dim=6, seed=2)
    result = simplicity_bias(ReadsCoordinate(0), data.inputs, data.targets, randomization="swap")
    assert float(result.s_randomized_accuracy) == 0.0 and float(result.sc_randomized_accuracy) == 1.0


def test_rotated_data_are_randomized_in_unrotated_coordinates():
    plain = make_lms(N, dim=8, seed=3)
    rotated = make_lms(N, dim=8, seed=3, rotate=True)
    w = rotated.rotation
    a = simplicity_bias(ReadsCoordinate(0), plain.inputs, plain.targets, seed=5)
    b = simplicity_bias(ReadsCoordinate(0, rotation=w), rotated.inputs, rotated.targets, rotation=w, seed=5)
    assert float(b.accuracy) == 1.0 and float(b.sc_randomized_accuracy) == 1.0
    assert float(a.s_randomized_accuracy) == float(b.s_randomized_accuracy)  # the same permutation
    z = randomize_coordinates(rotated.inputs.double(), [0], rotation=w.double(), seed=5)
    zp = randomize_coordinates(plain.inputs.double(), [0], seed=5)
    torch.testing.assert_close(z @ w.double().T, zp, rtol=0, atol=1e-5)


def test_randomized_accuracy_by_hand_on_a_tiny_float64_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2))
    coords = [1, 3]
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(11))
    shuffled = x.clone()
    for c in coords:
        shuffled[:, c] = x[perm, c]  # the same permutation for every column of the set
    with torch.no_grad():
        expected = (model(shuffled).argmax(1) == y).double().mean()
    got = randomized_accuracy(model, x, y, coords, generator=torch.Generator().manual_seed(11))
    assert got.dtype == torch.float64 and float(got) == float(expected)
    # Agreement with the model's own clean predictions instead of the labels.
    with torch.no_grad():
        agree = (model(shuffled).argmax(1) == model(x).argmax(1)).double().mean()
    assert float(randomized_accuracy(model, x, y, coords, generator=torch.Generator().manual_seed(11),
                                     reference="predictions")) == float(agree)
    # Repeats average successive draws of one generator.
    g = torch.Generator().manual_seed(11)
    draws = []
    for _ in range(3):
        z = randomize_coordinates(x, coords, generator=g)
        with torch.no_grad():
            draws.append(float((model(z).argmax(1) == y).double().mean()))
    got = randomized_accuracy(model, x, y, coords, generator=torch.Generator().manual_seed(11), num_repeats=3)
    assert float(got) == pytest.approx(sum(draws) / 3)
    # Chunked forwards give the same answer; a seed gives the same draws at every call.
    assert float(randomized_accuracy(model, x, y, coords, generator=torch.Generator().manual_seed(11),
                                     chunk_size=7)) == float(expected)
    assert float(randomized_accuracy(model, x, y, coords, seed=3)) == float(randomized_accuracy(model, x, y, coords,
                                                                                              seed=3))


def test_permutation_and_swap_move_whole_column_sets_and_nothing_else():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    z = randomize_coordinates(x, [2, 4], seed=0)
    assert torch.equal(z[:, [0, 1, 3, 5]], x[:, [0, 1, 3, 5]])
    for c in (2, 4):
        assert torch.equal(torch.sort(z[:, c]).values, torch.sort(x[:, c]).values)
    # Rows of the set move together: each new (x2, x4) pair is an existing row's pair.
    rows = {tuple(r) for r in x[:, [2, 4]].tolist()}
    assert all(tuple(r) in rows for r in z[:, [2, 4]].tolist())
    assert not torch.equal(z, x) and torch.equal(x, x.clone())
    s = randomize_coordinates(x, [2, 4], randomization="swap", targets=y, seed=0)
    for i in range(50):
        source = [j for j in range(50) if torch.equal(x[j, [2, 4]], s[i, [2, 4]])]
        assert source and all(int(y[j]) != int(y[i]) for j in source)
    assert torch.equal(s[:, [0, 1, 3, 5]], x[:, [0, 1, 3, 5]])


def test_masks_on_image_shaped_inputs_and_a_single_binary_logit():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 2, 3, generator=g)
    y = torch.randint(0, 2, (64,), generator=g)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[0] = True  # the top row is "simple"
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 1))
    by_mask = simplicity_bias(model, x, y, mask)
    by_index = simplicity_bias(model, x, y, [0, 1, 2])
    assert by_mask.simple_coords == (0, 1, 2) and by_mask.complex_coords == (3, 4, 5)
    assert float(by_mask.s_randomized_accuracy) == float(by_index.s_randomized_accuracy)
    assert float(by_mask.sc_randomized_accuracy) == float(by_index.sc_randomized_accuracy)
    logits = torch.tensor([[-1.0], [0.5], [0.0]])
    assert class_predictions(logits).tolist() == [0, 1, 0]
    assert class_predictions(torch.tensor([[0.1, 0.3, -2.0]])).tolist() == [1]
    float_targets = simplicity_bias(model, x, y.float(), mask)
    assert float(float_targets.accuracy) == float(by_mask.accuracy)


def test_integer_token_inputs_are_permuted_as_ids():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 16, (200, 6), generator=g)
    y = tokens[:, -1] % 2  # the label is the parity of the last token

    class LastTokenParity(nn.Module):
        def forward(self, t):
            odd = (t[:, -1] % 2).double()
            return torch.stack([1 - odd, odd], dim=1)

    result = simplicity_bias(LastTokenParity(), tokens, y, simple_coords=(5,))
    assert float(result.accuracy) == 1.0 and float(result.sc_randomized_accuracy) == 1.0
    assert abs(float(result.s_randomized_accuracy) - 0.5) < chance_band(n=200)
    shuffled = randomize_coordinates(tokens, [5], seed=0)
    assert shuffled.dtype == torch.long and torch.equal(shuffled[:, :5], tokens[:, :5])


def test_seeded_and_free_of_the_global_rng():
    data = make_lms(500, dim=5, seed=6)
    model = ReadsCoordinate(0)
    state = torch.get_rng_state()
    a = simplicity_bias(model, data.inputs, data.targets, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = simplicity_bias(model, data.inputs, data.targets, seed=1)
    c = simplicity_bias(model, data.inputs, data.targets, seed=2)
    assert float(a.s_randomized_accuracy) == float(b.s_randomized_accuracy)
    assert float(a.s_randomized_accuracy) != float(c.s_randomized_accuracy)


def test_bad_input():
    data = make_lms(100, dim=5, seed=0)
    x, y = data.inputs, data.targets
    model = ReadsCoordinate(0)
    with pytest.raises(ValueError, match="out of range"):
        simplicity_bias(model, x, y, (7,))
    with pytest.raises(ValueError, match="both the simple and the complex"):
        simplicity_bias(model, x, y, (0, 1), (1, 2))
    with pytest.raises(ValueError, match="empty"):
        simplicity_bias(model, x, y, ())
    with pytest.raises(ValueError, match="complex set is empty"):
        simplicity_bias(model, x, y, (0, 1, 2, 3, 4))
    with pytest.raises(TypeError, match="integers"):
        simplicity_bias(model, x, y, (0.5,))
    with pytest.raises(ValueError, match="does not match"):
        simplicity_bias(model, x, y, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="class indices"):
        simplicity_bias(model, x, y.float() + 0.5)
    with pytest.raises(ValueError, match="do not match"):
        simplicity_bias(model, x, y[:10])
    with pytest.raises(ValueError, match="randomization"):
        simplicity_bias(model, x, y, randomization="shuffle")
    with pytest.raises(ValueError, match="reference"):
        simplicity_bias(model, x, y, reference="labels")
    with pytest.raises(ValueError, match="num_repeats"):
        simplicity_bias(model, x, y, num_repeats=0)
    with pytest.raises(ValueError, match="chunk_size"):
        simplicity_bias(model, x, y, chunk_size=0)
    with pytest.raises(ValueError, match="rotation"):
        simplicity_bias(model, x, y, rotation=torch.eye(3))
    with pytest.raises(TypeError, match="one tensor"):
        simplicity_bias(model, (x, x), y)
    with pytest.raises(TypeError, match="one tensor"):
        simplicity_bias(model, x[:, 0], y)
    with pytest.raises(TypeError, match="rotation needs floating-point"):
        simplicity_bias(model, x.long(), y, rotation=torch.eye(5))
    with pytest.raises(ValueError, match="not class scores"):
        simplicity_bias(lambda_model(lambda t: t[:, None, :2]), x, y)
    with pytest.raises(ValueError, match="two classes"):
        randomize_coordinates(x, [0], randomization="swap", targets=torch.zeros(100, dtype=torch.long))
    with pytest.raises(ValueError, match="needs targets"):
        randomize_coordinates(x, [0], randomization="swap")
    with pytest.raises(ValueError, match="at least 2 examples"):
        randomize_coordinates(x[:1], [0])


def lambda_model(fn):
    class Wrapped(nn.Module):
        def forward(self, t):
            return fn(t)

    return Wrapped()
