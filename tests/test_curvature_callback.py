"""HessianCurvature in training: keys, steps, values against the functional form, isolation, failures."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import HessianCurvature
from lightning_biasprobe.functional.curvature import hessian_eigenvalues, hessian_trace


pytestmark = pytest.mark.usefixtures("one_thread")


def fit(callbacks, model=None, accumulate=1, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = model or BNDropoutNet()
    t = trainer(callbacks, max_epochs=2, accumulate_grad_batches=accumulate, **kwargs)
    t.fit(model, loader(blobs()))
    return model, t


def test_logs_eigenvalues_trace_and_blocks_at_the_cadence_and_matches_the_functional_form():
    probe = HessianCurvature(every_n_steps=4, num_samples=64, k=2, negative=True, blocks="auto", tol=1e-6)
    model, t = fit([probe])
    assert probe.measured_steps == [0, 4, 8, 12] and probe.failures == 0
    keys = set(probe.last_values)
    blocks = ["net.0", "net.1", "net.4", "net.5", "net.8"]
    expected = {"top_eigenvalue", "eigenvalue_2", "min_eigenvalue", "trace", "trace_std_error", "num_products",
                "seconds"} | {f"top_eigenvalue/{b}" for b in blocks} | {f"trace/{b}" for b in blocks}
    assert keys == {f"biasprobe/hessian/{k}" for k in expected}
    values = {k.split("biasprobe/hessian/")[1]: v for k, v in probe.last_values.items()}
    assert values["top_eigenvalue"] >= values["eigenvalue_2"] >= values["min_eigenvalue"]
    # The last point is at the final weights (at_end): recompute it with the functional form in eval mode.
    model.eval()
    x, y = probe.probe_set.inputs, probe.probe_set.targets
    top = hessian_eigenvalues(model, x, y, k=2, tol=1e-10)
    torch.testing.assert_close(torch.tensor([values["top_eigenvalue"], values["eigenvalue_2"]], dtype=torch.float64),
                               top.eigenvalues.double(), rtol=1e-4, atol=1e-6)
    assert values["trace"] == pytest.approx(hessian_trace(model, x, y, num_products=30, seed=0).estimate.item(),
                                            rel=1e-5)
    block = hessian_eigenvalues(model, x, y, params="net.4", tol=1e-10).eigenvalues[0].item()
    assert values["top_eigenvalue/net.4"] == pytest.approx(block, rel=1e-4)
    # per-block top eigenvalues never exceed the whole Hessian's (Cauchy interlacing for a principal block)
    assert all(values[f"top_eigenvalue/{b}"] <= values["top_eigenvalue"] * (1 + 1e-6) for b in blocks)
    assert values["num_products"] > 2 * 30


@pytest.mark.parametrize("accumulate", [1, 2])
def test_measuring_every_step_leaves_training_bit_identical(accumulate):
    baseline, _ = fit([], accumulate=accumulate)
    probe = HessianCurvature(every_n_steps=1, num_samples=48, negative=True, blocks=["net.0"], density=True,
                             density_steps=8)
    probed, _ = fit([probe], accumulate=accumulate)
    for (name, a), b in zip(baseline.state_dict().items(), probed.state_dict().values()):
        assert torch.equal(a, b), name
    assert probe.measured_steps == list(range(0, 12 // accumulate + 1)) and probe.failures == 0


def test_spectral_density_goes_to_tensorboard_as_a_histogram(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    probe = HessianCurvature(num_samples=64, density=True, density_steps=12, trace=False)
    fit([probe], logger=tb)
    assert probe.measured_steps == [0, 6, 12]
    events = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0, "scalars": 0})  # keep every point
    events.Reload()
    histograms = events.Histograms("biasprobe/hessian/spectral_density")
    assert [h.step for h in histograms] == [0, 6, 12]
    top = events.Scalars("biasprobe/hessian/top_eigenvalue")[-1].value
    last = histograms[-1].histogram_value
    assert last.num == 1000 and last.max <= top * (1 + 1e-3) + 1e-6  # SLQ nodes lie inside the spectrum
    assert "biasprobe/hessian/trace" not in events.Tags()["scalars"]


def test_unknown_block_fails_at_setup_and_names_the_modules():
    with pytest.raises(ValueError, match=r"no module or parameter named 'fc9'.*net\.0"):
        fit([HessianCurvature(blocks=["fc9"])])


def test_a_block_with_only_frozen_parameters_fails_at_setup():
    model = BNDropoutNet()
    model.net[0].requires_grad_(False)
    with pytest.raises(ValueError, match="all frozen"):
        fit([HessianCurvature(blocks=["net.0"])], model=model)


class NanLoss(BNDropoutNet):
    """Trains normally, but its probe loss (eval mode) is NaN."""

    def forward(self, x):
        out = self.net(x)
        return out if self.training else out * float("nan")


def test_nan_loss_warns_once_skips_and_training_goes_on():
    probe = HessianCurvature(every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, t = fit([probe], model=NanLoss())
    ours = [w for w in caught if "HessianCurvature skipped" in str(w.message)]
    assert len(ours) == 1 and "FloatingPointError" in str(ours[0].message) and "not finite" in str(ours[0].message)
    assert probe.measured_steps == [] and probe.failures == 7 and t.global_step == 12  # 0, 2, ..., 12
    with pytest.raises(FloatingPointError, match="not finite"):
        fit([HessianCurvature(strict=True)], model=NanLoss())


def test_a_loss_that_is_not_a_scalar_is_reported_with_its_shape():
    per_sample = HessianCurvature(loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([per_sample])
    ours = [str(w.message) for w in caught if "HessianCurvature skipped" in str(w.message)]
    assert len(ours) == 1 and "scalar" in ours[0] and "(192,)" in ours[0]
    assert per_sample.failures == 3 and per_sample.measured_steps == []


@pytest.mark.parametrize("kwargs", [
    dict(k=0), dict(tol=0), dict(tol=-1e-3), dict(max_iter=0), dict(trace_products=3), dict(density_steps=1),
    dict(density_runs=0), dict(blocks=[]), dict(blocks=[""]), dict(blocks=3), dict(hvp_method="fd"),
    dict(chunk_size=0), dict(num_samples=0),
])
def test_bad_arguments_raise_in_init(kwargs):
    with pytest.raises(ValueError):
        HessianCurvature(**kwargs)


def test_two_configurations_have_distinct_state_keys():
    assert HessianCurvature().state_key != HessianCurvature(blocks="auto").state_key
    assert HessianCurvature().state_key != HessianCurvature(k=3).state_key
