r"""Linear + k-slab (LMS) data sets for simplicity bias (Shah et al. 2020).

Shah, Tamuly, Raghunathan, Jain, Netrapalli (2020), "The Pitfalls of Simplicity Bias in Neural
Networks" (NeurIPS 2020, arXiv:2006.07710). Geometry as the authors' generator defines it
(``scripts/gendata.py``, ``generate_ub_linslab_data_diffmargin_v2`` and ``get_lms_data``;
METHODS.md §15, checked against that code). Written here from the definitions, in torch.

Every example has a label ``y`` in {0, 1} (uniformly random) and ``d`` coordinates, each of one kind:

- **linear** (margin ``gamma_lin = linear_margin * w``):
  ``x = (2y - 1)(gamma_lin + (w - gamma_lin) U)``, ``U ~ U[0, 1]``: class 1 in ``[gamma_lin, w]``,
  class 0 in ``[-w, -gamma_lin]``. A threshold at 0 separates the classes.
- **k-slab**, ``k`` in {3, 5, 7} (margin ``gamma = slab_margin * w``): ``k`` slabs of width
  ``s_k = (2w - 2(k - 1) gamma) / k`` tile ``[-w, w]`` with gaps ``2 gamma``, symmetric about 0;
  the slab at distance ``j`` from the centre (centre ``j = 0``) lies at
  ``+-[(j - 1/2) s_k + 2 j gamma, (j + 1/2) s_k + 2 j gamma]`` and has label ``j mod 2``.
  Class 0 uses the centre slab with probability ``p5 = 3/4`` and the outer ``j = 2`` slabs
  otherwise (5 slabs); class 1 the inner ``j = 1`` slabs with probability ``p7 = 7/8`` and the
  ``j = 3`` slabs otherwise, class 0 the centre or ``j = 2`` with probability 1/2 each (7 slabs);
  3 slabs: class 0 the centre, class 1 ``j = 1``. The side (sign) is uniform. With ``w = 1``,
  ``gamma = 0.1``: 5-slab ``s = 0.24``, centre ``[-0.12, 0.12]``, class 1 ``+-[0.32, 0.56]``,
  outer class 0 ``+-[0.76, 1]``. Only the slab rule (not a threshold) separates the classes.
- **noise**: ``U[0, w)``, independent of the label.

Coordinates are drawn independently given the label (the reference code's ``indep_slabs=True``),
so every linear or slab coordinate *alone* classifies perfectly.

- **LMS-k** (:func:`make_lms`): one linear coordinate (index 0) and ``d - 1`` k-slab coordinates.
  The reference defaults (``get_lms_data``) are ``d = 20``, ``w = 1``, margins 0.1, 100,000 training
  and 2,000 test examples.
- **MS-(5,7)** (:func:`make_ms`): one 5-slab coordinate (index 0) and ``d - 1`` 7-slab coordinates.
- Options of the reference generator kept here: ``corrupt_linear`` (that fraction of examples get
  their linear coordinate's sign flipped, or moved into the margin with
  ``corrupt_linear_into_margin``, so the linear coordinate alone no longer suffices) and a random
  orthonormal rotation ``W`` (inputs ``X W``) that hides the axis alignment.

Cost: ``O(n d)`` to generate; pure torch, CPU, seeded (the global RNG is not used).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "LMSData",
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

Kind = Union[str, int]
SLAB_COUNTS = (3, 5, 7)


@dataclass
class LMSData:
    """Examples, labels and which coordinates are simple.

    ``inputs`` are ``(n, d)`` (already rotated when ``rotation`` is set: ``inputs = X W``),
    ``targets`` ``(n,)`` class indices. ``simple_coords`` is the linear coordinate (LMS) or the
    5-slab one (MS-(5,7)); ``complex_coords`` the other designated coordinates; ``kinds[i]`` is
    ``"linear"``, a slab count or ``"noise"``.
    """

    inputs: Tensor
    targets: Tensor
    kinds: tuple
    simple_coords: tuple[int, ...]
    complex_coords: tuple[int, ...]
    rotation: Optional[Tensor]
    width: float
    linear_margin: float
    slab_margin: float

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def unrotated(self) -> Tensor:
        """``X``, the inputs in the coordinates the kinds refer to."""
        return self.inputs if self.rotation is None else self.inputs @ self.rotation.T

    def simplicity_kwargs(self) -> dict:
        """Arguments for ``simplicity_bias`` and the ``SimplicityBias`` probe on these data."""
        if not self.simple_coords or not self.complex_coords:
            raise ValueError(f"coordinates of kinds {sorted(set(map(str, self.kinds)))} have no simple/complex split "
                             "(simple: the linear coordinates, else those with the fewest slabs); pass "
                             "simple_coords and complex_coords yourself")
        return {"simple_coords": self.simple_coords, "complex_coords": self.complex_coords,
                "rotation": self.rotation}


def slab_width(num_slabs: int, width: float = 1.0, margin: float = 0.1) -> float:
    """``s_k = (2w - 2(k - 1) gamma) / k`` with ``gamma = margin * width`` (``margin`` is relative)."""
    _check_slab(num_slabs, width, margin)
    gamma = margin * width
    return (2 * width - 2 * (num_slabs - 1) * gamma) / num_slabs


def slab_intervals(num_slabs: int, width: float = 1.0, margin: float = 0.1) -> list[tuple[float, float, int]]:
    """Every slab as ``(low, high, label)``, left to right, tiling ``[-w, w]`` with gaps ``2 gamma``."""
    s = slab_width(num_slabs, width, margin)
    gamma = margin * width
    half = num_slabs // 2
    out = []
    for i in range(num_slabs):
        low = -width + i * (s + 2 * gamma)
        out.append((low, low + s, abs(i - half) % 2))
    return out


def slab_labels(values: Tensor, num_slabs: int, width: float = 1.0, margin: float = 0.1) -> Tensor:
    """The slab rule: the label of the nearest slab (``j mod 2`` for the ``j``-th slab from the centre)."""
    s = slab_width(num_slabs, width, margin)
    pitch = s + 2 * margin * width  # distance between neighbouring slab centres
    j = torch.round(values.abs() / pitch).clamp(max=num_slabs // 2)
    return (j.long() % 2)


def _check_slab(num_slabs: int, width: float, margin: float) -> None:
    if num_slabs not in SLAB_COUNTS:
        raise ValueError(f"num_slabs must be 3, 5 or 7 (the generator's slab layouts), got {num_slabs!r}")
    if not (isinstance(width, (int, float)) and width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if not (isinstance(margin, (int, float)) and 0 < margin and (num_slabs - 1) * margin < 1):
        raise ValueError(f"slab margin must be in (0, 1/{num_slabs - 1}) (relative to the width) so that "
                         f"{num_slabs} slabs fit, got {margin!r}")


def _sign(n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1


def linear_coordinate(targets: Tensor, width: float = 1.0, margin: float = 0.1,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """``(2y - 1)(gamma + (w - gamma) U)`` with ``gamma = margin * width`` (float64)."""
    if not (isinstance(margin, (int, float)) and 0 < margin < 1):
        raise ValueError(f"linear margin must be in (0, 1) (relative to the width), got {margin!r}")
    if not (isinstance(width, (int, float)) and width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a positive number, got {width!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    gamma = margin * width
    u = torch.rand(targets.shape[0], generator=g, dtype=torch.float64)
    return (2 * targets.double() - 1) * (gamma + (width - gamma) * u)


def slab_coordinate(targets: Tensor, num_slabs: int = 5, width: float = 1.0, margin: float = 0.1,
                    p5: float = 3 / 4, p7: float = 7 / 8, generator: Optional[torch.Generator] = None) -> Tensor:
    """A k-slab coordinate for labels ``targets`` (float64); see the module docstring for the layout.

    ``p5``: probability that a class-0 example of a 5-slab coordinate is in the centre slab;
    ``p7``: probability that a class-1 example of a 7-slab coordinate is in the inner slabs.
    """
    _check_slab(num_slabs, width, margin)
    for name, p in (("p5", p5), ("p7", p7)):
        if not (isinstance(p, (int, float)) and 0 <= p <= 1):
            raise ValueError(f"{name} must be a probability, got {p!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    s = slab_width(num_slabs, width, margin)
    gamma = margin * width
    n = targets.shape[0]
    y = targets.long().cpu()
    # The distance j (in slabs) from the centre of the slab each example falls in.
    coin = torch.rand(n, generator=g, dtype=torch.float64)
    if num_slabs == 3:
        j = y.clone()
    elif num_slabs == 5:
        j = torch.where(y == 1, torch.ones_like(y), torch.where(coin < p5, 0, 2))
    else:
        j = torch.where(y == 1, torch.where(coin < p7, 1, 3), torch.where(coin < 0.5, 0, 2))
    u = torch.rand(n, generator=g, dtype=torch.float64)
    side = _sign(n, g)
    jf = j.double()
    # Centre slab: uniform on [-s/2, s/2]; slab j >= 1: side * [(j - 1/2)s + 2j gamma, (j + 1/2)s + 2j gamma].
    low = torch.where(j == 0, torch.zeros_like(jf), (jf - 0.5) * s + 2 * jf * gamma)
    extent = torch.where(j == 0, torch.full_like(jf, s / 2), torch.full_like(jf, s))
    return side * (low + extent * u)


def random_rotation(dim: int, generator: Optional[torch.Generator] = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """A random orthonormal ``dim x dim`` matrix (QR of a Gaussian matrix, signs fixed: Haar-distributed)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.to(dtype)


