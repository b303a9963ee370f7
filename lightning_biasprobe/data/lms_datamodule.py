"""``LMSDataModule``: LMS simplicity-bias data (Shah et al. 2020) as a Lightning data module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from .lms import LMSData, make_slab_data

__all__ = ["LMSDataModule"]


class LMSDataModule(pl.LightningDataModule):
    """Training and held-out LMS-k (or MS-(5,7)) data, generated once from ``seed``.

    The held-out split (``num_val`` examples) is the validation and the test set; probe it with
    ``SimplicityBias(probe_data="val", **datamodule.simplicity_kwargs())``, as Shah et al. evaluate
    on held-out data. Defaults follow the reference ``get_lms_data`` except the size (10,000
    training examples instead of 100,000, so that a CPU run takes seconds).

    Args:
        num_train, num_val: examples in each split.
        dim: coordinates (one simple, ``dim - 1`` complex).
        num_slabs: slabs of the complex coordinates (LMS-k); ``dataset="ms"`` gives MS-(5,7).
        dataset: ``"lms"`` (coordinate 0 linear) or ``"ms"`` (coordinate 0 five-slab, the rest seven-slab).
        batch_size: training batch size (held-out loaders use the same).
        seed: data generation seed; the training loader shuffles with its own generator seeded from it.
        kinds: the kind of every coordinate (``"linear"``, 3, 5, 7 or ``"noise"``), instead of ``dataset``,
            ``dim`` and ``num_slabs`` (e.g. ``("noise",) + (5,) * 19``: LMS-5 without its linear coordinate).
        **data_kwargs: :func:`lightning_biasprobe.data.make_slab_data` options (``width``, margins,
            ``corrupt_linear``, ``rotate``...).
    """

    def __init__(self, num_train: int = 10_000, num_val: int = 2_000, dim: int = 20, num_slabs: int = 5,
                 dataset: str = "lms", batch_size: int = 256, seed: int = 0, kinds: Optional[Sequence] = None,
                 **data_kwargs: Any) -> None:
        super().__init__()
        for name, value in (("num_train", num_train), ("num_val", num_val), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        if dataset not in ("lms", "ms"):
            raise ValueError(f"dataset must be 'lms' or 'ms', got {dataset!r}")
        if dataset == "lms" and num_slabs not in (3, 5, 7):
            raise ValueError(f"num_slabs must be 3, 5 or 7, got {num_slabs!r}")
        if "generator" in data_kwargs:
            raise ValueError("pass seed=..., not a generator: the data module regenerates its data from the seed")
        self.num_train, self.num_val, self.dim, self.num_slabs = num_train, num_val, dim, num_slabs
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.data_kwargs = data_kwargs
        if kinds is None:
            kinds = (("linear",) + (num_slabs,) * (dim - 1)) if dataset == "lms" else ((5,) + (7,) * (dim - 1))
        else:
            kinds = tuple(kinds)
            self.dim = len(kinds)
        self.kinds = kinds
        self.data: Optional[LMSData] = None
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None
        # Errors in the generator options surface now, not at fit time.
        make_slab_data(2, kinds, seed=seed, **data_kwargs)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data is not None:
            return
        data = make_slab_data(self.num_train + self.num_val, self.kinds, seed=self.seed, **self.data_kwargs)
        self.data = data
        # The first num_val examples are held out, as in the reference code's split.
        self.val_set = TensorDataset(data.inputs[: self.num_val], data.targets[: self.num_val])
        self.train_set = TensorDataset(data.inputs[self.num_val:], data.targets[self.num_val:])

    def simplicity_kwargs(self) -> dict:
        """``simple_coords``, ``complex_coords`` and ``rotation`` for ``SimplicityBias`` on these data."""
        self.setup()
        return self.data.simplicity_kwargs()

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed + 1))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
