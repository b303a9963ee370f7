"""``biasprobe demo``: a small MLP on scikit-learn's bundled digits, with every probe attached."""

from __future__ import annotations

import os
import time
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The 8x8 digits (1,797 images, bundled with scikit-learn: no download), split 80/20.

    Pixels are scaled to [0, 1]; inputs are flat 64-vectors.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo needs scikit-learn: pip install 'lightning_biasprobe[demo]'") from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    train, val = order[:split], order[split:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def make_mlp(width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def demo_module(lr: float = 0.1, width: int = 128):
    """The demo MLP as a LightningModule, trained by plain SGD (the setting of the implicit-gradient-
    regularization and SGD-noise papers, so their probes need no caveat)."""
    import pytorch_lightning as pl

    class DigitsMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp(width)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train/loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val/loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
            self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    return DigitsMLP()


def default_probes(budgets: bool = False) -> list:
    """One instance of every probe the package has, at its default settings; without their default
    overhead budgets unless ``budgets``.

    The demo is a showcase on a toy whose training steps take about a millisecond: there a budget
    binds hard (one point of most probes costs more than several steps, and ten probes share one
    run), and the curves the demo is there to show would be thinned to a few points. The schedule
    each budget thins is kept (e.g. every epoch); a real run keeps the budgets.
    """
    from .. import ALL_PROBES

    probes = []
    for cls in ALL_PROBES:
        cadence = dict(cls.default_cadence)
        if budgets or cadence.pop("max_overhead", None) is None:
            probes.append(cls())
        else:
            probes.append(cls(**cadence))  # an explicit schedule has no budget
    return probes


def run_demo(out: str = "biasprobe_logs", epochs: int = 20, batch_size: int = 64, seed: int = 0,
             probes: Optional[list] = None, progress: bool = True, limit_batches: Optional[int] = None,
             width: int = 128) -> dict:
    """Train the demo MLP (hidden ``width``) with ``probes`` (default: all), log to TensorBoard under ``out``.

    Returns ``{"metrics": {key: last value}, "logdir": ..., "seconds": ...}``.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    pl.seed_everything(seed, verbose=False)
    train, val = digits_tensors(seed)
    probes = default_probes() if probes is None else probes
    logger = TensorBoardLogger(save_dir=out, name="demo")
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=probes,
        enable_progress_bar=progress, enable_model_summary=False, enable_checkpointing=False,
        log_every_n_steps=10, limit_train_batches=limit_batches, limit_val_batches=limit_batches,
    )
    started = time.perf_counter()
    trainer.fit(demo_module(width=width), DataLoader(train, batch_size=batch_size, shuffle=True),
                DataLoader(val, batch_size=256))
    metrics: dict[str, float] = {}
    for probe in probes:
        metrics.update(probe.last_values)
    return {"metrics": metrics, "logdir": logger.log_dir, "root": out, "seconds": time.perf_counter() - started}


def print_summary(result: dict) -> None:
    metrics = result["metrics"]
    width = max([len(k) for k in metrics] + [6])
    print()
    print(f"{'metric':<{width}}  last value")
    print(f"{'-' * width}  ----------")
    for key in sorted(metrics):
        print(f"{key:<{width}}  {metrics[key]:.6g}")
    print(f"\ntrained in {result['seconds']:.1f} s; logs in {os.path.abspath(result['logdir'])}")
    print(f"open them with:\n  tensorboard --logdir {result['root']}")


def write_demo_report(result: dict) -> Optional[str]:
    """Write the report of the demo run into ``<out>/report`` and print its path; without
    matplotlib, print how to get it instead. Returns the page's path (``None`` if not written)."""
    from ..report import PLOT_EXTRA_HINT, MissingPlotExtra, ReportError, write_report

    out = os.path.join(result["root"], "report")
    try:
        report = write_report([result["logdir"]], out)
    except MissingPlotExtra:
        print(f"\nthe HTML report needs matplotlib: {PLOT_EXTRA_HINT}, then\n"
              f"  biasprobe report {result['logdir']} --out {out}")
        return None
    except ReportError as err:  # e.g. a demo run with no probes: the training result still stands
        print(f"\nno report: {err}")
        return None
    print(f"\nreport ({len(report.panels)} panels, {report.seconds:.1f} s):\n  {report.path}")
    return report.path
