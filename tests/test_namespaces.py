"""The callbacks exist, with the same names, for pytorch_lightning and lightning.pytorch; both fit."""

import importlib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_biasprobe as lb
import lightning_biasprobe.lightning as lbl

from helpers import blobs


def make_module(namespace):
    L = importlib.import_module(namespace)

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return L, Net()


def test_same_names_in_both_namespaces():
    import lightning.pytorch as L
    import pytorch_lightning as pl

    assert [c.__name__ for c in lb.ALL_PROBES] == [c.__name__ for c in lbl.ALL_PROBES]
    for a, b in zip(lb.ALL_PROBES, lbl.ALL_PROBES):
        assert issubclass(a, pl.Callback) and not issubclass(a, L.Callback)
        assert issubclass(b, L.Callback) and not issubclass(b, pl.Callback)
        assert a.__doc__ == b.__doc__ and a.__module__ == "lightning_biasprobe.callbacks"
        assert b.__module__ == "lightning_biasprobe.lightning" and getattr(lbl, b.__name__) is b


@pytest.mark.parametrize("namespace, package", [("pytorch_lightning", lb), ("lightning.pytorch", lbl)])
def test_a_fit_with_every_probe_in_each_namespace(namespace, package, tmp_path):
    L, module = make_module(namespace)
    probes = [cls(every_n_steps=2, num_samples=48) for cls in package.ALL_PROBES]
    logger = importlib.import_module(f"{namespace}.loggers").CSVLogger(str(tmp_path))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, callbacks=probes, logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(blobs(), batch_size=32), DataLoader(blobs(seed=1), batch_size=32))
    for probe in probes:
        assert isinstance(probe, L.Callback)
        assert probe.failures == 0 and probe.measured_steps, type(probe).__name__
        assert any(k.startswith(f"biasprobe/{probe.log_name}/") for k in trainer.callback_metrics)
    assert (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").exists()
