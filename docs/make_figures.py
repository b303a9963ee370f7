"""Regenerate the pictures of ``docs/probes.md`` (``docs/img/*.png``).

Runs the demo (the MLP on scikit-learn's digits, every probe attached, 20 epochs, plain SGD),
writes its HTML report with :func:`lightning_biasprobe.report.write_report`, and copies the panels
that ``docs/probes.md`` shows into ``docs/img``. Two probes need more than the demo:

- ``FunctionFrequency`` is added to the demo's probes when the demo does not have it yet (while
  its module is still ``callbacks/_wip_frequency.py``);
- ``SimplicityBias`` needs data with a known simple coordinate: a second, short run trains a
  one-hidden-layer MLP on LMS-5 data (Shah et al. 2020; ``lightning_biasprobe.data``), and a
  control run on the same data with the linear coordinate replaced by noise; the probe measures on
  the held-out split.

Both callbacks come from ``lightning_biasprobe`` once their modules are final, else are built here
from their ``Logic`` classes in the ``_wip_`` modules, so the script works before and after the
rename. Run from the repository root (about two minutes on 2 CPU cores)::

    OMP_NUM_THREADS=1 python docs/make_figures.py                 # writes docs/img/*.png
    python docs/make_figures.py --out /tmp/figs --epochs 20       # keep the logs and reports there

Everything it prints is also checkable: the report pages are in ``<out>/report`` and
``<out>/lms_report``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
IMG = os.path.join(HERE, "img")

#: docs/img/<name>.png <- the report panel with this id (see ``Report.files``), for the demo run
DEMO_PANELS = {
    "gc": "gc-logits",
    "ntk_alignment": "ntk-alignment",
    "ntk_distance": "ntk-distance",
    "hessian_top_eigenvalue": "hessian-top_eigenvalue",
    "hessian_trace": "hessian-trace",
    "igr": "igr-igr_term",
    "rank_profile": "rank-erank_features-profile",
    "ncc_train_profile": "ncc-train_acc-profile",
    "ncc_heldout_profile": "ncc-heldout_acc-profile",
    "noise_snr": "noise-snr",
    "diffusion_distance": "diffusion-distance",
    "diffusion_exponent": "diffusion-exponent",
    "freq_mean_frequency": "freq-mean_frequency-per-group",
    "freq_high_frequency_fraction": "freq-high_frequency_fraction-per-group",
}

#: docs/img/<name>.png <- a panel drawn here from the demo run: (title, probe, quantity, [(legend, tag)])
DEMO_COMBINED = {
    "noise_tail_index": ("noise/tail_index and its standardized control", "noise", "tail_index",
                         [("pooled coordinates", "biasprobe/noise/tail_index"),
                          ("each coordinate standardized", "biasprobe/noise/tail_index_standardized")]),
}


def probe_class(name: str, final_module: str, wip_module: str) -> type:
    """The callback class ``name``: from the package once ``callbacks/<final_module>.py`` exists,
    else built from ``<name>Logic`` in ``callbacks/<wip_module>.py`` and ``pytorch_lightning.Callback``."""
    import pytorch_lightning as pl

    import lightning_biasprobe

    if importlib.util.find_spec(f"lightning_biasprobe.callbacks.{final_module}") is not None:
        return getattr(lightning_biasprobe, name)
    logic = getattr(importlib.import_module(f"lightning_biasprobe.callbacks.{wip_module}"), f"{name}Logic")
    return type(name, (logic, pl.Callback), {})


@contextlib.contextmanager
def quiet():
    """Lightning's banners and the probes' one-time warnings off (the figures are the output)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def demo_run(out: str, epochs: int) -> dict:
    """The demo with every probe (and FunctionFrequency), and its report in ``<out>/report``."""
    from lightning_biasprobe.cli.demo import default_probes, run_demo
    from lightning_biasprobe.report import write_report

    probes = default_probes()
    if not any(p.name == "freq" for p in probes):
        probes.append(probe_class("FunctionFrequency", "frequency", "_wip_frequency")())
    # On the digits, coordinate 0 (a corner pixel) is not a "simple feature": SimplicityBias is shown
    # on LMS data instead (lms_runs), so it is left out of this run if the demo has it.
    probes = [p for p in probes if p.name != "simplicity"]
    with quiet():
        result = run_demo(out=out, epochs=epochs, progress=False, probes=probes)
    report = write_report([result["logdir"]], os.path.join(out, "report"), title="biasprobe demo")
    print(f"demo: {epochs} epochs in {result['seconds']:.1f} s, report {report.path} ({len(report.panels)} panels)")
    return {"report": report, "result": result, "files": combined_panels(report)}


def combined_panels(report: Any) -> dict[str, str]:
    """Draw ``DEMO_COMBINED``: several quantities of one run in one panel, with the report's drawing."""
    from lightning_biasprobe.report import Panel
    from lightning_biasprobe.report.catalog import label, paper
    from lightning_biasprobe.report.plotting import draw_panel

    files = {}
    run = report.runs[0]
    for name, (title, probe, quantity, lines) in DEMO_COMBINED.items():
        if not all(tag in run.scalars for _, tag in lines):
            print(f"  (the demo run lacks {[t for _, t in lines if t not in run.scalars]}: {name}.png not written)")
            continue
        panel = Panel(name, "curve", probe, quantity, title, paper(probe, quantity), label(probe, quantity),
                      lines=lines)
        path = os.path.join(os.path.dirname(report.path), f"{name}.png")
        draw_panel(panel, [run], path)
        files[name] = path
    return files


