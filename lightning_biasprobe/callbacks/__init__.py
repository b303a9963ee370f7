"""The probe callbacks for ``pytorch_lightning`` (the primary namespace).

Each probe's logic is a namespace-free ``<Name>Logic`` class (a subclass of :class:`ProbeLogic`)
in its own module of this package. Its callback, ``<Name>``, is a thin class built here from
that logic and ``pytorch_lightning.Callback``, so the Trainer, ``isinstance`` checks and
LightningCLI see a callback of this namespace; :func:`callback_classes` builds the same set for
another namespace (``lightning.pytorch``). A new probe module is picked up without editing this
file.
"""

from __future__ import annotations

import importlib
import pkgutil

from pytorch_lightning import Callback

from ._data import BatchFormatError, ProbeSet, default_unpack
from ._guard import isolated
from ._schedule import Cadence, log_spaced_steps
from .base import ProbeLogic, ProbeSkipped


def probe_logic_classes() -> list[type]:
    """Every concrete probe logic class of this package, in module order then definition order."""
    found: list[type] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, ProbeLogic) and obj is not ProbeLogic
                    and obj.__module__ == module.__name__ and obj.__name__.endswith("Logic")
                    and obj not in found):
                found.append(obj)
    return found


def callback_classes(callback_base: type, module_name: str) -> dict[str, type]:
    """``{Name: class(NameLogic, callback_base)}`` for every probe, with the logic's docs and signature."""
    classes = {}
    for logic in probe_logic_classes():
        name = logic.__name__[: -len("Logic")]
        cls = type(name, (logic, callback_base), {"__doc__": logic.__doc__, "__module__": module_name})
        cls.__qualname__ = name
        classes[name] = cls
    return classes


_CALLBACKS = callback_classes(Callback, __name__)
globals().update(_CALLBACKS)
ALL_PROBES: tuple[type, ...] = tuple(_CALLBACKS.values())

__all__ = [
    "ALL_PROBES",
    "BatchFormatError",
    "Cadence",
    "ProbeLogic",
    "ProbeSet",
    "ProbeSkipped",
    "callback_classes",
    "default_unpack",
    "isolated",
    "log_spaced_steps",
    "probe_logic_classes",
    *_CALLBACKS,
]
