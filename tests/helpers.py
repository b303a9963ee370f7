"""Shared test fixtures: a small LightningModule with BatchNorm and Dropout, data, and every probe."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_biasprobe as lb


def every_probe(**kwargs) -> list:
    """One instance of every probe the package has; ``kwargs`` go to each (e.g. a cadence).

    The trajectory-invariance and DDP tests use this list, so a new probe is covered by adding
    it to ``lightning_biasprobe.ALL_PROBES``.
    """
    return [cls(**kwargs) for cls in lb.ALL_PROBES]


class BNDropoutNet(pl.LightningModule):
    """An MLP with BatchNorm and Dropout, SGD with momentum (so optimizer state exists)."""

    def __init__(self, d: int = 10, c: int = 3, lr: float = 0.1, frozen_eval_layer: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, c))
        self.lr = lr
        self.frozen_eval_layer = frozen_eval_layer
        if frozen_eval_layer:
            self.net[1].requires_grad_(False)

    def on_train_epoch_start(self):
        if self.frozen_eval_layer:
            self.net[1].eval()  # the user freezes one BatchNorm: probes must not un-freeze it

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Classifier(pl.LightningModule):
    """Any ``nn.Module`` as a classifier: cross-entropy, plain SGD."""

    def __init__(self, net: nn.Module, lr: float = 0.1):
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def load_example(name: str):
    """The module ``examples/<name>.py`` (examples are scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up there
    spec.loader.exec_module(module)
    return module


def blobs(n: int = 192, d: int = 10, c: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centers = torch.randn(c, d, generator=g) * 2
    x = centers[y] + torch.randn(n, d, generator=g)
    return TensorDataset(x, y)


def loader(dataset, batch_size: int = 32, shuffle: bool = True, generator_seed: int | None = None) -> DataLoader:
    generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def trainer(callbacks=(), max_epochs: int = 2, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=list(callbacks),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      deterministic=True, **kwargs)
