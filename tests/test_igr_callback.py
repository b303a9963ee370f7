"""GradientRegularization in training: values by hand, steps, isolation, optimizer warnings, failures."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import GradientRegularization

STEPS = 12  # 192 examples, batch 32, 2 epochs


class PlainSGDNet(BNDropoutNet):
    """Plain gradient descent (no momentum), with two parameter groups at different learning rates."""

    def __init__(self, optimizer="sgd", **kwargs):
        super().__init__(**kwargs)
        self.optimizer_name = optimizer

    def configure_optimizers(self):
        groups = [{"params": self.net[:4].parameters(), "lr": 0.05},
                  {"params": self.net[4:].parameters(), "lr": 0.2}]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(groups)
        return torch.optim.SGD(groups, lr=0.1)


class Recorder(pl.Callback):
    """Computes the IGR quantities by hand from .grad, in the same hook, for every optimizer step."""

    def __init__(self):
        self.points = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        per_group = [(g["lr"], sum(float(p.grad.double().pow(2).sum()) for p in g["params"] if p.grad is not None))
                     for g in optimizer.param_groups]
        self.points[trainer.global_step] = {
            "grad_norm_sq": sum(n for _, n in per_group),
            "igr_term": sum(lr / 4 * n for lr, n in per_group),
            "lr": optimizer.param_groups[0]["lr"],
        }


def fit(callbacks, model=None, accumulate=1, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = model if model is not None else PlainSGDNet()
    t = trainer(callbacks, max_epochs=2, accumulate_grad_batches=accumulate, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the optimizer warnings are tested on their own
        t.fit(model, loader(blobs()))
    return model, t


@pytest.mark.parametrize("accumulate", [1, 2])
def test_values_equal_lr_over_four_times_the_gradient_norm_by_hand_at_every_step(accumulate):
    recorder, probe = Recorder(), GradientRegularization()
    fit([recorder, probe], accumulate=accumulate)
    steps = STEPS // accumulate
    # one point per optimizer step, at the step whose weights the gradient was taken at: 0 .. T-1
    assert probe.measured_steps == list(range(steps)) == sorted(recorder.points)
    for step, values in probe.history:
        hand = recorder.points[step]
        for quantity in ("grad_norm_sq", "igr_term", "lr"):
            # per-tensor norms in float32 (fused), their squares summed in float64: ~1e-7 relative
            assert values[f"biasprobe/igr/{quantity}"] == pytest.approx(hand[quantity], rel=1e-6), (step, quantity)
        assert values["biasprobe/igr/seconds"] >= 0
    # with two groups (lr 0.05 and 0.2) the term lies strictly between the single-lr values
    last = probe.history[-1][1]
    assert 0.05 / 4 * last["biasprobe/igr/grad_norm_sq"] < last["biasprobe/igr/igr_term"] \
        < 0.2 / 4 * last["biasprobe/igr/grad_norm_sq"]


def test_the_value_is_the_unclipped_gradient():
    class BeforeClipping(pl.Callback):
        norms = []

        def on_after_backward(self, trainer, pl_module):
            self.norms.append(sum(float(p.grad.double().pow(2).sum()) for p in pl_module.parameters()))

    seen = BeforeClipping()
    probe = GradientRegularization()
    fit([seen, probe], gradient_clip_val=1e-3)
    logged = [v["biasprobe/igr/grad_norm_sq"] for _, v in probe.history]
    assert logged == pytest.approx(seen.norms, rel=1e-6)
    assert min(logged) > 1e-6  # so clipping at 1e-3 did change the gradients the optimizer used


@pytest.mark.parametrize("kwargs,steps", [
    (dict(every_n_steps=2), [0, 2, 4, 6, 8, 10, 11]),       # at_end: the last optimizer step, at its own step
    (dict(every_n_steps=2, at_end=False), [0, 2, 4, 6, 8, 10]),
    (dict(every_n_steps=5, at_start=False), [5, 10, 11]),
    (dict(every_n_epochs=1), [0, 5, 11]),                   # the last optimizer step of each epoch
    (dict(log_spaced=True, at_end=False), [0, 5, 6, 7, 8, 10, 11]),  # floor(5 * 1.15**k)
])
def test_cadence_points_land_on_optimizer_steps(kwargs, steps):
    probe = GradientRegularization(**kwargs)
    fit([probe])
    assert probe.measured_steps == steps and [s for s, _ in probe.history] == steps


@pytest.mark.parametrize("accumulate", [1, 2])
def test_reading_gradients_leaves_training_bit_identical(accumulate):
    pl.seed_everything(0, verbose=False)
    baseline = BNDropoutNet()
    trainer([], max_epochs=2, accumulate_grad_batches=accumulate).fit(baseline, loader(blobs()))
    pl.seed_everything(0, verbose=False)
    probed = BNDropoutNet()
    probe = GradientRegularization(every_n_steps=1)
    t = trainer([probe], max_epochs=2, accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t.fit(probed, loader(blobs()))
    for (name, a), b in zip(baseline.state_dict().items(), probed.state_dict().values()):
        assert torch.equal(a, b), name
    assert probe.measured_steps == list(range(STEPS // accumulate)) and probe.failures == 0


@pytest.mark.parametrize("model,expected", [
    (lambda: PlainSGDNet(), None),
    (lambda: BNDropoutNet(), "momentum=0.9"),
    (lambda: PlainSGDNet(optimizer="adam"), "Adam is not plain gradient descent"),
])
def test_warns_once_when_h_over_4_is_not_the_optimizers_coefficient(model, expected):
    probe = GradientRegularization()
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([probe], max_epochs=2).fit(model(), loader(blobs()))
    ours = [str(w.message) for w in caught if "IGR coefficient" in str(w.message)]
    assert len(ours) == (0 if expected is None else 1)
    if expected:
        assert expected in ours[0]
    assert probe.measured_steps == list(range(STEPS))  # the values are logged all the same


class NanAfter(PlainSGDNet):
    """Its loss (and so every gradient) becomes NaN from the 4th training batch on."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 3 else loss


