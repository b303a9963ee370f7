"""Accumulating a probe's statistics over whole validation epochs, on every DDP rank.

``ValidationAccumulation`` is mixed into a :class:`ProbeLogic` (before it) by the representation
probes (``EffectiveRank(data="val")``, ``EffectiveDepth(heldout="val")``); ``SumStatistics`` is the
torchmetrics ``Metric`` of sums whose ``compute()`` is the DDP reduction.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from ._guard import isolated
from .._names import short_names
from .base import ProbeSkipped, module_device


class SumStatistics(Metric):
    """A torchmetrics ``Metric`` whose states are sums of tensors (``dist_reduce_fx="sum"``).

    ``template`` gives the names and shapes; ``update({name: tensor})`` adds; ``compute()`` returns
    the (DDP-reduced) sums. Every rank must call ``compute()``: it is a collective.
    """

    full_state_update = False

    def __init__(self, template: dict[str, Tensor]) -> None:
        super().__init__()
        self._fields = list(template)
        # torchmetrics squeezes one-element results of compute(): restore the shapes with these.
        self.shapes = {name: tuple(value.shape) for name, value in template.items()}
        for i, (name, value) in enumerate(template.items()):
            self.add_state(f"s{i}", default=torch.zeros_like(value, dtype=torch.float64, device="cpu"),
                           dist_reduce_fx="sum")

    def update(self, values: dict[str, Tensor]) -> None:  # type: ignore[override]
        for i, name in enumerate(self._fields):
            if name in values:
                current = getattr(self, f"s{i}")
                setattr(self, f"s{i}", current + values[name].to(device=current.device, dtype=torch.float64))

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return {name: getattr(self, f"s{i}") for i, name in enumerate(self._fields)}


class ValidationAccumulation:
    """Accumulating a measurement over every validation batch, on every rank (mixed into a ProbeLogic).

    The extension point for probes whose data is a whole validation epoch: a subclass implements
    ``_accumulates``, ``_plan``, ``_template``, ``_contribution`` and ``_finish`` (below) and lists
    this mixin before :class:`ProbeLogic`; cadence, the DDP collectives, timing, the failure policy
    and logging are done here and in the base.

    When validation runs (not the sanity check) and the probe's cadence has passed a point since
    the last such measurement, rank zero prepares a plan (layers, class means or widths) under
    the isolation guard and broadcasts it; every rank then adds each validation batch's
    contribution to a :class:`SumStatistics` metric, and at the end of the validation epoch every
    rank calls ``compute()`` (the DDP reduction) and rank zero logs, at the current global step.
    Only the first validation dataloader is used. A failure on any rank is counted in the sums, so
    no rank leaves the collective sequence; the point is then skipped (warn once) unless ``strict``.
    """

    _val_pending: bool = False
    _last_val_step: int = -1
    _acc: Optional[dict] = None

    # --- to implement --------------------------------------------------------------------------
    def _accumulates(self) -> bool:
        raise NotImplementedError

    def _base_measures(self) -> bool:
        """Whether the base class still measures on the probe set at cadence points."""
        return True

    def _plan(self, pl_module: nn.Module, step: int) -> dict:
        """Rank zero, under the guard: what every rank needs (picklable, CPU tensors)."""
        raise NotImplementedError

    def _template(self, plan: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    def _contribution(self, pl_module: nn.Module, plan: dict, inputs: Any, targets: Optional[Tensor]) -> dict:
        raise NotImplementedError

    def _finish(self, plan: dict, totals: dict[str, Tensor]) -> dict[str, float]:
        raise NotImplementedError

    # --- cadence ---------------------------------------------------------------------------------
    def _maybe_measure(self, trainer: Any, pl_module: Any, force: bool = False) -> None:
        # Every cadence point makes the next validation run a measurement point too.
        if trainer.global_step != self._last_val_step:
            self._val_pending = True
        if self._base_measures() or not self._accumulates():
            super()._maybe_measure(trainer, pl_module, force)  # type: ignore[misc]
        else:
            self._last_considered_step = trainer.global_step

    @staticmethod
    def _final_validation(trainer: Any) -> bool:
        """The validation at the end of the last epoch (or at ``max_steps``): the ``at_end`` point."""
        if not trainer.is_last_batch:
            return False
        max_epochs, max_steps = getattr(trainer, "max_epochs", None), getattr(trainer, "max_steps", -1)
        return (max_epochs not in (None, -1) and trainer.current_epoch >= max_epochs - 1) or \
            (max_steps not in (None, -1) and trainer.global_step >= max_steps)

    def _validation_due(self, trainer: Any) -> bool:
        if trainer.global_step == self._last_val_step:
            return False
        if self._val_pending:
            return True
        epoch_end = trainer.is_last_batch and self.cadence.due_at_epoch_end(trainer.current_epoch)
        return epoch_end or (self.cadence.at_end and self._final_validation(trainer))

    # --- hooks (every rank) --------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._acc = None
        if not self._accumulates() or trainer.sanity_checking:
            return
        started = time.perf_counter()
        plan = self._plan_on_rank_zero(trainer, pl_module) if trainer.is_global_zero else None
        plan = trainer.strategy.broadcast(plan, src=0)  # a collective: every rank, same order
        if plan is None:
            return
        template = dict(self._template(plan), failed=torch.zeros((), dtype=torch.float64))
        metric = SumStatistics(template).to(module_device(pl_module))
        self._acc = {"plan": plan, "metric": metric, "seconds": time.perf_counter() - started,
                     "step": trainer.global_step}
        self._on_plan(plan, pl_module)

    def _on_plan(self, plan: dict, pl_module: Any) -> None:
        pass

    def _plan_on_rank_zero(self, trainer: Any, pl_module: Any) -> Optional[dict]:
        if not self._validation_due(trainer) or self._probe is None:
            return None
        force = self.cadence.at_end and self._final_validation(trainer)  # at_end ignores the budget, as in the base
        if not force and not self.cadence.within_budget(self._probe_seconds, self._train_seconds):
            self.skipped_for_budget += 1
            return None
        step = trainer.global_step
        self._val_pending = False
        self._last_val_step = step
        self._last_attempted_step = step  # the base does not measure this step again at the epoch end
        self._last_considered_step = step
        started, spent = time.perf_counter(), self._probe_seconds
        try:
            self._probe_on(pl_module)
            return self._plan(pl_module, step)
        except Exception as err:  # noqa: BLE001 - the failure policy
            self.fail(step, err)
            return None
        finally:  # (a measurement made inside the plan counted itself: count the whole once)
            self.spend(time.perf_counter() - started - (self._probe_seconds - spent))

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        acc = self._acc
        if acc is None or dataloader_idx != 0:
            return
        started = time.perf_counter()
        try:
            inputs, targets = self.unpack_batch(batch)
            with isolated(pl_module, self.mode):
                values = self._contribution(pl_module, acc["plan"], inputs, targets)
            acc["metric"].update(values)
        except Exception as err:  # noqa: BLE001 - counted, so every rank still reduces
            if self.strict:
                raise
            acc["metric"].update({"failed": torch.ones((), dtype=torch.float64)})
            self._warn_once(trainer.global_step, err)
        acc["seconds"] += time.perf_counter() - started

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        acc, self._acc = self._acc, None
        if acc is None:
            return
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*before the ``update``.*")
            totals = acc["metric"].compute()  # a collective: every rank calls it
        totals = {k: v.detach().cpu().reshape(acc["metric"].shapes[k]) for k, v in totals.items()}
        seconds = acc["seconds"] + time.perf_counter() - started
        if not trainer.is_global_zero:
            return
        step = acc["step"]
        try:
            if totals.pop("failed") > 0:
                raise ProbeSkipped("a validation batch failed on some rank (see the warning there)")
            values = self._finish(acc["plan"], totals)
        except Exception as err:  # noqa: BLE001 - the failure policy
            self.spend(seconds)
            self.fail(step, err)
            return
        self.record(trainer, step, values, seconds, seconds_key="val_seconds")

    # --- logging ---------------------------------------------------------------------------------
    def log_values(self, trainer: Any, step: int, values: Any) -> None:
        figure = getattr(self, "_figure_data", None)
        self._figure_data = None
        super().log_values(trainer, step, values)  # type: ignore[misc]
        steps = self.measured_steps
        if len(steps) >= 2 and steps[-1] == steps[-2]:  # a second row at the same step (validation)
            steps.pop()
        if figure is not None and getattr(self, "figures", False):
            started = time.perf_counter()
            _add_figure(trainer, f"biasprobe/{self.log_name}/profile", figure, step)
            self.spend(time.perf_counter() - started)  # rendering counts in the budget

    def extra_state(self) -> dict:
        return {"val_pending": self._val_pending, "last_val_step": self._last_val_step}

    def load_extra_state(self, state: dict) -> None:
        self._val_pending = bool(state.get("val_pending", False))
        self._last_val_step = int(state.get("last_val_step", -1))


def _add_figure(trainer: Any, tag: str, data: tuple, step: int) -> None:
    """A per-layer profile figure for loggers whose experiment has ``add_figure`` (TensorBoard)."""
    writers = []
    for logger in getattr(trainer, "loggers", []):
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            writers.append(experiment)
    if not writers:
        return
    try:
        from matplotlib.figure import Figure
    except ImportError:  # plotting is an optional extra
        return
    title, layers, curves, marker = data
    names, prefix = short_names([str(name) for name in layers])
    # Fixed margins for names of at most MAX_NAME characters: tight_layout cost as much as the rest
    # of the figure (about 20 ms at every measurement).
    width = max(4.0, 0.9 * len(layers) + 2)
    fig = Figure(figsize=(width, 3.6), dpi=100)
    # The first name, rotated 30 degrees, reaches left of its tick by ~0.046 inch per character.
    left = min(0.4, max(0.14, (0.046 * len(names[0]) + 0.15) / width)) if names else 0.14
    fig.subplots_adjust(left=left, right=0.97, top=0.9, bottom=0.3)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(1, len(layers) + 1))
    for label, ys in curves.items():
        ax.plot(x, ys, marker="o", label=label)
    if marker is not None:
        ax.axvline(marker[1], color="grey", linestyle="--", label=marker[0])
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    if prefix:
        ax.set_xlabel(f"layers under {prefix}", fontsize=7)
    ax.set_title(f"{title}, step {step}", fontsize=9)
    ax.legend(fontsize=7)
    for experiment in writers:
        experiment.add_figure(tag, fig, global_step=step, close=False)
