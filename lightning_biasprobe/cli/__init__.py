"""Command line: ``biasprobe demo``."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="biasprobe", description="Inductive-bias probes for PyTorch Lightning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small MLP on the bundled digits data with every probe attached")
    demo.add_argument("--out", default="biasprobe_logs", help="TensorBoard log directory (default: ./biasprobe_logs)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import print_summary, run_demo

        print_summary(run_demo(out=args.out, epochs=args.epochs, seed=args.seed, progress=not args.no_progress))
    return 0
