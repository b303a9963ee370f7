"""ProbeRunner: probes in a hand-written loop give the callbacks' values and keep training intact."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_biasprobe as lb
from lightning_biasprobe.runner import ProbeRunner

from helpers import Classifier, blobs, trainer


def make_net(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Dropout(dropout), nn.Linear(24, 3))


def comparable_probes():
    # Every probe that the plain loop can drive; EffectiveDepth's held-out side needs the
    # Trainer's validation loop, so the comparison uses heldout=None.
    probes = []
    for cls in lb.ALL_PROBES:
        kwargs = {"heldout": None} if cls.__name__ == "EffectiveDepth" else {}
        probes.append(cls(every_n_steps=2, **kwargs))
    return probes


def test_runner_gives_the_callbacks_values_on_the_same_model_data_and_steps():
    data = blobs(n=96)
    x, y = data.tensors
    probe_data = (x[:48], y[:48])

    callbacks = comparable_probes()
    for cb in callbacks:
        cb.set_probe_data(probe_data)
    module = Classifier(make_net())
    trainer(callbacks, max_epochs=2).fit(module, DataLoader(data, batch_size=32, shuffle=False))

    net = Classifier(make_net())  # the same layer names; trained by hand below
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    probes = comparable_probes()
    runner = ProbeRunner(net, probes, probe_data=probe_data)
    step = 0
    runner(step)
    for _ in range(2):
        for xb, yb in DataLoader(data, batch_size=32, shuffle=False):
            nn.functional.cross_entropy(net(xb), yb).backward()
            runner.before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            runner(step)
    runner.close()

    for a, b in zip(net.parameters(), module.parameters()):
        assert torch.equal(a, b)  # the same training trajectory, so the same weights at every step
    for cb, probe in zip(callbacks, probes):
        name = type(cb).__name__
        assert probe.measured_steps == cb.measured_steps, name
        assert len(probe.history) == len(cb.history), name
        for (s1, v1), (s2, v2) in zip(cb.history, probe.history):
            assert s1 == s2
            keys = [k for k in v1 if not k.endswith("seconds")]
            assert keys and sorted(keys) == sorted(k for k in v2 if not k.endswith("seconds")), name
            for k in keys:
                assert math.isclose(v1[k], v2[k], rel_tol=1e-6, abs_tol=1e-9), (name, s1, k, v1[k], v2[k])


def run_loop(with_runner):
    torch.manual_seed(0)
    net = make_net(dropout=0.3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    data = blobs(n=96)
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    runner = ProbeRunner(net, [cls(every_n_steps=1) for cls in lb.ALL_PROBES], train_data=loader) \
        if with_runner else None
    step = 0
    if runner:
        runner(step)
    for xb, yb in loader:
        net.train()
        nn.functional.cross_entropy(net(xb), yb).backward()
        if runner:
            runner.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if runner:
            runner(step)
    if runner:
        runner.close()
        assert all(p.failures == 0 and len(p.measured_steps) >= step for p in runner.probes)
    return net, optimizer, torch.get_rng_state()


def test_plain_loop_with_every_probe_at_every_step_is_bit_identical():
    net_a, opt_a, rng_a = run_loop(False)
    net_b, opt_b, rng_b = run_loop(True)
    for a, b in zip(net_a.state_dict().values(), net_b.state_dict().values()):
        assert torch.equal(a, b)
    for key, state in opt_a.state_dict()["state"].items():
        assert torch.equal(state["momentum_buffer"], opt_b.state_dict()["state"][key]["momentum_buffer"])
    assert torch.equal(rng_a, rng_b)
    assert net_b.training  # the loop's mode is left as it was


def test_summary_writer_and_callable_sinks(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    x, y = blobs(n=64).tensors
    writer = SummaryWriter(str(tmp_path))
    rows = []
    net = make_net()
    gc, ntk = lb.GeometricComplexity(every_n_steps=1), lb.NTKAlignment(every_n_steps=1)
    runner_tb = ProbeRunner(net, [gc, ntk], probe_data=(x, y), writer=writer)
    runner_fn = ProbeRunner(net, [lb.GeometricComplexity(every_n_steps=1)], probe_data=(x, y),
                            writer=lambda step, metrics: rows.append((step, metrics)))
    for step in (0, 1, 2):
        new = runner_tb(step)
        assert "biasprobe/gc/logits" in new and "biasprobe/ntk/alignment" in new
        runner_fn(step)
    runner_tb.close()
    runner_fn.close()
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("biasprobe/gc/logits")
    assert [e.step for e in events] == [0, 1, 2]
    assert events[-1].value == pytest.approx(gc.last_values["biasprobe/gc/logits"], rel=1e-6)
    assert "biasprobe/ntk/spectrum_log10" in acc.Tags()["histograms"]
    assert [s for s, _ in rows] == [0, 1, 2]
    assert rows[0][1]["biasprobe/gc/logits"] == pytest.approx(events[0].value, rel=1e-6)
    # Each point of each probe is one event holding all its scalars (callbacks/_tensorboard.py).
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    written = [e for path in tmp_path.glob("*tfevents*") for e in LegacyEventFileLoader(str(path)).Load()
               if e.HasField("summary") and e.summary.value[0].HasField("simple_value")]
    assert len(written) == 3 * 2 and all(len(e.summary.value) > 1 for e in written)


def test_epoch_cadence_budget_clock_and_force():
    x, y = blobs(n=64).tensors
    net = make_net()
    probe = lb.GeometricComplexity(every_n_epochs=2, at_start=False, at_end=False, max_overhead=100.0)
    runner = ProbeRunner(net, [probe], probe_data=(x, y))
    assert runner(0) == {} and runner(3) == {}
    assert runner.epoch_end(0) == {}
    assert "biasprobe/gc/logits" in runner.epoch_end(1)
    assert "biasprobe/gc/logits" in runner(5, force=True)
    assert probe.measured_steps == [3, 5]
    assert probe._train_seconds > 0  # the time between calls counts as training (for the budget)
    unbudgeted = lb.GeometricComplexity(every_n_epochs=2)
    ProbeRunner(net, [unbudgeted], probe_data=(x, y))(3)
    assert unbudgeted._train_seconds == 0  # no budget: no clock read at every step


def test_wrapped_modules_are_measured_under_their_own_names():
    net = make_net()
    wrapped = type("FabricLike", (nn.Module,), {})()
    wrapped._forward_module = net
    wrapped.module = net
    x, y = blobs(n=64).tensors
    probe = lb.EffectiveRank(every_n_steps=1)
    runner = ProbeRunner(wrapped, [probe], probe_data=(x, y))
    assert runner.model is net
    runner(0)
    assert any(k.startswith("biasprobe/rank/2/") for k in probe.last_values)  # not _forward_module.2


def test_bad_input_fails_clearly():
    net = make_net()
    with pytest.raises(TypeError, match="nn.Module"):
        ProbeRunner(lambda x: x, [lb.GeometricComplexity()])
    with pytest.raises(ValueError, match="empty"):
        ProbeRunner(net, [])
    with pytest.raises(TypeError, match="not a probe"):
        ProbeRunner(net, [object()])
    with pytest.raises(TypeError, match="writer"):
        ProbeRunner(net, [lb.GeometricComplexity()], writer=3)
    runner = ProbeRunner(net, [lb.GeometricComplexity()])
    with pytest.raises(ValueError, match="no probe_data"):
        runner(0)
    x, y = blobs(n=64).tensors
    runner = ProbeRunner(net, [lb.GeometricComplexity()], probe_data=(x, y))
    runner(4)
    with pytest.raises(ValueError, match="must not decrease"):
        runner(3)
    with pytest.raises(ValueError, match="non-negative"):
        runner(-1)
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner(5)


def test_a_failing_probe_warns_and_the_loop_goes_on():
    x = torch.randn(32, 7)  # the wrong width for the model
    runner = ProbeRunner(make_net(), [lb.GeometricComplexity(every_n_steps=1)], probe_data=x)
    with pytest.warns(RuntimeWarning, match="skipped its measurement"):
        assert runner(0) == {}
    assert runner(1) == {} and runner.probes[0].failures == 2


def test_state_dict_resumes_the_diffusion_curve():
    x, y = blobs(n=64).tensors
    net = make_net()
    first = lb.WeightDiffusion(every_n_steps=1)
    runner = ProbeRunner(net, [first], probe_data=(x, y))
    runner(0)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    runner(1)
    saved = runner.state_dict()
    resumed = lb.WeightDiffusion(every_n_steps=1)
    runner2 = ProbeRunner(net, [resumed], probe_data=(x, y))
    runner2.load_state_dict(saved)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    new = runner2(2)
    assert new["biasprobe/diffusion/distance"] == pytest.approx(2.0 * math.sqrt(net[0].weight.numel()), rel=1e-6)