def make_slab_data(
    n: int,
    kinds: Sequence[Kind],
    *,
    width: float = 1.0,
    linear_margin: float = 0.1,
    slab_margin: float = 0.1,
    p5: float = 3 / 4,
    p7: float = 7 / 8,
    corrupt_linear: float = 0.0,
    corrupt_linear_into_margin: bool = False,
    rotate: bool = False,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> LMSData:
    """``n`` examples whose coordinate ``i`` is of kind ``kinds[i]`` (``"linear"``, 3, 5, 7 or ``"noise"``).

    The simple coordinates are the linear ones, or (with none) the coordinates with the fewest
    slabs; the complex ones are the other designated coordinates (noise is in neither). With one
    kind of slab only, no coordinate is simple (both sets are empty or all complex).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError("kinds is empty: give the kind of every coordinate")
    for k in kinds:
        if k not in ("linear", "noise") and (isinstance(k, bool) or k not in SLAB_COUNTS):
            raise ValueError(f"each kind must be 'linear', 'noise' or a slab count 3, 5 or 7; got {k!r}")
    if not (isinstance(corrupt_linear, (int, float)) and 0 <= corrupt_linear <= 1):
        raise ValueError(f"corrupt_linear must be a fraction in [0, 1], got {corrupt_linear!r}")
    if not (isinstance(width, (int, float)) and width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a positive number, got {width!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, len(kinds), generator=g, dtype=torch.float64) * width  # noise everywhere first
    for i, kind in enumerate(kinds):
        if kind == "linear":
            column = linear_coordinate(targets, width, linear_margin, g)
            count = int(round(n * corrupt_linear))
            if count:
                chosen = torch.randperm(n, generator=g)[:count]
                if corrupt_linear_into_margin:
                    gamma = linear_margin * width
                    column[chosen] = (2 * torch.rand(count, generator=g, dtype=torch.float64) - 1) * gamma
                else:
                    column[chosen] = -column[chosen]
            x[:, i] = column
        elif kind != "noise":
            x[:, i] = slab_coordinate(targets, kind, width, slab_margin, p5, p7, g)
    designated = [i for i, k in enumerate(kinds) if k != "noise"]
    linear = [i for i in designated if kinds[i] == "linear"]
    slab_counts = {kinds[i] for i in designated if kinds[i] != "linear"}
    if linear:
        simple = linear
    elif len(slab_counts) > 1:
        simple = [i for i in designated if kinds[i] == min(slab_counts)]
    else:  # one kind only: no coordinate is simpler than another
        simple = []
    complex_ = [i for i in designated if i not in simple]
    rotation = None
    if rotate:
        rotation = random_rotation(len(kinds), g, torch.float64)
        x = x @ rotation
        rotation = rotation.to(dtype)
    return LMSData(x.to(dtype), targets, kinds, tuple(simple), tuple(complex_), rotation, float(width),
                   float(linear_margin), float(slab_margin))


def make_lms(n: int, dim: int = 20, num_slabs: int = 5, **kwargs) -> LMSData:
    """LMS-k: coordinate 0 linear, coordinates ``1 .. dim-1`` k-slab (Shah et al.'s LMS-5 by default).

    Keyword arguments go to :func:`make_slab_data` (``width``, margins, ``corrupt_linear``, ``rotate``,
    ``seed``...).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2 (one linear and at least one slab coordinate), got {dim!r}")
    return make_slab_data(n, ("linear",) + (num_slabs,) * (dim - 1), **kwargs)


def make_ms(n: int, dim: int = 20, simple_slabs: int = 5, complex_slabs: int = 7, **kwargs) -> LMSData:
    """MS-(5,7): coordinate 0 five-slab (the simple one), the others seven-slab."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
    if not simple_slabs < complex_slabs:
        raise ValueError("simple_slabs must be fewer than complex_slabs")
    return make_slab_data(n, (simple_slabs,) + (complex_slabs,) * (dim - 1), **kwargs)
