"""Benchmark: Hessian-vector products, top eigenvalue and trace, as ratios measured in one run.

Models (digits, 8x8 images from scikit-learn, first 512 training examples as the batch; each
model trained briefly with SGD so the spectrum has its trained shape, outliers over a bulk):

- ``mlp85k``: 64 -> 256 -> 256 -> 10, ReLU (85,002 parameters);
- ``cnn25k``: conv3x3 1->16, ReLU, conv3x3 16->32, ReLU, maxpool 2, linear 512->40, ReLU, linear 40->10
  (25,730 parameters);
- ``mlp1.1m``: 64 -> 1024 -> 1024 -> 10, ReLU (1,126,410 parameters).

Tables (every ratio is formed from measurements taken next to each other in this run, medians
over interleaved repeats, so machine load hits both sides alike):

1. Cost of one Hessian-vector product, as a multiple of one training step (zero_grad, forward,
   backward, SGD step) on the same 512 examples, for each product variant of
   ``HessianOperator``: ``double_backward`` (first-order graph built once and reused: the
   library default), ``recompute`` (graph rebuilt per product), ``jvp`` (``torch.func``
   forward-over-reverse), ``linearize`` (``torch.func.linearize`` of the gradient, built once),
   ``vjp`` (``torch.func.vjp`` of the gradient, built once). Build costs are listed separately.
2. Top eigenvalue. Reference: Lanczos run to residual 1e-10 (a "long-run reference"; the tests
   compare Lanczos with a dense ``eigvalsh`` on small models). Per seed: PyHessian 0.1's
   ``hessian(...).eigenvalues(top_n=1)`` at its defaults (``maxIter=100, tol=1e-3``; products
   counted by wrapping its product function), the same power iteration re-implemented here
   (used when PyHessian is not importable), power iteration stopped by an oracle as soon as its
   true relative error is <= 1e-3, ``hessian_eigenvalues(tol=1e-3)`` (Lanczos; its stopping rule
   bounds the error by the Ritz residual), and the same Lanczos run stopped by an oracle (a floor
   for any stopping rule). Products, worst relative error over seeds, and wall time (including
   building the graph, for both).
3. Trace. Reference: Hutch++ with many products, with its standard error. Per method (plain
   Hutchinson as in PyHessian, and Hutch++) at equal numbers of products, over seeds: the RMS
   error against the reference (the reference's own variance subtracted), for Hutchinson the
   number of products it would need to reach Hutch++'s error (its error falls as 1/sqrt(m):
   m * (err_hutchinson / err_hutch++)^2), and the distance of Hutch++'s mean over seeds from the
   reference in units of their combined standard error (|z| < 2: within the error bars).
4. ``GradientRegularization``: the cost of reading the gradients and the learning rates at one
   optimizer step, as a fraction of a training step at batch 64 and 512.

PyHessian: import it from ``--pyhessian PATH`` (a folder holding the ``pyhessian`` package, e.g.
``pip install --no-deps --target /tmp/pyhessian_pkg pyhessian``), else from the environment. It
calls ``.backward()`` on the model, so it gets a copy.

How to run::

    python benchmarks/bench_curvature.py --quick --pyhessian /tmp/pyhessian_pkg   # ~2-3 minutes
    python benchmarks/bench_curvature.py                                          # more seeds/repeats

Uses one intra-op thread by default (``--threads``): on a shared 2-core machine, two OpenMP
threads slow small products down by an order of magnitude whenever another process holds a core.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

from lightning_biasprobe.cli.demo import digits_tensors
from lightning_biasprobe.functional._lanczos import lanczos_tridiagonal
from lightning_biasprobe.functional.curvature import HessianOperator, hessian_eigenvalues, hessian_trace

VARIANTS = ["double_backward", "recompute", "jvp", "linearize", "vjp"]


# ---------------------------------------------------------------------- models and data
def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(512, 40), nn.ReLU(), nn.Linear(40, 10))

    def forward(self, x):
        return self.head(self.features(x.reshape(-1, 1, 8, 8)))


def trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    clone = copy.deepcopy(model).train()
    opt = torch.optim.SGD(clone.parameters(), lr=1e-9)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(clone(x), y).backward()
        opt.step()
    return step


# ---------------------------------------------------------------------- table 1: product variants
def bench_products(model, x, y, repeats: int, products: int) -> list[str]:
    step = train_step_fn(model, x, y)
    ops = {m: HessianOperator(model, x, y, hvp_method=m) for m in VARIANTS}
    builds = {m: [] for m in VARIANTS}
    per_product = {m: [] for m in VARIANTS}
    steps = []
    v = torch.randn(ops["double_backward"].dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for op in ops.values():  # warm-up
        op.matvec(v)
    step()
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        steps.append(min(timed(step) for _ in range(3)))
        for m in order:
            builds[m].append(timed(lambda: HessianOperator(model, x, y, hvp_method=m)))
            per_product[m].append(timed(lambda: [ops[m].matvec(v) for _ in range(products)]) / products)
        steps.append(min(timed(step) for _ in range(3)))
    t_step = statistics.median(steps)
    rows = []
    for m in VARIANTS:
        rows.append(f"| {m} | {statistics.median(per_product[m]) / t_step:.2f}x | "
                    f"{statistics.median(builds[m]) / t_step:.2f}x | {1e3 * statistics.median(per_product[m]):.1f} |")
    return [f"training step (batch {len(y)}): {1e3 * t_step:.1f} ms"] + rows


# ---------------------------------------------------------------------- table 2: top eigenvalue
def power_iteration(op: HessianOperator, seed: int, tol: float = 1e-3, max_iter: int = 100,
                    reference: float | None = None, target: float = 1e-3) -> tuple[float, int]:
    """PyHessian's algorithm (re-implemented): v <- Hv/|Hv|, stop when lambda changes by < tol (relative).

    Same start vector as PyHessian for the same seed, so the same products; it returns the last
    Rayleigh quotient (PyHessian returns the one before it, hence its slightly larger error).
    With ``reference``, stop instead as soon as the true relative error is <= target (an oracle).
    """
    with torch.random.fork_rng(devices=[]):  # PyHessian's start vector: randn per parameter after manual_seed
        torch.manual_seed(seed)
        v = torch.cat([torch.randn(shape).reshape(-1) for shape in op.shapes]).double()
    v /= v.norm()
    lam = None
    for i in range(max_iter):
        hv = op.matvec(v)
        new = float(v @ hv)
        if reference is not None:
            if abs(new / reference - 1) <= target:
                return new, i + 1
        elif lam is not None and abs(lam - new) / (abs(lam) + 1e-6) < tol:
            return new, i + 1
        lam = new
        v = hv / hv.norm()
    return lam, max_iter


def pyhessian_top(model, x, y, seed: int):
    """PyHessian's default top eigenvalue on a copy of the model: (value, products, seconds)."""
    hessian_module = sys.modules["pyhessian.hessian"]
    original = hessian_module.hessian_vector_product
    count = [0]

    def counted(*args):
        count[0] += 1
        return original(*args)

    hessian_module.hessian_vector_product = counted
    try:
        copy_ = copy.deepcopy(model)
        torch.manual_seed(seed)  # PyHessian draws its start vector from the global RNG
        start = time.perf_counter()
        h = hessian_module.hessian(copy_, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        values, _ = h.eigenvalues()
        seconds = time.perf_counter() - start
    finally:
        hessian_module.hessian_vector_product = original
    return values[0], count[0], seconds


def bench_eigen(model, x, y, seeds: int, have_pyhessian: bool) -> list[str]:
    ref = hessian_eigenvalues(model, x, y, k=2, tol=1e-10, max_iter=300)
    lam = ref.eigenvalues[0].item()
    gap = ref.eigenvalues[1].item() / lam
    rows = {"pyhessian": [], "power": [], "oracle": [], "lanczos": [], "lanczos_oracle": []}
    for seed in range(seeds):
        if have_pyhessian:
            value, n, sec = pyhessian_top(model, x, y, seed)
            rows["pyhessian"].append((n, abs(value / lam - 1), sec))
        start = time.perf_counter()
        op = HessianOperator(model, x, y)
        value, n = power_iteration(op, seed)
        rows["power"].append((n, abs(value / lam - 1), time.perf_counter() - start))
        value, n = power_iteration(HessianOperator(model, x, y), seed, reference=lam)
        rows["oracle"].append((n, abs(value / lam - 1), float("nan")))
        start = time.perf_counter()
        r = hessian_eigenvalues(model, x, y, tol=1e-3, seed=seed)
        rows["lanczos"].append((r.num_products, abs(r.eigenvalues[0].item() / lam - 1), time.perf_counter() - start))
        # the same Lanczos run (same start vector), stopped by an oracle: a floor for any stopping rule
        v0 = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        alpha, beta, _ = lanczos_tridiagonal(HessianOperator(model, x, y).matvec, v0, r.num_products)
        for m in range(1, alpha.numel() + 1):
            T = torch.diag(alpha[:m]) + torch.diag(beta[:m - 1], 1) + torch.diag(beta[:m - 1], -1)
            err = abs(torch.linalg.eigvalsh(T)[-1].item() / lam - 1)
            if err <= 1e-3:
                break
        rows["lanczos_oracle"].append((m, err, float("nan")))
    out = [f"lambda_1 = {lam:.6g}, lambda_2/lambda_1 = {gap:.3f} (reference: {ref.num_products} Lanczos products)"]
    names = {"pyhessian": "PyHessian 0.1 default (power iteration, tol 1e-3)",
             "power": "power iteration, PyHessian's rule (ours)",
             "oracle": "power iteration, oracle stop at 1e-3 error",
             "lanczos": "Lanczos, `hessian_eigenvalues(tol=1e-3)`",
             "lanczos_oracle": "Lanczos, oracle stop at 1e-3 error"}
    for key, label in names.items():
        data = rows[key]
        if not data:
            continue
        ns = [d[0] for d in data]
        worst = max(d[1] for d in data)
        secs = [d[2] for d in data]
        wall = "-" if all(math.isnan(s) for s in secs) else f"{1e3 * statistics.median(secs):.0f}"
        out.append(f"| {label} | {statistics.median(ns):g} ({min(ns)}-{max(ns)}) | {worst:.1e} | {wall} |")
    if rows["pyhessian"]:
        pairs = list(zip(rows["pyhessian"], rows["lanczos"]))
        out.append(f"Lanczos / PyHessian per seed: products <= in {sum(l[0] <= p[0] for p, l in pairs)}/{len(pairs)} "
                   f"seeds, median wall-time ratio {statistics.median(l[2] / p[2] for p, l in pairs):.2f}")
    return out


# ---------------------------------------------------------------------- table 3: trace
def bench_trace(model, x, y, seeds: int, budgets: list[int], reference_products: int) -> list[str]:
    op = HessianOperator(model, x, y)
    ref = hessian_trace(op, num_products=reference_products, seed=12345)
    t_ref, se_ref = ref.estimate.item(), ref.std_error.item()
    out = [f"reference: Hutch++ with {reference_products} products: {t_ref:.6g} +- {se_ref:.2g} (standard error)"]
    for m in budgets:
        errs = {"hutchinson": [], "hutch++": []}
        ses = {"hutchinson": [], "hutch++": []}
        for seed in range(seeds):
            for method in errs:
                r = hessian_trace(op, num_products=m, method=method, seed=seed)
                errs[method].append(r.estimate.item() - t_ref)
                ses[method].append(r.std_error.item())
        rms = {k: math.sqrt(max(statistics.fmean(e * e for e in v) - se_ref**2, 0.0)) for k, v in errs.items()}
        mean_hpp = statistics.fmean(errs["hutch++"])
        equal = m * (rms["hutchinson"] / rms["hutch++"]) ** 2 if rms["hutch++"] > 0 else float("inf")
        z = mean_hpp / math.sqrt(se_ref**2 + statistics.variance(errs["hutch++"]) / seeds)
        out.append(f"| {m} | {rms['hutchinson'] / abs(t_ref):.2%} | {rms['hutch++'] / abs(t_ref):.2%} | "
                   f"{statistics.fmean(ses['hutch++']) / abs(t_ref):.2%} | {equal:.0f} | {z:+.1f} |")
    return out


# ---------------------------------------------------------------------- table 4: IGR read cost
def bench_igr(model, x, y, repeats: int) -> list[str]:
    from lightning_biasprobe import GradientRegularization

    probe = GradientRegularization()
    out = []
    for batch in (64, 512):
        clone = copy.deepcopy(model).train()
        opt = torch.optim.SGD(clone.parameters(), lr=1e-9)
        xb, yb = x[:batch], y[:batch]

        def step():
            opt.zero_grad()
            nn.functional.cross_entropy(clone(xb), yb).backward()
            opt.step()

        def read():
            values = probe.read_gradients(opt)
            return {k: float(v) for k, v in values.items()}

        step()
        ratios = []
        for _ in range(repeats):
            t_step = min(timed(step) for _ in range(3))
            t_read = min(timed(read) for _ in range(3))
            ratios.append(t_read / t_step)
        out.append(f"| {batch} | {statistics.median(ratios):.2%} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, repeats and models' epochs")
    parser.add_argument("--pyhessian", default=None, help="folder holding the pyhessian package")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="mlp85k,cnn25k,mlp1.1m")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.pyhessian:
        sys.path.insert(0, args.pyhessian)
    try:
        import pyhessian.hessian  # noqa: F401
        have_pyhessian = True
    except Exception:  # noqa: BLE001
        have_pyhessian = False
    quick = args.quick
    train, _ = digits_tensors(0)
    X, Y = train.tensors
    x, y = X[:512], Y[:512]
    torch.manual_seed(0)
    builders = {"mlp85k": lambda: mlp(256), "cnn25k": CNN, "mlp1.1m": lambda: mlp(1024)}
    epochs = {"mlp85k": 10, "cnn25k": 10, "mlp1.1m": 5} if quick else {"mlp85k": 20, "cnn25k": 20, "mlp1.1m": 10}
    print(f"# bench_curvature ({'quick' if quick else 'full'}; torch {torch.__version__}, {args.threads} thread(s), "
          f"PyHessian {'imported' if have_pyhessian else 'NOT importable: power iteration re-implemented here'})\n")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = trained(builders[name](), X, Y, epochs[name])
        big = name == "mlp1.1m"
        print(f"## {name}: {sum(p.numel() for p in model.parameters()):,} parameters, batch 512, "
              f"trained {epochs[name]} epochs\n")
        lines = bench_products(model, x, y, repeats=3 if quick else 7, products=3 if big else 10)
        print(f"### One Hessian-vector product ({lines[0]})\n")
        print("| variant | product / training step | build / training step | ms per product |")
        print("|---|---|---|---|")
        print("\n".join(lines[1:]) + "\n")
        lines = bench_eigen(model, x, y, seeds=(3 if big else 5) if quick else (5 if big else 10),
                            have_pyhessian=have_pyhessian)
        print(f"### Top eigenvalue ({lines[0]})\n")
        print("| method | products: median (range) | worst relative error | median wall ms |")
        print("|---|---|---|---|")
        print("\n".join(lines[1:-1] if have_pyhessian else lines[1:]))
        if have_pyhessian:
            print(f"\n{lines[-1]}")
        print()
        budgets = [30] if (quick and big) else ([30, 60] if quick or big else [30, 60, 99])
        lines = bench_trace(model, x, y, seeds=(4 if big else 10) if quick else (8 if big else 30), budgets=budgets,
                            reference_products=(150 if big else 600) if quick else (300 if big else 1500))
        print(f"### Trace ({lines[0]})\n")
        print("| products | Hutchinson RMS error | Hutch++ RMS error | Hutch++ mean reported SE | "
              "products Hutchinson needs for Hutch++'s error | (Hutch++ mean - reference) / combined SE |")
        print("|---|---|---|---|---|---|")
        print("\n".join(lines[1:]) + "\n")
        if name == "mlp85k":
            print("### GradientRegularization: reading gradients at one optimizer step\n")
            print("| batch | read / training step |")
            print("|---|---|")
            print("\n".join(bench_igr(model, X, Y, repeats=5 if quick else 15)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