def cost_table(runs: list) -> str:
    """The docs' table of points and median wall time per measurement, from the runs' ``seconds``."""
    import numpy as np

    rows = ["| probe | points | median ms per measurement |", "|---|---:|---:|"]
    for run in runs:
        for tag, series in run.scalars.items():
            parts = tag.split("/")
            if len(parts) == 3 and parts[0] == "biasprobe" and parts[2].endswith("seconds") and len(series.values):
                name = parts[1] if parts[2] == "seconds" else f"{parts[1]} ({parts[2]})"
                rows.append(f"| `{name}` | {len(series.values)} | {1000 * np.median(series.values):.3g} |")
    return "\n".join(rows)


def lms_runs(out: str, epochs: int = 12) -> Optional[dict]:
    """SimplicityBias on LMS-5 and on the control (linear coordinate replaced by noise)."""
    try:
        from lightning_biasprobe.data import LMSDataModule
    except ImportError:
        print("lightning_biasprobe.data (LMS data) is not there: no SimplicityBias figure")
        return None
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch import nn

    from lightning_biasprobe.report import Panel, write_report
    from lightning_biasprobe.report.catalog import PROBE_TITLES
    from lightning_biasprobe.report.plotting import draw_panel

    simplicity = probe_class("SimplicityBias", "simplicity", "_wip_simplicity")
    dim = 20

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(dim, 100), nn.ReLU(), nn.Linear(100, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    logdirs = {}
    for name, first in (("lms5", "linear"), ("control", "noise")):
        pl.seed_everything(0, verbose=False)
        data = LMSDataModule(num_train=10_000, num_val=2_000, kinds=(first,) + (5,) * (dim - 1), batch_size=128,
                             seed=0)
        probe = simplicity(simple_coords=(0,), complex_coords=tuple(range(1, dim)), probe_data=data.val_dataloader(),
                           num_samples=2_000, log_spaced=True)
        logger = TensorBoardLogger(save_dir=out, name=name)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[probe], logger=logger,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=50)
        with quiet():
            trainer.fit(MLP(), datamodule=data)
        logdirs[name] = logger.log_dir
        last = probe.history[-1][1]
        print(f"{name}: " + ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in last.items()
                                      if not k.endswith("seconds")))
    report = write_report(list(logdirs.values()), os.path.join(out, "lms_report"), title="SimplicityBias on LMS-5")
    # One panel per run with the three accuracies together (the report draws one per quantity).
    title, paper = PROBE_TITLES.get("simplicity", ("simplicity", "Shah et al. 2020"))
    keys = [("clean", "accuracy"), ("S randomized", "s_randomized_accuracy"),
            ("Sᶜ randomized", "sc_randomized_accuracy")]
    files = {}
    by_path = {r.path: r for r in report.runs}
    for name, logdir in logdirs.items():
        run = by_path[os.path.abspath(logdir)]
        what = ("LMS-5: coordinate 0 linear, 19 five-slab coordinates" if name == "lms5"
                else "control: coordinate 0 noise, 19 five-slab coordinates")
        panel = Panel(f"simplicity-{name}", "curve", "simplicity", "accuracy", what, paper,
                      "held-out accuracy", lines=[(label, f"biasprobe/simplicity/{key}") for label, key in keys])
        path = os.path.join(out, "lms_report", f"{panel.id}.png")
        draw_panel(panel, [run], path)
        files[f"simplicity_{name}"] = path
    return {"report": report, "files": files}


def copy_figures(demo: dict, lms: Optional[dict], img: str) -> dict[str, int]:
    """Copy the chosen panels to ``img``; returns {file: bytes}."""
    os.makedirs(img, exist_ok=True)
    report = demo["report"]
    folder = os.path.dirname(report.path)
    sizes = {}
    for name, panel_id in DEMO_PANELS.items():
        if panel_id not in report.files:
            print(f"  (no panel {panel_id} in this demo run: {name}.png not written)")
            continue
        target = os.path.join(img, f"{name}.png")
        shutil.copyfile(os.path.join(folder, report.files[panel_id]), target)
        sizes[target] = os.path.getsize(target)
    for name, path in [*demo["files"].items(), *(lms or {}).get("files", {}).items()]:
        target = os.path.join(img, f"{name}.png")
        shutil.copyfile(path, target)
        sizes[target] = os.path.getsize(target)
    return sizes


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="folder for the logs and reports (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=20, help="demo epochs (default 20, as in the docs)")
    parser.add_argument("--img", default=IMG, help="where the PNGs go (default: docs/img)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="biasprobe_figures_")
    demo = demo_run(os.path.join(out, "demo"), args.epochs)
    lms = lms_runs(os.path.join(out, "lms"))
    print(cost_table(demo["report"].runs + (lms["report"].runs[:1] if lms else [])))
    sizes = copy_figures(demo, lms, args.img)
    stale = sorted(set(os.listdir(args.img)) - {os.path.basename(p) for p in sizes} - {".gitkeep"})
    if stale:
        print(f"  not written by this run (left in place): {', '.join(stale)}")
    for path, size in sorted(sizes.items()):
        print(f"  {os.path.relpath(path)}  {size / 1024:.0f} KiB")
    print(f"{len(sizes)} figures, {sum(sizes.values()) / 1024:.0f} KiB in all; logs and reports in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
