"""LMS data: slab geometry, margins, that each designated coordinate alone separates, the data module."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_biasprobe.data import (
    LMSDataModule,
    linear_coordinate,
    make_lms,
    make_ms,
    make_slab_data,
    slab_coordinate,
    slab_intervals,
    slab_labels,
    slab_width,
)


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("width,margin", [(1.0, 0.1), (10.0, 0.05)])
def test_slabs_tile_the_range_with_alternating_labels_and_equal_gaps(k, width, margin):
    slabs = slab_intervals(k, width, margin)
    s, gamma = slab_width(k, width, margin), margin * width
    assert s == pytest.approx((2 * width - 2 * (k - 1) * gamma) / k)
    assert slabs[0][0] == pytest.approx(-width) and slabs[-1][1] == pytest.approx(width)
    for (lo, hi, _), (lo2, _, _) in zip(slabs, slabs[1:]):
        assert hi - lo == pytest.approx(s)
        assert lo2 - hi == pytest.approx(2 * gamma)
    labels = [label for _, _, label in slabs]
    centre = k // 2
    assert labels[centre] == 0 and all(labels[i] != labels[i + 1] for i in range(k - 1))
    assert labels == labels[::-1]  # symmetric under x -> -x
    for (lo, hi, _), (lo2, hi2, _) in zip(slabs, slabs[::-1]):
        assert lo == pytest.approx(-hi2) and hi == pytest.approx(-lo2)


def test_five_slab_numbers_of_the_reference_geometry():
    assert slab_width(5) == pytest.approx(0.24)
    expected = [(-1.0, -0.76, 0), (-0.56, -0.32, 1), (-0.12, 0.12, 0), (0.32, 0.56, 1), (0.76, 1.0, 0)]
    for (lo, hi, label), (elo, ehi, elabel) in zip(slab_intervals(5), expected):
        assert (lo, hi, label) == (pytest.approx(elo), pytest.approx(ehi), elabel)


def min_gap_between_classes(values, labels):
    order = torch.argsort(values)
    v, y = values[order], labels[order]
    changes = y[1:] != y[:-1]
    return float((v[1:] - v[:-1])[changes].min())


@pytest.mark.parametrize("width", [1.0, 4.0])
def test_every_designated_coordinate_alone_separates_with_the_stated_margins(width):
    data = make_slab_data(20_000, ("linear", 3, 5, 7, "noise"), width=width, seed=0)
    x, y = data.inputs.double(), data.targets
    gamma = 0.1 * width
    # The linear coordinate: a threshold at 0; class 1 in [gamma, w], class 0 in [-w, -gamma].
    assert torch.equal((x[:, 0] > 0).long(), y)
    assert float(x[y == 1, 0].min()) >= gamma - 1e-6 and float(x[y == 1, 0].max()) <= width + 1e-6
    assert float(x[y == 0, 0].max()) <= -gamma + 1e-6 and float(x[y == 0, 0].min()) >= -width - 1e-6
    assert min_gap_between_classes(x[:, 0], y) >= 2 * gamma - 1e-5
    for i, k in ((1, 3), (2, 5), (3, 7)):
        column = x[:, i]
        assert torch.equal(slab_labels(column, k, width), y), k  # the slab rule classifies perfectly
        # Every value lies inside a slab of its own label, and opposite classes are >= 2 gamma apart.
        inside = torch.zeros_like(column, dtype=torch.bool)
        for lo, hi, label in slab_intervals(k, width):
            inside |= (column >= lo - 1e-6) & (column <= hi + 1e-6) & (y == label)
        assert bool(inside.all()), k
        assert min_gap_between_classes(column, y) >= 2 * gamma - 1e-5, k
        # ... but no threshold does: the best single threshold is far from perfect.
        thresholds = torch.linspace(-width, width, 201, dtype=torch.float64)
        best = max(max(float(((column > t).long() == y).double().mean()), float(((column <= t).long() == y)
                                                                               .double().mean())) for t in thresholds)
        assert best < 0.8, k
    noise = x[:, 4]
    assert float(noise.min()) >= 0 and float(noise.max()) < width
    assert abs(float(noise[y == 0].mean() - noise[y == 1].mean())) < 0.03 * width  # independent of the label


def test_slab_probabilities_and_balance_follow_the_reference_generator():
    n = 40_000
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (n,), generator=g)
    tol = lambda p, m: 5 * math.sqrt(p * (1 - p) / m)  # noqa: E731
    five = slab_coordinate(y, 5, generator=g)
    centre0 = float((five[y == 0].abs() < 0.12 + 1e-9).double().mean())
    assert abs(centre0 - 3 / 4) < tol(3 / 4, int((y == 0).sum()))
    seven = slab_coordinate(y, 7, generator=g)
    s7 = slab_width(7)
    inner1 = float((seven[y == 1].abs() < 1.5 * s7 + 0.2 + 1e-9).double().mean())
    assert abs(inner1 - 7 / 8) < tol(7 / 8, int((y == 1).sum()))
    centre7 = float((seven[y == 0].abs() < s7 / 2 + 1e-9).double().mean())
    assert abs(centre7 - 1 / 2) < tol(1 / 2, int((y == 0).sum()))
    for column in (five, seven):
        assert abs(float((column > 0).double().mean()) - 0.5) < tol(0.5, n)  # both sides equally likely
    lin = linear_coordinate(y, generator=g)
    assert torch.equal((lin > 0).long(), y)
    data = make_lms(n, dim=3, seed=2)
    assert abs(float(data.targets.double().mean()) - 0.5) < tol(0.5, n)


def test_coordinates_are_conditionally_independent_given_the_label():
    data = make_lms(40_000, dim=3, seed=3)
    x, y = data.inputs.double(), data.targets
    for c in (0, 1):
        a, b = x[y == c, 1].abs(), x[y == c, 2].abs()
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(corr) < 5 / math.sqrt(len(a))


def test_lms_and_ms_layouts_and_simple_coordinates():
    lms = make_lms(100, dim=6, num_slabs=7, seed=0)
    assert lms.kinds == ("linear", 7, 7, 7, 7, 7) and lms.inputs.shape == (100, 6) and lms.inputs.dtype == torch.float32
    assert lms.simple_coords == (0,) and lms.complex_coords == (1, 2, 3, 4, 5)
    assert lms.simplicity_kwargs() == {"simple_coords": (0,), "complex_coords": (1, 2, 3, 4, 5), "rotation": None}
    ms = make_ms(100, dim=4, seed=0)
    assert ms.kinds == (5, 7, 7, 7) and ms.simple_coords == (0,) and ms.complex_coords == (1, 2, 3)
    assert torch.equal(slab_labels(ms.inputs[:, 0], 5), ms.targets)
    only_slabs = make_slab_data(50, ("noise", 5, 5), seed=0)
    with pytest.raises(ValueError, match="no simple/complex split"):
        only_slabs.simplicity_kwargs()


def test_seeded_and_free_of_the_global_rng():
    state = torch.get_rng_state()
    a, b = make_lms(500, dim=5, seed=7), make_lms(500, dim=5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, make_lms(500, dim=5, seed=8).inputs)


def test_rotation_hides_the_axis_and_unrotated_recovers_it():
    data = make_lms(5000, dim=8, rotate=True, seed=4)
    w = data.rotation.double()
    torch.testing.assert_close(w.T @ w, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-6)
    x = data.unrotated().double()
    assert torch.equal((x[:, 0] > 0).long(), data.targets)
    assert float(((data.inputs[:, 0] > 0).long() == data.targets).double().mean()) < 0.95
    plain = make_lms(5000, dim=8, seed=4)
    assert plain.rotation is None and torch.equal(plain.unrotated(), plain.inputs)


def test_corrupted_linear_coordinate():
    n, frac = 1000, 0.1
    flipped = make_lms(n, dim=3, corrupt_linear=frac, seed=5)
    wrong = int(((flipped.inputs[:, 0] > 0).long() != flipped.targets).sum())
    assert wrong == round(n * frac)
    moved = make_lms(n, dim=3, corrupt_linear=frac, corrupt_linear_into_margin=True, seed=5)
    in_margin = moved.inputs[:, 0].abs() < 0.1
    assert int(in_margin.sum()) == round(n * frac)
    assert torch.equal(slab_labels(moved.inputs[:, 1], 5), moved.targets)  # slabs untouched


def test_bad_input():
    for kinds in ((), ("linear", 4), ("linear", "quadratic"), (True,)):
        with pytest.raises(ValueError, match="kind"):
            make_slab_data(10, kinds)
    for n in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="n must"):
            make_lms(n)
    with pytest.raises(ValueError, match="dim"):
        make_lms(10, dim=1)
    with pytest.raises(ValueError, match="3, 5 or 7"):
        make_lms(10, num_slabs=4)
    with pytest.raises(ValueError, match="slab margin"):
        make_lms(10, slab_margin=0.3)  # four gaps of 2 * 0.3 do not fit in [-1, 1] with 5 slabs
    with pytest.raises(ValueError, match="linear margin"):
        make_lms(10, linear_margin=1.5)
    with pytest.raises(ValueError, match="width"):
        make_lms(10, width=0)
    with pytest.raises(ValueError, match="corrupt_linear"):
        make_lms(10, corrupt_linear=1.5)
    with pytest.raises(ValueError, match="p5"):
        slab_coordinate(torch.zeros(3, dtype=torch.long), 5, p5=1.5)
    with pytest.raises(ValueError, match="simple_slabs"):
        make_ms(10, simple_slabs=7, complex_slabs=5)


def test_data_module_splits_loaders_and_probe_arguments():
    dm = LMSDataModule(num_train=300, num_val=100, dim=6, batch_size=32, seed=3, rotate=True)
    dm.setup("fit")
    assert len(dm.train_set) == 300 and len(dm.val_set) == 100
    full = make_slab_data(400, ("linear",) + (5,) * 5, seed=3, rotate=True)
    assert torch.equal(dm.val_set.tensors[0], full.inputs[:100])
    assert torch.equal(dm.train_set.tensors[0], full.inputs[100:])
    kwargs = dm.simplicity_kwargs()
    assert kwargs["simple_coords"] == (0,) and kwargs["complex_coords"] == (1, 2, 3, 4, 5)
    torch.testing.assert_close(kwargs["rotation"], full.rotation)
    train = dm.train_dataloader()
    assert isinstance(train, DataLoader) and train.batch_size == 32
    state = torch.get_rng_state()
    first = [b[1] for b in dm.train_dataloader()]
    assert torch.equal(torch.get_rng_state(), state)  # shuffles with its own generator
    assert all(torch.equal(a, b) for a, b in zip(first, [b[1] for b in dm.train_dataloader()]))
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(x, full.inputs[:32]) and torch.equal(y, full.targets[:32])
    ms = LMSDataModule(num_train=10, num_val=10, dim=3, dataset="ms")
    assert ms.kinds == (5, 7, 7)
    custom = LMSDataModule(num_train=10, num_val=10, kinds=("noise", 5, 5, 5))
    assert custom.dim == 4 and custom.kinds == ("noise", 5, 5, 5)


def test_data_module_bad_input():
    with pytest.raises(ValueError, match="num_train"):
        LMSDataModule(num_train=0)
    with pytest.raises(ValueError, match="dataset"):
        LMSDataModule(dataset="mnist-cifar")
    with pytest.raises(ValueError, match="num_slabs"):
        LMSDataModule(num_slabs=4)
    with pytest.raises(ValueError, match="seed="):
        LMSDataModule(generator=torch.Generator())
    with pytest.raises(ValueError, match="slab margin"):  # generator options fail at construction
        LMSDataModule(slab_margin=0.5)
    with pytest.raises(TypeError):
        LMSDataModule(not_an_option=1)
