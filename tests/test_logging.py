"""Values reach TensorBoard and CSV loggers at the right steps, and trainer.callback_metrics."""

import csv
import glob
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import GeometricComplexity


def test_values_reach_tensorboard_and_csv_at_the_measured_steps(tmp_path):
    pl.seed_everything(0, verbose=False)
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    gc = GeometricComplexity(every_n_steps=4, num_samples=32)
    projected = GeometricComplexity(estimator="projection", output="probs", name="gc_probs", every_n_epochs=1)
    t = trainer([gc, projected], max_epochs=2, logger=[tb, csv_logger], log_every_n_steps=1)
    t.fit(BNDropoutNet(), loader(blobs()))  # 6 steps per epoch, 12 in all

    assert gc.measured_steps == [0, 4, 8, 12]
    assert projected.measured_steps == [0, 6, 12]
    expected = {step: values for step, values in gc.history}

    events = EventAccumulator(tb.log_dir)
    events.Reload()
    scalars = events.Scalars("biasprobe/gc/logits")
    assert [e.step for e in scalars] == gc.measured_steps
    for e in scalars:
        assert math.isclose(e.value, expected[e.step]["biasprobe/gc/logits"], rel_tol=1e-6)
    assert [e.step for e in events.Scalars("biasprobe/gc/seconds")] == gc.measured_steps
    assert [e.step for e in events.Scalars("biasprobe/gc_probs/probs")] == [0, 6, 12]

    csv_logger.save()
    rows = list(csv.DictReader(open(glob.glob(f"{csv_logger.log_dir}/metrics.csv")[0])))
    logged = {int(r["step"]): float(r["biasprobe/gc/logits"]) for r in rows if r.get("biasprobe/gc/logits")}
    assert sorted(logged) == gc.measured_steps
    for step, value in logged.items():
        assert math.isclose(value, expected[step]["biasprobe/gc/logits"], rel_tol=1e-6)

    assert float(t.callback_metrics["biasprobe/gc/logits"]) == gc.last_values["biasprobe/gc/logits"]
    assert gc.last_values == gc.history[-1][1]
    assert all(v > 0 for _, values in gc.history for v in values.values())


def test_values_reach_early_stopping(tmp_path):
    """A probe value can be monitored: stop as soon as GC passes a (tiny) threshold."""
    from pytorch_lightning.callbacks import EarlyStopping

    stop = EarlyStopping(monitor="biasprobe/gc/logits", stopping_threshold=1e-9, mode="min", patience=100,
                         check_on_train_epoch_end=True)
    gc = GeometricComplexity(every_n_epochs=1, mode="eval")
    t = trainer([gc, stop], max_epochs=5)
    t.fit(BNDropoutNet(), loader(blobs()))
    # GC is far above 1e-9: EarlyStopping sees the value and never stops on the threshold,
    # so all epochs run; and with an impossible-to-meet divergence threshold it stops at once.
    assert t.current_epoch == 5
    diverge = EarlyStopping(monitor="biasprobe/gc/logits", divergence_threshold=1e-9, mode="min", patience=100,
                            check_on_train_epoch_end=True)
    t2 = trainer([GeometricComplexity(every_n_epochs=1), diverge], max_epochs=5)
    t2.fit(BNDropoutNet(), loader(blobs()))
    assert t2.current_epoch == 1 and "Divergence threshold" in diverge.stopping_reason_message


def _events(log_dir):
    # The events as written (EventFileLoader would migrate simple_value into tensors).
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    return [e for path in sorted(glob.glob(f"{log_dir}/*tfevents*")) for e in LegacyEventFileLoader(path).Load()
            if e.HasField("summary")]


