"""EffectiveDepth callback: values equal the functional ones, held-out data, accumulation, isolation, bad input."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import EffectiveDepth, EffectiveRank
from lightning_biasprobe.functional.ncc import ncc_profile


pytestmark = pytest.mark.usefixtures("one_thread")


def same_blobs(n, seed):
    """Examples of the same three classes as ``blobs(seed=0)`` (same centres), drawn with another seed."""
    g = torch.Generator().manual_seed(0)
    y0 = torch.randint(0, 3, (192,), generator=g)  # noqa: F841  (advance as blobs() does)
    centers = torch.randn(3, 10, generator=g) * 2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, 10, generator=g), y)


def train_keys(layers=("net.3", "net.7")):
    return sorted([f"biasprobe/ncc/{l}/{q}" for l in layers for q in ("train_acc", "nc1", "cdnv")]
                  + ["biasprobe/ncc/effective_depth", "biasprobe/ncc/seconds"])


def check_against_functional(probe, model, heldout=None):
    model.eval()
    probe_set = probe.probe_set
    profile = ncc_profile(model, probe_set.inputs, probe_set.targets, heldout_inputs=heldout and heldout[0],
                          heldout_targets=heldout and heldout[1])
    values = probe.last_values
    assert values["biasprobe/ncc/effective_depth"] == profile.effective_depth
    for i, layer in enumerate(profile.layers):
        assert values[f"biasprobe/ncc/{layer}/train_acc"] == pytest.approx(profile.train_accuracy[i].item(), abs=1e-12)
        assert values[f"biasprobe/ncc/{layer}/nc1"] == pytest.approx(profile.nc1[i].item(), rel=1e-9)
        assert values[f"biasprobe/ncc/{layer}/cdnv"] == pytest.approx(profile.cdnv[i].item(), rel=1e-9)
        if heldout is not None:
            assert values[f"biasprobe/ncc/{layer}/heldout_acc"] == pytest.approx(profile.heldout_accuracy[i].item(),
                                                                                abs=1e-12)
    return profile


def test_held_out_accuracy_is_accumulated_over_the_whole_validation_epoch(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    probe = EffectiveDepth(num_samples=90, strict=True)
    val_data = same_blobs(100, seed=5)
    val = loader(val_data, batch_size=16, shuffle=False)  # 7 batches, the last one short
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer([probe], max_epochs=2, logger=tb).fit(model, loader(blobs()), val)
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("biasprobe/ncc/net.7/heldout_acc")] == [6, 12]
    assert [e.step for e in events.Scalars("biasprobe/ncc/effective_depth")] == [0, 6, 12]
    assert "biasprobe/ncc/profile" in events.Tags()["images"]
    assert probe.measured_steps == [0, 6, 12] and probe.failures == 0
    rows = dict(probe.history)
    assert sorted(rows[0]) == train_keys()  # before training: no validation yet, so no held-out values
    for step in (6, 12):  # epoch ends: training and held-out values in one row
        assert sorted(rows[step]) == sorted(train_keys() + ["biasprobe/ncc/net.3/heldout_acc",
                                                            "biasprobe/ncc/net.7/heldout_acc",
                                                            "biasprobe/ncc/val_seconds"])
    profile = check_against_functional(probe, model, val_data.tensors)
    assert (profile.heldout_accuracy > 0.9).all()  # the same classes: the NCC generalises


def test_step_cadence_with_validation_keeps_train_points_and_adds_held_out_rows():
    pl.seed_everything(0, verbose=False)
    probe = EffectiveDepth(num_samples=48, every_n_steps=4, strict=True)
    trainer([probe], max_epochs=2).fit(BNDropoutNet(), loader(blobs()), loader(same_blobs(32, 6), shuffle=False))
    # 4, 8, 12 from the cadence; 6 (validation after a cadence point) measures both; at 12 the
    # cadence measured first and the validation adds a held-out row at the same step.
    assert probe.measured_steps == [0, 4, 6, 8, 12]
    steps = [s for s, _ in probe.history]
    assert steps == [0, 4, 6, 8, 12, 12]
    assert sorted(probe.history[-1][1]) == ["biasprobe/ncc/net.3/heldout_acc", "biasprobe/ncc/net.7/heldout_acc",
                                            "biasprobe/ncc/val_seconds"]


def test_fixed_held_out_tensors_are_measured_at_every_point():
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    held = same_blobs(50, seed=7)
    probe = EffectiveDepth(num_samples=60, heldout=held.tensors, every_n_epochs=1)
    trainer([probe], max_epochs=1).fit(model, loader(blobs()))
    assert probe.measured_steps == [0, 6]
    assert all("biasprobe/ncc/net.7/heldout_acc" in values for _, values in probe.history)
    check_against_functional(probe, model, held.tensors)
    # ... or a DataLoader of them, read whole.
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    probe = EffectiveDepth(num_samples=60, heldout=DataLoader(held, batch_size=7))
    trainer([probe], max_epochs=1).fit(model, loader(blobs()))
    check_against_functional(probe, model, held.tensors)


def test_without_validation_data_every_row_has_the_same_keys_and_no_held_out_values():
    probe = EffectiveDepth(num_samples=48, every_n_steps=3)
    trainer([probe], max_epochs=1).fit(BNDropoutNet(), loader(blobs()))
    assert probe.measured_steps == [0, 3, 6]
    assert all(sorted(values) == train_keys() for _, values in probe.history)


def test_explicit_layers_and_epsilon():
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    probe = EffectiveDepth(layers=["net.0", "net.3", "net.7", "net.8"], epsilon=0.2, num_samples=96)
    trainer([probe], max_epochs=2).fit(model, loader(blobs()))
    model.eval()
    x, y = probe.probe_set.inputs, probe.probe_set.targets
    profile = ncc_profile(model, x, y, layers=["net.0", "net.3", "net.7", "net.8"], epsilon=0.2)
    assert probe.last_values["biasprobe/ncc/effective_depth"] == profile.effective_depth
    assert probe.last_values["biasprobe/ncc/net.8/train_acc"] == profile.train_accuracy[3].item()
    assert 1 <= profile.effective_depth <= 5


def fit_for_identity(probes, accumulate):
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    t = trainer(probes, max_epochs=2, accumulate_grad_batches=accumulate, limit_val_batches=3, num_sanity_val_steps=1)
    t.fit(model, loader(blobs()), loader(same_blobs(64, 8), batch_size=16, shuffle=False))
    return model, t.optimizers[0].state_dict(), torch.get_rng_state()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_validation_accumulation_leaves_the_training_trajectory_bit_identical(accumulate):
    baseline = fit_for_identity([], accumulate)
    probes = [EffectiveDepth(every_n_steps=1, num_samples=48), EffectiveRank(data="val", every_n_steps=1),
              EffectiveDepth(heldout=same_blobs(20, 9).tensors, every_n_steps=1, num_samples=48, name="ncc_fixed")]
    probed = fit_for_identity(probes, accumulate)
    (model_a, opt_a, rng_a), (model_b, opt_b, rng_b) = baseline, probed
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert [m.training for m in model_a.modules()] == [m.training for m in model_b.modules()]
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(value, opt_b["state"][key][field])
    assert torch.equal(rng_a, rng_b)
    assert all(p.failures == 0 and p.measured_steps for p in probes)
    assert sum(len(m._forward_hooks) for m in model_b.modules()) == 0


def test_regression_targets_warn_once_and_skip():
    x = torch.randn(64, 10)
    data = DataLoader(TensorDataset(x, torch.randn(64)), batch_size=16)

    class Regression(BNDropoutNet):
        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self(batch[0])[:, 0], batch[1])

    probe = EffectiveDepth(num_samples=32, every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([probe], max_epochs=1).fit(Regression(), data)
    ours = [w for w in caught if "EffectiveDepth skipped" in str(w.message)]
    assert len(ours) == 1 and "integer class labels" in str(ours[0].message)
    assert probe.history == [] and probe.failures == 3


def test_single_class_probe_set_is_skipped_with_a_reason():
    data = DataLoader(TensorDataset(torch.randn(64, 10), torch.zeros(64, dtype=torch.long)), batch_size=16)
    probe = EffectiveDepth(num_samples=32, every_n_epochs=1)
    with pytest.warns(RuntimeWarning, match="single class"):
        trainer([probe], max_epochs=1).fit(BNDropoutNet(), data)
    assert probe.history == []


def test_missing_targets_and_unknown_layers_fail_at_setup():
    data = DataLoader(TensorDataset(torch.randn(64, 10)), batch_size=16)

    class Unsupervised(BNDropoutNet):
        def training_step(self, batch, batch_idx):
            return self(batch[0]).pow(2).mean()

    with pytest.raises(ValueError, match="needs targets"):
        trainer([EffectiveDepth()], max_epochs=1).fit(Unsupervised(), data)
    with pytest.raises(ValueError, match=r"no module named 'encoder'.*'net\.0'"):
        trainer([EffectiveDepth(layers="encoder")], max_epochs=1).fit(BNDropoutNet(), loader(blobs()))


@pytest.mark.parametrize("kwargs, error", [
    (dict(epsilon=1.0), ValueError),
    (dict(epsilon=-0.1), ValueError),
    (dict(heldout="test"), ValueError),
    (dict(heldout=torch.randn(5, 10)), ValueError),
    (dict(heldout=(torch.randn(5, 10), torch.randn(5))), ValueError),
    (dict(heldout=3), TypeError),
    (dict(clip=0), ValueError),
    (dict(max_dim=-1), ValueError),
    (dict(layers=""), ValueError),
])
def test_bad_arguments_fail_at_construction(kwargs, error):
    with pytest.raises(error):
        EffectiveDepth(**kwargs)


def test_a_single_layer_profile_survives_the_validation_reduction():
    # torchmetrics squeezes one-element results of compute(): one layer means a (1,) state.
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    probe = EffectiveDepth(layers=["net.3"], num_samples=60, strict=True)
    trainer([probe], max_epochs=1).fit(model, loader(blobs()), loader(same_blobs(40, seed=5), shuffle=False))
    assert 0.0 <= probe.last_values["biasprobe/ncc/net.3/heldout_acc"] <= 1.0
    assert probe.failures == 0
