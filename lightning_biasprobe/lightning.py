"""The probe callbacks for the ``lightning.pytorch`` namespace (the unified ``lightning`` package).

The same probes, under the same class names, as :mod:`lightning_biasprobe` (which serves
``pytorch_lightning``): each is built from the probe's namespace-free ``<Name>Logic`` class and
``lightning.pytorch.Callback``, so a ``lightning.pytorch.Trainer`` accepts it, ``isinstance(cb,
lightning.pytorch.Callback)`` holds, and LightningCLI configs name it as
``lightning_biasprobe.lightning.<Name>``::

    import lightning.pytorch as L
    from lightning_biasprobe.lightning import GeometricComplexity

    trainer = L.Trainer(callbacks=[GeometricComplexity()])

Importing this module needs the ``lightning`` package (``pip install lightning``).
"""

from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError as err:  # pragma: no cover - exercised only without the package
    raise ImportError("lightning_biasprobe.lightning needs the `lightning` package (`pip install lightning`); "
                      "for pytorch_lightning use the callbacks in `lightning_biasprobe` itself") from err

from .callbacks import callback_classes

_CALLBACKS = callback_classes(Callback, __name__)
globals().update(_CALLBACKS)
ALL_PROBES: tuple[type, ...] = tuple(_CALLBACKS.values())

__all__ = ["ALL_PROBES", *_CALLBACKS]