def test_a_point_is_one_tensorboard_event_with_add_scalar_values(tmp_path):
    """Lightning's own TensorBoardLogger gets a point's scalars as one event (one serialization instead of
    one per quantity), with the tags, steps and float32 values add_scalar writes."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_biasprobe.callbacks._tensorboard import scalar_writer

    tb = TensorBoardLogger(tmp_path, name="tb")
    gc = GeometricComplexity(every_n_steps=4, num_samples=32)
    trainer([gc], max_epochs=1, logger=tb).fit(BNDropoutNet(), loader(blobs()))
    assert scalar_writer(tb) is not None
    ours = [e for e in _events(tb.log_dir) if e.summary.value[0].tag.startswith("biasprobe/")]
    assert [e.step for e in ours] == gc.measured_steps == [0, 4, 6]
    for event, (step, metrics) in zip(ours, gc.history):
        assert {v.tag: v.simple_value for v in event.summary.value} == {
            k: float(torch.tensor(v, dtype=torch.float32)) for k, v in metrics.items()}

    reference = SummaryWriter(str(tmp_path / "add_scalar"))  # what Lightning's log_metrics would write
    for k, v in gc.history[0][1].items():
        reference.add_scalar(k, v, 0)
    reference.close()
    expected = sorted((v.tag, v.simple_value) for e in _events(tmp_path / "add_scalar") for v in e.summary.value)
    assert sorted((v.tag, v.simple_value) for v in ours[0].summary.value) == expected


def test_loggers_with_a_prefix_or_their_own_log_metrics_keep_log_metrics(tmp_path):
    from lightning_biasprobe.callbacks._tensorboard import scalar_writer

    class Recording(TensorBoardLogger):
        seen: list = []

        def log_metrics(self, metrics, step=None):
            self.seen.append(step)
            super().log_metrics(metrics, step)

    prefixed = TensorBoardLogger(tmp_path, name="prefixed", prefix="run")
    recording = Recording(tmp_path, name="recording")
    assert scalar_writer(prefixed) is None and scalar_writer(recording) is None
    gc = GeometricComplexity(every_n_steps=4, num_samples=32)
    trainer([gc], max_epochs=1, logger=[prefixed, recording]).fit(BNDropoutNet(), loader(blobs()))
    assert [s for s in Recording.seen if s in gc.measured_steps] == gc.measured_steps
    events = EventAccumulator(prefixed.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("run-biasprobe/gc/logits")] == gc.measured_steps


# --------------------------------------------------------------------------------------- held events
def _scalar_steps(log_dir) -> list[int]:
    return [e.step for e in _events(log_dir) if e.summary.value[0].tag.startswith("biasprobe/")]


def test_held_events_reach_the_writer_in_order_with_their_own_wall_time(tmp_path, monkeypatch):
    """Lightning's TensorBoardLogger gets a point's event held: handed over when HOLD_EVENTS are held,
    when the oldest is HOLD_SECONDS old, or on release(); in logging order, stamped when logged."""
    import time

    from torch.utils.tensorboard import SummaryWriter

    from lightning_biasprobe.callbacks import _tensorboard

    writer = SummaryWriter(str(tmp_path / "held"))
    write = _tensorboard.summary_writer_scalars(writer, hold=True)
    for step in range(3):
        write({"biasprobe/x/a": float(step)}, step)
    written = time.time()
    time.sleep(0.05)  # handed over later: the events must keep the time they were logged at
    writer.flush()
    assert _scalar_steps(tmp_path / "held") == [] and len(_tensorboard._held) == 3
    _tensorboard.release_if_due()  # not old enough yet
    assert len(_tensorboard._held) == 3
    monkeypatch.setattr(_tensorboard, "HOLD_SECONDS", 0.0)
    _tensorboard.release_if_due()
    writer.flush()
    assert _scalar_steps(tmp_path / "held") == [0, 1, 2] and _tensorboard._held == []
    monkeypatch.setattr(_tensorboard, "HOLD_SECONDS", 1e9)
    for step in range(3, 3 + _tensorboard.HOLD_EVENTS):  # the HOLD_EVENTS-th hands them all over
        write({"biasprobe/x/a": float(step)}, step)
    writer.flush()
    assert _scalar_steps(tmp_path / "held") == list(range(3 + _tensorboard.HOLD_EVENTS))
    assert all(e.wall_time <= written for e in _events(tmp_path / "held")[:3])
    write({"biasprobe/x/a": 1.0}, 99)
    _tensorboard.release()
    writer.close()
    assert _scalar_steps(tmp_path / "held")[-1] == 99 and _tensorboard._held == []


class _Fails(BNDropoutNet):
    def training_step(self, batch, batch_idx):
        if self.global_step == 9:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_held_events_are_written_when_training_fails(tmp_path):
    """An exception ends the fit: the points made before it are handed over before Lightning closes
    the logger (on_exception)."""
    from lightning_biasprobe.callbacks import _tensorboard

    tb = TensorBoardLogger(tmp_path, name="tb")
    gc = GeometricComplexity(every_n_steps=2, num_samples=32)
    with pytest.raises(RuntimeError, match="boom"):
        trainer([gc], max_epochs=3, logger=tb).fit(_Fails(), loader(blobs()))
    assert gc.measured_steps == [0, 2, 4, 6, 8] and _tensorboard._held == []
    assert _scalar_steps(tb.log_dir) == gc.measured_steps
