"""A probe written by a user on the base class, and the overhead budget that thins a schedule."""

import time

import pytorch_lightning as pl
import torch

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import ProbeLogic


class OutputNorm(ProbeLogic, pl.Callback):
    """Mean squared output on the probe set; optionally slow, to exercise the budget."""

    name = "output_norm"
    default_cadence = {"every_n_steps": 1}

    def __init__(self, delay: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def measure(self, module, probe):
        time.sleep(self.delay)
        return {"mean_square": self.outputs(module, probe.inputs).pow(2).mean()}


def test_a_user_probe_needs_only_measure():
    probe = OutputNorm(num_samples=16)
    trainer([probe], max_epochs=1).fit(BNDropoutNet(), loader(blobs()))
    assert probe.measured_steps == [0, 1, 2, 3, 4, 5, 6]
    assert len(probe.probe_set) == 16
    assert set(probe.last_values) == {"biasprobe/output_norm/mean_square", "biasprobe/output_norm/seconds"}


def test_max_overhead_thins_the_schedule_but_keeps_the_end():
    free = OutputNorm(name="free")
    budgeted = OutputNorm(delay=0.05, max_overhead=0.05, name="budgeted")
    pl.seed_everything(0, verbose=False)
    t = trainer([free, budgeted], max_epochs=2)
    t.fit(BNDropoutNet(), loader(blobs()))
    assert free.measured_steps == list(range(13)) and free.skipped_for_budget == 0
    # Each measurement sleeps far longer than 5% of a training step, so after the forced first
    # point every scheduled one is over budget until the forced one at the end.
    assert budgeted.measured_steps[0] == 0 and budgeted.measured_steps[-1] == 12
    assert budgeted.skipped_for_budget >= 8 and len(budgeted.measured_steps) <= 5
    assert budgeted._probe_seconds > 0.05 * 2


def test_a_budget_counts_training_not_the_other_probes():
    """Another probe that measures between this one's batch start and batch end (it comes first in
    the callbacks) does not count as training time for this one's budget."""
    slow = OutputNorm(delay=0.05, name="slow")  # 50 ms at every step, inside the budgeted probe's window
    budgeted = OutputNorm(max_overhead=0.5, name="budgeted")
    trainer([slow, budgeted], max_epochs=2).fit(BNDropoutNet(), loader(blobs()))
    slow_seconds = sum(m["biasprobe/slow/seconds"] for _, m in slow.history)
    assert slow_seconds > 12 * 0.05
    # 12 steps of a tiny model: a few ms each; counted with the other probe they would be >= 0.6 s
    assert 0 < budgeted._train_seconds < 0.5 * slow_seconds


def test_default_unpack_reads_dict_batches_and_explicit_probe_tensors():
    x = torch.randn(40, 10)
    probe = OutputNorm(probe_data=(x, torch.zeros(40, dtype=torch.long)), num_samples=25)
    trainer([probe], max_epochs=1).fit(BNDropoutNet(), loader(blobs()))
    assert torch.equal(probe.probe_set.inputs, x[:25]) and probe.probe_set.source == "tensors"
