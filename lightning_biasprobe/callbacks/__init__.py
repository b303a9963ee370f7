"""The probe callbacks for ``pytorch_lightning`` (the primary namespace).

Each class here is a thin shell: the probe's logic lives in a namespace-free ``...Logic`` class,
and the shell adds ``pytorch_lightning.Callback`` so the Trainer, ``isinstance`` checks and
LightningCLI see a callback of this namespace.
"""

from pytorch_lightning import Callback

from ._data import BatchFormatError, ProbeSet, default_unpack
from ._guard import isolated
from ._schedule import Cadence, log_spaced_steps
from .base import ProbeLogic, ProbeSkipped
from .geometric_complexity import GeometricComplexityLogic


class GeometricComplexity(GeometricComplexityLogic, Callback):
    __doc__ = GeometricComplexityLogic.__doc__


__all__ = [
    "BatchFormatError",
    "Cadence",
    "GeometricComplexity",
    "GeometricComplexityLogic",
    "ProbeLogic",
    "ProbeSet",
    "ProbeSkipped",
    "default_unpack",
    "isolated",
    "log_spaced_steps",
]
