"""LightningCLI (pytorch_lightning) with the probes configured in YAML.

    python examples/cli/train.py fit --config examples/cli/config.yaml
    python examples/cli/train.py fit --config examples/cli/config.yaml --print_config
    python examples/cli/train.py fit --trainer.callbacks.help lightning_biasprobe.HessianCurvature
"""

import os
import sys

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_task import build  # noqa: E402

DigitsMLP, DigitsData = build(pl)

if __name__ == "__main__":
    LightningCLI(DigitsMLP, DigitsData)
