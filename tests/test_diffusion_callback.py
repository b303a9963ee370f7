"""WeightDiffusion, the callback: ballistic and random-walk weights, the reference, the per-step update,
checkpoint resume, bad input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import WeightDiffusion
from lightning_biasprobe.callbacks import log_spaced_steps

import sklearn  # noqa: F401,E402  (the test extra installs it; the data are its bundled digits)
from lightning_biasprobe.cli.demo import demo_module, digits_tensors  # noqa: E402


class Drift(torch.optim.Optimizer):
    """Moves the weights without looking at gradients: by ``u`` every step (ballistic) or by a
    standard normal vector from a private generator (random walk)."""

    def __init__(self, params, kind: str, u: Optional[torch.Tensor] = None, seed: int = 0):
        super().__init__(params, {})
        self.kind, self.u = kind, u
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                if self.kind == "ballistic":
                    p.add_(self.u)
                else:
                    p.add_(torch.randn(p.shape, generator=self.gen, dtype=p.dtype))


class Walker(pl.LightningModule):
    def __init__(self, dim: int, kind: str, u: Optional[torch.Tensor] = None):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.theta = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)
        self.kind, self.u = kind, u

    def training_step(self, batch, batch_idx):
        return (self.theta * 0).sum()

    def configure_optimizers(self):
        return Drift([self.theta], self.kind, self.u)


def walk(probe, steps: int, kind: str, dim: int = 16, u=None, accumulate: int = 1):
    model = Walker(dim, kind, u)
    start = model.theta.detach().clone()
    data = DataLoader(TensorDataset(torch.zeros(steps * accumulate, 1)), batch_size=1)
    trainer([probe], max_epochs=1, accumulate_grad_batches=accumulate).fit(model, data)
    return model, start


def values(probe, key: str) -> dict[int, float]:
    return {step: m[f"biasprobe/{probe.log_name}/{key}"] for step, m in probe.history
            if f"biasprobe/{probe.log_name}/{key}" in m}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ballistic_weights_give_exponent_one_and_constant_update(accumulate):
    u = torch.linspace(-1, 1, 16, dtype=torch.float64) * 0.01
    probe = WeightDiffusion(every_n_steps=1)
    model, start = walk(probe, 40, "ballistic", u=u, accumulate=accumulate)
    speed = float(u.norm())
    assert probe.measured_steps == list(range(41)) and probe.failures == 0
    distance = values(probe, "distance")
    for step in range(41):
        assert distance[step] == pytest.approx(step * speed, rel=1e-12, abs=1e-15)
    updates = values(probe, "update_size")
    assert updates[0] == 0.0 and all(updates[s] == pytest.approx(speed, rel=1e-9) for s in range(1, 41))
    exponent, r2, points = values(probe, "exponent"), values(probe, "exponent_r2"), values(probe, "fit_points")
    assert [points[s] for s in range(5)] == [0, 1, 2, 3, 4] and exponent[2] == 0.0 and r2[2] == 0.0
    assert all(exponent[s] == pytest.approx(1.0, abs=1e-9) and r2[s] == pytest.approx(1.0, abs=1e-9)
               for s in range(3, 41))
    # Fitted points are thinned to at most 32 per decade (each at least 10**(1/32) times the last),
    # and the sliding window of one decade keeps t >= 4 at step 40.
    kept = [1]
    for t in range(2, 41):
        if t >= kept[-1] * 10 ** (1 / 32):
            kept.append(t)
    assert kept[:14] == list(range(1, 15)) and 15 not in kept and 40 in kept
    assert values(probe, "fit_t_start")[40] == 4.0 and points[40] == len([t for t in kept if t >= 4])
    # The reference is the initialization (trainable parameters only, on the CPU).
    assert list(probe.reference) == ["theta"]
    assert torch.equal(probe.reference["theta"], start) and probe.reference["theta"].device.type == "cpu"
    assert values(probe, "weight_norm")[40] == pytest.approx(float(model.theta.detach().norm()), rel=1e-12)


def test_random_walk_gives_one_half_on_the_default_log_spaced_steps():
    probe = WeightDiffusion(log_spaced=1.25)  # the default steps (about 10 per decade) without its budget
    walk(probe, 600, "random", dim=4096)
    steps = probe.measured_steps
    assert steps == [0, *log_spaced_steps(600, factor=1.25), 600] and len(steps) == 24
    last = {k.split("/")[-1]: v for k, v in probe.last_values.items()}
    assert abs(last["exponent"] - 0.5) < 0.06, last
    assert last["exponent_r2"] > 0.95 and last["fit_t_start"] >= 60 and last["fit_points"] >= 10
    # One step of N(0, I_4096) has length about 64.
    assert all(abs(v - 64) < 4 for s, v in values(probe, "update_size").items() if s > 0)


def test_a_later_reference_step_starts_the_curve_there():
    u = torch.full((16,), 0.1, dtype=torch.float64)
    probe = WeightDiffusion(reference_step=10, every_n_steps=2)
    model, start = walk(probe, 30, "ballistic", u=u)
    assert probe.measured_steps == list(range(10, 31, 2))
    distance = values(probe, "distance")
    assert distance[10] == 0.0
    assert all(distance[s] == pytest.approx((s - 10) * float(u.norm()), rel=1e-12) for s in range(12, 31, 2))
    torch.testing.assert_close(probe.reference["theta"], start + 10 * u, rtol=1e-15, atol=1e-15)
    assert values(probe, "exponent")[30] == pytest.approx(1.0, abs=1e-9)


def test_previous_weights_are_copied_only_before_measured_steps(monkeypatch):
    """The per-step update needs the weights before the step; they are copied only when the next step
    is measured (or may end an epoch or the run), and freed afterwards."""
    probe = WeightDiffusion(every_n_steps=7)
    copies: list[int] = []
    original = WeightDiffusion.copy_before_step
    monkeypatch.setattr(WeightDiffusion, "copy_before_step", lambda self, m, step: copies.append(step)
                        or original(self, m, step))
    walk(probe, 30, "ballistic", u=torch.full((16,), 0.1, dtype=torch.float64))
    assert probe.measured_steps == [0, 7, 14, 21, 28, 30]
    assert copies == [7, 14, 21, 28, 30]  # the end too
    assert probe._previous is None
    assert all(v == pytest.approx(0.4, rel=1e-9) for s, v in values(probe, "update_size").items() if s > 0)


@pytest.mark.parametrize("kwargs, measured", [
    (dict(every_n_steps=100), [0, 30]),  # only the end: epoch ends before the last are not copied for
    (dict(every_n_epochs=1), [0, 10, 20, 30]),
])
def test_epoch_ends_are_copied_only_when_measured(monkeypatch, kwargs, measured):
    probe = WeightDiffusion(**kwargs)
    copies: list[int] = []
    original = WeightDiffusion.copy_before_step
    monkeypatch.setattr(WeightDiffusion, "copy_before_step", lambda self, m, step: copies.append(step)
                        or original(self, m, step))
    u = torch.full((16,), 0.1, dtype=torch.float64)
    data = DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=1)
    trainer([probe], max_epochs=3).fit(Walker(16, "ballistic", u), data)
    assert probe.measured_steps == measured and copies == measured[1:]
    assert sorted(values(probe, "update_size")) == measured
    assert all(v == pytest.approx(0.4, rel=1e-9) for s, v in values(probe, "update_size").items() if s > 0)


def spy_copies(monkeypatch) -> list[int]:
    copies: list[int] = []
    original = WeightDiffusion.copy_before_step
    monkeypatch.setattr(WeightDiffusion, "copy_before_step", lambda self, m, step: copies.append(step)
                        or original(self, m, step))
    return copies


def test_the_default_cadence_is_log_spaced_within_half_a_percent():
    cadence = WeightDiffusion().cadence
    assert (cadence.log_spaced, cadence.max_overhead, cadence.at_start, cadence.at_end) == (1.25, 0.005, True, True)
    assert WeightDiffusion(log_spaced=1.25).cadence.max_overhead is None  # an explicit schedule is kept exactly


def test_over_the_budget_neither_the_point_nor_its_copy_is_made(monkeypatch):
    """A scheduled point over the budget is declined before its step: no pre-step copy is taken for it;
    the forced first and last points are made, the last with its update."""
    copies = spy_copies(monkeypatch)
    probe = WeightDiffusion(log_spaced=1.25, max_overhead=1e-12)  # after the first point: always over
    u = torch.full((16,), 0.1, dtype=torch.float64)
    walk(probe, 60, "ballistic", u=u)
    scheduled = log_spaced_steps(59, factor=1.25)
    assert probe.measured_steps == [0, 60] and copies == [60]
    assert probe.skipped_for_budget == len(scheduled) == 12
    assert values(probe, "update_size")[60] == pytest.approx(0.4, rel=1e-9)


def test_within_a_budget_every_point_made_has_its_update(monkeypatch):
    """Whatever the timing, a copy is taken exactly for the points then made (a copied step is measured
    even if the budget ran out meanwhile), and the budget counts the points' logging too."""
    copies = spy_copies(monkeypatch)
    probe = WeightDiffusion(log_spaced=1.25, max_overhead=0.05)
    walk(probe, 300, "ballistic", u=torch.full((16,), 0.1, dtype=torch.float64))
    steps, scheduled = probe.measured_steps, log_spaced_steps(300, factor=1.25)
    assert steps[0] == 0 and steps[-1] == 300 and set(steps[1:-1]) <= set(scheduled)
    assert copies == steps[1:] and sorted(values(probe, "update_size")) == steps
    assert probe.skipped_for_budget == len(scheduled) - len(steps[1:-1])
    logged = sum(m["biasprobe/diffusion/seconds"] for _, m in probe.history)
    assert probe._probe_seconds > logged  # measurements and copies (logged) plus the logging


