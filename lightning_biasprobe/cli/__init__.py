"""Command line: ``biasprobe demo`` and ``biasprobe report``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes global steps separated by commas, e.g. 0,500,2000; got "
                                         f"{text!r}") from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"--steps needs non-negative global steps, got {text!r}")
    return steps


def run_report(logdirs: Sequence[str], out: str, steps: Optional[Sequence[int]] = None) -> int:
    """Write the report and print its path; a clear message (exit status 2) when it cannot be written."""
    from ..report import MissingPlotExtra, ReportError, write_report

    try:
        report = write_report(logdirs, out, steps=steps)
    except (ReportError, MissingPlotExtra) as err:
        print(f"biasprobe report: {err}", file=sys.stderr)
        return 2
    print(f"report: {report.path}  ({len(report.panels)} panels, {len(report.runs)} run"
          f"{'s' if len(report.runs) != 1 else ''}, {report.seconds:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="biasprobe", description="Inductive-bias probes for PyTorch Lightning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small MLP on the bundled digits data with every probe attached")
    demo.add_argument("--out", default="biasprobe_logs", help="TensorBoard log directory (default: ./biasprobe_logs)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    demo.add_argument("--no-report", action="store_true", help="do not write the HTML report into OUT/report")
    report = sub.add_parser("report", help="an HTML page of PNG plots of the probe curves in TensorBoard logs",
                            description="Reads the TensorBoard event files of one or more runs and writes "
                                        "OUT/index.html with one PNG panel per probe quantity (runs overlaid), "
                                        "spectra and per-layer profiles at chosen steps. Needs matplotlib: "
                                        "pip install 'lightning_biasprobe[plot]'.")
    report.add_argument("logdirs", nargs="+", metavar="LOGDIR",
                        help="a run's log directory, or a folder of runs (every folder with event files below "
                             "it is a run)")
    report.add_argument("--out", default="biasprobe_report", help="output folder (default: ./biasprobe_report)")
    report.add_argument("--steps", type=_steps, default=None,
                        help="global steps for profiles, spectra and distributions, comma-separated (the "
                             "nearest logged step of each is shown; default: first, middle, last)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import print_summary, run_demo, write_demo_report

        result = run_demo(out=args.out, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
        print_summary(result)
        if not args.no_report:
            write_demo_report(result)
        return 0
    return run_report(args.logdirs, args.out, args.steps)
