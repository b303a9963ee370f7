"""Extreme simplicity bias on LMS-5 data, measured with the ``SimplicityBias`` probe, in seconds.

Reproduces, qualitatively and at toy scale, the LMS-5 result of Shah, Tamuly, Raghunathan, Jain,
Netrapalli (2020), "The Pitfalls of Simplicity Bias in Neural Networks" (NeurIPS): on data where
one linear coordinate and each of 19 five-slab coordinates *alone* separate the two classes, a
one-hidden-layer ReLU network trained to 100% accuracy relies on the linear coordinate only.
Randomizing the slab coordinates (S^c) leaves its held-out accuracy at ~100%; randomizing the
linear coordinate (S) drops it to chance (~50%).

A control shows that the slabs are not beyond the network: the same network trained on the same
data with the linear coordinate replaced by noise learns the slabs (its accuracy survives
randomizing coordinate 0 and falls to chance when the slabs are randomized).

Setting: ``LMSDataModule`` (LMS-5, d = 20, width w = 1, margins 0.1: the reference ``get_lms_data``
geometry) with 10,000 training and 2,000 held-out examples (the reference uses 100,000 and
2,000); an MLP 20-100-2 (ReLU), Adam (lr 3e-3), batch 128, 12 epochs, trained with Lightning. The
``SimplicityBias`` probe measures on the 2,000 held-out examples (the data module's validation
loader) at the start, at log-spaced steps and at the end.

Printed: the probe's curve (step: clean, S-randomized and S^c-randomized held-out accuracy; 14
of its points), the final values of both runs, and each qualitative check with what it compared.

Run::

    python examples/simplicity_bias_lms.py               # 12 epochs per run (~10 s on one core)
    python examples/simplicity_bias_lms.py --epochs 4    # shorter

Pure torch, Lightning and the package; no GPU, no data download.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import time
import warnings

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_biasprobe.data import LMSDataModule

from lightning_biasprobe import SimplicityBias


DIM = 20
NUM_TRAIN = 10_000
NUM_VAL = 2_000
HIDDEN = 100
LR = 3e-3
BATCH_SIZE = 128
KEYS = ("accuracy", "s_randomized_accuracy", "sc_randomized_accuracy")


class MLP(pl.LightningModule):
    """One hidden layer of ReLU units, two logits, cross-entropy, Adam."""

    def __init__(self, dim: int = DIM, hidden: int = HIDDEN, lr: float = LR) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.lr = lr
        self.train_correct = 0
        self.train_seen = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_correct += int((logits.argmax(1) == y).sum())
        self.train_seen += len(y)
        return nn.functional.cross_entropy(logits, y)

    def on_train_epoch_start(self) -> None:
        self.train_correct = self.train_seen = 0

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def run(linear: bool = True, epochs: int = 12, seed: int = 0) -> dict:
    """Train on LMS-5 (``linear=False``: coordinate 0 replaced by noise); the probe's curve."""
    pl.seed_everything(seed, verbose=False)
    kinds = ("linear" if linear else "noise",) + (5,) * (DIM - 1)
    data = LMSDataModule(num_train=NUM_TRAIN, num_val=NUM_VAL, kinds=kinds, batch_size=BATCH_SIZE, seed=seed)
    # S = coordinate 0 (linear, or the noise that replaced it), S^c = the slabs. For LMS data,
    # data.simplicity_kwargs() gives the same sets (and the rotation of rotated data).
    probe = SimplicityBias(simple_coords=(0,), complex_coords=tuple(range(1, DIM)),
                           probe_data=data.val_dataloader(), num_samples=NUM_VAL, log_spaced=True)
    model = MLP()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[probe], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    curve = [(step, {k: values[f"biasprobe/simplicity/{k}"] for k in KEYS}) for step, values in probe.history]
    return {"curve": curve, "final": curve[-1][1], "train_accuracy": model.train_correct / max(model.train_seen, 1),
            "steps": trainer.global_step, "probe_seconds": sum(v["biasprobe/simplicity/seconds"]
                                                               for _, v in probe.history)}


def checks(lms: dict, control: dict) -> dict[str, tuple[bool, str]]:
    f, c = lms["final"], control["final"]
    return {
        "LMS-5: the network fits the data": (
            f["accuracy"] > 0.99,
            f"held-out accuracy {f['accuracy']:.3f}, last-epoch training accuracy {lms['train_accuracy']:.3f}"),
        "LMS-5: randomizing the slabs (S^c) changes nothing": (
            f["sc_randomized_accuracy"] > 0.98,
            f"S^c-randomized accuracy {f['sc_randomized_accuracy']:.3f} (clean {f['accuracy']:.3f})"),
        "LMS-5: randomizing the linear coordinate (S) gives chance": (
            abs(f["s_randomized_accuracy"] - 0.5) < 0.1,
            f"S-randomized accuracy {f['s_randomized_accuracy']:.3f} (chance 0.5)"),
        "control without the linear coordinate: the slabs are learnable": (
            c["accuracy"] > 0.9 and c["s_randomized_accuracy"] > 0.9 and abs(c["sc_randomized_accuracy"] - 0.5) < 0.1,
            f"clean {c['accuracy']:.3f}, coordinate 0 randomized {c['s_randomized_accuracy']:.3f}, slabs randomized "
            f"{c['sc_randomized_accuracy']:.3f}"),
    }


def main(epochs: int = 12, quiet: bool = False, seed: int = 0) -> dict:
    """Both runs; print (unless ``quiet``) and return ``{"lms", "control", "checks", "seconds"}``."""
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    started = time.perf_counter()
    lms = run(linear=True, epochs=epochs, seed=seed)
    control = run(linear=False, epochs=epochs, seed=seed)
    results = {"lms": lms, "control": control, "checks": checks(lms, control),
               "seconds": time.perf_counter() - started}
    if not quiet:
        report(results, epochs)
    return results


def report(results: dict, epochs: int) -> None:
    print(f"LMS-5, d={DIM}: {NUM_TRAIN} training / {NUM_VAL} held-out examples; MLP {DIM}-{HIDDEN}-2, Adam lr {LR}, "
          f"batch {BATCH_SIZE}, {epochs} epochs\n")
    for name in ("lms", "control"):
        run_ = results[name]
        title = "LMS-5" if name == "lms" else "control: coordinate 0 is noise, 19 five-slab coordinates"
        print(f"{title}: held-out accuracy (clean / S-randomized / S^c-randomized) by step")
        curve = run_["curve"]
        shown = curve if len(curve) <= 14 else [curve[round(i * (len(curve) - 1) / 13)] for i in range(14)]
        for step, values in shown:
            print(f"  step {step:>5}: {values['accuracy']:.3f} / {values['s_randomized_accuracy']:.3f} / "
                  f"{values['sc_randomized_accuracy']:.3f}")
        print(f"  probe time {run_['probe_seconds']:.2f} s over {len(run_['curve'])} points\n")
    for claim, (ok, detail) in results["checks"].items():
        print(f"[{'ok' if ok else 'NOT REPRODUCED'}] {claim}: {detail}")
    print(f"\n{results['seconds']:.1f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(epochs=args.epochs, seed=args.seed)
