"""The digits MLP and its data as importable LightningCLI classes, for either Lightning namespace."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_biasprobe.cli.demo import digits_tensors, make_mlp


def build(L):
    """``(DigitsMLP, DigitsData)`` built on ``L`` (``pytorch_lightning`` or ``lightning.pytorch``)."""

    class DigitsMLP(L.LightningModule):
        """An MLP on scikit-learn's 8x8 digits, plain SGD.

        Args:
            width: hidden width.
            lr: SGD learning rate.
        """

        def __init__(self, width: int = 128, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = make_mlp(width)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    class DigitsData(L.LightningDataModule):
        """scikit-learn's bundled digits (no download), 75/25 split.

        Args:
            batch_size: training batch size.
            seed: seed of the split and of the shuffling.
        """

        def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
            super().__init__()
            self.batch_size, self.seed = batch_size, seed

        def setup(self, stage: str) -> None:
            self.train, self.val = digits_tensors(self.seed)

        def train_dataloader(self):
            return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(self.seed))

        def val_dataloader(self):
            return DataLoader(self.val, batch_size=256)

    return DigitsMLP, DigitsData
