"""Benchmark: what geometric complexity (GC) costs, as ratios measured in one run.

What it measures
----------------
1. The cost of one GC measurement over N=512 samples, as a multiple of one training-style
   forward+backward pass (cross-entropy loss, ``.backward()`` into the parameters) over the same
   512 samples, for two models in eval mode, float32:

   - the demo MLP (``lightning_biasprobe.cli.demo.make_mlp()``: 64 -> 128 -> 128 -> 10), and
   - a small CNN on 1x8x8 inputs (conv3x3 16, ReLU, conv3x3 32, ReLU, adaptive avg pool to 4x4,
     flatten, linear to 10 classes).

   Candidates: ``geometric_complexity(..., estimator="exact")``, the projection estimator with
   ``k=1`` and ``k=4`` (library defaults otherwise, e.g. ``chunk_size=256``), and the straightforward
   ``torch.func`` code a user would otherwise write: ``vmap(jacrev(f))`` per-sample input Jacobians,
   then the mean squared Frobenius norm (under ``torch.no_grad()``, its cheaper form). Also
   reported: the speed-up of the exact estimator over ``vmap(jacrev)`` and the relative difference
   of their values (they compute the same number).

   Timing: each callable is warmed up, then timed ``timeit`` style (``number`` calls per sample,
   chosen so one sample lasts a few tens of milliseconds, Python's GC off while timing). Every
   candidate sample is taken right next to a sample of the forward+backward baseline (which goes
   first alternates; the candidates' order rotates every round), the ratio of the two neighbours is
   formed, and the median ratio over the rounds is reported with its interquartile range, so
   machine noise hits baseline and candidate alike.

2. The demo's training time with a ``GeometricComplexity()`` probe at its default cadence (start,
   every epoch end, end; 256 probe samples) over the same demo without any probe:
   ``run_demo(out=tmp, epochs=20, probes=[GeometricComplexity()], progress=False)`` against
   ``probes=[]``, run in alternating pairs (the order flips every pair), reported as the median of
   the per-pair ratios of ``trainer.fit`` seconds (with its interquartile range, and the ratio of
   the fastest runs of each kind as a cross-check: load from other processes only ever slows a run
   down). Also: the probe's own seconds (the sum of its ``biasprobe/gc/seconds`` history entries)
   as a fraction of the probed run's training time.

Targets are printed beside the ratios and never asserted (wall times depend on the machine):
exact GC <= 4x F+B, projection k=1 <= 1.5x F+B, default-cadence overhead <= 5 %.

How to run
----------
::

    python benchmarks/bench_geometric_complexity.py            # full run (1-2 minutes on 2 idle cores)
    python benchmarks/bench_geometric_complexity.py --quick    # shorter (~15 s): fewer, shorter repeats; 5 epochs

Needs scikit-learn (the demo's bundled digits data). ``torch.set_num_threads`` is left at its default.
"""

from __future__ import annotations

import argparse
import gc as pygc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from lightning_biasprobe import GeometricComplexity
from lightning_biasprobe.cli.demo import digits_tensors, make_mlp
from lightning_biasprobe.functional.geometry import geometric_complexity

from _common import demo_fit_seconds, quartiles  # noqa: E402  (benchmarks/, the script's folder)

N_SAMPLES = 512
TARGET_EXACT = 4.0  # exact GC <= 4x one forward+backward
TARGET_K1 = 1.5  # projection k=1 <= 1.5x one forward+backward
TARGET_OVERHEAD = 0.05  # default-cadence probe adds <= 5 % to training time
AGREEMENT_TOL = 1e-4  # relative difference exact vs vmap(jacrev), float32 Jacobians


@dataclass
class Settings:
    repeats: int  # timing rounds, one paired sample per candidate each (>= 10)
    warmup: int  # untimed calls per candidate before timing
    sample_seconds: float  # aim for one timing sample (``number`` calls) to last about this long
    epochs: int  # demo epochs
    pairs: int  # (without probe, with probe) demo pairs

    @classmethod
    def from_args(cls, quick: bool) -> "Settings":
        if quick:
            return cls(repeats=10, warmup=3, sample_seconds=0.02, epochs=5, pairs=3)
        return cls(repeats=31, warmup=5, sample_seconds=0.03, epochs=20, pairs=7)


