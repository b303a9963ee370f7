"""Probes in a plain PyTorch training loop (no Trainer), logged to TensorBoard.

    python examples/plain_loop.py            # then: tensorboard --logdir biasprobe_logs/plain_loop

An MLP on scikit-learn's digits, SGD; ``ProbeRunner`` measures geometric complexity, the top
Hessian eigenvalue, the NTK alignment and the weight diffusion at their cadences. Prints the last
values.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_biasprobe import GeometricComplexity, HessianCurvature, NTKAlignment, WeightDiffusion
from lightning_biasprobe.cli.demo import digits_tensors, make_mlp
from lightning_biasprobe.runner import ProbeRunner, summary


def main(epochs: int = 5, out: str | None = "biasprobe_logs/plain_loop", seed: int = 0, quiet: bool = False) -> dict:
    torch.manual_seed(seed)
    train, _ = digits_tensors(seed)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = None
    if out is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out)
    probes = [GeometricComplexity(every_n_steps=25), HessianCurvature(every_n_steps=50),
              NTKAlignment(every_n_steps=50), WeightDiffusion()]
    # train_data lets each probe read its class-balanced probe set by index, as under the Trainer.
    runner = ProbeRunner(model, probes, train_data=loader, writer=writer)
    step = 0
    runner(step)
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
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
    if not quiet:
        print(summary(values))
        if out is not None:
            print(f"tensorboard --logdir {out}")
    return values


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="biasprobe_logs/plain_loop")
    args = parser.parse_args()
    main(args.epochs, args.out)
