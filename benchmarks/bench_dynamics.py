"""Benchmark of the SGD-dynamics probes: per-sample gradients (GradientNoise) and WeightDiffusion.

Part 1 - per-sample gradients of N = 256 digits on the demo MLP (``make_mlp()``, 64-128-128-10,
26,122 parameters, float32, eval mode), in units of one forward+backward of the same 256 samples
(cross-entropy, ``.backward()``). Goal: ``per_sample_gradients`` (``method="auto"``, the default)
<= 4x. Timed for each of ``method="auto"`` (structured linear layers: one forward, one backward to
the layers' outputs, per-sample outer products), ``method="vmap"`` (``vmap(grad)`` over
``functional_call``) and ``method="loop"`` (one ``torch.autograd.grad`` per sample): the dict form,
and for auto and vmap the flat form (``flatten=True``) and the whole GradientNoise measurement
(``gradient_noise_statistics``: gradients, tail indices, B_simple); also the straightforward
``torch.func`` recipe (one ``vmap(grad)`` call over the whole batch). The correctness rows compare
auto with the loop and with vmap (largest difference relative to the largest entry).

Part 2 - WeightDiffusion. One measurement (``run_measurement``: distance, norm, fit) and one
measured step (the pre-step copy of the weights + the measurement with the update size), in units
of one plain PyTorch training step (batch 64, Adam), on the demo MLP and on 1.1M- and 17M-parameter
ones of the same shape (widths 1024 and 4096; the largest is measured in chunks). Then Lightning
fits of the demo task (TensorBoard logging, validation every epoch) with ``WeightDiffusion()`` at
its defaults (log-spaced steps, thinned to 0.5 % of the training steps' time): the seconds spent inside the probe's own hooks (measurements, pre-step copies,
logging, and the checks made at every step; less the clock's own cost, measured on a do-nothing
callback clocked in the same fit) as a share of the fit, for the demo (20 epochs, 460 steps), the
same 5x longer, and the width-1024 model. Goal: <= 1 % of training. The same share on every
log-spaced step without the budget is shown beside it. Cross-check: paired fits with no callback, a
do-nothing callback and the probe (fit-to-fit noise is larger than the effect; Lightning's dispatch
of a callback's hooks is not the probe's).

Every ratio is a median over rounds of (candidate / baseline timed right next to it), with the
interquartile range; candidates are interleaved with the baseline so load from other processes
mostly cancels. Nothing is asserted.

Usage: ``python benchmarks/bench_dynamics.py [--quick] [--threads T]``. Threads: 1 by default (on a
shared machine, intra-op threads that oversubscribe the cores make OpenMP spin-wait, and small ops
then take 100x longer at random); pass ``--threads 0`` for torch's default.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_biasprobe import GradientNoise, WeightDiffusion
from lightning_biasprobe.cli.demo import digits_tensors, make_mlp
from lightning_biasprobe.functional.noise import gradient_noise_statistics, per_sample_gradients

from _common import HookClock, Timed, demo_fit_seconds, interleaved, quartiles  # noqa: E402  (benchmarks/)

N = 256
TRAIN_BATCH = 64
GOAL_PER_SAMPLE = 4.0
GOAL_DIFFUSION = 0.01


@dataclass
class Settings:
    rounds: int
    sample_seconds: float
    epochs: int
    pairs: int

    @classmethod
    def make(cls, quick: bool) -> "Settings":
        return cls(10, 0.02, 4, 2) if quick else cls(31, 0.04, 20, 6)


def fmt(values: list[float], digits: int = 2) -> str:
    q1, q2, q3 = quartiles(values)
    return f"{q2:.{digits}f}x [{q1:.{digits}f}-{q3:.{digits}f}]"


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.3f} ms"


# --------------------------------------------------------------------------------------- part 1
def torch_func_recipe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    """The recipe from the torch.func tutorial: vmap(grad) of a one-sample loss over the whole batch."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    return lambda: per_sample(params, x, y)


def autograd_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    params = list(model.parameters())

    def run():
        return [torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
                for i in range(x.shape[0])]

    return run