class SkipsSomeSteps(PlainSGDNet):
    def training_step(self, batch, batch_idx):
        return None if self.global_step == 2 and batch_idx == 2 else super().training_step(batch, batch_idx)


def test_nan_gradients_warn_once_skip_and_training_goes_on():
    probe = GradientRegularization()
    pl.seed_everything(0, verbose=False)
    t = trainer([probe], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(NanAfter(), loader(blobs()))
    ours = [str(w.message) for w in caught if "GradientRegularization skipped" in str(w.message)]
    assert len(ours) == 1 and "FloatingPointError" in ours[0] and "non-finite" in ours[0]
    assert probe.measured_steps == [0, 1, 2] and probe.failures == STEPS - 3 and t.global_step == STEPS
    with pytest.raises(FloatingPointError):
        pl.seed_everything(0, verbose=False)
        trainer([GradientRegularization(strict=True)], max_epochs=2).fit(NanAfter(), loader(blobs()))


def test_a_step_without_gradients_is_skipped_with_a_warning():
    probe = GradientRegularization()
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer([probe], max_epochs=2)
        t.fit(SkipsSomeSteps(), loader(blobs()))
    ours = [str(w.message) for w in caught if "GradientRegularization skipped" in str(w.message)]
    assert len(ours) == 1 and "no parameter of the optimizer has a gradient" in ours[0]
    assert probe.failures == 1 and 2 not in probe.measured_steps and 3 in probe.measured_steps


def test_values_reach_the_logger_and_callback_metrics():
    class Memory(pl.loggers.logger.Logger):
        name, version = "memory", 0
        rows = []

        @property
        def experiment(self):
            return None

        def log_metrics(self, metrics, step):
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, *args, **kwargs):
            pass

    memory = Memory()
    probe = GradientRegularization(every_n_steps=3)
    _, t = fit([probe], logger=memory)
    ours = [(s, m) for s, m in memory.rows if "biasprobe/igr/igr_term" in m]
    assert [s for s, _ in ours] == [0, 3, 6, 9, 11]
    assert set(ours[0][1]) == {f"biasprobe/igr/{q}" for q in ("grad_norm_sq", "igr_term", "lr", "seconds")}
    assert float(t.callback_metrics["biasprobe/igr/igr_term"]) == ours[-1][1]["biasprobe/igr/igr_term"]


def test_needs_no_probe_set_and_the_direct_measure_reads_the_last_optimizer():
    probe = GradientRegularization()
    assert GradientRegularization.needs_probe_set is False
    model, t = fit([probe])
    assert probe.probe_set is None
    values = probe.run_measurement(model, t.global_step)  # .grad still holds the last step's gradient
    assert values["grad_norm_sq"] == probe.history[-1][1]["biasprobe/igr/grad_norm_sq"]
    fresh = GradientRegularization(strict=True)
    with pytest.raises(RuntimeError, match="none was seen yet"):
        fresh.run_measurement(nn.Linear(2, 2), 0)
