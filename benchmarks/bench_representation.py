"""Benchmark: what the representation probes (EffectiveRank, EffectiveDepth) cost, as ratios.

What it measures
----------------
Model: an MLP 784 -> 1024 -> 1024 -> 1024 -> 1024 -> 1024 -> 10 (ReLU; five hidden layers of width
1024, the issue's goal case), float32, eval mode, on N = 2,000 synthetic examples of 10 classes.
Layers: ``"auto"`` (the five post-ReLU outputs).

1. Time, in units of one Lightning validation epoch of the same model over the same 2,000
   examples (``trainer.validate``, batch 256, a ``validation_step`` computing loss and accuracy; timed
   from ``on_validation_epoch_start`` to ``on_validation_epoch_end`` by a callback):

   - ``EffectiveRank`` measurement on a 2,000-example probe set (``run_measurement``: forward with
     hooks, CountSketch to ``max_dim`` = 192 (its default), 256 or 128, streamed float64 scatter, two
     eigendecompositions per layer), and with ``max_dim=None`` (exact: 1024 x 1024 scatter per layer);
   - ``EffectiveDepth`` measurement on a 2,000-example probe set (training side: class means, NCC
     accuracy, NC1, CDNV), with ``max_dim=192`` (its default), 256 and ``None``;
   - held-out accumulation over a 2,000-example validation epoch (``heldout="val"``; the probe's own
     ``val_seconds``: broadcast plan, a forward with hooks on every batch, classification, metric
     reduction), and ``EffectiveRank(data="val")`` accumulation (``val_seconds``);
   - the straightforward code a user would otherwise write: forward hooks storing every layer's
     ``N x 1024`` features, then ``torch.linalg.svdvals`` in float64 (uncentered and centered) for the
     rank quantities; and for NCC the stored features, ``torch.cdist`` to the class means, and NC1
     with ``D x D`` within/between-class covariances and ``torch.linalg.pinv`` (Papyan's formula).

   Each candidate sample is taken next to a baseline sample (the order alternates), the ratio of
   the two is formed, and the median (with min-max) over the rounds is reported.

2. Peak memory: every configuration runs in a fresh subprocess (Linux); the peak resident size
   (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the measurement) minus the resident
   size at that moment (model, data and one warm-up forward already in memory), at N = 2,000 and
   N = 8,000: the probes' memory follows the projection dimension (plus ``N x k`` stored features for
   NCC's training side), the straightforward code's follows ``N x D``.

Targets (never asserted): one measurement of both probes over 2,000 examples <= 1.2 validation
epochs (attached together they share one forward pass: the first row); peak memory bounded by the projection dimension, not by N x D.

How to run
----------
::

    python benchmarks/bench_representation.py            # 7 rounds (3 for the slow straightforward code)
    python benchmarks/bench_representation.py --quick    # 3 rounds (1 for the straightforward code)
    python benchmarks/bench_representation.py --threads 1

``torch.set_num_threads`` is left at its default unless ``--threads`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

N, D_IN, WIDTH, DEPTH, CLASSES = 2000, 784, 1024, 5, 10


def make_model():
    import pytorch_lightning as pl

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            layers, d = [], D_IN
            for _ in range(DEPTH):
                layers += [nn.Linear(d, WIDTH), nn.ReLU()]
                d = WIDTH
            self.net = nn.Sequential(*layers, nn.Linear(d, CLASSES))

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    torch.manual_seed(0)
    return MLP().eval()


def make_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    centers = torch.randn(CLASSES, D_IN, generator=g)
    return centers[y] + 2 * torch.randn(n, D_IN, generator=g), y


# ------------------------------------------------------------------------------- straightforward code
def stored_features(model, x, chunk=256):
    feats = {i: [] for i in range(1, 2 * DEPTH, 2)}
    handles = [model.net[i].register_forward_hook(lambda m, a, o, i=i: feats[i].append(o.detach().clone()))
               for i in feats]
    try:
        with torch.no_grad():
            for s in range(0, len(x), chunk):
                model(x[s:s + chunk])
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in feats.items()}


def naive_rank(model, x):
    from lightning_biasprobe.functional.rank import rank_measures

    out = {}
    for i, z in stored_features(model, x).items():
        z = z.double()
        out[i] = rank_measures(torch.linalg.svdvals(z), torch.linalg.svdvals(z - z.mean(0)))
    return out


def naive_ncc(model, x, y):
    out = {}
    for i, z in stored_features(model, x).items():
        z = z.double()
        means = torch.stack([z[y == c].mean(0) for c in range(CLASSES)])
        acc = (torch.cdist(z, means).argmin(1) == y).double().mean()
        dev = z - means[y]
        sigma_w = dev.T @ dev / len(z)
        centered = means - z.mean(0)
        sigma_b = centered.T @ centered / CLASSES
        out[i] = (acc, torch.trace(sigma_w @ torch.linalg.pinv(sigma_b)) / CLASSES)
    return out


# ------------------------------------------------------------------------------- candidates
def probe_measurement(kind, max_dim, x, y):
    from lightning_biasprobe import EffectiveDepth, EffectiveRank

    cls = EffectiveRank if kind == "rank" else EffectiveDepth
    probe = cls(max_dim=max_dim, num_samples=len(x), figures=False, strict=True)
    probe.set_probe_data((x, y))
    return probe


class EpochTimer:
    """Callback: seconds from on_validation_epoch_start to on_validation_epoch_end."""

    def __init__(self):
        import pytorch_lightning as pl

        outer = self

        class _CB(pl.Callback):
            def on_validation_epoch_start(self, trainer, pl_module):
                outer.t0 = time.perf_counter()

            def on_validation_epoch_end(self, trainer, pl_module):
                outer.seconds = time.perf_counter() - outer.t0

        self.callback = _CB()
        self.seconds = float("nan")


def validate(model, loader, probes=()):
    import pytorch_lightning as pl

    timer = EpochTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[timer.callback, *probes])
    trainer.validate(model, loader, verbose=False)
    return timer.seconds


def accumulation_probe(kind, x, y, model):
    """A validation-mode probe made due at the next validation run (training side prepared)."""
    from lightning_biasprobe import EffectiveDepth, EffectiveRank

    if kind == "ncc":
        probe = EffectiveDepth(num_samples=len(x), figures=False, strict=True)
        probe.set_probe_data((x, y))
        probe.run_measurement(model, 0)  # the training means (not part of the held-out pass)
        probe.measured_steps = [0]
    else:
        probe = EffectiveRank(data="val", num_samples=8, figures=False, strict=True)
        probe.set_probe_data((x[:8], y[:8]))
    probe._val_pending, probe._last_val_step = True, -1
    return probe


def both_probes(x, y, model):
    """One point of both probes, attached together (defaults): one forward serves both."""
    from lightning_biasprobe import EffectiveDepth, EffectiveRank
    from lightning_biasprobe.callbacks import _shared_capture

    rank = EffectiveRank(num_samples=len(x), figures=False, strict=True)
    ncc = EffectiveDepth(num_samples=len(x), figures=False, strict=True)
    probes = (rank, ncc)
    for probe in probes:
        probe.set_probe_data((x, y))
        _shared_capture.subscribe(probe, model)  # what Trainer setup does
    try:
        t0 = time.perf_counter()
        rank.run_measurement(model, 0)
        ncc.run_measurement(model, 0)
        return time.perf_counter() - t0
    finally:
        for probe in probes:
            _shared_capture.unsubscribe(probe, model)


def time_section(rounds, slow_rounds):
    from torch.utils.data import DataLoader, TensorDataset

    model = make_model()
    x, y = make_data(N)
    hx, hy = make_data(N, seed=1)
    val_loader = DataLoader(TensorDataset(hx, hy), batch_size=256)
    candidates = {
        "both probes at one point, attached together (defaults; one shared forward)":
            lambda: {"seconds": both_probes(x, y, model)},
        "EffectiveRank measurement (default max_dim=192)":
            lambda: probe_measurement("rank", 192, x, y).run_measurement(model, 0),
        "EffectiveRank measurement (max_dim=256)": lambda: probe_measurement("rank", 256, x, y).run_measurement(model, 0),
        "EffectiveRank measurement (max_dim=128)": lambda: probe_measurement("rank", 128, x, y).run_measurement(model, 0),
        "EffectiveRank measurement (max_dim=None, exact)":
            lambda: probe_measurement("rank", None, x, y).run_measurement(model, 0),
        "EffectiveDepth measurement (default max_dim=192)":
            lambda: probe_measurement("ncc", 192, x, y).run_measurement(model, 0),
        "EffectiveDepth measurement (max_dim=256)":
            lambda: probe_measurement("ncc", 256, x, y).run_measurement(model, 0),
        "EffectiveDepth measurement (max_dim=None, exact)":
            lambda: probe_measurement("ncc", None, x, y).run_measurement(model, 0),
        "straightforward rank (stored features, svdvals)": lambda: naive_rank(model, x),
        "straightforward NCC + NC1 (stored features, D x D pinv)": lambda: naive_ncc(model, x, y),
    }
    accumulations = {
        "EffectiveDepth held-out accumulation over a val epoch": "ncc",
        "EffectiveRank(data='val') accumulation over a val epoch (max_dim=192)": "rank",
    }
    ratios = {name: [] for name in [*candidates, *accumulations]}
    base_times = []
    validate(model, val_loader)  # warm-up
    for name, fn in candidates.items():
        if not name.startswith("straightforward"):
            fn()  # warm-up (sketches, first-call overheads)
    slow = {name for name in candidates if name.startswith("straightforward")}
    for r in range(rounds):
        for i, (name, fn) in enumerate(candidates.items()):
            if name in slow and r >= slow_rounds:
                continue
            first_base = (r + i) % 2 == 0  # which of the pair goes first alternates
            if first_base:
                base = validate(model, val_loader)
            t0 = time.perf_counter()
            value = fn()
            seconds = time.perf_counter() - t0
            if isinstance(value, dict) and "seconds" in value:
                seconds = value["seconds"]
            if not first_base:
                base = validate(model, val_loader)
            base_times.append(base)
            ratios[name].append(seconds / base)
        for name, kind in accumulations.items():
            probe = accumulation_probe(kind, x, y, model)
            base = validate(model, val_loader)
            validate(model, val_loader, [probe])
            seconds = probe.last_values[f"biasprobe/{probe.log_name}/val_seconds"]
            base_times.append(base)
            ratios[name].append(seconds / base)
    return ratios, statistics.median(base_times)


# ------------------------------------------------------------------------------- memory (subprocess)
def status_bytes(field):
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since the last reset) of this process."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak():
    # Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current one, so
    # the import-time peak of torch/Lightning does not mask the measurement.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def memory_child(mode, n):
    from lightning_biasprobe.functional._layers import FeatureCapture  # noqa: F401  (imports before the baseline)
    from lightning_biasprobe.functional.ncc import ncc_profile  # noqa: F401
    from lightning_biasprobe.functional.rank import layer_spectra  # noqa: F401

    model = make_model()
    x, y = make_data(n)
    with torch.no_grad():  # warm-up: one validation-style pass in chunks
        for s in range(0, n, 256):
            model(x[s:s + 256])
    # The probe (and its copy of the probe set, which lives as long as the callback) exists before
    # the window: measured is what one measurement adds.
    rank = mode.startswith("EffectiveRank")
    probe = probe_measurement("rank" if rank else "ncc", 192, x, y)
    reset_peak()
    before = status_bytes("VmRSS")
    if mode == "forward only (chunks of 256)":
        with torch.no_grad():
            for s in range(0, n, 256):
                model(x[s:s + 256])
    elif mode.startswith("Effective"):
        probe.run_measurement(model, 0)
    elif mode.startswith("both probes"):
        both_probes(x, y, model)
    elif mode.startswith("straightforward rank"):
        naive_rank(model, x)
    elif mode.startswith("straightforward NCC"):
        naive_ncc(model, x, y)
    print(json.dumps({"mb": max(0, status_bytes("VmHWM") - before) / 2**20}))


MEMORY_MODES = ["forward only (chunks of 256)", "EffectiveRank (default max_dim=192)",
                "EffectiveDepth (default max_dim=192)", "both probes, attached together (shared forward)",
                "straightforward rank (stored features)", "straightforward NCC (stored features)"]


def memory_section(sizes, threads):
    rows = {}
    for mode in MEMORY_MODES:
        for n in sizes:
            cmd = [sys.executable, __file__, "--memory-child", mode, "--n", str(n)]
            if threads:
                cmd += ["--threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.setdefault(mode, {})[n] = json.loads(out)["mb"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7 (1 instead of 3 for the "
                        "straightforward code)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=N, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.memory_child:
        memory_child(args.memory_child, args.n)
        return
    rounds, slow_rounds = (3, 1) if args.quick else (7, 3)
    ratios, base = time_section(rounds, slow_rounds)
    print(f"\n## Representation probes: cost in validation epochs (N={N}, MLP {D_IN}->{DEPTH}x{WIDTH}->{CLASSES})\n")
    print(f"torch {torch.__version__}, {platform.machine()}, threads={torch.get_num_threads()}, rounds={rounds}, "
          f"validation epoch median {base * 1e3:.0f} ms\n")
    print("| candidate | time / validation epoch (median) | min | max | rounds |")
    print("|---|---|---|---|---|")
    for name, values in ratios.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} | {len(values)} |")
    if args.no_memory:
        return
    sizes = [2000, 8000]
    mem = memory_section(sizes, args.threads)
    print("\n## Peak memory above the model, data and a warm-up forward (MB, fresh process each)\n")
    print("| configuration | " + " | ".join(f"N={n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for mode, by_n in mem.items():
        print(f"| {mode} | " + " | ".join(f"{by_n[n]:.1f}" for n in sizes) + " |")
    print("\nTarget: one measurement of both probes (first row) <= 1.2 validation epochs; memory bounded by the projection "
          "dimension k, not N x D. Not asserted.")


if __name__ == "__main__":
    main()
