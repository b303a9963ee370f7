"""SimplicityBias in training: values, trajectory invariance, LMS data, failures (DDP: tests/test_ddp.py)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import SimplicityBias
from lightning_biasprobe.data import LMSDataModule
from lightning_biasprobe.functional.simplicity import simplicity_bias
from test_trajectory_invariance import Stream, assert_identical, fit


PREFIX = "biasprobe/simplicity/"


def test_logged_values_equal_the_function_on_the_probe_set_at_the_final_weights():
    probe = SimplicityBias(num_samples=64, simple_coords=(0, 1), randomization="swap", num_repeats=2, seed=3)
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    trainer(([probe]), max_epochs=2).fit(model, loader(blobs()))
    assert probe.measured_steps == [0, 6, 12] and probe.failures == 0  # at start, every epoch (6 steps), at end
    model.eval()
    expected = simplicity_bias(model, probe.probe_set.inputs, probe.probe_set.targets, (0, 1),
                               randomization="swap", num_repeats=2, seed=3)
    last = probe.last_values
    assert set(last) == {PREFIX + k for k in ("accuracy", "s_randomized_accuracy", "sc_randomized_accuracy",
                                              "seconds")}
    assert last[PREFIX + "accuracy"] == float(expected.accuracy)
    assert last[PREFIX + "s_randomized_accuracy"] == float(expected.s_randomized_accuracy)
    assert last[PREFIX + "sc_randomized_accuracy"] == float(expected.sc_randomized_accuracy)
    assert len(probe.probe_set) == 64


def test_agreement_keys_with_predictions_as_reference():
    probe = SimplicityBias(num_samples=48, reference="predictions", every_n_steps=3)
    pl.seed_everything(0, verbose=False)
    trainer([probe], max_epochs=1).fit(BNDropoutNet(), loader(blobs()))
    assert set(probe.last_values) == {PREFIX + "s_randomized_agreement", PREFIX + "sc_randomized_agreement",
                                      PREFIX + "seconds"}
    assert all(0 <= v <= 1 for k, v in probe.last_values.items() if not k.endswith("seconds"))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_measuring_at_every_step_leaves_training_bit_identical(accumulate):
    baseline = fit([], accumulate=accumulate)
    probe = SimplicityBias(every_n_steps=1, num_samples=48)
    assert_identical(baseline, fit([probe], accumulate=accumulate))
    steps = 2 * 6 // accumulate
    assert probe.measured_steps == list(range(steps + 1)) and probe.failures == 0


def test_invariance_with_a_shuffling_generator_frozen_modules_validation_data_and_streams():
    baseline = fit([], generator_seed=123, frozen=True)
    probe = SimplicityBias(every_n_steps=2, randomization="swap", num_repeats=2)
    assert_identical(baseline, fit([probe], generator_seed=123, frozen=True))
    assert probe.measured_steps and probe.failures == 0
    baseline = fit([], val=True)
    probe = SimplicityBias(every_n_steps=3, probe_data="val", num_samples=40)
    assert_identical(baseline, fit([probe], val=True))
    assert len(probe.probe_set) == 40 and probe.probe_set.source == "val" and probe.failures == 0
    stream = lambda: DataLoader(Stream(blobs()), batch_size=32)  # noqa: E731
    baseline = fit([], data=stream())
    probe = SimplicityBias(every_n_steps=1, num_samples=48)
    assert_identical(baseline, fit([probe], data=stream()))
    assert probe.failures == 0 and probe.measured_steps[0] == 2


class MLP(pl.LightningModule):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_an_mlp_on_rotated_lms_data_relies_on_the_linear_coordinate_only():
    data = LMSDataModule(num_train=4000, num_val=1000, dim=10, batch_size=100, seed=1, rotate=True)
    probe = SimplicityBias(probe_data=data.val_dataloader(), num_samples=1000, **data.simplicity_kwargs())
    pl.seed_everything(0, verbose=False)
    t = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, callbacks=[probe], logger=False,
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   num_sanity_val_steps=0)
    t.fit(MLP(10), datamodule=data)
    first, last = probe.history[0][1], probe.history[-1][1]
    assert first[PREFIX + "accuracy"] < 0.9  # untrained
    assert last[PREFIX + "accuracy"] > 0.99
    assert last[PREFIX + "sc_randomized_accuracy"] > 0.98
    assert abs(last[PREFIX + "s_randomized_accuracy"] - 0.5) < 0.08
    # Without the rotation the probe would randomize rotated axes, which mix every coordinate.
    wrong = simplicity_bias(t.lightning_module.eval(), probe.probe_set.inputs, probe.probe_set.targets)
    assert float(wrong.sc_randomized_accuracy) < last[PREFIX + "sc_randomized_accuracy"]


@pytest.mark.parametrize("kwargs,error", [
    ({"simple_coords": ()}, "empty"),
    ({"simple_coords": (-1,)}, "non-negative"),
    ({"simple_coords": (0, 0)}, "repeats"),
    ({"simple_coords": "0"}, "sequence"),
    ({"simple_coords": torch.zeros(4, dtype=torch.bool)}, "all-False"),
    ({"simple_coords": (0, 1), "complex_coords": (1, 2)}, "both"),
    ({"randomization": "shuffle"}, "randomization"),
    ({"reference": "labels"}, "reference"),
    ({"rotation": torch.ones(3, 3)}, "orthonormal"),
    ({"rotation": torch.eye(3)[:2]}, "square"),
    ({"num_repeats": 0}, "num_repeats"),
    ({"seed": 1.5}, "seed"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"mode": "test"}, "mode"),  # the base class's eval/train mode is still its own argument
])
def test_bad_arguments_raise_in_init(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        SimplicityBias(**kwargs)


def test_out_of_range_coordinates_warn_once_skip_and_training_goes_on():
    probe = SimplicityBias(simple_coords=(50,), every_n_steps=2, num_samples=32)
    pl.seed_everything(0, verbose=False)
    with pytest.warns(RuntimeWarning, match="out of range"):
        trainer([probe], max_epochs=1).fit(BNDropoutNet(), loader(blobs()))
    assert probe.failures > 1 and probe.history == [] and probe.measured_steps == []
    strict = SimplicityBias(simple_coords=(50,), num_samples=32, strict=True)
    with pytest.raises(ValueError, match="out of range"):
        trainer([strict], max_epochs=1).fit(BNDropoutNet(), loader(blobs()))


def test_probe_data_without_targets_fails_at_fit_start():
    probe = SimplicityBias(probe_data=torch.randn(32, 10))
    with pytest.raises(ValueError, match="needs targets"):
        trainer([probe], max_epochs=1).fit(BNDropoutNet(), loader(blobs()))


def test_state_keys_tell_configurations_apart_and_state_round_trips():
    a = SimplicityBias()
    keys = {a.state_key, SimplicityBias(simple_coords=(1,)).state_key,
            SimplicityBias(randomization="swap").state_key, SimplicityBias(reference="predictions").state_key,
            SimplicityBias(rotation=torch.eye(4)).state_key,
            SimplicityBias(simple_coords=torch.tensor([True, False])).state_key}
    assert len(keys) == 6
    assert SimplicityBias().state_key == a.state_key
    probe = SimplicityBias(every_n_steps=4, num_samples=32)
    pl.seed_everything(0, verbose=False)
    trainer([probe], max_epochs=1).fit(BNDropoutNet(), loader(blobs()))
    restored = SimplicityBias(every_n_steps=4, num_samples=32)
    restored.load_state_dict(probe.state_dict())
    assert restored.measured_steps == probe.measured_steps and restored.last_values == probe.last_values