# --------------------------------------------------------------------------------------- models/data
class SmallCNN(nn.Module):
    """Two 3x3 convs (16, 32 channels) with ReLU, adaptive avg pool to 4x4, linear to 10 classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def probe_batch(n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` training digits: flat float32 inputs ``(n, 64)`` in [0, 1] and labels ``(n,)``."""
    train, _ = digits_tensors(seed=0)
    x, y = train.tensors
    return x[:n].contiguous(), y[:n].contiguous()


# --------------------------------------------------------------------------------------- what is timed
def forward_backward_fn(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    """One training-style pass: forward, cross-entropy, ``.backward()`` into the parameters."""

    def run() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    return run


def gc_fn(model: nn.Module, x: Tensor, **kwargs) -> Callable[[], Tensor]:
    """The library's ``geometric_complexity`` with ``kwargs`` (defaults otherwise)."""
    return lambda: geometric_complexity(model, x, **kwargs)


def vmap_jacrev_gc(model: nn.Module, x: Tensor) -> Tensor:
    """The straightforward ``torch.func`` version: per-sample input Jacobians, mean squared norm.

    Run under ``torch.no_grad()``: ``jacrev`` still differentiates (function transforms ignore an
    outer ``no_grad``), but no graph from the Jacobian back to the parameters is recorded. That is
    the cheaper form of this baseline, so the speed-up reported over it is conservative.
    """

    def f(sample: Tensor) -> Tensor:
        return model(sample.unsqueeze(0)).squeeze(0)

    with torch.no_grad():
        jac = vmap(jacrev(f))(x)  # (N, C, *input_shape)
        return jac.pow(2).flatten(1).sum(dim=1).mean()


# --------------------------------------------------------------------------------------- timer
@dataclass
class Candidate:
    name: str
    fn: Callable[[], object]
    number: int = 1  # calls per timing sample
    seconds: list[float] = field(default_factory=list)  # per-call time, one entry per round
    baseline_seconds: list[float] = field(default_factory=list)  # the adjacent baseline sample


def _timed(fn: Callable[[], object], number: int) -> float:
    """Seconds for ``number`` calls of ``fn`` with Python's garbage collector off (as ``timeit``)."""
    was_enabled = pygc.isenabled()
    pygc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return time.perf_counter() - start
    finally:
        if was_enabled:
            pygc.enable()


def _calibrate(c: Candidate, warmup: int, sample_seconds: float) -> None:
    for _ in range(warmup):
        c.fn()
    single = min(_timed(c.fn, 1) for _ in range(5))  # min: robust to a busy machine
    c.number = max(1, round(sample_seconds / max(single, 1e-9)))
    c.seconds, c.baseline_seconds = [], []


def paired_timings(baseline: Candidate, candidates: list[Candidate], repeats: int, warmup: int,
                   sample_seconds: float) -> None:
    """Time every candidate ``repeats`` times, each sample right next to a sample of ``baseline``.

    All are warmed up and given a ``number`` of calls per sample so that one sample lasts about
    ``sample_seconds``. Each round visits the candidates in an order rotated by one per round and
    times, for each, a baseline sample and a candidate sample back to back (which one goes first
    alternates), so ``c.seconds[r] / c.baseline_seconds[r]`` is a ratio of two neighbouring
    measurements: slow drifts and bursts of load from other processes mostly cancel.
    """
    for c in [baseline] + candidates:
        _calibrate(c, warmup, sample_seconds)
    for r in range(repeats):
        shift = r % len(candidates)
        for i, c in enumerate(candidates[shift:] + candidates[:shift]):
            if (r + i) % 2 == 0:
                base = _timed(baseline.fn, baseline.number)
                cand = _timed(c.fn, c.number)
            else:
                cand = _timed(c.fn, c.number)
                base = _timed(baseline.fn, baseline.number)
            c.seconds.append(cand / c.number)
            c.baseline_seconds.append(base / baseline.number)
            baseline.seconds.append(base / baseline.number)





def ratio_to_baseline(c: Candidate) -> tuple[float, float, float]:
    """Quartiles over the rounds of ``candidate / adjacent baseline``."""
    return quartiles([a / b for a, b in zip(c.seconds, c.baseline_seconds)])


def ratio_between(num: Candidate, den: Candidate) -> tuple[float, float, float]:
    """Quartiles over the rounds of ``num / den``, each side normalised by its adjacent baseline."""
    return quartiles([(a / ab) / (b / bb) for a, ab, b, bb in
                      zip(num.seconds, num.baseline_seconds, den.seconds, den.baseline_seconds)])


# --------------------------------------------------------------------------------------- part 1
@dataclass
class Row:
    quantity: str
    model: str
    time: str
    value: str
    target: str = ""
    verdict: str = ""


NOISY_SPREAD = 0.25  # an interquartile range wider than this fraction of the median: too noisy to judge


def _verdict(q: tuple[float, float, float], limit: float) -> str:
    """Median against the target, unless the rounds disagree too much to say."""
    if q[2] - q[0] > NOISY_SPREAD * q[1]:
        return "noisy: rerun on an idle machine"
    return "meets" if q[1] <= limit else "**misses**"


def _fmt_ratio(q: tuple[float, float, float]) -> str:
    return f"{q[1]:.2f}x [{q[0]:.2f}-{q[2]:.2f}]"


def _fmt_ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1e3:.2f} ms"