class TwoOptimizerWalker(pl.LightningModule):
    """Manual optimization, two optimizers a batch, each moving its own parameter by a constant: the
    global step advances by two per batch."""

    def __init__(self, u1: torch.Tensor, u2: torch.Tensor):
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Parameter(torch.zeros(16, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(16, dtype=torch.float64))
        self.u1, self.u2 = u1, u2

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return [Drift([self.a], "ballistic", self.u1), Drift([self.b], "ballistic", self.u2)]


class StepReads(pl.Callback):
    """Compares the probe's step reader with ``trainer.global_step`` at every batch and optimizer step."""

    def __init__(self, probe) -> None:
        self.probe, self.reads, self.fast = probe, 0, 0

    def _check(self, trainer) -> None:
        assert self.probe._global_step.read(trainer) == trainer.global_step
        self.reads += 1
        self.fast += self.probe._global_step.counter is not None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._check(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._check(trainer)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_the_step_reader_agrees_with_the_trainer(accumulate):
    probe = WeightDiffusion(every_n_steps=4)
    reads = StepReads(probe)
    data = DataLoader(TensorDataset(torch.zeros(30 * accumulate, 1)), batch_size=1)
    u = torch.full((16,), 0.1, dtype=torch.float64)
    trainer([probe, reads], max_epochs=2, accumulate_grad_batches=accumulate).fit(Walker(16, "ballistic", u), data)
    assert reads.reads > 60 and reads.fast == reads.reads  # Lightning's counter was found and kept
    assert probe.measured_steps == [0, *range(4, 61, 4)]
    assert sorted(values(probe, "update_size")) == probe.measured_steps


def test_two_optimizers_a_batch_copy_before_the_step_that_ends_at_the_point(monkeypatch):
    copies = spy_copies(monkeypatch)
    u1, u2 = torch.full((16,), 0.1, dtype=torch.float64), torch.full((16,), 0.3, dtype=torch.float64)
    probe = WeightDiffusion(every_n_steps=4)
    reads = StepReads(probe)
    data = DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=1)
    trainer([probe, reads], max_epochs=1).fit(TwoOptimizerWalker(u1, u2), data)
    # Either step of the last batch may end the run: both are copied, the later one is measured.
    assert probe.measured_steps == [0, 4, 8, 12, 16, 20] and copies == [4, 8, 12, 16, 19, 20]
    assert reads.fast == reads.reads
    # The update at a point is its last optimizer step: the second optimizer's, |u2| = 0.3 * 4.
    assert all(v == pytest.approx(1.2, rel=1e-9) for s, v in values(probe, "update_size").items() if s > 0)
    assert values(probe, "distance")[20] == pytest.approx(10 * math.hypot(0.4, 1.2), rel=1e-12)


def test_the_step_reader_falls_back_to_the_property():
    from types import SimpleNamespace

    from lightning_biasprobe.callbacks.base import _GlobalStep

    assert _GlobalStep(SimpleNamespace(global_step=7)).counter is None  # not a Lightning trainer
    counter = SimpleNamespace(completed=3)
    loop = SimpleNamespace(automatic_optimization=SimpleNamespace(optim_progress=SimpleNamespace(
        optimizer=SimpleNamespace(step=SimpleNamespace(total=counter)))))
    fake = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop), global_step=3,
                           lightning_module=SimpleNamespace(automatic_optimization=True))
    reader = _GlobalStep(fake)
    assert reader.counter is counter and reader.read(fake) == 3
    counter.completed, fake.global_step = 9, 5  # the counter stops agreeing: caught within 64 reads
    assert {reader.read(fake) for _ in range(64)} >= {5} and reader.counter is None
    assert reader.read(fake) == 5
    assert _GlobalStep(SimpleNamespace(**{**vars(fake), "global_step": 4})).counter is None


