"""Monitoring: stop training when the top Hessian eigenvalue (sharpness) passes a threshold.

    python examples/early_stopping_on_sharpness.py

Probe values are in ``trainer.callback_metrics`` under their log keys, so Lightning's own
``EarlyStopping`` and ``ModelCheckpoint`` can watch them. With full-batch-like SGD at learning
rate ``h`` the sharpness rises towards ``2/h`` (Cohen et al. 2021, "Gradient Descent on Neural
Networks Typically Occurs at the Edge of Stability"); here training stops once it passes a
fraction of that, and the checkpoint with the lowest geometric complexity is kept.

Two details make the stop exact: the probe is listed *before* ``EarlyStopping`` (callbacks run in
order, so the value is fresh when it is checked), and ``check_on_train_epoch_end=True`` (the
default would check after validation, which runs before the epoch-end measurement).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_biasprobe import GeometricComplexity, HessianCurvature
from lightning_biasprobe.cli.demo import demo_module, digits_tensors

SHARPNESS = "biasprobe/hessian/top_eigenvalue"


def main(threshold: float = 5.0, max_epochs: int = 30, lr: float = 0.1, out: str = "biasprobe_logs/early_stopping",
         quiet: bool = False) -> dict:
    pl.seed_everything(0, verbose=False)
    train, val = digits_tensors(0)
    sharpness = HessianCurvature(every_n_epochs=1, trace=False, num_samples=512)
    stop = EarlyStopping(monitor=SHARPNESS, mode="min", divergence_threshold=threshold, patience=10**6,
                         check_on_train_epoch_end=True, verbose=not quiet)
    keep = ModelCheckpoint(dirpath=f"{out}/checkpoints", monitor="biasprobe/gc/logits", mode="min", save_top_k=1,
                           filename="lowest-gc-{epoch}")
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                         callbacks=[sharpness, GeometricComplexity(), stop, keep],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(demo_module(lr=lr), DataLoader(train, batch_size=64, shuffle=True,
                                               generator=torch.Generator().manual_seed(0)),
                DataLoader(val, batch_size=256))
    result = {
        "stopped_epoch": stop.stopped_epoch,
        "epochs_run": trainer.current_epoch,
        "reason": getattr(stop, "stopping_reason_message", None),
        "reason_code": getattr(getattr(stop, "stopping_reason", None), "value", None),
        "sharpness_history": [(step, values[SHARPNESS]) for step, values in sharpness.history],
        "threshold": threshold,
        "best_checkpoint": keep.best_model_path,
        "best_gc": float(keep.best_model_score) if keep.best_model_score is not None else None,
    }
    if not quiet:
        for step, value in result["sharpness_history"]:
            print(f"step {step:5d}  top Hessian eigenvalue {value:8.3f}")
        print(f"stopped after epoch {result['stopped_epoch']}: {result['reason']}")
        print(f"checkpoint with the lowest geometric complexity ({result['best_gc']:.4g}): {result['best_checkpoint']}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=5.0)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default="biasprobe_logs/early_stopping")
    args = parser.parse_args()
    main(args.threshold, args.max_epochs, args.lr, args.out)
