"""Probes in a hand-written training loop (plain PyTorch or Lightning Fabric): no Trainer needed.

:class:`ProbeRunner` drives the same probe objects the Trainer drives (the callbacks of
:mod:`lightning_biasprobe`, or their ``<Name>Logic`` classes) through the same hooks, so every
guarantee holds unchanged: the fixed probe set, the cadence and budget, the isolation guard (a
seeded loop ends with bit-identical weights with and without the runner), warn-and-skip, the
checkpoint state. Values go to a TensorBoard ``SummaryWriter`` (scalars, histograms, figures) or
to any callable ``sink(step, {key: value})``::

    runner = ProbeRunner(model, [GeometricComplexity(), HessianCurvature()], probe_data=(x, y),
                         writer=SummaryWriter("runs/probed"))
    runner(0)                                   # before the first step: the at_start points
    for step, (xb, yb) in enumerate(loader, start=1):
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        runner.before_optimizer_step(optimizer)  # optional: GradientRegularization, update sizes
        optimizer.step(); optimizer.zero_grad()
        runner(step)                            # step = optimizer steps taken so far
    runner.close()                              # the at_end points

``runner(step)`` measures every probe due at ``step`` by its own cadence; ``runner.epoch_end(epoch)``
serves ``every_n_epochs`` cadences; ``force=True`` measures every probe now. The time between two
calls counts as training time for the ``max_overhead`` budgets.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .callbacks._tensorboard import summary_writer_scalars
from .callbacks.base import ProbeData, ProbeLogic

Sink = Union[Callable[[int, dict], Any], Any]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's and DDP's wrappers (as the Trainer measures the LightningModule).

    Layer names then read as the user wrote them; Fabric's wrapper only adds precision casting,
    which a probe's own forward does not need on a full-precision model.
    """
    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and (hasattr(model, "_forward_module")
                                             or isinstance(model, nn.parallel.DistributedDataParallel)):
            model = inner
        else:
            return model


def summary(values: Mapping[str, float], *, include_seconds: bool = False) -> str:
    """A two-column text table of ``{key: value}`` (sorted; timing keys left out unless asked)."""
    keys = sorted(k for k in values if include_seconds or not k.endswith("seconds"))
    width = max([len(k) for k in keys] + [6])
    return "\n".join(f"{k:<{width}}  {float(values[k]): .6g}" for k in keys)