def test_replaced_or_reshaped_parameters_are_read_again():
    """The parameters are looked up by owner and name after the first time: a replaced parameter is
    followed, a reshaped one is reported."""
    model = nn.Sequential(nn.Linear(3, 2))
    probe = WeightDiffusion()
    probe.capture_reference(model)
    assert probe.run_measurement(model, 1)["distance"] == 0.0
    model[0].weight = nn.Parameter(model[0].weight.detach() + 1)
    assert probe.run_measurement(model, 2)["distance"] == pytest.approx(math.sqrt(6), rel=1e-7)
    model[0].weight = nn.Parameter(torch.zeros(4, 3))
    with pytest.warns(RuntimeWarning, match="shape"):
        assert probe.run_measurement(model, 3) is None


def test_buffers_and_frozen_parameters_are_not_followed():
    probe = WeightDiffusion(every_n_steps=3)
    model = BNDropoutNet(frozen_eval_layer=True)  # the first BatchNorm is frozen
    pl.seed_everything(0, verbose=False)
    trainer([probe], max_epochs=1).fit(model, loader(blobs()))
    names = list(probe.reference)
    assert "net.1.weight" not in names and not any("running" in n for n in names)
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert probe.failures == 0 and values(probe, "distance")[6] > 0


# --------------------------------------------------------------------------------------- checkpoint resume
def digits_fit(callbacks, epochs: int, root: Path, ckpt_path: Optional[Path] = None) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    train, _ = digits_tensors(0)
    data = DataLoader(TensorDataset(*train[:40]), batch_size=8, shuffle=False)  # same batches after a resume
    t = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks, logger=False,
                   default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                   num_sanity_val_steps=0, limit_val_batches=0)
    t.fit(demo_module(width=16), data, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return t


def test_resume_continues_the_same_curve_from_the_same_reference(tmp_path):
    straight = WeightDiffusion(every_n_steps=1, window=None)
    digits_fit([straight], 2, tmp_path / "straight")

    first = WeightDiffusion(every_n_steps=1, window=None)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="first", save_on_train_epoch_end=True)
    digits_fit([first, checkpoint], 1, tmp_path / "first")
    path = tmp_path / "ckpt" / "first.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=True)["callbacks"][first.state_key]
    assert state["extra"]["names"] == list(first.reference)
    assert [t for t, _ in state["extra"]["points"]] == [1.0, 2.0, 3.0, 4.0, 5.0]

    resumed = WeightDiffusion(every_n_steps=1, window=None)
    digits_fit([resumed], 2, tmp_path / "resumed", ckpt_path=path)
    assert resumed.measured_steps == list(range(11)) and resumed.failures == 0
    for name, ref in straight.reference.items():
        assert torch.equal(resumed.reference[name], ref), name
    # The resumed run's points are the uninterrupted run's: distances from the initialization, and the
    # exponent fitted over the points from before the checkpoint too.
    expected = dict(straight.history)
    for step, metrics in resumed.history:
        assert step > 5
        for key in ("distance", "update_size", "weight_norm", "exponent", "exponent_r2", "fit_points"):
            full = f"biasprobe/diffusion/{key}"
            assert metrics[full] == pytest.approx(expected[step][full], rel=1e-12, abs=1e-15), (step, key)
    assert dict(resumed.history)[10]["biasprobe/diffusion/fit_points"] == 10
    # Not vacuous: measured from the weights at the resume point the distance would be far smaller.
    at_resume = dict(first.history)[5]["biasprobe/diffusion/distance"]
    assert dict(resumed.history)[6]["biasprobe/diffusion/distance"] > 0.5 * at_resume


