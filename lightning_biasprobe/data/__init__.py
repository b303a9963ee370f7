"""Data sets from the seed papers: LMS simplicity-bias data (Shah et al. 2020).

The generators (:mod:`.lms`) are pure torch; :class:`LMSDataModule` (a Lightning data module) is
imported on first use.
"""

from .lms import (
    LMSData,
    linear_coordinate,
    make_lms,
    make_ms,
    make_slab_data,
    random_rotation,
    slab_coordinate,
    slab_intervals,
    slab_labels,
    slab_width,
)

__all__ = [
    "LMSData",
    "LMSDataModule",
    "linear_coordinate",
    "make_lms",
    "make_ms",
    "make_slab_data",
    "random_rotation",
    "slab_coordinate",
    "slab_intervals",
    "slab_labels",
    "slab_width",
]


def __getattr__(name: str):
    if name == "LMSDataModule":
        from .lms_datamodule import LMSDataModule

        return LMSDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
