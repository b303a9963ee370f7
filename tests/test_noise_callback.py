"""GradientNoise, the callback: what it logs, that it equals the functional form, train-mode BatchNorm, bad input."""

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import GradientNoise
from lightning_biasprobe.functional.noise import gradient_noise_statistics

KEYS = {"tail_index", "tail_index_clipped", "tail_index_standardized", "tail_index_standardized_clipped",
        "grad_sq_norm", "trace_cov", "snr", "gsnr", "num_samples", "num_minibatches", "batch_size",
        "tail_index_values", "tail_index_standardized_values", "tail_index_zeros", "seconds"}


def fit(callbacks, model=None, epochs=1):
    pl.seed_everything(0, verbose=False)
    model = model or BNDropoutNet()
    trainer(callbacks, max_epochs=epochs).fit(model, loader(blobs()))
    return model


def test_logs_every_quantity_and_matches_the_functional_form():
    probe = GradientNoise(num_samples=64, every_n_steps=3)
    model = fit([probe])
    assert probe.measured_steps == [0, 3, 6] and probe.failures == 0
    last = {k.split("/")[-1]: v for k, v in probe.last_values.items()}
    assert KEYS <= set(last) <= KEYS | {"b_simple"}
    assert last["num_samples"] == 64 and last["batch_size"] == 4 and last["num_minibatches"] == 16
    assert last["tail_index_values"] > 0.9 * 16 * sum(p.numel() for p in model.parameters())
    # The last point (at_end, step 6) is the functional form on the final weights, in eval mode.
    model.eval()
    stats = gradient_noise_statistics(model, probe.probe_set.inputs, probe.probe_set.targets, batch_size=4, seed=0)
    assert last["tail_index"] == pytest.approx(stats.tail.alpha, rel=1e-12)
    assert last["tail_index_standardized"] == pytest.approx(stats.tail_standardized.alpha, rel=1e-12)
    assert last["trace_cov"] == pytest.approx(stats.noise_scale.trace_cov, rel=1e-12)
    assert last["snr"] == pytest.approx(stats.noise_scale.snr, rel=1e-10)
    assert last["gsnr"] == pytest.approx(stats.noise_scale.gsnr, rel=1e-12)
    assert 0 < last["tail_index_clipped"] <= 2 and 0 < last["tail_index_standardized_clipped"] <= 2


def test_explicit_batch_size_and_loop_method():
    probe = GradientNoise(num_samples=40, batch_size=5, method="loop", every_n_epochs=1, at_start=False)
    vmapped = GradientNoise(num_samples=40, batch_size=5, every_n_epochs=1, at_start=False, name="noise_vmap")
    fit([probe, vmapped])
    assert probe.measured_steps == vmapped.measured_steps == [6]
    a, b = probe.last_values, vmapped.last_values
    assert a["biasprobe/noise/num_minibatches"] == 8 and a["biasprobe/noise/batch_size"] == 5
    for key in ("tail_index", "trace_cov", "gsnr", "snr"):
        assert a[f"biasprobe/noise/{key}"] == pytest.approx(b[f"biasprobe/noise_vmap/{key}"], rel=1e-5), key


def test_batchnorm_in_train_mode_is_explained_not_crashed():
    """mode='train' on a model with BatchNorm: per-sample gradients are undefined there. The probe
    warns once with the reason, logs nothing, and training ends exactly as without the probe."""
    baseline = fit([])
    probe = GradientNoise(num_samples=32, mode="train", every_n_steps=2)
    with pytest.warns(RuntimeWarning, match=r"BatchNorm.*train mode.*eval") as caught:
        probed = fit([probe])
    assert sum("GradientNoise skipped" in str(w.message) for w in caught) == 1
    assert probe.measured_steps == [] and probe.failures == 4  # attempted at steps 0, 2, 4 and 6 (the end)
    for (name, a), (_, b) in zip(baseline.state_dict().items(), probed.state_dict().items()):
        assert torch.equal(a, b), name


class DropoutNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_train_mode_without_batchnorm_measures_dropout_noise_too():
    eval_probe = GradientNoise(num_samples=32, every_n_epochs=1, at_start=False, name="eval")
    train_probe = GradientNoise(num_samples=32, every_n_epochs=1, at_start=False, mode="train", name="train")
    fit([eval_probe, train_probe], model=DropoutNet())
    assert eval_probe.failures == train_probe.failures == 0
    # Dropout masks add per-sample noise: the noise trace is larger in train mode.
    assert train_probe.last_values["biasprobe/train/trace_cov"] > eval_probe.last_values["biasprobe/eval/trace_cov"]


def test_unresolved_noise_scale_is_left_out_with_one_warning():
    """At the least-squares optimum the mean gradient is zero: ||G||^2 is estimated as -S/N < 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(64, 1, generator=g,
                                                                                            dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    probe = GradientNoise(num_samples=64)
    probe.set_probe_data((x, y))
    with pytest.warns(RuntimeWarning, match="B_simple"):
        values = probe.run_measurement(model, step=0)
    assert "b_simple" not in values and values["snr"] < 0 and values["grad_sq_norm"] < 0
    assert values["trace_cov"] > 0 and all(math.isfinite(v) for v in values.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once only
        assert "b_simple" not in probe.run_measurement(model, step=1)
    # Away from the optimum the signal is resolved and B_simple is logged.
    with torch.no_grad():
        model.weight.add_(1.0)
    values = probe.run_measurement(model, step=2)
    assert values["b_simple"] == pytest.approx(1 / values["snr"], rel=1e-12) and values["b_simple"] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=200), "fewer than two minibatches"),
    (dict(num_minibatches=1), "num_minibatches"),
    (dict(num_samples=8), "smaller than num_minibatches"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(max_coordinates=0), "max_coordinates"),
    (dict(block_size=1), "block_size"),
    (dict(method="functorch"), "method"),
])
def test_bad_configuration_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientNoise(**kwargs)


def test_state_key_tells_configurations_apart():
    assert GradientNoise().state_key != GradientNoise(batch_size=8).state_key
    assert GradientNoise().state_key == GradientNoise().state_key