def part1(settings: Settings) -> list[tuple[str, ...]]:
    torch.manual_seed(0)
    model = make_mlp().eval()
    train, _ = digits_tensors(0)
    x, y = (t[:N].contiguous() for t in train.tensors)
    # Correctness first: the library's rows (auto) equal the loop's and vmap's.
    flat = per_sample_gradients(model, x, y, flatten=True)
    loop = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in autograd_loop(model, x[:16], y[:16])()])
    err = float((flat[:16] - loop).abs().max() / loop.abs().max())
    vmapped = per_sample_gradients(model, x, y, flatten=True, method="vmap")
    err_vmap = float((flat - vmapped).abs().max() / vmapped.abs().max())

    def forward_backward():
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    base = Timed("F+B", forward_backward)
    cands = [
        Timed('per_sample_gradients, method="auto" (the default; {name: (N, *shape)})',
              lambda: per_sample_gradients(model, x, y)),
        Timed('per_sample_gradients, method="auto", flatten=True (one N x P matrix)',
              lambda: per_sample_gradients(model, x, y, flatten=True)),
        Timed('per_sample_gradients, method="vmap"', lambda: per_sample_gradients(model, x, y, method="vmap")),
        Timed('per_sample_gradients, method="vmap", flatten=True',
              lambda: per_sample_gradients(model, x, y, flatten=True, method="vmap")),
        Timed("torch.func recipe: vmap(grad) over the batch", torch_func_recipe(model, x, y)),
        Timed('gradient_noise_statistics, method="auto" (GradientNoise\'s measurement)',
              lambda: gradient_noise_statistics(model, x, y, batch_size=16)),
        Timed('gradient_noise_statistics, method="vmap"',
              lambda: gradient_noise_statistics(model, x, y, batch_size=16, method="vmap")),
    ]
    loop_timed = Timed('per_sample_gradients, method="loop" (N torch.autograd.grad calls)',
                       lambda: per_sample_gradients(model, x, y, method="loop"))
    interleaved(base, cands, settings.rounds, settings.sample_seconds)
    short = Settings(max(3, settings.rounds // 5), settings.sample_seconds, settings.epochs, settings.pairs)
    interleaved(base, [loop_timed], short.rounds, short.sample_seconds)  # slow: fewer rounds
    model.zero_grad(set_to_none=True)
    rows = [("forward+backward of the 256 samples (the unit)", ms(base.seconds), "1.00x", "", "")]
    for c in cands + [loop_timed]:
        goal = verdict = ""
        if c is cands[0]:
            goal = f"<= {GOAL_PER_SAMPLE:g}x"
            verdict = "meets" if quartiles(c.ratios)[1] <= GOAL_PER_SAMPLE else "**misses**"
        rows.append((c.name, ms(c.seconds), fmt(c.ratios), goal, verdict))
    rows.append(('max \\|auto - autograd loop\\| / max \\|loop\\| over 16 rows (float32)', "", f"{err:.1e}",
                 "<= 1e-6", "agrees" if err <= 1e-6 else "**disagrees**"))
    rows.append(('max \\|auto - vmap\\| / max \\|vmap\\| over 256 rows (float32)', "", f"{err_vmap:.1e}",
                 "<= 1e-6", "agrees" if err_vmap <= 1e-6 else "**disagrees**"))
    return rows


# --------------------------------------------------------------------------------------- part 2
def demo_fit(epochs: int, probes: list, limit: Optional[int] = None, width: int = 128) -> float:
    return demo_fit_seconds(epochs, probes, limit, width=width)


def measurement_rows(settings: Settings, width: int) -> list[tuple[str, ...]]:
    torch.manual_seed(0)
    model = make_mlp(width)
    size = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train, _ = digits_tensors(0)
    x, y = (t[:TRAIN_BATCH].contiguous() for t in train.tensors)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    probe = WeightDiffusion()
    probe.capture_reference(model)
    steps = itertools.count(1)
    for _ in range(10):  # a few points so the fit runs
        probe.run_measurement(model, next(steps))

    def measurement():
        probe.run_measurement(model, next(steps))

    def measured_step():
        # What a measured step adds: the copy before the optimizer step (for the update size) and
        # the measurement after it (distance, update, norm, fit), at a new step each time.
        step = next(steps)
        probe.copy_before_step(model, step)
        probe.run_measurement(model, step)

    base = Timed("training step", train_step)
    measure = Timed("one measurement", measurement)
    both = Timed("copy + measurement", measured_step)
    interleaved(base, [measure, both], settings.rounds, settings.sample_seconds)
    name = f"MLP 64-{width}-{width}-10 ({size / 1e6:.2f}M parameters)"
    return [(f"{name}: plain PyTorch training step (batch {TRAIN_BATCH}, Adam): the unit", ms(base.seconds),
             "1.00x", "", ""),
            (f"{name}: one measurement without the update (distance, norm, fit)", ms(measure.seconds),
             fmt(measure.ratios, 3), "", ""),
            (f"{name}: one measured step (pre-step copy + measurement with the update)", ms(both.seconds),
             fmt(both.ratios, 3), "", "")]


def part2(settings: Settings) -> list[tuple[str, ...]]:
    # Widths 128 and 1024 keep their working buffers between points; 4096 (17M parameters) is read
    # in chunks of 1M entries through one kept buffer, its pre-step copy allocated at each point.
    rows = measurement_rows(settings, 128) + measurement_rows(settings, 1024) + measurement_rows(settings, 4096)

    demo_fit(1, [WeightDiffusion(), GradientNoise()], limit=3)  # warm-up
    fits = [(128, settings.epochs), (128, 5 * settings.epochs), (1024, settings.epochs)]
    for width, epochs in fits:
        rows += fit_rows(settings, width, epochs)
    gn = GradientNoise()
    fit_seconds = demo_fit(settings.epochs, [gn])
    noise_share = sum(m["biasprobe/noise/seconds"] for _, m in gn.history) / fit_seconds
    rows.append((f"demo fit, {settings.epochs} epochs: GradientNoise's own seconds / fit seconds "
                 f"({len(gn.history)} measurements of 256)", "", f"{noise_share * 100:.2f} %", "", ""))
    return rows


class _Nothing(pl.Callback):
    """A callback that does nothing: what Lightning's dispatch of the hooks costs by itself."""

    last_values: dict = {}


def clocked_fit(probe: WeightDiffusion, width: int, epochs: int) -> tuple[float, float]:
    """One demo fit with ``probe`` and a clocked do-nothing control: (share of the fit in the probe's
    hooks, less the clock's own cost; fit seconds)."""
    clock = HookClock(probe)
    seconds = demo_fit(epochs, [probe, clock.with_control()], width=width)
    return clock.net_seconds() / seconds, seconds


def fit_rows(settings: Settings, width: int, epochs: int) -> list[tuple[str, ...]]:
    """Lightning fits of the demo task: WeightDiffusion's seconds inside its own hooks (``HookClock``:
    measurements, pre-step copies, logging, the checks at every step; less the clock's own cost) as a
    share of the fit, at the defaults (log-spaced steps within a budget of 0.5 % of training-step
    time) and on the same log-spaced steps without the budget; and, as a cross-check, paired fits
    without callbacks, with a do-nothing callback and with the probe at its defaults."""
    shares, unbudgeted, dispatch, added = [], [], [], []
    kept = scheduled = all_points = steps = 0
    kinds = ["plain", "nothing", "probe", "unbudgeted"]
    for pair in range(settings.pairs):
        seconds = {}
        for kind in kinds[pair % 4:] + kinds[:pair % 4]:
            if kind == "plain":
                seconds[kind] = demo_fit(epochs, [], width=width)
            elif kind == "nothing":
                seconds[kind] = demo_fit(epochs, [_Nothing()], width=width)
            elif kind == "probe":
                wd = WeightDiffusion()
                share, seconds[kind] = clocked_fit(wd, width, epochs)
                shares.append(share)
                kept, steps = len(wd.history), wd.history[-1][0]
                scheduled = kept + wd.skipped_for_budget
            else:
                every = WeightDiffusion(log_spaced=1.25)
                share, _ = clocked_fit(every, width, epochs)
                unbudgeted.append(share)
                all_points = len(every.history)
        dispatch.append(seconds["nothing"] / seconds["plain"] - 1)
        added.append((seconds["probe"] - seconds["nothing"]) / seconds["plain"])
    share = statistics.median(shares)
    label = f"MLP width {width}, {epochs} epochs ({steps} steps)"
    percent = lambda values: "{1:.2f} % [{0:.2f}-{2:.2f}]".format(*(100 * q for q in quartiles(values)))  # noqa: E731
    return [(f"{label}, defaults ({kept} of {scheduled} points within the budget): WeightDiffusion's seconds "
             "in its hooks / fit seconds", "", percent(shares), f"<= {GOAL_DIFFUSION * 100:g} %",
             "meets" if share <= GOAL_DIFFUSION else "**misses**"),
            (f"{label}, every log-spaced step, no budget ({all_points} points): the same share", "",
             percent(unbudgeted), "", ""),
            (f"{label}: cross-check, paired fits: (defaults - do-nothing callback) / no callback "
             f"({settings.pairs} rounds)", "", percent(added), "", ""),
            (f"{label}: Lightning's dispatch alone: do-nothing callback / no callback - 1", "", percent(dispatch),
             "", "")]


def table(rows: list[tuple[str, ...]]) -> None:
    print("| what | median time | ratio: median [IQR] | goal | verdict |")
    print("|---|---:|---:|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a 4-epoch demo, 2 pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = Settings.make(args.quick)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"# SGD-dynamics benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; {settings.rounds} rounds.\n", flush=True)
    print("## Per-sample gradients, N = 256, demo MLP\n")
    table(part1(settings))
    print("\n## WeightDiffusion\n", flush=True)
    table(part2(settings))
    print(f"\n1-minute load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end. "
          f"Wall time {time.perf_counter() - started:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
