"""Probes in a Lightning Fabric training loop, logged to TensorBoard.

    python examples/fabric_loop.py           # then: tensorboard --logdir biasprobe_logs/fabric_loop

Fabric sets up the model and optimizer (here on CPU, one process); ``ProbeRunner`` measures on
the Fabric-wrapped model (the process of global rank 0 measures, as under DDP). Prints the last
values.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_biasprobe import EffectiveRank, GeometricComplexity, GradientNoise, GradientRegularization
from lightning_biasprobe.cli.demo import digits_tensors, make_mlp
from lightning_biasprobe.runner import ProbeRunner, summary


def main(epochs: int = 5, out: str | None = "biasprobe_logs/fabric_loop", seed: int = 0, quiet: bool = False) -> dict:
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(seed)
    train, _ = digits_tensors(seed)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(train, batch_size=64, shuffle=True))
    writer = None
    if out is not None and fabric.is_global_zero:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out)
    x, y = train.tensors
    probes = [GeometricComplexity(every_n_steps=25), GradientNoise(every_n_steps=50),
              GradientRegularization(every_n_steps=5), EffectiveRank(every_n_steps=50)]
    runner = ProbeRunner(model, probes, probe_data=(x[:512], y[:512]), writer=writer,
                         rank_zero=fabric.is_global_zero)
    step = 0
    runner(step)
    for epoch in range(epochs):
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            fabric.backward(loss)
            runner.before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            runner(step)
        runner.epoch_end(epoch)
    runner.close()
    if writer is not None:
        writer.close()
    values = {k: float(v) for k, v in runner.callback_metrics.items()}
    if not quiet and fabric.is_global_zero:
        print(summary(values))
        if out is not None:
            print(f"tensorboard --logdir {out}")
    return values


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="biasprobe_logs/fabric_loop")
    args = parser.parse_args()
    main(args.epochs, args.out)
