"""The frequency probe's curves on digits: spectral bias in practice, on a CPU in seconds.

Reproduces, qualitatively and at toy scale, the findings of Fridovich-Keil, Gontijo-Lopes, Roelofs
(2022), "Spectral Bias in Practice: The Role of Function Frequency in Generalization" (NeurIPS):

1. Over training, the function becomes higher-frequency *between* classes: along straight paths
   from an example of one class to an example of another, the predicted probabilities change more
   sharply (the paths cross sharper decision boundaries), and more than along paths between two
   examples of the same class.
2. A setting that generalises better (here: ten times more training data, the same number of SGD
   steps) gives a function with higher frequency between classes and *less* high-frequency
   content within classes, where it is flatter near the examples.

What this toy run does and does not show: between classes, both the scale-free measures (mean
frequency, high-frequency fraction) and the high-frequency power rise with training and with more
data. Within classes, what falls with more data is the *amount* of change (high-frequency power,
largest prediction change: about half, averaged over the seeds); the scale-free *shape* of the within-class spectrum (mean
frequency, fraction) does not differ between the two data sizes at this scale (within the seeds'
spread). Frequencies are low throughout (about 1-1.4 cycles per path: mostly one smooth crossing),
as expected of a small MLP on 8x8 digits.

Setting: the demo MLP (64-128-128-10, ReLU, plain SGD, lr 0.1, batch 64) on scikit-learn's bundled
8x8 digits (no download), trained with Lightning and a ``FunctionFrequency`` probe that measures,
at Baratin's log-spaced steps, 100 same-class and 100 different-class paths of 64 points between
the 360 held-out digits (the paper's default is the test split). Two runs of the same number of
steps: all 1,437 training digits, and the first 150 of them; three seeds each (data split,
initialisation, batch order, pairs), end-of-training values averaged over the seeds.

Printed: the curves of the full-data run (per measured step: mean frequency in cycles per path,
high-frequency fraction, high-frequency power and the largest prediction change, for same-class
and different-class paths), the two runs side by side at the end with their held-out accuracy,
and each qualitative check with what it compared.

Run::

    python examples/function_frequency_digits.py              # 3 seeds x 2 runs of 1,840 steps (~20 s, one core)
    python examples/function_frequency_digits.py --steps 460 --seeds 0  # shorter (the data-size checks
                                                                        # need the full length)
    python examples/function_frequency_digits.py --logdir runs  # also write TensorBoard logs

Needs scikit-learn (the digits) and the package; no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
import warnings
from typing import Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_biasprobe import FunctionFrequency

from lightning_biasprobe.cli.demo import demo_module, digits_tensors

GROUPS = ("same_class", "different_class")
QUANTITIES = ("mean_frequency", "high_frequency_fraction", "high_frequency_power", "max_distance")
SHORT = {"mean_frequency": "freq", "high_frequency_fraction": "HF frac", "high_frequency_power": "HF power",
         "max_distance": "max dist"}


@contextlib.contextmanager
def quiet():
    """Silence Lightning's info lines and advisory warnings (the example prints its own table)."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def train_and_probe(num_train: Optional[int], steps: int, seed: int = 0, num_pairs: int = 100,
                    logdir: Optional[str] = None, name: str = "run") -> dict:
    """Train the demo MLP for ``steps`` SGD steps on the first ``num_train`` digits (None: all) with the probe.

    Returns ``{"curve": [(step, {key: value})], "final": {key: value}, "accuracy": held-out accuracy}``
    with keys ``<group>/<quantity>``.
    """
    pl.seed_everything(seed, verbose=False)
    train, val = digits_tensors(seed)
    x_train, y_train = train.tensors
    x_val, y_val = val.tensors
    num_train = len(y_train) if num_train is None else min(num_train, len(y_train))
    probe = FunctionFrequency(probe_data=(x_val, y_val), num_samples=len(y_val), num_pairs=num_pairs,
                              log_spaced=True, seed=seed, strict=True)
    logger = False
    if logdir is not None:
        from pytorch_lightning.loggers import TensorBoardLogger
        logger = TensorBoardLogger(logdir, name=name)
    model = demo_module(lr=0.1)
    loader = DataLoader(TensorDataset(x_train[:num_train], y_train[:num_train]), batch_size=64, shuffle=True)
    with quiet():
        trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, callbacks=[probe],
                             logger=logger, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_val).argmax(-1) == y_val).float().mean())
    prefix = f"biasprobe/{probe.log_name}/"
    curve = [(step, {k[len(prefix):]: v for k, v in values.items()}) for step, values in probe.history]
    return {"curve": curve, "final": curve[-1][1], "accuracy": accuracy, "num_train": num_train, "seed": seed}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def end_values(runs: list[dict]) -> dict:
    """Mean over seeds of each run's last measurement (and of its held-out accuracy)."""
    keys = runs[0]["final"].keys()
    out = {key: _mean([r["final"][key] for r in runs]) for key in keys}
    out["accuracy"] = _mean([r["accuracy"] for r in runs])
    return out


