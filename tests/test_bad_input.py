"""Bad configuration fails at setup with a clear message; failures at run time warn once and skip."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers import BNDropoutNet, blobs, loader, trainer
from lightning_biasprobe import GeometricComplexity
from lightning_biasprobe.callbacks import BatchFormatError


class Triples(Dataset):
    def __init__(self):
        self.base = blobs()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, y, torch.tensor(1.0)  # (inputs, targets, weight): the default cannot tell


class WeightedNet(BNDropoutNet):
    def training_step(self, batch, batch_idx):
        x, y, w = batch
        return (w * nn.functional.cross_entropy(self(x), y, reduction="none")).mean()


class DictNet(BNDropoutNet):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["pixels"]), batch["label"])


class DictData(Dataset):
    def __init__(self):
        self.base = blobs()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"pixels": x, "label": y}


def test_unreadable_batch_fails_at_fit_start_and_names_the_argument():
    with pytest.raises(BatchFormatError, match="unpack_batch"):
        trainer([GeometricComplexity()], max_epochs=1).fit(WeightedNet(), DataLoader(Triples(), batch_size=32))
    with pytest.raises(BatchFormatError, match=r"unpack_batch.*|.*pixels"):
        trainer([GeometricComplexity()], max_epochs=1).fit(DictNet(), DataLoader(DictData(), batch_size=32))
    # ... and the argument it names fixes it.
    gc = GeometricComplexity(unpack_batch=lambda b: (b[0], b[1]), num_samples=30)
    trainer([gc], max_epochs=1).fit(WeightedNet(), DataLoader(Triples(), batch_size=32))
    assert gc.measured_steps == [0, 6] and len(gc.probe_set) == 30
    gc = GeometricComplexity(unpack_batch=lambda b: (b["pixels"], b["label"]))
    trainer([gc], max_epochs=1).fit(DictNet(), DataLoader(DictData(), batch_size=32))
    assert gc.failures == 0 and gc.measured_steps == [0, 6]


class FailsInEval(BNDropoutNet):
    """Trains normally; its forward raises (or returns NaN) in eval mode, where probes measure."""

    def __init__(self, how="raise"):
        super().__init__()
        self.how = how

    def forward(self, x):
        out = self.net(x)
        if not self.training:
            if self.how == "raise":
                raise RuntimeError("this model cannot run in eval mode")
            return out * float("nan")
        return out


@pytest.mark.parametrize("how,error", [("raise", "RuntimeError"), ("nan", "FloatingPointError")])
def test_run_time_failure_warns_once_skips_and_training_goes_on(tmp_path, how, error):
    pl.seed_everything(0, verbose=False)
    baseline = BNDropoutNet()
    trainer([], max_epochs=2).fit(baseline, loader(blobs()))

    pl.seed_everything(0, verbose=False)
    model = FailsInEval(how)
    gc = GeometricComplexity(every_n_steps=1)
    t = trainer([gc], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, loader(blobs()))
    ours = [w for w in caught if "GeometricComplexity skipped" in str(w.message)]
    assert len(ours) == 1 and error in str(ours[0].message)
    assert gc.failures == 13 and gc.measured_steps == [] and gc.last_values == {}
    # training went on, unchanged, and its checkpoint is intact
    assert t.global_step == 12
    for a, b in zip(baseline.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    t.save_checkpoint(tmp_path / "after_failures.ckpt")
    ckpt = torch.load(tmp_path / "after_failures.ckpt", weights_only=False)
    assert ckpt["global_step"] == 12 and ckpt["callbacks"][gc.state_key]["failures"] == 13
    restored = FailsInEval(how)
    restored.load_state_dict(ckpt["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))


def test_strict_raises_the_measurement_error():
    with pytest.raises(RuntimeError, match="cannot run in eval mode"):
        trainer([GeometricComplexity(strict=True)], max_epochs=1).fit(FailsInEval("raise"), loader(blobs()))


def test_validation_probe_without_validation_data_fails_at_fit_start():
    with pytest.raises(ValueError, match="no val dataloader"):
        trainer([GeometricComplexity(probe_data="val")], max_epochs=1, limit_val_batches=0).fit(
            BNDropoutNet(), loader(blobs()))


def test_sharded_strategies_are_refused_in_setup():
    class FSDPStrategy:
        pass

    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(RuntimeError, match="sharded strategy FSDPStrategy"):
        GeometricComplexity().setup(FakeTrainer(), None, "fit")


@pytest.mark.parametrize("kwargs,error", [
    (dict(probe_data="test"), ValueError), (dict(probe_data=3.5), TypeError), (dict(num_samples=0), ValueError),
    (dict(unpack_batch="x"), TypeError), (dict(mode="half"), ValueError), (dict(name="a/b"), ValueError),
    (dict(every_n_steps=-1), ValueError), (dict(output="softmax"), ValueError),
    (dict(estimator="hutchinson"), ValueError), (dict(num_projections=0), ValueError),
    (dict(chunk_size=0), ValueError),
])
def test_bad_arguments_raise_in_init(kwargs, error):
    with pytest.raises(error):
        GeometricComplexity(**kwargs)


def test_token_inputs_warn_with_the_way_out():
    """GC needs floating inputs: an embedding model warns (and says what to pass) instead of crashing."""

    class Tokens(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.emb(ids).mean(1))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randint(0, 20, (64, 5)), torch.randint(0, 3, (64,)))
    gc = GeometricComplexity()
    with pytest.warns(RuntimeWarning, match="embeddings"):
        trainer([gc], max_epochs=1).fit(Tokens(), DataLoader(data, batch_size=16))
    assert gc.failures == 2 and gc.measured_steps == []
    # the way out the message gives: differentiate with respect to the embeddings
    ids = data.tensors[0][:16]
    model = Tokens()
    gc_emb = GeometricComplexity(probe_data=model.emb(ids).detach(), forward=lambda m, e: m.head(e.mean(1)))
    trainer([gc_emb], max_epochs=1).fit(model, DataLoader(data, batch_size=16))
    assert gc_emb.failures == 0 and gc_emb.measured_steps == [0, 4]