def test_resume_without_reference_state_warns_and_measures_nothing(tmp_path):
    first = WeightDiffusion(every_n_steps=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="first", save_on_train_epoch_end=True)
    digits_fit([first, checkpoint], 1, tmp_path / "first")
    other = WeightDiffusion(every_n_steps=1, window=2.0)  # another configuration: gets no state
    with pytest.warns(RuntimeWarning, match="no reference weights were restored"):
        digits_fit([other], 2, tmp_path / "other", ckpt_path=tmp_path / "ckpt" / "first.ckpt")
    assert other.measured_steps == [] and other.reference is None and other.failures == 0


# --------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(reference_step=-1), "reference_step"),
    (dict(reference_step=1.5), "reference_step"),
    (dict(window=0), "window"),
    (dict(t_min=0), "t_min"),
    (dict(min_points=2), "min_points"),
    (dict(reference_device="warp-drive"), "reference_device"),
])
def test_bad_configuration_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightDiffusion(**kwargs)


def test_a_model_that_changed_shape_is_skipped_with_a_reason():
    probe = WeightDiffusion()
    model = nn.Linear(3, 2)
    probe.capture_reference(model)
    assert probe.run_measurement(model, step=0)["distance"] == 0.0
    with pytest.warns(RuntimeWarning, match="shape"):
        assert probe.run_measurement(nn.Linear(4, 2), step=1) is None
    assert probe.failures == 1
    assert math.isfinite(probe.run_measurement(model, step=2)["distance"])


