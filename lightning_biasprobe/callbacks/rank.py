"""Effective rank of representations over training (Huh et al. 2023; RankMe; Roy & Vetterli 2007).

Also holds the machinery both representation probes share to accumulate over a whole validation
epoch on every DDP rank (``_ValidationAccumulation``, with a torchmetrics ``Metric`` of sums).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from .._tree import slice_rows
from ..functional._layers import FeatureCapture, LayerSpec, SequencePool
from ..functional.ncc import FeatureStatistics
from ..functional.rank import layer_spectra, rank_measures, spectrum_of
from ._data import ProbeSet
from ._guard import isolated
from .base import ProbeLogic, ProbeSkipped, module_device


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


def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _describe_pool(pool: Any) -> str:
    return pool if isinstance(pool, str) else "callable"


class _ValidationAccumulation:
    """Accumulating a measurement over every validation batch, on every rank (mixed into a ProbeLogic).

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
            if self.strict:
                raise
            self.failures += 1
            self._warn_once(step, err)
            return None
        finally:  # (a measurement made inside the plan counted itself: count the whole once)
            self._probe_seconds = spent + time.perf_counter() - started

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
        self._probe_seconds += seconds
        step = acc["step"]
        try:
            if totals.pop("failed") > 0:
                raise ProbeSkipped("a validation batch failed on some rank (see the warning there)")
            values = self._finish(acc["plan"], totals)
            bad = sorted(k for k, v in values.items() if not math.isfinite(v))
            if bad:
                raise FloatingPointError(f"non-finite value for {', '.join(bad)}")
        except Exception as err:  # noqa: BLE001 - the failure policy
            if self.strict:
                raise
            self.failures += 1
            self._warn_once(step, err)
            return
        values["val_seconds"] = seconds
        self.log_values(trainer, step, values)

    # --- logging ---------------------------------------------------------------------------------
    def log_values(self, trainer: Any, step: int, values: Any) -> None:
        figure = getattr(self, "_figure_data", None)
        self._figure_data = None
        super().log_values(trainer, step, values)  # type: ignore[misc]
        steps = self.measured_steps
        if len(steps) >= 2 and steps[-1] == steps[-2]:  # a second row at the same step (validation)
            steps.pop()
        if figure is not None and getattr(self, "figures", False):
            _add_figure(trainer, f"biasprobe/{self.log_name}/profile", figure, step)

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
    fig = Figure(figsize=(max(4.0, 0.9 * len(layers) + 2), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(1, len(layers) + 1))
    for label, ys in curves.items():
        ax.plot(x, ys, marker="o", label=label)
    if marker is not None:
        ax.axvline(marker[1], color="grey", linestyle="--", label=marker[0])
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=7)
    ax.set_title(f"{title}, step {step}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    for experiment in writers:
        experiment.add_figure(tag, fig, global_step=step, close=False)


class EffectiveRankLogic(_ValidationAccumulation, ProbeLogic):
    r"""Logs the effective rank of chosen layers' representations: the low-rank simplicity bias.

    Huh, Mobahi, Zhang, Cheung, Agrawal, Isola (2023), "The Low-Rank Simplicity Bias in Deep
    Networks" (TMLR): deeper networks find lower effective-rank embeddings. Per layer, over the
    ``(N, D)`` matrix ``Z`` of N examples' features (pooled and, above ``max_dim``, projected; see
    :mod:`lightning_biasprobe.functional._layers`), it logs

    - ``biasprobe/rank/<layer>/erank_features``: Roy–Vetterli :math:`\exp H(p)`,
      :math:`p_k = \sigma_k(Z)/\sum_j\sigma_j(Z)`, ``Z`` uncentered;
    - ``.../erank_features_centered``: the same for ``Z`` minus its mean example (the spread: the
      uncentered value is dominated by the mean embedding);
    - ``.../erank_gram``: of the uncentered Gram matrix :math:`Z Z^T` (Huh et al.'s matrix; uses
      :math:`\sigma_k^2`, so it is at most ``erank_features``);
    - ``.../rankme``: RankMe (Garrido et al. 2023) of ``Z`` uncentered, :math:`\varepsilon = 10^{-7}`;
    - ``.../stable_rank_features``: :math:`\lVert Z\rVert_F^2/\lVert Z\rVert_2^2`, uncentered;

    plus the singular values as a histogram (``.../singular_values``), ``biasprobe/rank/seconds`` and,
    where the logger is TensorBoard (and matplotlib is installed), a per-layer profile figure
    ``biasprobe/rank/profile``. ``<layer>`` is the module name, suffixed with the reduction for conv
    maps (``-gap``/``-flat``) and sequences (``-mean``, ...).

    Data: ``data="probe"`` (default) measures on the fixed probe set (``num_samples=1024`` training
    examples) at the cadence points (every epoch by default), on rank zero. ``data="val"`` instead
    accumulates :math:`\sum z`, :math:`\sum z z^T` over every batch of the validation epoch that
    follows a cadence point, on every DDP rank, reduced with torchmetrics (2 processes give the
    numbers of 1 process on all the data, exactly so when the validation set divides evenly among
    the ranks); values are logged at the validation's global step with ``biasprobe/rank/val_seconds``.
    In that mode the probe set only sizes the statistics (``num_samples`` defaults to 8), and nothing
    is logged if validation never runs.

    Cost per measurement: one eval-mode forward over the data plus ``O(N D + N k^2 + k^3)`` per
    layer, ``k = min(D, max_dim)``; peak memory one chunk's activations plus ``k^2`` float64 per layer,
    independent of ``N``. erank is capped by ``min(N, k)``: keep ``N`` several times ``k``.

    Args:
        layers: ``"auto"`` (the output of each hidden block; the rule is in
            :mod:`lightning_biasprobe.functional._layers`), module names, module types, or a list.
            An unknown name fails at setup with the list of names that exist.
        data: ``"probe"`` or ``"val"``.
        conv_pool: ``"gap"`` (global average pooling, default) or ``"flatten"`` for conv maps.
        sequence_pool: ``"mean"`` (default), ``"last"``, ``"first"``, ``"flatten"`` or a callable for
            ``(N, T, D)`` outputs.
        max_dim: CountSketch layers wider than this to this many features (default 192: the
            scatter and eigendecompositions cost ``k^2`` and ``k^3``, and at 192 a measurement of a
            five-layer width-1024 MLP costs about 1.15 validation epochs; see
            ``benchmarks/bench_representation.py``). Every effective rank is then at most 192: raise
            it for wide layers whose rank you expect to be higher (RankMe of a 2048-d SSL embedding,
            say), or ``None`` for exact values (memory ``D^2`` per layer).
        seed: seed of the sketches (the same sketch at every measurement).
        chunk_size: examples per forward.
        figures: log the per-layer profile figure where possible.
        **kwargs: probe data, adapters, cadence and failure policy, see :class:`ProbeLogic`.
    """

    name = "rank"
    default_cadence = {"every_n_epochs": 1}
    default_num_samples = 1024

    def __init__(
        self,
        layers: LayerSpec = "auto",
        data: Literal["probe", "val"] = "probe",
        conv_pool: Literal["gap", "flatten"] = "gap",
        sequence_pool: SequencePool = "mean",
        max_dim: Optional[int] = 192,
        seed: int = 0,
        chunk_size: Optional[int] = 256,
        figures: bool = True,
        **kwargs: Any,
    ) -> None:
        if data not in ("probe", "val"):
            raise ValueError(f"data must be 'probe' (the fixed probe set) or 'val' (accumulated over validation "
                             f"epochs), got {data!r}")
        _check_chunk_size(chunk_size)
        self.capture = FeatureCapture(layers, conv_pool=conv_pool, sequence_pool=sequence_pool, max_dim=max_dim,
                                      seed=seed, forward=kwargs.get("forward"))
        if data == "val" and kwargs.get("num_samples") is None:
            kwargs["num_samples"] = 8  # the probe set only sizes the statistics in this mode
        super().__init__(**kwargs)
        self.layers, self.data, self.conv_pool, self.sequence_pool = layers, data, conv_pool, sequence_pool
        self.max_dim, self.seed, self.chunk_size, self.figures = max_dim, seed, chunk_size, figures
        self._figure_data = None

    def key_fields(self) -> dict:
        return {"layers": self.capture.describe(), "data": self.data, "conv_pool": self.conv_pool,
                "sequence_pool": _describe_pool(self.sequence_pool), "max_dim": self.max_dim, "seed": self.seed}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.capture.check(pl_module)  # an unknown layer name fails here, listing the names that exist

    # --- probe set -------------------------------------------------------------------------------
    def measure(self, module: nn.Module, probe: ProbeSet) -> dict:
        spectra = layer_spectra(module, probe.inputs, capture=self.capture, chunk_size=self.chunk_size)
        return self._values(spectra)

    def _values(self, spectra: dict) -> dict:
        values: dict[str, Tensor] = {}
        curves: dict[str, list[float]] = {}
        for key, spectrum in spectra.items():
            for quantity, value in rank_measures(spectrum.singular_values, spectrum.centered_singular_values).items():
                values[f"{key}/{quantity}"] = value
                curves.setdefault(quantity, []).append(float(value))
            self.add_histogram(f"{key}/singular_values", spectrum.singular_values)
        self._figure_data = ("effective rank per layer", list(spectra), curves, None)
        return values

    # --- validation accumulation -----------------------------------------------------------------------
    def _accumulates(self) -> bool:
        return self.data == "val"

    def _base_measures(self) -> bool:
        return self.data == "probe"

    def _plan(self, pl_module: nn.Module, step: int) -> dict:
        # The layer keys and widths (after pooling and projection), from two probe examples, so
        # every rank creates the same metric states before its first batch.
        dims: dict[str, int] = {}
        with isolated(pl_module, self.mode):
            self.capture.run(pl_module, slice_rows(self._probe.inputs, 0, min(2, len(self._probe))),
                             lambda f: dims.update({k: v.shape[1] for k, v in f.items()}), None)
        return {"refs": list(self.capture.refs), "dims": dims}

    def _on_plan(self, plan: dict, pl_module: Any) -> None:
        self.capture.refs = list(plan["refs"])

    def _template(self, plan: dict) -> dict[str, Tensor]:
        template = {}
        for i, (key, k) in enumerate(plan["dims"].items()):
            for field, value in FeatureStatistics(k, 1, scatter=True).state().items():
                template[f"{i}/{field}"] = value
        return template

    def _contribution(self, pl_module: nn.Module, plan: dict, inputs: Any, targets: Optional[Tensor]) -> dict:
        out: dict[str, Tensor] = {}
        keys = list(plan["dims"])

        def add(features: dict[str, Tensor]) -> None:
            if list(features) != keys:
                raise ValueError(f"validation batches gave layers {list(features)}, the plan has {keys}")
            for i, key in enumerate(keys):
                stats = FeatureStatistics(plan["dims"][key], 1, scatter=True, device=features[key].device)
                for field, value in stats.update(features[key]).state().items():
                    name = f"{i}/{field}"
                    out[name] = out[name] + value if name in out else value

        self.capture.run(pl_module, inputs, add, self.chunk_size)
        return out

    def _finish(self, plan: dict, totals: dict[str, Tensor]) -> dict[str, float]:
        spectra = {}
        for i, (key, k) in enumerate(plan["dims"].items()):
            stats = FeatureStatistics(k, 1, scatter=True)
            stats.load_state({field: totals[f"{i}/{field}"] for field in stats.state()})
            spectra[key] = spectrum_of(stats)
        return {k: float(v) for k, v in self._values(spectra).items()}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if self.data == "val" and trainer.is_global_zero and not self.measured_steps:
            warnings.warn("EffectiveRank(data='val') measured nothing: no validation epoch ran during fit. Pass "
                          "validation data, or data='probe'.", RuntimeWarning, stacklevel=2)
