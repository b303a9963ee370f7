"""Benchmark: what the function-frequency probe costs, as ratios measured in one run.

What it measures
----------------
Model: the demo MLP (``lightning_biasprobe.cli.demo.make_mlp()``: 64 -> 128 -> 128 -> 10, ReLU),
float32, on the digits (the probe set: 256 class-balanced training digits, as the callback's
default; 100 same-class + 100 different-class pairs, 64 points per path: 12,800 points).

1. One measurement, in units of one training step of the demo (batch 64: forward, cross-entropy,
   ``.backward()``, an SGD step):

   - ``FunctionFrequency().run_measurement`` (the callback's whole measurement: the isolation guard,
     ``function_frequency`` with its defaults, chunks of 1,024 points, the summaries), and the bare
     ``function_frequency`` call with ``chunk_size`` 512, 1,024 (default), 4,096 and ``None`` (all points in
     one forward);
   - the straightforward implementation a user would write: a Python loop over the 200 pairs, one
     forward of the path's 64 points each, a per-point softmax, the distance signal, and the
     spectrum with ``numpy.fft.rfft`` per path. Also reported: the speed-up of ours over it and the
     largest difference of their per-path mean frequencies (they compute the same numbers).

   Every candidate sample is timed next to a sample of the training step (which goes first
   alternates), and the median of the per-round ratios is reported with its interquartile range,
   so load from other processes hits both sides alike.

2. The demo's training time with ``FunctionFrequency()`` at its default cadence (start, every epoch,
   end, within a 5% budget) over the demo without probes: ``run_demo(epochs=20)``, alternating pairs,
   median of the per-pair ratios; and the probe's own seconds over the probed run's fit time.

   The floor is the forward passes of the 12,800 path points alone (prebuilt, chunks of 1,024,
   ``no_grad``): the work any implementation must do. A measurement costs about
   ``12,800 / 64 / 3`` (forward of the points over forward+backward of a batch) ~ 67 training
   steps of this MLP by that count; what matters is how close it stays to the floor.

Targets, printed and never asserted: a measurement <= 1.5x the floor; ours faster than the loop;
default-cadence overhead of the demo <= 5% (on the 1-second demo the forced first and last
measurements alone are a few percent; on real runs, whose epochs are long, they vanish).

How to run
----------
::

    python benchmarks/bench_frequency.py            # full (about a minute on an idle core)
    python benchmarks/bench_frequency.py --quick    # shorter (about 15 s)

Needs scikit-learn (the demo's bundled digits).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from lightning_biasprobe import FunctionFrequency

from lightning_biasprobe.callbacks._data import stratified_positions
from lightning_biasprobe.cli.demo import digits_tensors, make_mlp
from lightning_biasprobe.functional.frequency import function_frequency, interpolation_pairs

from _common import Timed, demo_fit_seconds, interleaved, quartiles  # noqa: E402  (benchmarks/)

NUM_SAMPLES = 256
NUM_PAIRS = 100
NUM_POINTS = 64
BATCH = 64
TARGET_OVER_FLOOR = 1.5
TARGET_OVERHEAD = 0.05


# --------------------------------------------------------------------------------------- what is timed
def training_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One plain SGD step of the demo on a batch of 64 (its unit of cost)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights, hence the probe's work, stay put

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return run


def loop_frequency(model: nn.Module, x: torch.Tensor, pairs: torch.Tensor, m: int = NUM_POINTS) -> np.ndarray:
    """The straightforward version: one path at a time, numpy FFT. Returns per-path mean frequencies."""
    window = np.hanning(m + 1)[:-1]
    t = torch.arange(m, dtype=torch.float32) / m
    fold = np.full(m // 2 + 1, 2.0)
    fold[0], fold[-1] = 0.0, 1.0
    freqs = np.arange(m // 2 + 1)
    out = []
    with torch.no_grad():
        for i, j in pairs.tolist():
            points = x[i] + t.unsqueeze(1) * (x[j] - x[i])
            p = torch.softmax(model(points), dim=1).double().numpy()
            p0 = torch.softmax(model(x[i:i + 1]), dim=1).double().numpy()[0]
            s = np.linalg.norm(p - p0, axis=1)
            s = s - (window * s).sum() / window.sum()
            power = np.abs(np.fft.rfft(window * s)) ** 2 * fold
            out.append((power * freqs).sum() / power.sum())
    return np.array(out)


def fmt(q: tuple[float, float, float]) -> str:
    return f"{q[1]:.2f}x [{q[0]:.2f}-{q[2]:.2f}]"


# --------------------------------------------------------------------------------------- parts
def forward_floor_fn(model: nn.Module, x: torch.Tensor, pairs: torch.Tensor, chunk: int = 1024) -> Callable[[], None]:
    """The floor: the forwards of the path points alone (prebuilt inputs, no_grad, chunks of 1,024)."""
    t = torch.arange(NUM_POINTS, dtype=torch.float32) / NUM_POINTS
    points = (x[pairs[:, 0]].unsqueeze(1) + t.view(1, -1, 1) * (x[pairs[:, 1]] - x[pairs[:, 0]]).unsqueeze(1))
    points = points.reshape(-1, x.shape[1]).contiguous()

    def run() -> None:
        with torch.no_grad():
            for s in range(0, len(points), chunk):
                model(points[s:s + chunk])

    return run


def bench_measurement(rounds: int, sample_seconds: float) -> list[tuple[str, str, str, str]]:
    torch.manual_seed(0)
    train, _ = digits_tensors(0)
    x_all, y_all = train.tensors
    pos = stratified_positions(y_all[:4 * NUM_SAMPLES], NUM_SAMPLES)
    x, y = x_all[pos].contiguous(), y_all[pos].contiguous()
    model = make_mlp()
    model.eval()
    pairs, _ = interpolation_pairs(y, NUM_PAIRS, seed=0)

    probe = FunctionFrequency(probe_data=(x, y), num_samples=NUM_SAMPLES, strict=True)
    probe.set_probe_data((x, y))
    # Agreement in float64 (in float32 both sides carry rounding noise of the probabilities, ~1e-7,
    # which the tiny signals of an untrained model turn into ~1e-6 cycles).
    model64, x64 = make_mlp().double().eval(), x.double()
    model64.load_state_dict(model.state_dict())
    ours = function_frequency(model64, x64, y, pairs=pairs)
    agreement = float(np.nanmax(np.abs(ours.mean_frequency.numpy() - loop_frequency(model64, x64, pairs))))

    unit = Timed("train step", training_step_fn(model, x_all[:BATCH], y_all[:BATCH]))
    model.eval()
    floor = Timed("the path points' forwards alone (12,800 points, chunks of 1,024, no_grad): the floor",
                      forward_floor_fn(model, x, pairs))
    cands = [
        floor,
        Timed("FunctionFrequency().run_measurement (guard + defaults)", lambda: probe.run_measurement(model, 0)),
        Timed("function_frequency, chunk_size=512", lambda: function_frequency(model, x, y, pairs=pairs,
                                                                                 chunk_size=512)),
        Timed("function_frequency, chunk_size=1024 (default)",
                  lambda: function_frequency(model, x, y, pairs=pairs)),
        Timed("function_frequency, chunk_size=4096", lambda: function_frequency(model, x, y, pairs=pairs,
                                                                                  chunk_size=4096)),
        Timed("function_frequency, chunk_size=None (one forward)",
                  lambda: function_frequency(model, x, y, pairs=pairs, chunk_size=None)),
        Timed("per-pair loop (straightforward, numpy FFT)", lambda: loop_frequency(model, x, pairs)),
    ]
    interleaved(unit, cands, rounds, sample_seconds)
    model.zero_grad(set_to_none=True)
    rows = [("one plain training step of the demo MLP (batch 64: forward, loss, backward, SGD), the unit",
             f"{statistics.median(unit.seconds) * 1e3:.2f} ms", "1.00x", "")]
    for c in cands:
        rows.append((c.name, f"{statistics.median(c.seconds) * 1e3:.2f} ms", fmt(quartiles(c.ratios)), ""))
    default, loop = cands[3], cands[-1]
    over_floor = quartiles([a / b for a, b in zip(cands[1].ratios, floor.ratios)])
    rows.append(("a measurement / the floor (what interpolation, softmax, FFT and the guard add)", "",
                 fmt(over_floor), f"<= {TARGET_OVER_FLOOR:g}x " + ("meets" if over_floor[1] <= TARGET_OVER_FLOOR
                                                                  else "**misses**")))
    speedup = quartiles([a / b for a, b in zip(loop.ratios, default.ratios)])
    rows.append(("speed-up of function_frequency (default) over the per-pair loop", "", fmt(speedup),
                 "> 1x " + ("meets" if speedup[1] > 1 else "**misses**")))
    rows.append(("max |mean frequency ours - loop| over the 200 paths, float64 (cycles per path)", "",
                 f"{agreement:.1e}", "<= 1e-9 " + ("agrees" if agreement <= 1e-9 else "**disagrees**")))
    return rows


def _demo(epochs: int, probes: list) -> float:
    return demo_fit_seconds(epochs, probes)


def bench_demo(pairs: int, epochs: int) -> list[tuple[str, str, str, str]]:
    _demo(1, [FunctionFrequency()])  # warm-up
    ratios, plain, probed, fractions, points = [], [], [], [], []
    for k in range(pairs):
        seconds = {}
        for kind in (("plain", "probed") if k % 2 == 0 else ("probed", "plain")):
            if kind == "plain":
                seconds[kind] = _demo(epochs, [])
            else:
                probe = FunctionFrequency()
                seconds[kind] = _demo(epochs, [probe])
                fractions.append(sum(v["biasprobe/freq/seconds"] for _, v in probe.history) / seconds[kind])
                points.append(len(probe.history))
        ratios.append(seconds["probed"] / seconds["plain"])
        plain.append(seconds["plain"])
        probed.append(seconds["probed"])
    q = quartiles(ratios)
    return [
        (f"demo fit time with FunctionFrequency() / without ({epochs} epochs, median of {pairs} alternating pairs)",
         f"{statistics.median(plain):.2f} s -> {statistics.median(probed):.2f} s",
         f"{fmt(q)} ({(q[1] - 1) * 100:+.1f} %)",
         f"<= {1 + TARGET_OVERHEAD:.2f}x " + ("meets" if q[1] <= 1 + TARGET_OVERHEAD else "**misses**")),
        (f"probe's own seconds / probed fit time ({statistics.median(points):.0f} measurements)", "",
         f"{statistics.median(fractions) * 100:.1f} %", ""),
    ]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds, sample_seconds, demo_pairs, epochs = (7, 0.03, 2, 5) if args.quick else (21, 0.05, 5, 20)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"# Function frequency benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
          f"{platform.machine()}; demo MLP, {NUM_SAMPLES} probe digits, {NUM_PAIRS}+{NUM_PAIRS} pairs x "
          f"{NUM_POINTS} points; {rounds} rounds; ratios: median [interquartile range].\n", flush=True)
    rows = bench_measurement(rounds, sample_seconds) + bench_demo(demo_pairs, epochs)
    print("| quantity | median time | ratio to one training step | target |")
    print("|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nTargets are printed, not asserted. 1-minute load average {load:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end, on {os.cpu_count()} CPUs. "
          f"Wall time {time.perf_counter() - started:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
