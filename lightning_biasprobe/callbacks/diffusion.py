"""Anomalous diffusion of the weights over training (Kunin et al. 2021)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..functional.diffusion import loglog_line
from ._data import ProbeSet
from .base import ProbeLogic, ProbeSkipped


FIT_POINTS_PER_DECADE = 32


_GROUP_ELEMENTS = 1 << 24  # 64 MiB of float32 differences alive at a time, whatever the model size


def _sums_of_squares(tensors: list[Tensor], *minus: list[Tensor]) -> list[float]:
    """``[Σ x², Σ (x - m₁)², ...]`` over every entry of ``tensors`` (per-tensor norms, summed in float64).

    One fused norm kernel per group of tensors for all the sums together (a per-tensor loop costs a
    dispatch per tensor, most of a measurement on models with hundreds of parameter tensors), and
    the groups are sized so that the temporary differences stay bounded whatever the model size.
    """
    totals = torch.zeros(1 + len(minus), dtype=torch.float64)
    start = 0
    while start < len(tensors):
        stop, size = start, 0
        while stop < len(tensors) and (stop == start or size + tensors[stop].numel() <= _GROUP_ELEMENTS):
            size += tensors[stop].numel()
            stop += 1
        group = tensors[start:stop]
        parts = list(group)
        for m in minus:
            parts += torch._foreach_sub(group, m[start:stop])
        # Each tensor's norm in its own dtype (PyTorch reduces with cascade summation: relative error
        # ~eps log n; a float64 upcast doubled the cost), combined across tensors in float64.
        norms = torch.stack(torch._foreach_norm(parts, 2)).double().view(1 + len(minus), -1)
        totals += norms.square().sum(dim=1).cpu()
        start = stop
    return totals.tolist()


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
    default) and, only around measurement points, a second one: the per-step update needs the
    weights before the step, so they are copied (in ``on_before_optimizer_step``) only before steps
    that will be measured — a scheduled step, the last batch of an epoch, ``max_steps`` — and freed
    at the next step. An end of training that cannot be foreseen (``max_time``, a callback that
    stops mid-epoch) logs no ``update_size`` at that point.

    Cost per measurement: reading the weights once (:math:`O(P)`, plus a device-to-host copy when
    the reference is on the CPU and the model on a GPU); no forward or backward pass and no probe
    data. On the demo MLP (26k parameters) about 0.2-0.5 ms, half of it the base class's isolation
    guard; with the default cadence about 2 % of the demo's (tiny, 2-3 ms) training steps, far less
    on models whose steps cost more than reading their weights (``benchmarks/bench_dynamics.py``).
    Default cadence: log-spaced steps (``floor(5 * 1.15**k)``: dense early, about 16 points per
    decade, which is what a log-log fit wants), at the start and at the end.

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
    default_cadence = {"log_spaced": True}
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
        self._reference: Optional[list[Tensor]] = None
        self._points: list[tuple[float, float]] = []  # (t, distance) inside the fit window
        self._previous: Optional[list[Tensor]] = None
        self._previous_step = -1
        self.current_step = 0
        self._warned_no_reference = False

    def key_fields(self) -> dict:
        return {"reference_step": self.reference_step, "window": self.window, "t_min": self.t_min}

    @property
    def reference(self) -> Optional[dict[str, Tensor]]:
        """The reference weights ``{parameter name: tensor}``, or None before they are taken."""
        if self._reference is None:
            return None
        return dict(zip(self._names, self._reference))

    # ----------------------------------------------------------------- weights
    def _device_for(self, module: nn.Module) -> torch.device:
        if self.reference_device is not None:
            return self.reference_device
        for p in module.parameters():
            return p.device
        return torch.device("cpu")

    def _copy(self, module: nn.Module, names: list[str]) -> list[Tensor]:
        params = dict(module.named_parameters())
        device = self._device_for(module)
        return [params[n].detach().to(device, copy=True) for n in names]

    def capture_reference(self, module: nn.Module) -> None:
        """Take the module's current trainable parameters as the reference (one copy)."""
        self._names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameter to follow")
        self._reference = self._copy(module, self._names)
        self._points = []

    def _tracked(self, module: nn.Module) -> list[Tensor]:
        params = dict(module.named_parameters())
        missing = [n for n in self._names if n not in params]
        if missing:
            raise ProbeSkipped(f"the reference has parameters the model no longer has: {missing[:3]}; a checkpoint "
                               "of another model? Start a new curve with a new WeightDiffusion")
        tensors = [params[n] for n in self._names]
        for name, p, r in zip(self._names, tensors, self._reference):
            if p.shape != r.shape:
                raise ProbeSkipped(f"parameter {name} has shape {tuple(p.shape)}, the reference {tuple(r.shape)}")
        return tensors

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
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

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._previous, self._previous_step = None, -1
        if not trainer.is_global_zero:
            return
        upcoming = trainer.global_step + 1
        if upcoming < self.reference_step or (self._reference is None and upcoming > self.reference_step):
            return
        max_steps = getattr(trainer, "max_steps", -1)
        if (self.cadence.due_at_step(upcoming) or getattr(trainer, "is_last_batch", False)
                or (max_steps is not None and max_steps > 0 and upcoming >= max_steps)):
            names = self._names or [n for n, p in pl_module.named_parameters() if p.requires_grad]
            self._previous, self._previous_step = self._copy(pl_module, names), upcoming

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.is_global_zero and self._reference is None and trainer.global_step == self.reference_step:
            self.capture_reference(pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        self._previous, self._previous_step = None, -1

    def should_measure(self, trainer: Any, pl_module: Any) -> bool:
        # Nothing to measure against: before the reference step, or (warned at train start) a run that
        # began after it without a restored reference.
        return trainer.global_step >= self.reference_step and self._reference is not None

    # ----------------------------------------------------------------- the measurement
    def measure(self, module: nn.Module, probe: Optional[ProbeSet]) -> dict:
        if self._reference is None:
            raise ProbeSkipped(f"no reference weights (reference_step={self.reference_step} has not been reached "
                               "or was not restored)")
        params = self._tracked(module)
        device = self._device_for(module)
        if self._reference[0].device != device:  # restored from a checkpoint onto another device
            self._reference = [r.to(device) for r in self._reference]
        previous = self._previous if self._previous_step == self.current_step else None
        with torch.no_grad():
            # One fused kernel per quantity over all tensors (a per-tensor loop costs a dispatch
            # per tensor: most of a measurement on models with hundreds of parameter tensors).
            # Differences in the weights' own dtype (the reference is an exact copy of them),
            # norms accumulated in float64.
            x = [p.detach() if p.device == device else p.detach().to(device) for p in params]
            if previous is not None:
                norm2, dist2, upd2 = _sums_of_squares(x, self._reference, previous)
            else:
                (norm2, dist2), upd2 = _sums_of_squares(x, self._reference), 0.0
        distance, weight_norm = math.sqrt(dist2), math.sqrt(norm2)
        if not (math.isfinite(distance) and math.isfinite(weight_norm)):
            raise FloatingPointError("the weights are not finite")
        t = float(self.current_step - self.reference_step)
        values = {"distance": distance, "weight_norm": weight_norm}
        if previous is not None:
            values["update_size"] = math.sqrt(upd2)
        elif self.current_step == 0:
            values["update_size"] = 0.0  # before the first optimizer step
        # The fit keeps log-spaced points only (at most FIT_POINTS_PER_DECADE per decade of t): late
        # times are not overweighted under an every-n-steps cadence, and memory and fit cost stay
        # bounded however often the probe measures.
        last = self._points[-1][0] if self._points else 0.0
        if t >= self.t_min and distance > 0 and t >= last * 10.0 ** (1.0 / FIT_POINTS_PER_DECADE):
            self._points.append((t, distance))
        if self.window is not None and self._points:
            latest = max(s for s, _ in self._points)
            self._points = [(s, d) for s, d in self._points if s >= latest / 10.0**self.window]
        usable = len(self._points)
        if usable >= self.min_points:
            # The fit changes only when a point enters or leaves the window: between such points
            # (most measurements of a dense cadence) the last fit is reused.
            # The points are those diffusion_exponent would keep (t >= t_min, positive, in the
            # window), so the line is fitted directly, without its checks.
            key = (self._points[0], self._points[-1], usable)
            cached = self.__dict__.get("_fit_cache")
            if cached is None or cached[0] != key:
                points = np.asarray(self._points, dtype=np.float64)
                slope, _, r2, _ = loglog_line(np.log(points[:, 0]), np.log(points[:, 1]))
                cached = self.__dict__["_fit_cache"] = (key, (slope, r2, float(points[:, 0].min())))
            slope, r2, t_start = cached[1]
            values.update(exponent=slope, exponent_r2=r2, fit_points=usable, fit_t_start=t_start)
        else:
            values.update(exponent=0.0, exponent_r2=0.0, fit_points=usable, fit_t_start=0.0)
        return values

    # ----------------------------------------------------------------- checkpoint state
    def extra_state(self) -> dict:
        if self._reference is None:
            return {}
        return {
            "reference_step": self.reference_step,
            "names": list(self._names),
            "reference": [r.cpu() for r in self._reference],
            "points": [[t, d] for t, d in self._points],
        }

    def load_extra_state(self, state: dict) -> None:
        if not state or state.get("reference") is None:
            return
        if state.get("reference_step", self.reference_step) != self.reference_step:
            raise ValueError(f"the checkpoint's reference is step {state['reference_step']}, this "
                             f"{type(self).__name__} has reference_step={self.reference_step}")
        device = self.reference_device or torch.device("cpu")  # the model's device is set at the first copy
        self._names = list(state["names"])
        self._reference = [r.to(device) for r in state["reference"]]
        self._points = [(float(t), float(d)) for t, d in state.get("points", [])]
