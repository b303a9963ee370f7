"""The probe base class: everything common to probes, free of Lightning's classes.

``ProbeLogic`` implements the probe contract (DESIGN.md): the fixed probe set, the adapters, the
cadence, the isolation guard, logging, the failure policy, DDP and checkpoint state. It names no
Lightning class; ``trainer`` and ``pl_module`` are used through their public attributes only, so
thin callback classes can be built for both ``pytorch_lightning`` and ``lightning.pytorch``::

    class GeometricComplexity(GeometricComplexityLogic, pytorch_lightning.Callback): ...

A concrete probe sets ``name`` (its log namespace) and ``default_cadence`` and implements
``measure(module, probe) -> {quantity: value}``; it is mostly its math.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable, ClassVar, Literal, Optional, Union

import torch
from torch import Tensor, nn

from .._tree import detach_to, tree_leaves
from ..functional._adapters import ForwardFn, default_loss, model_outputs
from ._data import BatchCollector, ProbeSet, UnpackFn, default_unpack, from_tensors, is_map_style, \
    read_loader, read_map_dataset
from ._guard import isolated
from ._schedule import Cadence
from . import _tensorboard
from ._tensorboard import scalar_writer

ProbeData = Union[None, str, Tensor, tuple, list, dict, Iterable]

_SHARDED = ("FSDP", "DeepSpeed", "ModelParallel", "XLAFSDP")

# Seconds spent by every probe of this process: a probe's training clock (for its budget) leaves out
# what any probe spent inside a training batch, its own pre-step work and the others' measurements
# made in hooks that Lightning calls between this probe's batch start and batch end.
_all_probes_seconds = [0.0]


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); a LightningModule's ``device`` otherwise."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    device = getattr(module, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")


def _callback_metrics(trainer: Any) -> Any:
    """``trainer.callback_metrics``, the dictionary monitors read.

    Lightning's property first gathers the step's own logged values into it (~20 us inside a fit);
    the dictionary itself is updated in place, so it is taken directly where it can be.
    """
    metrics = getattr(getattr(trainer, "_logger_connector", None), "_callback_metrics", None)
    return metrics if isinstance(metrics, dict) else getattr(trainer, "callback_metrics", None)


class _GlobalStep:
    """``trainer.global_step`` read where probes read it at every batch and optimizer step.

    Lightning's property walks five objects and two properties (~1 us inside a fit, about what an
    idle probe costs otherwise); this reads the optimizer-step counter behind it directly. It checks
    the counter against the property every 64 reads (and the base at every measurement) and on any
    disagreement falls back to the property for good; without a Lightning trainer it is the property.
    """

    __slots__ = ("counter", "reads")

    def __init__(self, trainer: Any = None) -> None:
        self.counter = None
        self.reads = 0
        try:
            loop = trainer.fit_loop.epoch_loop
            if trainer.lightning_module.automatic_optimization:
                counter = loop.automatic_optimization.optim_progress.optimizer.step.total
            else:
                counter = loop.manual_optimization.optim_step_progress.total
            if isinstance(counter.completed, int) and counter.completed == trainer.global_step:
                self.counter = counter
        except Exception:  # noqa: BLE001 - not a Lightning trainer, or another Lightning: the property
            pass

    def read(self, trainer: Any) -> int:
        counter = self.counter
        if counter is None:
            return trainer.global_step
        self.reads += 1
        if self.reads & 63:
            return counter.completed
        step = trainer.global_step
        self.check(step)
        return step

    def check(self, step: int) -> None:
        """Compare with ``step`` read from the property; fall back to the property if they differ."""
        if self.counter is not None and self.counter.completed != step:
            self.counter = None


class ProbeSkipped(RuntimeError):
    """A measurement could not be made at this point (the reason is in the message)."""


class ProbeLogic:
    """Base of every probe: when to measure, on what, under the guard, and where the values go.

    Args:
        probe_data: what to measure on. ``None`` or ``"train"``: the first ``num_samples``
            examples of the training set, read by index at fit start (class-balanced with
            ``stratify``); ``"val"``: the same from the validation set; a tensor, an
            ``(inputs, targets)`` tuple or a dict batch: those examples; a ``DataLoader`` or any
            iterable of batches: its first ``num_samples`` examples.
        num_samples: size of the probe set (each probe has its own default).
        stratify: choose a class-balanced probe set when targets are class indices.
        unpack_batch: ``batch -> (inputs, targets)`` when the default (tensor, ``(x, y)`` pair,
            dict with common keys) cannot read your batches. ``targets`` may be ``None``.
        forward: ``(module, inputs) -> outputs``; default ``module(inputs)``.
        loss_fn: ``(outputs, targets) -> scalar loss`` for probes that need a loss; default
            cross-entropy for integer targets, mean squared error for float targets.
        every_n_steps: measure after every n-th optimizer step (global step divisible by n).
            When none of ``every_n_steps``, ``every_n_epochs`` and ``log_spaced`` is given, the
            probe's own default cadence applies (it may include a default ``max_overhead``).
        every_n_epochs: measure at the end of every n-th training epoch.
        log_spaced: measure at global steps ``floor(5 * f**k)``, dense early, sparse late: ``True``
            for f = 1.15 (Baratin et al. 2021; about 16 steps per decade), or the growth factor f
            itself (a float > 1, e.g. 1.25 for about 10 per decade).
        at_start: measure before the first optimizer step (global step 0).
        at_end: measure when training ends (never skipped for the budget).
        max_overhead: a fraction of training-step time (e.g. 0.05): a scheduled measurement is
            skipped while this probe has spent more than that fraction of the time spent in
            training steps so far; ``None``: no budget.
        mode: ``"eval"`` (default: BatchNorm running statistics, no dropout) or ``"train"``
            (buffers are restored afterwards).
        strict: raise on a failed measurement instead of warning once and skipping it.
        name: log namespace, ``biasprobe/<name>/<quantity>``; defaults to the probe's own.
    """

    name: ClassVar[str] = "probe"
    default_cadence: ClassVar[dict] = {"every_n_epochs": 1}
    default_num_samples: ClassVar[int] = 256
    requires_targets: ClassVar[bool] = False
    needs_probe_set: ClassVar[bool] = True
    # False for probes whose point at step k is read from the optimizer step taken at the weights
    # of step k (gradients): the final weights have no such step, so their last point is T - 1.
    measures_final_weights: ClassVar[bool] = True
    # False for read-only probes (they only read weights, under no_grad): the guard's snapshot of
    # flags, buffers and RNG would cost more than the measurement itself.
    isolate: ClassVar[bool] = True

    def __init__(
        self,
        *,
        probe_data: ProbeData = None,
        num_samples: Optional[int] = None,
        stratify: bool = True,
        unpack_batch: Optional[UnpackFn] = None,
        forward: Optional[ForwardFn] = None,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        every_n_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        log_spaced: Union[bool, float] = False,
        at_start: bool = True,
        at_end: bool = True,
        max_overhead: Optional[float] = None,
        mode: Literal["eval", "train"] = "eval",
        strict: bool = False,
        name: Optional[str] = None,
    ) -> None:
        if isinstance(probe_data, str) and probe_data not in ("train", "val"):
            raise ValueError(f"probe_data must be 'train', 'val', tensors or a DataLoader, got {probe_data!r}")
        if probe_data is not None and not isinstance(probe_data, (str, Tensor, tuple, list, dict, Iterable)):
            raise TypeError(f"probe_data of type {type(probe_data).__name__} is not supported; pass 'train', "
                            "'val', a tensor, an (inputs, targets) tuple or a DataLoader")
        num_samples = self.default_num_samples if num_samples is None else num_samples
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        for arg, value in (("unpack_batch", unpack_batch), ("forward", forward), ("loss_fn", loss_fn)):
            if value is not None and not callable(value):
                raise TypeError(f"{arg} must be a callable, got {type(value).__name__}")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
        cadence = dict(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, log_spaced=log_spaced)
        if every_n_steps is None and every_n_epochs is None and log_spaced is False:
            # The probe's own default schedule, which may carry a default budget: an explicit
            # schedule from the user is kept exactly (no budget unless asked for).
            cadence.update(self.default_cadence)
        if max_overhead is not None:
            cadence["max_overhead"] = max_overhead
        self.cadence = Cadence(**cadence, at_start=at_start, at_end=at_end)
        self.probe_data = "train" if probe_data is None else probe_data
        self.num_samples = num_samples
        self.stratify = stratify
        self.unpack_batch: UnpackFn = unpack_batch or default_unpack
        self.forward = forward
        self.loss_fn = loss_fn
        self.mode = mode
        self.strict = strict
        self.log_name = name or self.name
        # Latest logged values, {"biasprobe/<name>/<quantity>": float}, and every logged point.
        self.last_values: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self.measured_steps: list[int] = []
        self.failures = 0
        self.skipped_for_budget = 0
        self._probe: Optional[ProbeSet] = None
        self._collector: Optional[BatchCollector] = None
        self._restored: Optional[dict] = None
        self._last_considered_step = -1
        self._last_attempted_step = -1
        self._next_due_step: Union[int, float] = 0  # no step below it is due (see on_train_batch_end)
        self._global_step = _GlobalStep()
        self.current_step = -1  # the global step of the measurement in progress
        self._train_seconds = 0.0
        self._probe_seconds = 0.0
        self._batch_t0: Optional[float] = None
        self._others_t0 = 0.0
        self._warned: set[str] = set()
        self._histograms: list[tuple[str, Tensor]] = []

    # ----------------------------------------------------------------- for concrete probes
    def measure(self, module: nn.Module, probe: Optional[ProbeSet]) -> Mapping[str, Union[float, Tensor]]:
        """Compute this probe's quantities on ``probe``; runs inside the isolation guard.

        ``probe`` is None only for probes with ``needs_probe_set = False``.
        """
        raise NotImplementedError

    def should_measure(self, trainer: Any, pl_module: Any) -> bool:
        """Whether a due measurement can be made now (e.g. a reference point exists); default True."""
        return True

    def check_probe_set(self, probe: ProbeSet) -> None:
        """Raise ``ValueError`` if this probe cannot measure ``probe`` (called once, when the set is fixed:
        bad data is a configuration error at setup, not a warning at every point)."""

    def key_fields(self) -> dict:
        """Arguments that tell two instances of the probe apart (for ``state_key``)."""
        return {}

    def extra_state(self) -> dict:
        """Probe-specific state a resumed run needs (e.g. the initial kernel)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def outputs(self, module: nn.Module, inputs: Any) -> Tensor:
        """The module's output tensor through the ``forward`` adapter."""
        return model_outputs(module, inputs, self.forward)

    def loss(self, module: nn.Module, inputs: Any, targets: Tensor) -> Tensor:
        """The scalar loss through the ``forward`` and ``loss_fn`` adapters."""
        return (self.loss_fn or default_loss)(self.outputs(module, inputs), targets)

    def add_histogram(self, quantity: str, values: Tensor) -> None:
        """Log ``values`` as a histogram where the logger supports it (TensorBoard)."""
        self._histograms.append((quantity, values.detach().double().cpu()))

    # ----------------------------------------------------------------- measuring (no Lightning)
    @property
    def probe_set(self) -> Optional[ProbeSet]:
        return self._probe

    def set_probe_data(self, data: Any, device: Optional[torch.device] = None) -> ProbeSet:
        """Fix the probe set from explicit tensors or a loader (also usable without a Trainer)."""
        if isinstance(data, (Tensor, tuple, list, dict)):
            probe = from_tensors(data, self.num_samples, self.unpack_batch)
        else:
            with torch.random.fork_rng(devices=[]):
                probe = read_loader(data, self.num_samples, self.unpack_batch)
        self._set_probe(probe, device)
        return probe

    def _set_probe(self, probe: ProbeSet, device: Optional[torch.device]) -> None:
        if self.requires_targets and probe.targets is None:
            raise ValueError(f"{type(self).__name__} needs targets, but the probe data has none; pass "
                             "`unpack_batch=lambda batch: (inputs, targets)` or (inputs, targets) tensors")
        self.check_probe_set(probe)
        self._probe = probe.to(device) if device is not None else probe

    def run_measurement(self, module: nn.Module, step: int) -> Optional[dict[str, float]]:
        """Measure under the isolation guard; ``{quantity: value}``, or None if it failed and was skipped."""
        started = time.perf_counter()
        self._histograms = []
        try:
            if self._probe is None and self.needs_probe_set:
                raise ProbeSkipped("the probe set is not ready yet")
            probe = self._probe_on(module) if self._probe is not None else None
            self.current_step = step
            with isolated(module, self.mode) if self.isolate else torch.no_grad():
                raw = self.measure(module, probe)
            values = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in raw.items()}
            bad = sorted(k for k, v in values.items() if not math.isfinite(v))
            if bad:
                raise FloatingPointError(f"non-finite value for {', '.join(bad)}")
        except Exception as err:  # noqa: BLE001 - the failure policy: never kill a training run
            if self.strict:
                raise
            self.fail(step, err)
            return None
        finally:
            self.spend(time.perf_counter() - started)
        values["seconds"] = time.perf_counter() - started
        return values

    # ----------------------------------------------------------------- for probes that measure elsewhere
    # Probes whose values come from another hook (an optimizer step's gradients, a whole validation
    # epoch) use these three instead of ``run_measurement``; the policy stays the base's.
    def fail(self, step: int, err: BaseException) -> None:
        """The failure policy: raise with ``strict``, else count the failure and warn once per kind."""
        if self.strict:
            raise err
        self.failures += 1
        self._warn_once(step, err)

    def claim_step(self, step: int, force: bool = False) -> bool:
        """Whether a point may be made at ``step`` now (not yet attempted there, within the budget).

        ``True`` also marks ``step`` as attempted, so no other hook measures it again; a point skipped
        for the budget is counted in ``skipped_for_budget``. ``force`` (the ``at_end`` point) ignores
        the budget.
        """
        if step == self._last_attempted_step:
            return False
        if not force and not self.cadence.within_budget(self._probe_seconds, self._train_seconds):
            self.skipped_for_budget += 1
            return False
        self._last_attempted_step = self._last_considered_step = step
        return True

    def spend(self, seconds: float) -> None:
        """Count ``seconds`` of this probe's work done outside :meth:`run_measurement` in its budget
        (e.g. a copy taken in another hook)."""
        self._probe_seconds += seconds
        _all_probes_seconds[0] += seconds

    def record(self, trainer: Any, step: int, values: Mapping[str, Union[float, Tensor]], seconds: float,
               seconds_key: str = "seconds") -> bool:
        """Log a point measured outside :meth:`run_measurement` at ``step``; ``seconds`` counts in the budget.

        Non-finite values are a failure (the failure policy applies). Returns whether it was logged.
        """
        self.spend(seconds)
        floats = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in values.items()}
        bad = sorted(k for k, v in floats.items() if not math.isfinite(v))
        if bad:
            self.fail(step, FloatingPointError(f"non-finite value for {', '.join(bad)}"))
            return False
        floats[seconds_key] = seconds
        self.log_values(trainer, step, floats)
        return True

    def _probe_on(self, module: nn.Module) -> ProbeSet:
        device = module_device(module)
        current = tree_leaves(self._probe.inputs)
        if current and current[0].device != device:
            self._probe = self._probe.to(device)
        return self._probe

    def _warn_once(self, step: int, err: BaseException) -> None:
        kind = type(err).__name__
        if kind in self._warned:
            return
        self._warned.add(kind)
        warnings.warn(
            f"{type(self).__name__} skipped its measurement at step {step}: {kind}: {err}. Training goes "
            "on; later failures of this kind are not reported again. Pass strict=True to raise instead.",
            RuntimeWarning,
            stacklevel=2,
        )

    # ----------------------------------------------------------------- Lightning hooks (duck-typed)
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        strategy = type(getattr(trainer, "strategy", None)).__name__
        if any(s in strategy for s in _SHARDED):
            raise RuntimeError(
                f"{type(self).__name__} does not support the sharded strategy {strategy}: probes need the whole "
                "model on one process. Use strategy='ddp' (or a single device) while probing."
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._next_due_step = 0
        self._global_step = _GlobalStep(trainer)
        if not trainer.is_global_zero:
            return
        if self._probe is None and self.needs_probe_set:
            self._capture(trainer, pl_module)
        if self.cadence.at_start and trainer.global_step == 0 and (self._probe is not None or not self.needs_probe_set):
            self._maybe_measure(trainer, pl_module, force=True)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._collector is not None and trainer.is_global_zero:
            if self._collector.add(batch):
                self._set_probe(self._collector.result(), module_device(pl_module))
                self._collector = None
                if self.cadence.at_start and trainer.global_step == 0:
                    self._maybe_measure(trainer, pl_module, force=True)
        if self.cadence.max_overhead is not None:  # the training clock serves the budget only
            self._batch_t0 = time.perf_counter()  # after any measurement: the budget counts training only
            self._others_t0 = _all_probes_seconds[0]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_t0 is not None:
            probes = _all_probes_seconds[0] - self._others_t0
            self._train_seconds += time.perf_counter() - self._batch_t0 - probes
            self._batch_t0 = None
        step = self._global_step.read(trainer)
        # Asked at every step: below the next step the cadence can be due at, one comparison.
        if step >= self._next_due_step:
            following = self.cadence.next_due_step(step)
            self._next_due_step = math.inf if following is None else following
            if step != self._last_considered_step and self.cadence.due_at_step(step):
                self._maybe_measure(trainer, pl_module)
        if _tensorboard._held and not step & 63:  # the age of held TensorBoard events, every 64 steps
            _tensorboard.release_if_due()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.cadence.due_at_epoch_end(trainer.current_epoch):
            self._maybe_measure(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.cadence.at_end:
            self._maybe_measure(trainer, pl_module, force=True)
        _tensorboard.release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        _tensorboard.release()  # before Lightning closes the loggers

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        _tensorboard.release()

    # ----------------------------------------------------------------- plumbing
    def _capture(self, trainer: Any, pl_module: Any) -> None:
        """Fix the probe set at fit start (rank zero); bad configuration raises here."""
        restored, self._restored = self._restored, None
        source = self.probe_data
        with torch.random.fork_rng(devices=[]):
            if restored is not None and restored.get("tensors") is not None:
                inputs, targets = restored["tensors"]
                probe = ProbeSet(inputs, targets, None, restored.get("source", "train_batches"))
            elif isinstance(source, str):
                loader = self._loader(trainer, source)
                if is_map_style(loader):
                    indices = restored.get("indices") if restored else None
                    probe = read_map_dataset(loader, self.num_samples, self.unpack_batch, stratify=self.stratify,
                                             indices=indices, source=source)
                elif source == "train":
                    # Iterable datasets: take the first batches as they pass through the hooks.
                    self._collector = BatchCollector(self.num_samples, self.unpack_batch)
                    return
                else:
                    probe = read_loader(loader, self.num_samples, self.unpack_batch, source=f"{source} dataloader")
            elif isinstance(source, (Tensor, tuple, list, dict)):
                probe = from_tensors(source, self.num_samples, self.unpack_batch)
            else:
                probe = read_loader(source, self.num_samples, self.unpack_batch)
        self._set_probe(probe, module_device(pl_module))

    @staticmethod
    def _loader(trainer: Any, source: str) -> Any:
        if source == "train":
            loader = trainer.train_dataloader
        else:
            loader = trainer.val_dataloaders
            if loader is None:
                try:  # validation data are set up lazily, at the first validation run
                    trainer.fit_loop.epoch_loop.val_loop.setup_data()
                except Exception:  # noqa: BLE001
                    pass
                loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        elif isinstance(loader, Mapping):
            loader = next(iter(loader.values()), None)
        if loader is None:
            raise ValueError(f"probe_data={source!r} but the trainer has no {source} dataloader; pass "
                             "probe_data=(inputs, targets) or a DataLoader instead")
        return loader

    def _maybe_measure(self, trainer: Any, pl_module: Any, force: bool = False) -> None:
        step = trainer.global_step
        self._global_step.check(step)
        self._last_considered_step = step
        if not trainer.is_global_zero or step == self._last_attempted_step:
            return
        if not self.should_measure(trainer, pl_module):
            return
        if self._collector is not None:  # still filling the probe set from passing batches
            return
        if not self.claim_step(step, force):
            return
        values = self.run_measurement(pl_module, step)
        if values is not None:
            started = time.perf_counter()
            self.log_values(trainer, step, values)
            self.spend(time.perf_counter() - started)  # a point's logging is part of its cost

    def log_values(self, trainer: Any, step: int, values: Mapping[str, float]) -> None:
        """Write ``{quantity: value}`` to every logger at ``step`` and keep them as the latest values."""
        prefix = f"biasprobe/{self.log_name}/"
        metrics = {prefix + k: v for k, v in values.items()}
        for logger in trainer.loggers:
            write = scalar_writer(logger)
            if write is not None:
                write(metrics, step)  # one TensorBoard event for the point, not one per scalar
            else:
                logger.log_metrics(metrics, step=step)
            experiment = getattr(logger, "experiment", None) if self._histograms else None
            if experiment is not None and hasattr(experiment, "add_histogram"):
                for quantity, hist in self._histograms:
                    experiment.add_histogram(prefix + quantity, hist, global_step=step)
        self._histograms = []
        self.last_values = metrics
        self.history.append((step, metrics))
        self.measured_steps.append(step)
        callback_metrics = _callback_metrics(trainer)
        if isinstance(callback_metrics, dict):
            # Monitors (EarlyStopping, ModelCheckpoint) read 0-d tensors: views of one float64 tensor
            # (one allocation per point, not one per quantity).
            callback_metrics.update(zip(metrics, torch.tensor(list(metrics.values()), dtype=torch.float64).unbind()))

    # ----------------------------------------------------------------- checkpoint state
    @property
    def state_key(self) -> str:
        # Lightning reads state_key around every hook call (thousands of times per epoch): build it
        # once, at first use, when every subclass argument is set.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._make_state_key()
        return key

    def _make_state_key(self) -> str:
        fields = dict(name=self.log_name, num_samples=self.num_samples, mode=self.mode,
                      every_n_steps=self.cadence.every_n_steps, every_n_epochs=self.cadence.every_n_epochs,
                      log_spaced=self.cadence.log_spaced, probe_data=self.probe_data
                      if isinstance(self.probe_data, str) else type(self.probe_data).__name__)
        fields.update(self.key_fields())
        return f"{type(self).__qualname__}{fields!r}"

    def state_dict(self) -> dict[str, Any]:
        probe = self._probe
        tensors = None
        if probe is not None and probe.indices is None and probe.source == "train_batches":
            tensors = (detach_to(probe.inputs, "cpu"), None if probe.targets is None else probe.targets.cpu())
        return {
            "measured_steps": list(self.measured_steps),
            "last_considered_step": self._last_considered_step,
            "last_attempted_step": self._last_attempted_step,
            "train_seconds": self._train_seconds,
            "probe_seconds": self._probe_seconds,
            "failures": self.failures,
            "skipped_for_budget": self.skipped_for_budget,
            "last_values": dict(self.last_values),
            "probe": None if probe is None else {"indices": probe.indices, "source": probe.source, "tensors": tensors},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured_steps = list(state_dict.get("measured_steps", []))
        self._last_considered_step = state_dict.get("last_considered_step", -1)
        self._last_attempted_step = state_dict.get("last_attempted_step", -1)
        self._train_seconds = state_dict.get("train_seconds", 0.0)
        self._probe_seconds = state_dict.get("probe_seconds", 0.0)
        self.failures = state_dict.get("failures", 0)
        self.skipped_for_budget = state_dict.get("skipped_for_budget", 0)
        self.last_values = dict(state_dict.get("last_values", {}))
        self._restored = state_dict.get("probe")
        self._probe = None
        self.load_extra_state(state_dict.get("extra", {}))

