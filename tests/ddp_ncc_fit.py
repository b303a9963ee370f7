"""A 2-process CPU DDP fit with the representation probes accumulating over validation epochs.

Usage: ``python tests/ddp_ncc_fit.py OUT_DIR`` (run by ``tests/test_ncc_ddp.py`` in a subprocess).

``EffectiveDepth`` (held-out accuracy over the validation loader) and ``EffectiveRank(data="val")``
accumulate sufficient statistics on both ranks, each over its half of the validation data, and
reduce them with torchmetrics. Rank zero saves the final weights (``OUT_DIR/final.pt``); each rank
writes ``OUT_DIR/rank<k>.json`` with what its probes logged, so the test can recompute everything
in one process on all the validation data.
"""

from __future__ import annotations

import json
import os
import sys

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_biasprobe import EffectiveDepth, EffectiveRank
from lightning_biasprobe.cli.demo import demo_module, digits_tensors

WORLD_SIZE = 2
BATCH_SIZE = 8
NUM_TRAIN = 80          # 5 steps per epoch per rank
NUM_VAL = 64            # 4 validation batches per rank: no padding by the DistributedSampler
EPOCHS = 2
SEED = 0


def data():
    train, val = digits_tensors(SEED)
    return TensorDataset(*train[:NUM_TRAIN]), TensorDataset(*val[:NUM_VAL])


def probes() -> list:
    return [EffectiveDepth(num_samples=40, strict=True),
            EffectiveRank(data="val", max_dim=16, strict=True, name="rank_val")]


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(SEED, verbose=False)
    train, val = data()
    callbacks = probes()
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy="ddp", max_epochs=EPOCHS, logger=False,
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(demo_module(width=32), DataLoader(train, batch_size=BATCH_SIZE, shuffle=True),
                DataLoader(val, batch_size=BATCH_SIZE, shuffle=False))
    rank = trainer.global_rank
    if rank == 0:
        torch.save(trainer.lightning_module.state_dict(), os.path.join(out_dir, "final.pt"))
    report = {
        "global_rank": rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "probes": {p.log_name: {"history": p.history, "measured_steps": p.measured_steps, "failures": p.failures,
                                "indices": None if p.probe_set is None else p.probe_set.indices}
                   for p in callbacks},
    }
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(report, fh)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUT_DIR")
    main(sys.argv[1])
