"""Effective rank of representations over training (Huh et al. 2023; RankMe; Roy & Vetterli 2007).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

from torch import Tensor, nn

from .._tree import slice_rows
from ..functional._layers import FeatureCapture, LayerSpec, SequencePool
from ..functional.ncc import FeatureStatistics
from ..functional.rank import layer_spectra, rank_measures, spectrum_of
from ._data import ProbeSet
from ._guard import isolated
from ._shared_capture import SharedCapture, SharesCapture
from ._validation import ValidationAccumulation
from .base import ProbeLogic


def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _describe_pool(pool: Any) -> str:
    return pool if isinstance(pool, str) else "callable"


class EffectiveRankLogic(SharesCapture, ValidationAccumulation, ProbeLogic):
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
        max_dim: CountSketch layers wider than this to this many features (default 192, as
            :class:`EffectiveDepth`, so that the two share one forward pass; the scatter and
            eigendecompositions cost ``k^2`` and ``k^3``: a measurement of a five-layer width-1024
            MLP over 2,000 examples costs about 1.1 validation epochs alone, and both probes
            together about 1.2; see ``benchmarks/bench_representation.py``). Every effective rank
            is then at most 192: raise
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
        # With EffectiveDepth attached on the same layers and probe set, one forward serves both.
        spectra = layer_spectra(module, probe.inputs, capture=SharedCapture(self, module), chunk_size=self.chunk_size)
        return self._values(spectra)

    def _shares_probe_set_capture(self) -> bool:
        return self.data == "probe"

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
