"""Values reach TensorBoard and CSV loggers at the right steps, and trainer.callback_metrics."""

import csv
import glob
import math

import pytorch_lightning as pl
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
