"""FunctionFrequency, the callback: what it logs, equality with the functional form, fixed pairs and their
checkpoint state, undefined values left out, trajectory invariance, 2-process DDP, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe.functional.frequency import function_frequency, interpolation_pairs

from lightning_biasprobe import FunctionFrequency


QUANTITIES = ("mean_frequency", "mean_frequency_per_distance", "high_frequency_fraction", "high_frequency_power",
              "max_distance", "flat_fraction")
KEYS = {f"biasprobe/freq/{g}/{q}" for g in ("same_class", "different_class", "all") for q in QUANTITIES}
KEYS.add("biasprobe/freq/seconds")
REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def fit(callbacks, epochs=1, model=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = model or BNDropoutNet()
    trainer(callbacks, max_epochs=epochs, **kwargs).fit(model, loader(blobs()))
    return model


def small_probe(**kwargs):
    kwargs.setdefault("num_samples", 60)
    kwargs.setdefault("num_pairs", 10)
    kwargs.setdefault("num_points", 16)
    return FunctionFrequency(**kwargs)


def test_logs_every_quantity_and_equals_the_functional_form_on_fixed_pairs():
    probe = small_probe(every_n_steps=3, strict=True)
    model = fit([probe])
    assert probe.measured_steps == [0, 3, 6] and probe.failures == 0
    assert set(probe.last_values) == KEYS
    for _, values in probe.history:
        assert set(values) == KEYS
    # The pairs are the seeded stratified draw from the probe set's labels, 10 of each type.
    probe_set = probe.probe_set
    expected_pairs, same = interpolation_pairs(probe_set.targets, 10, seed=0)
    assert torch.equal(probe.pairs, expected_pairs) and int(same.sum()) == 10
    # The last point (at_end) is the functional form on the final weights, in eval mode.
    model.eval()
    summary = function_frequency(model, probe_set.inputs, probe_set.targets, pairs=probe.pairs,
                                 num_points=16).summary()
    for key, value in summary.items():
        assert probe.last_values[f"biasprobe/freq/{key}"] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    values = {k.split("/", 2)[2]: v for k, v in probe.last_values.items()}
    assert values["different_class/max_distance"] > 0 and 0 <= values["all/high_frequency_fraction"] <= 1


def test_the_same_pairs_at_every_measurement_and_through_a_checkpoint(tmp_path):
    probe = small_probe(every_n_steps=2)
    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    first = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=[probe, checkpoint], logger=False,
                       enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    first.fit(BNDropoutNet(), loader(blobs()))
    pairs = probe.pairs.clone()
    state = probe.state_dict()
    assert torch.equal(state["extra"]["pairs"], pairs)
    # A new instance with the same arguments resumes with those pairs (another seed would draw others:
    # the saved pairs win, so the resumed curves follow the same paths).
    resumed = small_probe(every_n_steps=2)
    pl.seed_everything(0, verbose=False)
    second = pl.Trainer(max_epochs=2, accelerator="cpu",
                        callbacks=[resumed, ModelCheckpoint(dirpath=tmp_path / "resumed")], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    second.fit(BNDropoutNet(), loader(blobs()), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.measured_steps == [0, 2, 4, 6, 8, 10, 12] and resumed.failures == 0
    assert [step for step, _ in resumed.history] == [8, 10, 12]
    assert torch.equal(resumed.pairs, pairs)
    assert resumed.probe_set.indices == probe.probe_set.indices
    other_seed = small_probe(every_n_steps=2, seed=1)
    other_seed.load_state_dict(state)
    assert torch.equal(other_seed.pairs, pairs)


def test_a_constant_model_leaves_the_undefined_values_out_instead_of_failing(tmp_path):
    probe = small_probe(every_n_steps=3, forward=lambda module, x: torch.zeros(len(x), 3))
    tb = TensorBoardLogger(tmp_path, name="tb")
    fit([probe], logger=tb)
    assert probe.failures == 0 and probe.measured_steps == [0, 3, 6]
    logged = {k.split("/", 2)[2] for k in probe.last_values}
    for group in ("same_class", "different_class", "all"):
        for quantity in ("mean_frequency", "mean_frequency_per_distance", "high_frequency_fraction"):
            assert f"{group}/{quantity}" not in logged  # 0/0: left out, never logged as 0 or NaN
        assert probe.last_values[f"biasprobe/freq/{group}/flat_fraction"] == 1.0
        assert probe.last_values[f"biasprobe/freq/{group}/max_distance"] == 0.0
        assert probe.last_values[f"biasprobe/freq/{group}/high_frequency_power"] == 0.0
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    assert "biasprobe/freq/all/flat_fraction" in events.Tags()["scalars"]
    assert "biasprobe/freq/all/high_frequency_fraction" not in events.Tags()["scalars"]
    assert not events.Tags()["histograms"]  # no finite per-path frequency to histogram


def test_histograms_of_per_path_frequencies_go_to_tensorboard(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    fit([small_probe(every_n_steps=3)], logger=tb)
    events = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0})  # 0: keep every point
    events.Reload()
    histograms = events.Tags()["histograms"]
    for group in ("same_class", "different_class"):
        assert f"biasprobe/freq/{group}/mean_frequency_hist" in histograms
        assert [e.step for e in events.Histograms(f"biasprobe/freq/{group}/mean_frequency_hist")] == [0, 3, 6]


# --------------------------------------------------------------------------------------- isolation
def fit_for_identity(probes, accumulate=1, generator_seed=None):
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet(frozen_eval_layer=True)
    t = trainer(probes, max_epochs=2, accumulate_grad_batches=accumulate, limit_val_batches=0,
                num_sanity_val_steps=0)
    t.fit(model, loader(blobs(), generator_seed=generator_seed))
    return model, t.optimizers[0].state_dict(), torch.get_rng_state()


def assert_same_run(a, b):
    (model_a, opt_a, rng_a), (model_b, opt_b, rng_b) = a, b
    for (name, x), (_, y) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(x, y), name
    assert [m.training for m in model_a.modules()] == [m.training for m in model_b.modules()]
    assert [p.requires_grad for p in model_a.parameters()] == [p.requires_grad for p in model_b.parameters()]
    for key, fields in opt_a["state"].items():
        for field, value in fields.items():
            assert torch.equal(value, opt_b["state"][key][field]), (key, field)
    assert torch.equal(rng_a, rng_b)


@pytest.mark.parametrize("accumulate,generator_seed", [(1, None), (2, 123)])
def test_measuring_at_every_step_leaves_training_bit_identical(accumulate, generator_seed):
    baseline = fit_for_identity([], accumulate, generator_seed)
    probe = small_probe(every_n_steps=1, num_samples=48)
    assert_same_run(baseline, fit_for_identity([probe], accumulate, generator_seed))
    assert probe.measured_steps == list(range(0, 12 // accumulate + 1)) and probe.failures == 0


# --------------------------------------------------------------------------------------- bad input
def test_bad_arguments_fail_at_construction_with_clear_messages():
    with pytest.raises(ValueError, match="at least 2 points"):
        FunctionFrequency(num_points=1, window="none")
    with pytest.raises(ValueError, match="Hann"):
        FunctionFrequency(num_points=3)
    with pytest.raises(ValueError, match="num_pairs"):
        FunctionFrequency(num_pairs=0)
    with pytest.raises(ValueError, match="cutoff"):
        FunctionFrequency(cutoff=1.0)
    with pytest.raises(ValueError, match="window"):
        FunctionFrequency(window="hamming")
    with pytest.raises(ValueError, match="extrapolate"):
        FunctionFrequency(extrapolate=-1)
    with pytest.raises(ValueError, match="constant_tol"):
        FunctionFrequency(constant_tol=-1e-3)
    with pytest.raises(ValueError, match="chunk_size"):
        FunctionFrequency(chunk_size=0)
    probe = FunctionFrequency()
    assert probe.cadence.max_overhead == 0.05 and probe.cadence.every_n_epochs == 1
    assert FunctionFrequency(num_points=32).state_key != FunctionFrequency(num_points=64).state_key


def test_labels_that_are_not_classes_fail_at_setup():
    x, y = blobs().tensors
    with pytest.raises(ValueError, match="integer class labels"):
        fit([FunctionFrequency(probe_data=(x, y.double()))])
    with pytest.raises(ValueError, match="at least two classes"):
        fit([FunctionFrequency(probe_data=(x[y == 0], y[y == 0]))])
    with pytest.raises(ValueError, match="needs targets"):
        fit([FunctionFrequency(probe_data=x)])


def test_train_mode_with_dropout_is_explained_and_skipped_not_crashed():
    baseline = fit_for_identity([])
    probe = small_probe(every_n_steps=4, mode="train")
    with pytest.warns(RuntimeWarning, match="model.eval"):
        probed = fit_for_identity([probe])
    assert probe.failures > 0 and probe.measured_steps == []
    assert_same_run(baseline, probed)


def test_extrapolated_paths_are_measured_and_tell_instances_apart():
    inner = small_probe(every_n_steps=6)
    outer = small_probe(every_n_steps=6, extrapolate=0.5, name="freq_extrapolated")
    assert inner.state_key != outer.state_key
    fit([inner, outer])
    assert inner.failures == outer.failures == 0
    assert torch.equal(inner.pairs, outer.pairs)
    # Extended paths reach beyond the data, where the prediction moves further from the start's.
    a = inner.last_values["biasprobe/freq/all/max_distance"]
    b = outer.last_values["biasprobe/freq_extrapolated/all/max_distance"]
    assert b > a
