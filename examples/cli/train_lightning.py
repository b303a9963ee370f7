"""LightningCLI (lightning.pytorch, the unified package) with the probes configured in YAML.

    python examples/cli/train_lightning.py fit --config examples/cli/config_lightning.yaml
"""

import os
import sys

import lightning.pytorch as L
from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_task import build  # noqa: E402

DigitsMLP, DigitsData = build(L)

if __name__ == "__main__":
    LightningCLI(DigitsMLP, DigitsData)
