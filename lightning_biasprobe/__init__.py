"""lightning_biasprobe: Lightning callbacks that measure a network's inductive biases while it trains.

Every measurement has a functional form in :mod:`lightning_biasprobe.functional` (pure torch) and
a callback form here (``pytorch_lightning`` callbacks; every probe is in ``ALL_PROBES``).
"""

from . import data, functional, nn
from .callbacks import _CALLBACKS, ALL_PROBES, ProbeLogic

globals().update(_CALLBACKS)

__version__ = "0.1.0"

__all__ = ["ALL_PROBES", "ProbeLogic", "data", "functional", "nn", "__version__", *_CALLBACKS]
