"""EffectiveRank callback: logged values equal the functional ones, validation accumulation, bad input."""

import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import EffectiveRank
from lightning_biasprobe.functional.rank import layer_spectra, rank_measures

QUANTITIES = ["erank_features", "erank_features_centered", "erank_gram", "rankme", "stable_rank_features"]


pytestmark = pytest.mark.usefixtures("one_thread")


def expected_values(model, inputs, **kwargs):
    model.eval()
    spectra = layer_spectra(model, inputs, **kwargs)
    return {f"biasprobe/rank/{key}/{q}": float(v) for key, s in spectra.items()
            for q, v in rank_measures(s.singular_values, s.centered_singular_values).items()}


def forward_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_logged_values_equal_the_functional_values_and_reach_tensorboard(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    probe = EffectiveRank(num_samples=64)
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer([probe], max_epochs=2, logger=tb).fit(model, loader(blobs()))
    assert probe.measured_steps == [0, 6, 12] and probe.failures == 0
    expected = expected_values(model, probe.probe_set.inputs)
    assert sorted(expected) == sorted(f"biasprobe/rank/net.{i}/{q}" for i in (3, 7) for q in QUANTITIES)
    for key, value in expected.items():  # the last point is at the final weights
        assert probe.last_values[key] == pytest.approx(value, rel=1e-9), key
    assert forward_hooks(model) == 0
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("biasprobe/rank/net.7/erank_features")] == [0, 6, 12]
    assert "biasprobe/rank/net.3/singular_values" in events.Tags()["histograms"]
    assert "biasprobe/rank/profile" in events.Tags()["images"]


def test_validation_accumulation_equals_one_pass_over_all_validation_data():
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    probe = EffectiveRank(data="val", layers=["net.3", "net.7"], max_dim=16, strict=True)
    val = loader(blobs(n=96, seed=1), batch_size=16, shuffle=False)  # 6 batches per validation
    trainer([probe], max_epochs=2, num_sanity_val_steps=2).fit(model, loader(blobs()), val)
    # Validation runs at the end of each epoch; the sanity check is not a measurement.
    assert probe.measured_steps == [6, 12] and [s for s, _ in probe.history] == [6, 12]
    everything = torch.cat([x for x, _ in val])
    expected = expected_values(model, everything, layers=["net.3", "net.7"], max_dim=16)
    for key, value in expected.items():
        assert probe.last_values[key] == pytest.approx(value, rel=1e-9), key
    assert probe.last_values["biasprobe/rank/val_seconds"] >= 0


def test_unknown_layer_fails_at_setup_and_lists_the_module_names():
    model = BNDropoutNet()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"no module named 'net\.42'.*'net\.3'"):
        trainer([EffectiveRank(layers=["net.3", "net.42"])], max_epochs=1).fit(model, loader(blobs()))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing trained


@pytest.mark.parametrize("kwargs, error", [
    (dict(data="train"), ValueError),
    (dict(conv_pool="max"), ValueError),
    (dict(sequence_pool="median"), ValueError),
    (dict(max_dim=0), ValueError),
    (dict(chunk_size=0), ValueError),
    (dict(layers=[3]), TypeError),
    (dict(layers=["auto", "net.1"]), ValueError),
])
def test_bad_arguments_fail_at_construction(kwargs, error):
    with pytest.raises(error):
        EffectiveRank(**kwargs)


def test_a_layer_that_does_not_run_warns_once_and_training_goes_on():
    model = BNDropoutNet()
    probe = EffectiveRank(layers="net.7", forward=lambda m, x: m.net[:4](x), every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([probe], max_epochs=1).fit(model, loader(blobs()))
    ours = [w for w in caught if "EffectiveRank skipped" in str(w.message)]
    assert len(ours) == 1 and "did not run" in str(ours[0].message)
    assert probe.failures == 4 and probe.history == [] and forward_hooks(model) == 0
    with pytest.raises(ValueError, match="did not run"):
        trainer([EffectiveRank(layers="net.7", forward=lambda m, x: m.net[:4](x), strict=True)],
                max_epochs=1).fit(BNDropoutNet(), loader(blobs()))


def test_state_round_trip_and_keys_tell_configurations_apart():
    a, b = EffectiveRank(), EffectiveRank(data="val")
    assert a.state_key != b.state_key and a.state_key != EffectiveRank(max_dim=None).state_key
    b._val_pending, b._last_val_step = True, 17
    c = EffectiveRank(data="val")
    c.load_state_dict(b.state_dict())
    assert c._val_pending and c._last_val_step == 17


def test_validation_mode_respects_the_overhead_budget_but_always_measures_at_the_end():
    pl.seed_everything(0, verbose=False)
    probe = EffectiveRank(data="val", max_overhead=1e-9)
    val = loader(blobs(n=64, seed=1), batch_size=16, shuffle=False)
    trainer([probe], max_epochs=3).fit(BNDropoutNet(), loader(blobs()), val)
    # The first validation is within budget (nothing spent yet); the second is over it and skipped;
    # the final one is the at_end point, which ignores the budget (as the base class does).
    assert probe.measured_steps == [6, 18] and probe.skipped_for_budget == 1


def test_without_matplotlib_the_profile_figure_is_left_out_and_nothing_else_changes(tmp_path, monkeypatch):
    """matplotlib is optional (the `plot` extra): without it the scalars and histograms still arrive."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    pl.seed_everything(0, verbose=False)
    probe = EffectiveRank(num_samples=64)
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer([probe], max_epochs=1, logger=tb).fit(BNDropoutNet(), loader(blobs()))
    assert probe.failures == 0 and probe.measured_steps == [0, 6]
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("biasprobe/rank/net.7/erank_features")] == [0, 6]
    assert "biasprobe/rank/net.3/singular_values" in events.Tags()["histograms"]
    assert events.Tags()["images"] == []