class _SinkLogger:
    """A Lightning-logger lookalike: ``log_metrics`` to a SummaryWriter or a callable."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        # Histograms and figures go to SummaryWriter-like sinks (the base looks for ``experiment``).
        self.experiment = sink if hasattr(sink, "add_scalar") else None
        # A torch SummaryWriter takes a point's scalars as one event (see callbacks/_tensorboard.py).
        self.biasprobe_scalar_writer = summary_writer_scalars(sink)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.experiment is not None:
            for key, value in metrics.items():
                self.experiment.add_scalar(key, value, global_step=step)
        else:
            self.sink(step, dict(metrics))


class _LoopState:
    """The few Trainer attributes the probes read, kept by the runner (duck-typed, like the Trainer)."""

    def __init__(self, loggers: list, is_global_zero: bool, train_dataloader: Any, val_dataloaders: Any) -> None:
        self.loggers = loggers
        self.is_global_zero = is_global_zero
        self.train_dataloader = train_dataloader
        self.val_dataloaders = val_dataloaders
        self.callback_metrics: dict[str, Tensor] = {}
        self.global_step = 0
        self.current_epoch = 0
        self.max_steps = -1
        self.max_epochs = None
        self.is_last_batch = False
        self.sanity_checking = False
        self.strategy = None


class ProbeRunner:
    """Runs probes from a plain training loop, at the step numbers the loop passes.

    Args:
        model: the ``nn.Module`` being trained; a Fabric- or DDP-wrapped module is unwrapped
            (probes measure the module itself, under the names you gave its layers).
        probes: probe instances (the callbacks of :mod:`lightning_biasprobe` or their ``Logic``
            classes).
        probe_data: the probe set for every probe that has none of its own: a tensor, an
            ``(inputs, targets)`` tuple, a dict batch, or a ``DataLoader``. Probes constructed with
            tensors or a loader keep theirs.
        train_data: the training ``DataLoader``: lets probes with ``probe_data="train"`` (their
            default) read their class-balanced probe set by index, as under the Trainer.
        val_data: the validation ``DataLoader`` for probes with ``probe_data="val"``.
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (scalars, histograms, figures), or any
            callable ``sink(step, {key: value})``; ``None`` keeps the values in memory only
            (``runner.history``, each probe's ``last_values``).
        rank_zero: whether this process measures (default: the ``torch.distributed`` rank is 0, or
            no process group). Probes measure the whole model on one process, as under DDP.
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Sequence[ProbeLogic],
        *,
        probe_data: ProbeData = None,
        train_data: Optional[Iterable] = None,
        val_data: Optional[Iterable] = None,
        writer: Optional[Sink] = None,
        rank_zero: Optional[bool] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        probes = list(probes)
        if not probes:
            raise ValueError("probes is empty: pass at least one probe, e.g. [GeometricComplexity()]")
        for probe in probes:
            if not isinstance(probe, ProbeLogic):
                raise TypeError(f"{type(probe).__name__} is not a probe (a lightning_biasprobe callback or ProbeLogic)")
        if writer is not None and not (callable(writer) or hasattr(writer, "add_scalar")):
            raise TypeError("writer must be a SummaryWriter (with add_scalar) or a callable sink(step, metrics)")
        if rank_zero is None:
            rank_zero = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_rank() == 0
        self.model = unwrap(model)
        self.probes = probes
        self.probe_data = probe_data
        loggers = [] if writer is None else [_SinkLogger(writer)]
        self.state = _LoopState(loggers, bool(rank_zero), train_data, val_data)
        self._started = False
        self._closed = False
        self._last_step = -1

    @property
    def callback_metrics(self) -> dict[str, Tensor]:
        """The latest value of every logged key (as the Trainer's ``callback_metrics``)."""
        return self.state.callback_metrics

    @property
    def history(self) -> list[tuple[int, dict[str, float]]]:
        """Every logged point of every probe, ``(step, {key: value})``, in logging order."""
        rows = [row for probe in self.probes for row in probe.history]
        return sorted(rows, key=lambda row: row[0])

    def _start(self, step: int) -> None:
        self._started = True
        state = self.state
        state.global_step = step
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        for probe in self.probes:
            probe.setup(state, self.model, "fit")
            own = probe.probe_data
            if probe.needs_probe_set and state.is_global_zero and probe.probe_set is None:
                if isinstance(own, str) and self.probe_data is not None:
                    probe.set_probe_data(self.probe_data, device)
                elif isinstance(own, str) and (state.train_dataloader if own == "train" else state.val_dataloaders) \
                        is None:
                    raise ValueError(f"{type(probe).__name__} has probe_data={own!r}, but the runner has no probe_data "
                                     f"and no {own}_data; pass ProbeRunner(..., probe_data=(inputs, targets))")
            if getattr(probe, "_accumulates", lambda: False)():
                warnings.warn(f"{type(probe).__name__}: accumulation over validation epochs needs the Trainer's "
                              "validation loop; in a plain loop those values are not logged (pass fixed held-out "
                              "data instead, e.g. heldout=(inputs, targets))", RuntimeWarning, stacklevel=3)
            probe.on_train_start(state, self.model)

    def __call__(self, step: int, *, force: bool = False) -> dict[str, float]:
        """Measure every probe due at ``step`` (optimizer steps taken so far); returns the new values."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer (optimizer steps taken so far), got {step!r}")
        if self._closed:
            raise RuntimeError("this ProbeRunner was closed; build a new one to continue")
        if step < self._last_step:
            raise ValueError(f"steps must not decrease: got {step} after {self._last_step}")
        before = self._counts()
        state = self.state
        if not self._started:
            self._start(step)  # the at_start points at step 0, as at the Trainer's train start
        if step != self._last_step:
            state.global_step = step
            for probe in self.probes:
                probe.on_train_batch_end(state, self.model, None, None, step)
        if force:
            for probe in self.probes:
                probe._maybe_measure(state, self.model, force=True)
        self._last_step = step
        new = self._new_values(before)
        for probe in self.probes:  # from here to the next call is training time (for budgets)
            probe.on_train_batch_start(state, self.model, None, step)
        return new

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: Optional[int] = None) -> None:
        """Call after ``backward`` and before ``optimizer.step()``; ``step`` = steps taken so far.

        Probes that read the step's gradients (``GradientRegularization``) or the weights just before
        the update (``WeightDiffusion``'s update size) need it; the others ignore it.
        """
        if not self._started:
            self._start(0 if step is None else step)
        self.state.global_step = self._last_step if step is None else step
        for probe in self.probes:
            hook = getattr(probe, "on_before_optimizer_step", None)
            if hook is not None:
                hook(self.state, self.model, optimizer)

    def epoch_end(self, epoch: int) -> dict[str, float]:
        """Call at the end of training epoch ``epoch`` (0-based): serves ``every_n_epochs`` cadences."""
        before = self._counts()
        self.state.current_epoch = epoch
        for probe in self.probes:
            probe.on_train_epoch_end(self.state, self.model)
        return self._new_values(before)

    def close(self) -> dict[str, float]:
        """End of training: the ``at_end`` points (at the last step passed)."""
        if self._closed:
            return {}
        before = self._counts()
        if not self._started:
            self._start(max(self._last_step, 0))
        for probe in self.probes:
            probe.on_train_batch_end(self.state, self.model, None, None, self._last_step)
            probe.on_train_end(self.state, self.model)
        for probe in self.probes:
            teardown = getattr(probe, "teardown", None)
            if teardown is not None:
                teardown(self.state, self.model, "fit")
        self._closed = True
        for logger in self.state.loggers:
            flush = getattr(logger.experiment, "flush", None)
            if flush is not None:
                flush()
        return self._new_values(before)

    def _counts(self) -> list[int]:
        return [len(p.history) for p in self.probes]

    def _new_values(self, before: list[int]) -> dict[str, float]:
        new: dict[str, float] = {}
        for probe, n in zip(self.probes, before):
            for _, values in probe.history[n:]:
                new.update(values)
        return new

    def state_dict(self) -> dict[str, Any]:
        """Every probe's checkpoint state, by its ``state_key`` (save it with your checkpoint)."""
        return {probe.state_key: probe.state_dict() for probe in self.probes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` before the first call (the probe sets are re-read as saved)."""
        if self._started:
            raise RuntimeError("load_state_dict must come before the runner's first call")
        for probe in self.probes:
            if probe.state_key in state:
                probe.load_state_dict(state[probe.state_key])
        self._last_step = max((max(p.measured_steps, default=-1) for p in self.probes), default=-1)