class _Mixed(nn.Module):
    """Parameters of three dtypes, in an order that splits them into several same-dtype groups."""

    def __init__(self, g: torch.Generator) -> None:
        super().__init__()
        shapes = [(7, 5), (100,), (3, 4, 2), (9,), (5, 5), (1,)]
        dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.bfloat16, torch.float32]
        self.params = nn.ParameterList(nn.Parameter(torch.randn(s, generator=g).to(d)) for s, d in zip(shapes, dtypes))


@pytest.mark.parametrize("resident", [True, False])  # working buffers kept between points, or made at each
@pytest.mark.parametrize("group", [1, 50, 10**9])  # one tensor per group, several, all of a dtype in one
def test_flat_groups_give_the_exact_float64_sums(monkeypatch, group, resident):
    """Distance, update and norm over flat same-dtype groups of bounded size equal a float64 per-tensor
    computation: the norm to 1e-8 (float32 sums of 256 squares added in float64; one float32 reduction
    was 1e-5 off), the differences to 1e-7 (a float32 difference of two weights is rounded once, relative
    error <= 2**-24)."""
    from lightning_biasprobe.callbacks import diffusion

    monkeypatch.setattr(diffusion, "_GROUP_ELEMENTS", group)
    if not resident:
        monkeypatch.setattr(diffusion, "_RESIDENT_BYTES", 0)
    g = torch.Generator().manual_seed(0)
    model = _Mixed(g)
    probe = WeightDiffusion()
    probe.capture_reference(model)
    assert (probe._resident is not None) == resident
    assert len(probe._reference) == len(diffusion._groups(list(model.parameters())))
    assert len(probe._reference) >= (6 if group == 1 else 5)  # dtype changes split groups too
    start = [p.detach().double().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():  # a small step then a large one: differences of different sizes
            p.add_(1e-3 * torch.randn(p.shape, generator=g).to(p.dtype))
        before = [p.detach().double().clone() for p in model.parameters()]
        probe.copy_before_step(model, 7)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
    after = [p.detach().double() for p in model.parameters()]
    values = probe.run_measurement(model, 7)

    def norm(xs):
        return math.sqrt(sum(float(x.pow(2).sum()) for x in xs))

    assert values["weight_norm"] == pytest.approx(norm(after), rel=1e-8)
    assert values["distance"] == pytest.approx(norm([a - b for a, b in zip(after, start)]), rel=1e-7)
    assert values["update_size"] == pytest.approx(norm([a - b for a, b in zip(after, before)]), rel=1e-7)
    assert probe._previous is None  # the scratch copy is used once and freed
    for name, ref in probe.reference.items():  # the flat buffers give the parameters back exactly
        torch.testing.assert_close(ref.double(), start[int(name.split(".")[-1])], rtol=0, atol=0)


class _Large(nn.Module):
    """A parameter that spans several chunks (of 512 in the test) beside small ones of three dtypes."""

    def __init__(self, g: torch.Generator) -> None:
        super().__init__()
        shapes = [(7, 5), (40, 30), (100,), (3, 4, 2), (5, 5), (1,)]
        dtypes = [torch.float32, torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float32]
        self.params = nn.ParameterList(nn.Parameter(torch.randn(s, generator=g).to(d)) for s, d in zip(shapes, dtypes))


@pytest.mark.parametrize("with_update", [True, False])
def test_large_models_are_measured_in_chunks_through_one_kept_buffer(monkeypatch, with_update):
    """Beyond the resident size, groups and the slices of a parameter larger than a chunk go through
    one buffer of three chunk-long rows: the same float64-exact sums, no per-point allocation."""
    from lightning_biasprobe.callbacks import diffusion

    monkeypatch.setattr(diffusion, "_RESIDENT_BYTES", 0)
    monkeypatch.setattr(diffusion, "_CHUNK", 512)
    monkeypatch.setattr(diffusion, "_GROUP_ELEMENTS", 512)
    g = torch.Generator().manual_seed(0)
    model = _Large(g)
    probe = WeightDiffusion()
    probe.capture_reference(model)
    assert probe._resident is None and [r.numel() for r in probe._reference][1] == 1280  # 1200, padded
    start = [p.detach().double().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=g).to(p.dtype))
        before = [p.detach().double().clone() for p in model.parameters()]
        if with_update:
            probe.copy_before_step(model, 3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
    after = [p.detach().double() for p in model.parameters()]
    for step in (3, 4):  # twice: the kept buffer's leftovers (the last chunk's padding) do not leak
        values = probe.run_measurement(model, step)

        def norm(xs):
            return math.sqrt(sum(float(x.pow(2).sum()) for x in xs))

        assert values["weight_norm"] == pytest.approx(norm(after), rel=1e-7)  # float32 sums of 256 squares
        assert values["distance"] == pytest.approx(norm([a - b for a, b in zip(after, start)]), rel=1e-7)
        assert ("update_size" in values) == (with_update and step == 3)
        if "update_size" in values:
            assert values["update_size"] == pytest.approx(norm([a - b for a, b in zip(after, before)]), rel=1e-7)
    assert {tuple(w.shape) for w in probe._chunk_work.values()} == {(3, 512)}
    assert {w.dtype for w in probe._chunk_work.values()} == {torch.float32, torch.float64}


def test_a_large_model_in_a_fit_drops_its_chunk_buffer_at_the_end(monkeypatch):
    from lightning_biasprobe.callbacks import diffusion

    monkeypatch.setattr(diffusion, "_RESIDENT_BYTES", 0)
    monkeypatch.setattr(diffusion, "_CHUNK", 256)
    u = torch.linspace(-1, 1, 600, dtype=torch.float64) * 0.01
    probe = WeightDiffusion(every_n_steps=5)
    walk(probe, 20, "ballistic", dim=600, u=u)
    distance = values(probe, "distance")
    assert all(distance[s] == pytest.approx(s * float(u.norm()), rel=1e-12) for s in (5, 10, 15, 20))
    assert all(v == pytest.approx(float(u.norm()), rel=1e-9) for s, v in values(probe, "update_size").items() if s)
    assert probe._chunk_work == {}


@pytest.mark.parametrize("width", [100, 1024])  # 26k and 1M entries
def test_float32_distance_is_accurate_where_one_float32_reduction_is_not(width):
    """Equal float32 differences (their rounding errors all point the same way): the blocked sums stay
    within 5e-7 of the float64 value, where a single float32 reduction is 1e-5 (26k) to 1e-3 (1M) off."""
    model = nn.Linear(256, width)
    probe = WeightDiffusion()
    probe.capture_reference(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    diffs = [p.detach() - r for p, r in zip(model.parameters(), probe.reference.values())]
    exact = math.sqrt(sum(float(d.double().pow(2).sum()) for d in diffs))
    one_reduction = float(torch.linalg.vector_norm(torch.cat([d.reshape(-1) for d in diffs])))
    assert abs(one_reduction / exact - 1) > 2e-6  # the trap is real at this size
    assert probe.run_measurement(model, 1)["distance"] == pytest.approx(exact, rel=5e-7)
