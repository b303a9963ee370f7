"""Anomalous diffusion of the weights over training (Kunin et al. 2021)."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..functional.diffusion import loglog_line
from ._data import ProbeSet
from .base import ProbeLogic, ProbeSkipped


FIT_POINTS_PER_DECADE = 32
_FIT_SPACING = 10.0 ** (1.0 / FIT_POINTS_PER_DECADE)


_BLOCK = 256  # entries per partial sum of squares (see _norms)
# Entries of one chunk of a large model's measurement: its working buffer is 3 rows of this many
# (12 MiB in float32), kept while training; a parameter larger than a chunk is read in slices.
_CHUNK = 1 << 20
_GROUP_ELEMENTS = _CHUNK  # a run of same-dtype tensors flattened into one buffer fills at most a chunk
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# A model whose measurement's working buffers (3 rows of its trainable entries) fit in this many bytes
# keeps them between points (2.8M float32 entries, 1.4M float64); a larger one is measured in chunks.
_RESIDENT_BYTES = 32 << 20

# What the step about to be taken ends at (see _copy_due).
_NOT_MEASURED, _SCHEDULED, _FORCED = 0, 1, 2


def _groups(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """Index ranges ``[start, stop)`` of consecutive same-dtype tensors, each range at most
    ``_GROUP_ELEMENTS`` entries (or one tensor): the unit that is flattened into one buffer."""
    ranges, start = [], 0
    while start < len(tensors):
        stop, size = start, 0
        while stop < len(tensors) and (stop == start or (size + tensors[stop].numel() <= _GROUP_ELEMENTS
                                                         and tensors[stop].dtype == tensors[start].dtype)):
            size += tensors[stop].numel()
            stop += 1
        ranges.append((start, stop))
        start = stop
    return ranges


def _padded_length(tensors: list[Tensor]) -> int:
    n = sum(t.numel() for t in tensors)
    return n + (-n % _BLOCK)


def _flatten_into(out: Tensor, tensors: list[Tensor]) -> Tensor:
    """Write the tensors' entries one after another into the 1-D ``out``, zeros after them."""
    n = sum(t.numel() for t in tensors)
    views = [t.detach().reshape(-1) for t in tensors]
    source = views[0].device
    if all(v.device == source for v in views):
        if source == out.device:
            torch.cat(views, out=out[:n])
        else:  # one transfer per group, not one per tensor
            out[:n].copy_(torch.cat(views))
    else:  # a model split over devices
        offset = 0
        for v in views:
            out[offset:offset + v.numel()].copy_(v)
            offset += v.numel()
    out[n:].zero_()
    return out


def _flat_copy(tensors: list[Tensor], device: torch.device) -> Tensor:
    """A flat copy of the tensors on ``device`` (their dtype), zero-padded to whole blocks."""
    out = torch.empty(_padded_length(tensors), dtype=tensors[0].dtype, device=device)
    return _flatten_into(out, tensors)


