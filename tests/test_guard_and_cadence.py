"""The isolation guard and the cadence, as units."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_biasprobe.callbacks import Cadence, isolated, log_spaced_steps


def model_with_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    model[1].eval()  # a module the user froze in eval mode
    model[3].weight.requires_grad_(False)  # and a frozen parameter
    return model


def snapshot(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [b.clone() for b in model.buffers()])


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("fail", [False, True])
def test_guard_restores_rng_flags_and_buffers_even_on_error(mode, fail):
    model = model_with_state()
    before = snapshot(model)
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        with isolated(model, mode) as m:
            assert all(mod.training == (mode == "train") for mod in m.modules())
            torch.rand(3), np.random.rand(3), random.random()
            for p in m.parameters():
                p.requires_grad_(True)
            m[1].train()
            m(torch.randn(16, 4))  # train-mode BatchNorm writes its running statistics
            m[1].running_mean.add_(1.0)
            if fail:
                raise KeyError("boom")
    except KeyError:
        assert fail
    after = snapshot(model)
    assert after[0] == before[0] and after[1] == before[1]
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.rand() == (np.random.set_state(np_state), np.random.rand())[1]
    assert random.random() == (random.setstate(py_state), random.random())[1]


def test_guard_restores_a_replaced_buffer_and_warns_on_backward():
    model = model_with_state()
    original = model[1].running_var
    with isolated(model):
        model[1].running_var = torch.zeros(8)
    assert model[1].running_var is original
    with pytest.warns(RuntimeWarning, match="gradients"):
        with isolated(model):
            model(torch.randn(5, 4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_guard_enables_grad_and_disables_autocast():
    model = nn.Linear(3, 1)
    with torch.no_grad(), isolated(model):
        assert torch.is_grad_enabled()
        assert model(torch.randn(2, 3)).requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16), isolated(model):
        assert model(torch.randn(2, 3)).dtype == torch.float32


def test_log_spaced_steps_follow_baratin_schedule():
    steps = log_spaced_steps(100)
    expected = sorted({int(5 * 1.15**k) for k in range(40) if int(5 * 1.15**k) <= 100})
    assert steps == expected
    assert steps[:6] == [5, 6, 7, 8, 10, 11]
    cadence = Cadence(log_spaced=True)
    assert [s for s in range(1, 101) if cadence.due_at_step(s)] == expected


@pytest.mark.parametrize("factor", [1.25, 1.5, 2])
def test_log_spaced_takes_a_growth_factor(factor):
    expected = sorted({int(5 * factor**k) for k in range(60) if int(5 * factor**k) <= 10_000})
    assert log_spaced_steps(10_000, factor=factor) == expected
    cadence = Cadence(log_spaced=factor)
    assert cadence.log_factor == factor
    assert [s for s in range(1, 10_001) if cadence.due_at_step(s)] == expected
    # Asked in any order and more than once (a resumed run, two hooks at one step): the same answers.
    shuffled = list(range(1, 10_001))
    random.Random(0).shuffle(shuffled)
    again = Cadence(log_spaced=factor)
    assert sorted(s for s in shuffled + shuffled[:500] if again.due_at_step(s)) == sorted(
        expected + [s for s in shuffled[:500] if s in expected])


@pytest.mark.parametrize("kwargs", [dict(log_spaced=True), dict(log_spaced=1.25), dict(every_n_steps=7),
                                    dict(every_n_steps=10, log_spaced=1.5), dict(every_n_epochs=1)])
def test_next_due_step_is_the_first_due_step_after(kwargs):
    """The base asks ``due_at_step`` only from the step ``next_due_step`` names: it must be the first due one."""
    cadence = Cadence(**kwargs)
    due = [s for s in range(0, 3_000) if Cadence(**kwargs).due_at_step(s)]
    for step in [-1, 0, 1, 4, 5, 6, 99, 100, 101, 1_234, 2_000]:
        following = cadence.next_due_step(step)
        expected = next((s for s in due if s > step), None)
        assert following == expected or (expected is None and following is not None and following >= 3_000), step
    if "every_n_epochs" in kwargs:
        assert cadence.next_due_step(5) is None


def test_every_n_steps_epochs_and_budget():
    cadence = Cadence(every_n_steps=3, every_n_epochs=2, max_overhead=0.1)
    assert [s for s in range(0, 10) if cadence.due_at_step(s)] == [3, 6, 9]
    assert [e for e in range(6) if cadence.due_at_epoch_end(e)] == [1, 3, 5]
    assert cadence.within_budget(probe_seconds=0.9, train_seconds=10.0)
    assert not cadence.within_budget(probe_seconds=1.1, train_seconds=10.0)
    assert Cadence().within_budget(1e9, 0.0)


@pytest.mark.parametrize("kwargs", [dict(every_n_steps=0), dict(every_n_epochs=1.5), dict(max_overhead=0),
                                    dict(every_n_steps=True), dict(log_spaced=1.0), dict(log_spaced=0.5),
                                    dict(log_spaced="often")])
def test_bad_cadence_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        Cadence(**kwargs)


def test_attention_has_second_derivatives_inside_the_guard():
    # The fused CPU attention kernel has no double backward; Hessian products need one.
    from lightning_biasprobe.callbacks._guard import isolated

    torch.manual_seed(0)
    model = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    with isolated(model):
        out = model(x, x, x, need_weights=False)[0]
        (g,) = torch.autograd.grad(out.pow(2).sum(), model.in_proj_weight, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), model.in_proj_weight)
    assert torch.isfinite(h).all() and h.abs().sum() > 0
