"""The probes, unchanged, on Lightning's own demo Transformer (synthetic tokens, no download).

    python examples/transformer_probes.py            # then: tensorboard --logdir biasprobe_logs/transformer

``pytorch_lightning.demos.LightningTransformer`` is used as it ships (only ``prepare_data``, which
downloads WikiText-2, is switched off). Its batches are ``(inputs, target)`` token tensors of shape
``(N, T)`` and its forward takes both and returns log-probabilities of shape ``(N*T, V)``; two
adapters make that what the probes expect, one example per row:

- ``unpack_batch``: ``((inputs, target), target[:, -1])``: the model's inputs, and the next token
  after the last position as the example's class;
- ``forward``: ``module(inputs, target)`` reshaped to ``(N, T, V)``, at the last position.

Representation probes take the encoder and decoder layers' outputs ``(N, T, D)``, mean-pooled
over positions (``sequence_pool="mean"``). Probes that cannot apply to token inputs are listed with
the reason; every other probe runs at its defaults (with smaller probe sets, for CPU).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.transformer import LightningTransformer, Transformer
from torch.utils.data import DataLoader, TensorDataset

import lightning_biasprobe as lb

# Probes that need something token inputs do not have.
NOT_APPLICABLE = {
    "GeometricComplexity": "it differentiates the outputs with respect to the inputs; token ids are integers "
                           "(an input gradient exists only for the embeddings)",
    "SimplicityBias": "it randomizes coordinates of one input tensor across examples; this model takes a "
                      "(tokens, target) pair of token tensors",
    "FunctionFrequency": "it evaluates the model on straight lines between two inputs; there is no point "
                         "halfway between two token sequences",
}
LAYERS = ["model.transformer.encoder.layers.0", "model.transformer.encoder.layers.1",
          "model.transformer.decoder.layers.0", "model.transformer.decoder.layers.1"]


class SyntheticTransformer(LightningTransformer):
    """Lightning's demo Transformer as shipped, minus the WikiText-2 download.

    ``width`` other than 200 swaps in a smaller ``Transformer`` of the same class (for quick runs).
    """

    def __init__(self, vocab_size: int = 16, width: int = 200) -> None:
        super().__init__(vocab_size=vocab_size)
        if width != 200:
            self.model = Transformer(vocab_size=vocab_size, ninp=width, nhead=2, nhid=width, nlayers=2)

    def prepare_data(self) -> None:
        pass


def token_data(n: int = 512, length: int = 12, vocab: int = 16, seed: int = 0) -> TensorDataset:
    """Sequences x_{t+1} = x_t + s (mod vocab), s in {1, 2, 3} per sequence; target = inputs shifted by one."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    tokens = (start + stride * torch.arange(length + 1)) % vocab
    return TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def unpack(batch):
    inputs, target = batch
    return (inputs, target), target[:, -1]


def last_position(module, inputs):
    tokens, target = inputs
    n, t = tokens.shape
    return module(tokens, target).view(n, t, -1)[:, -1]


def probes(every_n_steps: int = 8) -> tuple[list, dict]:
    """Every probe that can apply, with the adapters; and ``{name: reason}`` for the others."""
    adapters = dict(unpack_batch=unpack, forward=last_position, every_n_steps=every_n_steps)
    sizes = {"NTKAlignment": 32, "GradientNoise": 64, "HessianCurvature": 64, "EffectiveRank": 128,
             "EffectiveDepth": 128}
    extra = {"EffectiveRank": {"layers": LAYERS}, "EffectiveDepth": {"layers": LAYERS}}
    chosen = []
    for cls in lb.ALL_PROBES:
        name = cls.__name__
        if name in NOT_APPLICABLE:
            continue
        kwargs = dict(adapters, **extra.get(name, {}))
        if cls.needs_probe_set:
            kwargs["num_samples"] = sizes.get(name, 64)
        chosen.append(cls(**kwargs))
    return chosen, {name: reason for name, reason in NOT_APPLICABLE.items() if hasattr(lb, name)}


def main(max_steps: int = 120, out: str | None = "biasprobe_logs/transformer", quiet: bool = False,
         every_n_steps: int = 20, width: int = 200) -> dict:
    pl.seed_everything(0, verbose=False)
    data = token_data()
    model = SyntheticTransformer(vocab_size=16, width=width)
    chosen, skipped = probes(every_n_steps)
    logger = False
    if out is not None:
        from pytorch_lightning.loggers import TensorBoardLogger

        logger = TensorBoardLogger(out, name="")
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=chosen,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    report = {"measured": {}, "failed": {}, "not_applicable": skipped}
    for probe in chosen:
        name = type(probe).__name__
        if probe.failures:
            report["failed"][name] = probe.failures
        if probe.measured_steps:
            report["measured"][name] = dict(probe.last_values)
    if not quiet:
        print(f"{'probe':24s} {'points':>6s} {'seconds':>8s}  a value at the end")
        for probe in chosen:
            values = {k: v for k, v in probe.last_values.items() if not k.endswith("seconds")}
            key = next(iter(sorted(values)), "-")
            print(f"{type(probe).__name__:24s} {len(probe.measured_steps):6d} {probe._probe_seconds:8.2f}  "
                  f"{key} = {values.get(key, float('nan')):.4g}")
        for name, reason in skipped.items():
            print(f"{name:24s} not applicable: {reason}")
        for name, count in report["failed"].items():
            print(f"{name:24s} failed {count} time(s): see the warning above")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--out", default="biasprobe_logs/transformer")
    parser.add_argument("--width", type=int, default=200, help="model width (200: the demo Transformer as shipped)")
    args = parser.parse_args()
    main(args.max_steps, args.out, width=args.width)
