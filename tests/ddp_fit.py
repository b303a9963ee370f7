"""A 2-process CPU DDP fit with probes attached; run by ``tests/test_ddp.py`` in a subprocess.

Usage: ``python tests/ddp_fit.py OUT_DIR``

Lightning's ``strategy="ddp"`` re-launches this script once per extra rank (with ``LOCAL_RANK``
set), so it must be a plain script, not something run inside pytest. Each rank writes
``OUT_DIR/rank<k>.json`` after ``fit``::

    {"global_rank": k, "world_size": 2, "global_step": ..., "log_dir": ..., "param_checksum": ...,
     "probes": {"<log name>": {"measured_steps": [...], "history_len": n, "state_key": ...}}}

Every probe in ``lightning_biasprobe.ALL_PROBES`` is covered.
"""

from __future__ import annotations

import json
import os
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_biasprobe import ALL_PROBES
from lightning_biasprobe.cli.demo import demo_module, digits_tensors

WORLD_SIZE = 2
BATCH_SIZE = 8
STEPS_PER_EPOCH = 5          # per rank: the DistributedSampler gives each rank 1 / WORLD_SIZE of the data
EPOCHS = 3
NUM_EXAMPLES = WORLD_SIZE * BATCH_SIZE * STEPS_PER_EPOCH   # 80
SEED = 0
LR = 0.1                     # plain SGD (the demo module's optimizer)


def probes() -> list:
    """Every probe of the package (``ALL_PROBES``), each measuring every 2nd step on 32 examples."""
    return [cls(every_n_steps=2, num_samples=32) for cls in ALL_PROBES]


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(SEED, verbose=False)
    train, _ = digits_tensors(SEED)
    train = TensorDataset(*train[:NUM_EXAMPLES])
    callbacks = probes()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy="ddp",
        max_epochs=EPOCHS,
        logger=CSVLogger(save_dir=out_dir, name="csv"),
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(demo_module(lr=LR, width=32), DataLoader(train, batch_size=BATCH_SIZE, shuffle=True))
    report = {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "log_dir": trainer.logger.log_dir,
        # DDP keeps the replicas identical; a probe that desynchronised them would show here.
        "param_checksum": float(sum(p.detach().double().sum() for p in trainer.lightning_module.parameters())),
        "probes": {
            probe.log_name: {
                "measured_steps": list(probe.measured_steps),
                "history_len": len(probe.history),
                "history_steps": [step for step, _ in probe.history],
                "failures": probe.failures,
                "state_key": probe.state_key,
            }
            for probe in callbacks
        },
    }
    path = os.path.join(out_dir, f"rank{trainer.global_rank}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(report, fh)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUT_DIR")
    main(sys.argv[1])