def qualitative_checks(full: list[dict], small: list[dict]) -> list[tuple[str, bool, str]]:
    """The paper's qualitative claims as comparisons of the measured numbers (means over seeds):
    ``(claim, holds, the numbers compared)``."""
    start = {key: _mean([r["curve"][0][1][key] for r in full]) for key in full[0]["final"]}
    end, small_end = end_values(full), end_values(small)
    # The largest change of the prediction along same-class paths at any point, then at the end.
    same_peak = _mean([max(v["same_class/max_distance"] for _, v in r["curve"]) for r in full])
    n_full, n_small = full[0]["num_train"], small[0]["num_train"]
    checks = []

    def check(claim: str, a: float, b: float, a_name: str, b_name: str) -> None:
        checks.append((claim, a > b, f"{a_name} {a:.4g} > {b_name} {b:.4g}"))

    check("training raises the between-class mean frequency", end["different_class/mean_frequency"],
          start["different_class/mean_frequency"], "end", "start")
    check("at the end, between-class paths have a higher mean frequency than within-class ones",
          end["different_class/mean_frequency"], end["same_class/mean_frequency"], "different", "same")
    check("... and a larger high-frequency fraction", end["different_class/high_frequency_fraction"],
          end["same_class/high_frequency_fraction"], "different", "same")
    check("within classes the function flattens late in training (the largest prediction change along "
          "same-class paths falls from its peak)", same_peak, end["same_class/max_distance"], "peak", "end")
    check(f"more data ({n_full} vs {n_small} examples, same steps) generalises better", end["accuracy"],
          small_end["accuracy"], "full", "small")
    check("... and puts more high-frequency power on between-class paths",
          end["different_class/high_frequency_power"], small_end["different_class/high_frequency_power"],
          "full", "small")
    check("... and less within classes", small_end["same_class/high_frequency_power"],
          end["same_class/high_frequency_power"], "small", "full")
    return checks


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(quantity: str, value: float) -> str:
    return f"{value:.3e}" if quantity == "high_frequency_power" else f"{value:.4f}"


def print_report(full: list[dict], small: list[dict], checks: list[tuple[str, bool, str]]) -> None:
    first = full[0]
    header = ["step"] + [f"{g.split('_')[0]} {SHORT[q]}" for g in GROUPS for q in QUANTITIES]
    print(f"## Curves: all {first['num_train']} training digits, seed {first['seed']} "
          "(held-out paths, 64 points each)\n")
    print(_row(header))
    print("|" + "---:|" * len(header))
    for step, values in first["curve"]:
        print(_row([str(step)] + [_fmt(q, values.get(f"{g}/{q}", float("nan"))) for g in GROUPS for q in QUANTITIES]))
    seeds = ", ".join(str(r["seed"]) for r in full)
    print(f"\n## End of training, mean [min, max] over seeds {seeds}: {first['num_train']} vs "
          f"{small[0]['num_train']} training digits\n")
    print(_row(["quantity", f"{first['num_train']} examples", f"{small[0]['num_train']} examples"]))
    print("|---|---:|---:|")

    def cell(runs: list[dict], get, quantity: str) -> str:
        values = [get(r) for r in runs]
        if len(values) == 1:
            return _fmt(quantity, values[0])
        return f"{_fmt(quantity, _mean(values))} [{_fmt(quantity, min(values))}, {_fmt(quantity, max(values))}]"

    print(_row(["held-out accuracy", cell(full, lambda r: r["accuracy"], ""),
                cell(small, lambda r: r["accuracy"], "")]))
    for g in GROUPS:
        for q in QUANTITIES:
            key = f"{g}/{q}"
            print(_row([key, cell(full, lambda r: r["final"][key], q), cell(small, lambda r: r["final"][key], q)]))
    print("\n## Qualitative checks (means over seeds)\n")
    for claim, holds, numbers in checks:
        print(f"- [{'x' if holds else ' '}] {claim}: {numbers}")


def run(steps: int = 1840, seeds: tuple[int, ...] = (0, 1, 2), small_train: int = 150, num_pairs: int = 100,
        logdir: Optional[str] = None, verbose: bool = True) -> dict:
    """Both runs for every seed, and the checks; returns ``{"full", "small", "checks", "seconds"}``
    (``full`` and ``small``: one result of :func:`train_and_probe` per seed)."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    full, small = [], []
    for seed in seeds:
        full.append(train_and_probe(None, steps, seed, num_pairs, logdir, f"full_seed{seed}"))
        small.append(train_and_probe(small_train, steps, seed, num_pairs, logdir, f"small_seed{seed}"))
    checks = qualitative_checks(full, small)
    seconds = time.perf_counter() - started
    if verbose:
        print_report(full, small, checks)
        print(f"\n{steps} SGD steps per run, {len(seeds)} seed(s) x 2 runs; {seconds:.1f} s in all.")
    return {"full": full, "small": small, "checks": checks, "seconds": seconds}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1840, help="SGD steps per run (default 1840, 80 epochs of "
                        "the full data)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (data split, "
                        "initialisation, batches, pairs); the end-of-training values are averaged over them")
    parser.add_argument("--small", type=int, default=150, help="training examples of the second run (default 150)")
    parser.add_argument("--logdir", default=None, help="also write TensorBoard logs here")
    args = parser.parse_args(argv)
    result = run(args.steps, tuple(args.seeds), args.small, logdir=args.logdir)
    return 0 if all(holds for _, holds, _ in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
