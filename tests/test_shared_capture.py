"""EffectiveRank and EffectiveDepth on the same layers and probe set share one forward pass."""

import pytorch_lightning as pl
import torch

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import EffectiveDepth, EffectiveRank
from lightning_biasprobe.callbacks import _shared_capture


class CountingNet(BNDropoutNet):
    """Counts forward calls made outside training steps (the probes' chunks)."""

    def __init__(self):
        super().__init__()
        self.probe_forwards = 0

    def forward(self, x):
        if not self.training:
            self.probe_forwards += 1
        return super().forward(x)


def without_seconds(values):
    return {k: v for k, v in values.items() if not k.endswith("seconds")}


def fit(probes, epochs=2):
    pl.seed_everything(0, verbose=False)
    model = CountingNet()
    trainer(probes, max_epochs=epochs, limit_val_batches=0).fit(model, loader(blobs()))
    return model


def test_both_probes_share_one_forward_and_log_what_each_logs_alone():
    alone_rank, alone_ncc = EffectiveRank(num_samples=96), EffectiveDepth(num_samples=96, heldout=None)
    model_rank = fit([alone_rank])
    model_ncc = fit([alone_ncc])
    rank, ncc = EffectiveRank(num_samples=96), EffectiveDepth(num_samples=96, heldout=None)
    model_both = fit([rank, ncc])
    # Each point is one pass over 96 examples (one chunk): alone, each probe runs its own pass.
    points = len(rank.measured_steps)
    assert points == len(ncc.measured_steps) == 3  # start and two epoch ends (the end is the last of them)
    assert model_rank.probe_forwards == model_ncc.probe_forwards
    assert model_both.probe_forwards == model_rank.probe_forwards  # not twice as many
    for shared, alone in ((rank, alone_rank), (ncc, alone_ncc)):  # bit-identical values
        assert [(step, without_seconds(v)) for step, v in shared.history] == \
            [(step, without_seconds(v)) for step, v in alone.history]
    ours = id(model_both)  # nothing of this fit is kept after it
    assert not any(sig[0] == ours for sig in [*_shared_capture._SLOTS, *_shared_capture._SUBSCRIBERS])


def test_different_captures_or_changed_weights_are_not_shared():
    x, y = blobs(n=96).tensors
    model = CountingNet().eval()
    layers = ["net.3", "net.7"]  # explicit: no extra forward to find the layers
    rank = EffectiveRank(layers=layers, max_dim=4, probe_data=(x, y))  # another sketch: another signature
    ncc = EffectiveDepth(layers=layers, probe_data=(x, y), heldout=None)
    same = EffectiveRank(layers=layers, probe_data=(x, y))
    for probe in (rank, ncc):
        probe.set_probe_data((x, y))
        _shared_capture.subscribe(probe, model)
    try:
        rank.run_measurement(model, 0)
        ncc.run_measurement(model, 0)
        assert model.probe_forwards == 2
        same.set_probe_data((x, y))
        _shared_capture.subscribe(same, model)
        ncc.run_measurement(model, 1)
        shared_values = same.run_measurement(model, 1)
        assert model.probe_forwards == 3  # shared with ncc's pass at step 1
        ncc.run_measurement(model, 2)
        saved = model.net[0].weight.detach().clone()
        with torch.no_grad():
            model.net[0].weight.add_(0.1)  # new weights at the same step: features differ
        same.run_measurement(model, 2)
        assert model.probe_forwards == 5
        with torch.no_grad():
            model.net[0].weight.copy_(saved)
        alone = EffectiveRank(layers=layers, probe_data=(x, y))
        alone.set_probe_data((x, y))
        alone_values = alone.run_measurement(model, 7)  # its own pass, at the step-1 weights
        assert model.probe_forwards == 6
        for key, value in alone_values.items():
            if key != "seconds":
                assert shared_values[key] == value, key
    finally:
        for probe in (rank, ncc, same):
            _shared_capture.unsubscribe(probe, model)