def bench_gc_cost(label: str, model: nn.Module, x: Tensor, y: Tensor, settings: Settings) -> list[Row]:
    """Part 1 for one model: GC estimators and vmap(jacrev) against one forward+backward."""
    model.eval()

    # Correctness first: the exact estimator and vmap(jacrev) compute the same quantity.
    exact_value = float(geometric_complexity(model, x, estimator="exact"))
    jacrev_value = float(vmap_jacrev_gc(model, x))
    rel_diff = abs(exact_value - jacrev_value) / abs(jacrev_value)
    k1_value = float(geometric_complexity(model, x, estimator="projection", num_projections=1, seed=0))
    k4_value = float(geometric_complexity(model, x, estimator="projection", num_projections=4, seed=0))

    fb = Candidate("F+B", forward_backward_fn(model, x, y))
    exact = Candidate("exact", gc_fn(model, x, estimator="exact"))
    k1 = Candidate("k1", gc_fn(model, x, estimator="projection", num_projections=1, seed=0))
    k4 = Candidate("k4", gc_fn(model, x, estimator="projection", num_projections=4, seed=0))
    jac = Candidate("jacrev", lambda: vmap_jacrev_gc(model, x))
    paired_timings(fb, [exact, k1, k4, jac], settings.repeats, settings.warmup, settings.sample_seconds)
    model.zero_grad(set_to_none=True)

    r_exact, r_k1, r_k4, r_jac = (ratio_to_baseline(c) for c in (exact, k1, k4, jac))
    speedup = ratio_between(jac, exact)
    return [
        Row("forward+backward (CE, `.backward()`), the unit", label, _fmt_ms(fb.seconds), "1.00x"),
        Row(f"GC exact / F+B (GC = {exact_value:.4g})", label, _fmt_ms(exact.seconds), _fmt_ratio(r_exact),
            f"<= {TARGET_EXACT:g}x", _verdict(r_exact, TARGET_EXACT)),
        Row(f"GC projection k=1 / F+B (estimate {k1_value:.4g})", label, _fmt_ms(k1.seconds), _fmt_ratio(r_k1),
            f"<= {TARGET_K1:g}x", _verdict(r_k1, TARGET_K1)),
        Row(f"GC projection k=4 / F+B (estimate {k4_value:.4g})", label, _fmt_ms(k4.seconds), _fmt_ratio(r_k4)),
        Row("`vmap(jacrev)` GC / F+B (straightforward torch.func)", label, _fmt_ms(jac.seconds), _fmt_ratio(r_jac)),
        Row("speed-up of GC exact over `vmap(jacrev)` (>1: ours is faster)", label, "", _fmt_ratio(speedup)),
        Row("\\|exact - vmap(jacrev)\\| / vmap(jacrev)", label, "", f"{rel_diff:.1e}", f"<= {AGREEMENT_TOL:g}",
            "agrees" if rel_diff <= AGREEMENT_TOL else "**disagrees**"),
    ]