def _shaped_views(flat: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    """Views of the 1-D ``flat`` laid out as consecutive tensors of ``shapes``."""
    sizes = [math.prod(shape) for shape in shapes]
    return [piece.view(shape) for piece, shape in zip(flat[:sum(sizes)].split(sizes), shapes)]


def _norms(blocks: Tensor) -> Tensor:
    """Float64 ``[‖row‖]`` of ``blocks`` (rows, blocks, 256): the rows of a padded buffer.

    Each block of 256 squares is summed in the weights' dtype, the blocks' sums in float64:
    relative error ~1e-7 for float32 weights even when every rounding points the same way (tested),
    where a single float32 reduction was off by 1e-5 at 26k entries and 1e-3 at 1M (and a float64
    copy of the weights cost four times as much).
    """
    return torch.linalg.vector_norm(torch.linalg.vector_norm(blocks, dim=2), dim=1, dtype=torch.float64)


class _Resident:
    """The working buffer of one group, kept between measurements (small models only).

    Rows: 0 the weights at the measurement, 1 their difference from the reference, 2 the pre-step
    copy and then the update. The views let one ``_foreach_copy_`` fill a row from the parameters,
    and the zero padding is written once. Allocating the buffer at every point (fresh pages) cost
    more than the arithmetic on a small model.
    """

    __slots__ = ("scratch", "rows", "blocks", "current", "previous")

    def __init__(self, shapes: list[torch.Size], length: int, dtype: torch.dtype, device: torch.device) -> None:
        self.scratch = torch.zeros(3, length, dtype=dtype, device=device)
        # Views made once: on a small model each view made per point costs as much as a kernel.
        self.rows = self.scratch.unbind()
        self.blocks = {k: self.scratch[:k].view(k, -1, _BLOCK) for k in (2, 3)}
        self.current = _shaped_views(self.rows[0], shapes)
        self.previous = _shaped_views(self.rows[2], shapes)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision is widened: the difference of two of them is exact in float32.
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class WeightDiffusionLogic(ProbeLogic):
    r"""Logs the distance of the weights from a reference point and its diffusion exponent.

    Kunin, Sagastuy-Brena, Gillespie, Margalit, Tanaka, Ganguli, Yamins (2021), "Limiting Dynamics
    of SGD: Modified Loss, Phase Space Oscillations, and Anomalous Diffusion": after the loss has
    converged, SGD keeps moving the weights, and their distance from where they were grows as
    :math:`\lVert\theta_t - \theta_\text{ref}\rVert \propto t^c` with an exponent that depends on
    learning rate, batch size and momentum.

    Logs, with :math:`t` = global step − ``reference_step``:

    - ``distance``: :math:`\lVert\theta_t - \theta_\text{ref}\rVert` over every trainable parameter
      (buffers excluded), subtracted in the weights' dtype and accumulated in float64;
    - ``update_size``: :math:`\lVert\theta_t - \theta_{t-1}\rVert`, the size of the optimizer step
      that led to this point (0 at global step 0, before any step);
    - ``weight_norm``: :math:`\lVert\theta_t\rVert`;
    - ``exponent``, ``exponent_r2``: the slope :math:`c` of :math:`\log` distance against
      :math:`\log t`, least squares over the measured points of the last ``window`` decades of
      :math:`t` (a sliding window), and the fit's :math:`R^2`; ``fit_points`` and ``fit_t_start``
      say which points it used. The fit keeps at most 32 points per decade of :math:`t` (a point
      closer than a factor :math:`10^{1/32}` to the previous one is logged but not fitted), so late
      times do not dominate under an every-n-steps cadence and the fit's memory and cost stay
      bounded. Until ``min_points`` points with :math:`t \ge` ``t_min`` exist,
      ``exponent`` and ``exponent_r2`` are logged as 0 with ``fit_points`` below ``min_points``
      (filter on ``fit_points``). A random walk gives 1/2, a straight path 1; Kunin et al.'s
      exponent of the *squared* distance is twice this one.

    The exponent is meaningful at constant hyperparameters (learning-rate schedules break the
    stationarity it assumes); for the paper's setting, start at a converged checkpoint or name a
    late ``reference_step``.

    Memory: one copy of the trainable parameters (the reference, on ``reference_device``, CPU by
    default, kept flat: one buffer per run of same-dtype parameters of at most 1M entries, or per
    larger parameter). The per-step update needs the weights before the step: they are copied (in
    ``on_before_optimizer_step``) only before steps that will be measured — a scheduled step within
    the budget, the end of an epoch that is measured, the last epoch's last batch, ``max_steps``.
    A model whose working buffers (three rows of its entries: the weights, both differences) fit in
    32 MiB (2.8M float32 entries) keeps them between points and takes the pre-step copy into them;
    a larger one is measured a chunk of 1M entries at a time through one buffer of three such rows
    (12 MiB in float32) kept while training, and its pre-step copy is allocated at each point and
    freed at the measurement (that fresh memory costs more than the copy: 29 ms against 3 ms for
    17M float32 entries on our CPU).
    An end of training that cannot be foreseen (``max_time``, early stopping, a callback that stops
    mid-epoch) logs no ``update_size`` at that point.

    Numerics: differences in the weights' dtype (exact unless two entries differ by more than a
    factor 2, then rounded once; half precision is widened to float32 first), sums of squares in
    blocks of 256 in that dtype, the blocks' sums in float64: relative error ~1e-7 for float32
    weights (a single float32 reduction is off by 1e-5 at 26k parameters and 1e-3 at 1M), ~1e-16
    for float64 ones.

    Cost per measurement: one pass over the weights, the reference and (with the update size) the
    pre-step copy (:math:`O(P)`, plus a device-to-host copy when the reference is on the CPU and the
    model on a GPU); no forward or backward pass and no probe data. Between points, three checks
    per training step of about a microsecond each. Measured (``benchmarks/bench_dynamics.py``, one
    CPU thread): a measured step (pre-step copy + measurement) costs 0.082 of a plain training step
    of the demo MLP (26k parameters, 0.033 ms), 0.105 of one of a 1.1M-parameter MLP and 0.22 of one
    of a 17M-parameter MLP (44 ms, of which the measurement is 9 ms: in chunks; 95 ms before).

    Default cadence: log-spaced steps ``floor(5 * 1.25**k)`` (about 10 points per decade, enough
    for a log-log fit over a one-decade window), at the start and at the end, thinned by a budget:
    a scheduled point (and its pre-step copy) is skipped while the probe has spent more than 0.5 %
    of the training steps' time (``max_overhead=0.005``; its points, copies and logging count). The
    other half of the 1 % goal is for what no budget can skip: the checks at every step and the
    first and last points. Over Lightning fits of the demo task (TensorBoard, validation every
    epoch) the time inside the probe's hooks is 0.82 % of the 460-step demo (8 of its 23 log-spaced
    points made), 0.41 % of the same run 5x longer (15 of 30) and 0.70 % with a 1.1M-parameter MLP
    (9 of 23); on every log-spaced step without the budget it is 1.39 %, 0.49 % and 1.34 %. The
    points skipped are early ones: a measured step costs about a tenth of a training step (both are
    :math:`O(P)`, their ratio set mostly by the batch size), so the budget allows a point every 20
    steps or so, and log-spaced steps are that far apart only from about step 100 on. Pass
    ``log_spaced=1.25`` (an explicit schedule has no budget unless ``max_overhead`` is given) to
    make every point.

    The reference, the reference step and the fitted points are checkpoint state, so a resumed run
    continues the same curve from the same reference.

    Args:
        reference_step: global step whose weights are the reference (0: the initialization). Before
            it nothing is measured.
        window: decades of :math:`t` in the sliding fit window (None: every point since the reference).
        t_min: smallest :math:`t` used in the fit.
        min_points: points needed before an exponent is fitted (at least 3).
        reference_device: where the reference copy lives: ``"cpu"`` (default: costs no accelerator
            memory) or None for the model's own device (faster measurements on a GPU).
        **kwargs: cadence and failure policy, see :class:`ProbeLogic` (probe data is not used).
    """

    name = "diffusion"
    default_cadence = {"log_spaced": 1.25, "max_overhead": 0.005}
    needs_probe_set = False
    isolate = False  # reads weights only, under no_grad

    def __init__(
        self,
        reference_step: int = 0,
        window: Optional[float] = 1.0,
        t_min: float = 1.0,
        min_points: int = 3,
        reference_device: Union[str, torch.device, None] = "cpu",
        **kwargs: Any,
    ) -> None:
        if isinstance(reference_step, bool) or not isinstance(reference_step, int) or reference_step < 0:
            raise ValueError(f"reference_step must be a global step (integer >= 0), got {reference_step!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, (int, float))
                                   or not window > 0):
            raise ValueError(f"window must be a positive number of decades or None, got {window!r}")
        if isinstance(t_min, bool) or not isinstance(t_min, (int, float)) or not t_min > 0:
            raise ValueError(f"t_min must be a positive number of steps, got {t_min!r}")
        if isinstance(min_points, bool) or not isinstance(min_points, int) or min_points < 3:
            raise ValueError(f"min_points must be an integer >= 3 (a line through 2 points has no quality), "
                             f"got {min_points!r}")
        if reference_device is not None:
            try:
                reference_device = torch.device(reference_device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"reference_device must be a device (e.g. 'cpu') or None, got "
                                 f"{reference_device!r}") from err
        super().__init__(**kwargs)
        self.reference_step = reference_step
        self.window = None if window is None else float(window)
        self.t_min = float(t_min)
        self.min_points = min_points
        self.reference_device = reference_device
        self._names: Optional[list[str]] = None
        self._shapes: list[torch.Size] = []
        self._ranges: Optional[list[tuple[int, int]]] = None  # parameter groups, one flat buffer each
        self._reference: Optional[list[Tensor]] = None  # flat, one per group
        # (t, distance, log t, log distance) inside the fit window: logarithms taken once per point
        self._points: list[tuple[float, float, float, float]] = []
        self._resident: Optional[list[_Resident]] = None  # working buffers kept between points (small models)
        self._chunk_work: dict[tuple, Tensor] = {}  # a large model's: (dtype, device) -> 3 rows of _CHUNK
        # Weights before a measured step, per group: a flat copy, or None where the group's resident
        # buffer holds them.
        self._previous: Optional[list[Optional[Tensor]]] = None
        self._previous_params: Optional[list[Tensor]] = None
        self._previous_step = -1
        self._copy_seconds = 0.0
        self._owners: Optional[list[tuple[nn.Module, str]]] = None  # (submodule, attribute) per tracked name
        self._owners_of: Optional[nn.Module] = None
        self._global_zero = True
        self._limits = (-1, -1)  # the trainer's max_steps and max_epochs (-1: none)
        # Asked before every optimizer step: the next step a copy may be due at (the cadence's next
        # step or max_steps), and whether this epoch's end is measured.
        self._next_copy = 0
        self._epoch_end_copy = True
        self._declined_step = -1
        self.current_step = 0
        self._warned_no_reference = False

    def key_fields(self) -> dict:
        return {"reference_step": self.reference_step, "window": self.window, "t_min": self.t_min}

    @property
    def reference(self) -> Optional[dict[str, Tensor]]:
        """The reference weights ``{parameter name: tensor}``, or None before they are taken."""
        if self._reference is None:
            return None
        tensors: list[Tensor] = []
        for flat, (start, stop) in zip(self._reference, self._ranges):
            tensors += _shaped_views(flat, self._shapes[start:stop])
        return dict(zip(self._names, tensors))

    # ----------------------------------------------------------------- weights
    # The reference and the pre-step copy are kept flat, one 1-D buffer per group of same-dtype
    # parameters (bounded size): a measurement is then a few kernels per group, not a few per
    # parameter tensor, which on small models is most of its cost.
    def _device_for(self, module: nn.Module) -> torch.device:
        if self.reference_device is not None:
            return self.reference_device
        for p in module.parameters():
            return p.device
        return torch.device("cpu")

    @staticmethod
    def _copy(tensors: list[Tensor], ranges: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Flat copies of ``tensors``, one per index range."""
        return [_flat_copy(tensors[a:b], device) for a, b in ranges]

    def _set_reference(self, names: list[str], tensors: list[Tensor], device: torch.device) -> None:
        self._names = names
        self._shapes = [t.shape for t in tensors]
        self._ranges = _groups(tensors)
        self._reference = self._copy(tensors, self._ranges, device)
        self._make_resident()
        self._owners = self._owners_of = None

    def _make_resident(self) -> None:
        """Working buffers beside the reference, kept between points, if the model is small."""
        self._resident = None
        if sum(3 * r.numel() * _work_dtype(r.dtype).itemsize for r in self._reference) <= _RESIDENT_BYTES:
            self._resident = [_Resident(self._shapes[a:b], r.numel(), _work_dtype(r.dtype), r.device)
                              for r, (a, b) in zip(self._reference, self._ranges)]

    def capture_reference(self, module: nn.Module) -> None:
        """Take the module's current trainable parameters as the reference (one copy)."""
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameter to follow")
        self._set_reference([n for n, _ in trainable], [p for _, p in trainable], self._device_for(module))
        self._points = []

    def _tracked(self, module: nn.Module) -> list[Tensor]:
        """The module's parameters that the reference follows, in its order (checked by name and shape)."""
        if self._owners_of is module:  # a dictionary lookup per parameter, not a walk of the module tree
            tensors = [owner._parameters.get(attr) for owner, attr in self._owners]
            for t, shape in zip(tensors, self._shapes):
                if t is None or t.shape != shape:
                    break
            else:
                return tensors
        params = dict(module.named_parameters())
        missing = [n for n in self._names if n not in params]
        if missing:
            raise ProbeSkipped(f"the reference has parameters the model no longer has: {missing[:3]}; a checkpoint "
                               "of another model? Start a new curve with a new WeightDiffusion")
        tensors = [params[n] for n in self._names]
        for name, p, shape in zip(self._names, tensors, self._shapes):
            if p.shape != shape:
                raise ProbeSkipped(f"parameter {name} has shape {tuple(p.shape)}, the reference {tuple(shape)}")
        owners = []
        for name in self._names:
            path, _, attr = name.rpartition(".")
            owners.append((module.get_submodule(path), attr))
        self._owners, self._owners_of = owners, module
        return tensors

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Fixed for the fit, read at every step: kept here rather than asked of the trainer each time.
        self._global_zero = bool(trainer.is_global_zero)
        self._limits = (getattr(trainer, "max_steps", -1) or -1, getattr(trainer, "max_epochs", -1) or -1)
        self._next_copy = 0  # the first step asks _copy_due, which sets the next
        self._epoch_end_copy = True
        if not trainer.is_global_zero:
            self._reference = None  # only rank zero measures: no copy on the others
        elif self._reference is None:
            if trainer.global_step == self.reference_step:
                self.capture_reference(pl_module)
            elif trainer.global_step > self.reference_step and not self._warned_no_reference:
                self._warned_no_reference = True
                warnings.warn(
                    f"{type(self).__name__}: training starts at global step {trainer.global_step}, after "
                    f"reference_step={self.reference_step}, and no reference weights were restored from a "
                    "checkpoint; nothing will be measured. Resume from a checkpoint saved with this callback, "
                    f"or pass reference_step >= {trainer.global_step}.", RuntimeWarning, stacklevel=2)
        super().on_train_start(trainer, pl_module)

    def _copy_due(self, trainer: Any, upcoming: int) -> int:
        """What the step about to be taken ends at: ``_NOT_MEASURED``, a ``_SCHEDULED`` point (the
        budget may skip it) or the end of training (``_FORCED``: the ``at_end`` point)."""
        if upcoming < self.reference_step or (self._reference is None and upcoming > self.reference_step):
            return _NOT_MEASURED
        cadence = self.cadence
        max_steps, max_epochs = self._limits
        if cadence.at_end and 0 < max_steps <= upcoming:
            return _FORCED
        final_epoch = cadence.at_end and 0 < max_epochs <= trainer.current_epoch + 1
        last_batch = (final_epoch or cadence.every_n_epochs is not None) and bool(getattr(trainer, "is_last_batch", False))
        if last_batch and final_epoch:
            return _FORCED
        if cadence.due_at_step(upcoming) or (last_batch and cadence.due_at_epoch_end(trainer.current_epoch)):
            return _SCHEDULED
        return _NOT_MEASURED

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        cadence, max_epochs = self.cadence, self._limits[1]
        final_epoch = cadence.at_end and 0 < max_epochs <= trainer.current_epoch + 1
        self._epoch_end_copy = final_epoch or cadence.due_at_epoch_end(trainer.current_epoch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._previous is not None:  # a copy nobody measured (the run did not end where foreseen)
            self._previous, self._previous_step, self._previous_params = None, -1, None
        if not self._global_zero:
            return
        upcoming = self._global_step.read(trainer) + 1
        # The usual answer at a step (no copy) is one comparison; the full check runs at the steps it
        # may be yes, and says where to look next.
        if upcoming < self._next_copy and not (self._epoch_end_copy and trainer.is_last_batch):
            return
        due = self._copy_due(trainer, upcoming)
        if due == _FORCED or (due == _SCHEDULED and self.cadence.within_budget(self._probe_seconds,
                                                                               self._train_seconds)):
            self.copy_before_step(pl_module, upcoming)
        elif due == _SCHEDULED:
            self._declined_step = upcoming  # over the budget: neither the copy nor the point
        if upcoming >= self._next_copy:
            following = self.cadence.next_due_step(upcoming)
            max_steps = self._limits[0]
            if max_steps > upcoming and (following is None or following > max_steps):
                following = max_steps
            self._next_copy = following if following is not None else math.inf

    def copy_before_step(self, module: nn.Module, step: int) -> None:
        """Copy the weights before the optimizer step that ends at global step ``step``, for the update
        size measured there (the callback does this itself, only before steps it will measure)."""
        started = time.perf_counter()
        if self._reference is None:  # the step that ends at the reference point
            tensors = [p for p in module.parameters() if p.requires_grad]
            self._previous = self._copy(tensors, _groups(tensors), self._device_for(module))
        else:
            try:
                tensors = self._tracked(module)
            except ProbeSkipped:
                return  # the measurement reports it
            if self._resident is not None and tensors[0].device == self._resident[0].scratch.device:
                with torch.no_grad():
                    for resident, (a, b) in zip(self._resident, self._ranges):
                        torch._foreach_copy_(resident.previous, tensors[a:b])
                self._previous = [None] * len(self._ranges)
            else:
                self._previous = self._copy(tensors, self._ranges, self._device_for(module))
        # The optimizer updates these tensors in place: the measurement after the step reads them
        # without looking the parameters up again.
        self._previous_params, self._previous_step = tensors, step
        # The copy is part of the point's cost: in the budget now, in its logged seconds later.
        self._copy_seconds = time.perf_counter() - started
        self.spend(self._copy_seconds)

    def run_measurement(self, module: nn.Module, step: int) -> Optional[dict[str, float]]:
        copied = self._copy_seconds if self._previous_step == step else 0.0
        values = super().run_measurement(module, step)
        if values is not None:
            values["seconds"] += copied
        return values

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._reference is None and self._global_zero and trainer.global_step == self.reference_step:
            self.capture_reference(pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        self._previous, self._previous_step, self._previous_params = None, -1, None
        self._owners = self._owners_of = None  # no reference to the model after the fit
        self._chunk_work.clear()  # a large model's working buffer is not kept after training

    def claim_step(self, step: int, force: bool = False) -> bool:
        if step == self._previous_step:
            force = True  # the weights before this step were copied for it: measured whatever the budget says now
        elif step == self._declined_step and not force:
            self._declined_step = -1
            self.skipped_for_budget += 1
            return False
        return super().claim_step(step, force)

    def should_measure(self, trainer: Any, pl_module: Any) -> bool:
        # Nothing to measure against: before the reference step, or (warned at train start) a run that
        # began after it without a restored reference.
        return trainer.global_step >= self.reference_step and self._reference is not None

    # ----------------------------------------------------------------- the measurement
    def measure(self, module: nn.Module, probe: Optional[ProbeSet]) -> dict:
        if self._reference is None:
            raise ProbeSkipped(f"no reference weights (reference_step={self.reference_step} has not been reached "
                               "or was not restored)")
        device = self._device_for(module)
        if self._reference[0].device != device:  # restored from a checkpoint onto another device
            self._reference = [r.to(device) for r in self._reference]
            self._make_resident()
        previous = self._previous if self._previous_step == self.current_step else None
        params = self._previous_params if previous is not None else self._tracked(module)
        self._previous, self._previous_step, self._previous_params = None, -1, None  # used once
        with torch.no_grad():
            norms = self._norms(params, previous).tolist()
        weight_norm, distance = norms[0], norms[1]
        if not (math.isfinite(distance) and math.isfinite(weight_norm)):
            raise FloatingPointError("the weights are not finite")
        t = float(self.current_step - self.reference_step)
        values = {"distance": distance, "weight_norm": weight_norm}
        if previous is not None:
            values["update_size"] = norms[2]
        elif self.current_step == 0:
            values["update_size"] = 0.0  # before the first optimizer step
        values.update(self._fit(t, distance))
        return values

    def _norms(self, params: list[Tensor], previous: Optional[list[Optional[Tensor]]]) -> Tensor:
        """Float64 ``[‖θ‖, ‖θ - θ_ref‖]`` and, with ``previous``, ``‖θ - θ_prev‖``, over all groups.

        A few kernels per group or chunk whatever the number of tensors: the weights, both
        differences and the three sums of squares go through one working buffer. Differences are
        taken in the weights' dtype (exact unless the two differ by more than a factor 2, then
        rounded once).
        """
        k = 2 if previous is None else 3
        norms: list[Tensor] = []
        for i, (start, stop) in enumerate(self._ranges):
            tensors, reference = params[start:stop], self._reference[i]
            resident = self._resident[i] if self._resident is not None else None
            if resident is not None and (tensors[0].device == reference.device
                                         or (previous is not None and previous[i] is None)):
                rows = resident.rows
                torch._foreach_copy_(resident.current, tensors)  # the padding stays zero
                torch.sub(rows[0], reference, out=rows[1])
                if previous is not None:
                    if previous[i] is None:  # the pre-step copy is in the resident buffer's row 2
                        rows[2].sub_(rows[0])
                    else:
                        torch.sub(rows[0], previous[i], out=rows[2])
                norms.append(_norms(resident.blocks[k]))
            else:
                norms += self._chunk_norms(tensors, reference, None if previous is None else previous[i], k)
        if len(norms) == 1:
            return norms[0]
        return torch.stack(norms).square().sum(0).sqrt()

    def _chunk_norms(self, tensors: list[Tensor], reference: Tensor, previous: Optional[Tensor],
                     k: int) -> list[Tensor]:
        """The row norms of a group of a large model, a chunk at a time through one kept buffer.

        Its three rows of ``_CHUNK`` entries stay in cache between the copy, the subtractions and
        the sums, and no memory is allocated per point: on a 17M-parameter MLP a measurement took
        95 ms with the whole group's rows allocated at each point, 12 ms in chunks.
        """
        dtype = _work_dtype(reference.dtype)
        key = (dtype, reference.device)
        if key not in self._chunk_work:
            self._chunk_work[key] = torch.empty(3, _CHUNK, dtype=dtype, device=reference.device)
        scratch, length = self._chunk_work[key], reference.numel()
        if len(tensors) > 1:  # a run of small tensors: one chunk (a group fills at most one)
            if length > _CHUNK:  # only if _GROUP_ELEMENTS was raised above _CHUNK
                scratch = torch.empty(3, length, dtype=dtype, device=reference.device)
            rows = scratch[:k, :length]
            _flatten_into(rows[0], tensors)
            torch.sub(rows[0], reference, out=rows[1])
            if previous is not None:
                torch.sub(rows[0], previous, out=rows[2])
            return [_norms(rows.view(k, -1, _BLOCK))]
        flat = tensors[0].detach().reshape(-1)  # a view unless the tensor is not contiguous
        size, norms = flat.numel(), []
        for begin in range(0, length, _CHUNK):
            end = min(begin + _CHUNK, length)
            filled = min(end, size) - begin
            rows = scratch[:k, :end - begin]
            rows[0, :filled].copy_(flat[begin:begin + filled])
            if filled < end - begin:  # the padding of the last chunk
                rows[0, filled:].zero_()
            torch.sub(rows[0], reference[begin:end], out=rows[1])
            if previous is not None:
                torch.sub(rows[0], previous[begin:end], out=rows[2])
            norms.append(_norms(rows.view(k, -1, _BLOCK)))
        return norms

    def _fit(self, t: float, distance: float) -> dict[str, float]:
        """Add ``(t, distance)`` to the sliding window and fit its log-log line (reused while unchanged)."""
        # The fit keeps log-spaced points only (at most FIT_POINTS_PER_DECADE per decade of t): late
        # times are not overweighted under an every-n-steps cadence, and memory and fit cost stay
        # bounded however often the probe measures. Points enter in increasing t (each at least a
        # factor above the last), so the window is trimmed from the front.
        points = self._points
        if t >= self.t_min and distance > 0 and (not points or t >= points[-1][0] * _FIT_SPACING):
            points.append((t, distance, math.log(t), math.log(distance)))
        if self.window is not None and points:
            cut = points[-1][0] / 10.0**self.window
            first = 0
            while points[first][0] < cut:
                first += 1
            del points[:first]
        usable = len(points)
        if usable < self.min_points:
            return {"exponent": 0.0, "exponent_r2": 0.0, "fit_points": usable, "fit_t_start": 0.0}
        # The fit changes only when a point enters or leaves the window: between such points (most
        # measurements of a dense cadence) the last fit is reused. The points are those
        # diffusion_exponent would keep (t >= t_min, positive, in the window), so the line is
        # fitted directly, without its checks.
        key = (points[0], points[-1], usable)
        cached = self.__dict__.get("_fit_cache")
        if cached is None or cached[0] != key:
            slope, _, r2, _ = loglog_line([p[2] for p in points], [p[3] for p in points])
            cached = self.__dict__["_fit_cache"] = (key, {"exponent": slope, "exponent_r2": r2,
                                                          "fit_points": usable, "fit_t_start": points[0][0]})
        return cached[1]

    # ----------------------------------------------------------------- checkpoint state
    def extra_state(self) -> dict:
        if self._reference is None:
            return {}
        return {
            "reference_step": self.reference_step,
            "names": list(self._names),
            # Per parameter (views of the flat buffers: torch.save writes each buffer once), so a
            # checkpoint does not depend on how the parameters are grouped.
            "reference": [r.cpu() for r in self.reference.values()],
            "points": [[p[0], p[1]] for p in self._points],
        }

    def load_extra_state(self, state: dict) -> None:
        if not state or state.get("reference") is None:
            return
        if state.get("reference_step", self.reference_step) != self.reference_step:
            raise ValueError(f"the checkpoint's reference is step {state['reference_step']}, this "
                             f"{type(self).__name__} has reference_step={self.reference_step}")
        device = self.reference_device or torch.device("cpu")  # the model's device is set at the first copy
        self._set_reference(list(state["names"]), list(state["reference"]), device)
        self._points = [(float(t), float(d), math.log(t), math.log(d)) for t, d in state.get("points", [])]
