"""lightning_biasprobe: Lightning callbacks that measure a network's inductive biases while it trains.

Every measurement has a functional form in :mod:`lightning_biasprobe.functional` (pure torch) and
a callback form here.
"""

from . import functional
from .callbacks import GeometricComplexity, ProbeLogic

__version__ = "0.1.0"

ALL_PROBES = (GeometricComplexity,)

__all__ = ["ALL_PROBES", "GeometricComplexity", "ProbeLogic", "functional", "__version__"]