# --------------------------------------------------------------------------------------- part 2
def _demo(epochs: int, probes: list, limit_batches: Optional[int] = None) -> float:
    return demo_fit_seconds(epochs, probes, limit_batches)


def bench_demo_overhead(settings: Settings) -> list[Row]:
    """Part 2: demo training time with the default-cadence GC probe over without any probe."""
    _demo(1, [GeometricComplexity()], limit_batches=2)  # warm-up: imports, TensorBoard, allocator
    ratios, plain_runs, probed_runs, fractions, measurements = [], [], [], [], []
    for pair in range(settings.pairs):
        order = ("plain", "probed") if pair % 2 == 0 else ("probed", "plain")
        seconds = {}
        for kind in order:
            if kind == "plain":
                seconds[kind] = _demo(settings.epochs, [])
            else:
                probe = GeometricComplexity()
                seconds[kind] = _demo(settings.epochs, [probe])
                probe_seconds = sum(m["biasprobe/gc/seconds"] for _, m in probe.history)
                fractions.append(probe_seconds / seconds[kind])
                measurements.append(len(probe.history))
        ratios.append(seconds["probed"] / seconds["plain"])
        plain_runs.append(seconds["plain"])
        probed_runs.append(seconds["probed"])
    q = quartiles(ratios)
    fastest = min(probed_runs) / min(plain_runs)  # one-sided noise (load bursts) only slows runs down
    frac = statistics.median(fractions)
    label = f"demo MLP, {settings.epochs} epochs"
    runs = ", ".join(f"{r:.3f}" for r in ratios)
    return [
        Row(f"demo fit time with `GeometricComplexity()` / without, median of {settings.pairs} alternating pairs "
            f"({runs})", label,
            f"{statistics.median(plain_runs):.2f} s -> {statistics.median(probed_runs):.2f} s",
            f"{_fmt_ratio(q)} (overhead {(q[1] - 1) * 100:+.1f} %)",
            f"<= {1 + TARGET_OVERHEAD:.2f}x", _verdict(q, 1 + TARGET_OVERHEAD)),
        Row("same, fastest probed run / fastest plain run (cross-check, robust to load bursts)", label,
            f"{min(plain_runs):.2f} s -> {min(probed_runs):.2f} s",
            f"{fastest:.3f}x (overhead {(fastest - 1) * 100:+.1f} %)"),
        Row(f"probe's own seconds (sum of `biasprobe/gc/seconds`) / probed fit time ({measurements[0]} measurements "
            "of 256 samples)", label, "", f"{frac * 100:.1f} %"),
    ]


# --------------------------------------------------------------------------------------- report
def print_table(rows: list[Row]) -> None:
    header = ("quantity", "model", "median time", "ratio: median [IQR]", "target", "verdict")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * 2 + ["---"] * 2) + "|")
    for r in rows:
        print(f"| {r.quantity} | {r.model} | {r.time} | {r.value} | {r.target} | {r.verdict} |")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run: fewer/shorter repeats, 5 demo epochs")
    args = parser.parse_args(argv)
    settings = Settings.from_args(args.quick)
    started = time.perf_counter()

    torch.manual_seed(0)
    x, y = probe_batch(N_SAMPLES)
    mlp = make_mlp()
    cnn = SmallCNN()
    print(f"# Geometric complexity benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
          f"{platform.machine()}; N={N_SAMPLES} samples, float32, eval mode; {settings.repeats} rounds, "
          f"each timing every candidate next to a forward+backward sample; ratios: median [interquartile range] "
          f"over the rounds.\n", flush=True)

    load_start = os.getloadavg()[0]
    if load_start > 0.5 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load average {load_start:.2f} on {os.cpu_count()} CPUs: other processes are "
              "running, timings will be noisy.\n", flush=True)
    rows = bench_gc_cost("MLP 64-128-128-10", mlp, x, y, settings)
    rows += bench_gc_cost("CNN 1x8x8 conv16-conv32-pool4-fc10", cnn, x.reshape(-1, 1, 8, 8), y, settings)
    rows += bench_demo_overhead(settings)
    print_table(rows)
    print(f"\nTargets are printed, not asserted. 1-minute load average {load_start:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end, on {os.cpu_count()} CPUs (other processes on the cores widen "
          f"the spread). Script wall time: {time.perf_counter() - started:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
