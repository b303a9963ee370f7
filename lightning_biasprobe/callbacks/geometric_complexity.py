"""Geometric complexity over training (Dherin, Munn, Rosca, Barrett 2022)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from torch import nn

from ..functional.geometry import geometric_complexity
from ._data import ProbeSet
from .base import ProbeLogic


class GeometricComplexityLogic(ProbeLogic):
    r"""Logs the geometric complexity :math:`GC = \frac1N\sum_i \lVert \partial f(x_i)/\partial x_i\rVert_F^2`.

    Dherin, Munn, Rosca, Barrett (2022), "Why neural networks find simple solutions: the many
    regularizers of geometric complexity" (NeurIPS). The discrete Dirichlet energy of the model
    function on a fixed probe set of training examples, in the model's input space; lower GC has
    gone with simpler, better-generalising solutions in their experiments (larger learning rates,
    smaller batches and L2 all lower it).

    Logs ``biasprobe/gc/<output>`` (e.g. ``biasprobe/gc/logits``) and ``biasprobe/gc/seconds``.
    Default cadence: at the start, at the end of every epoch and at the end of training, on 256
    training examples (class-balanced), thinned so that the probe spends at most 3% of the time of
    the training steps (``max_overhead=0.03``: with the callback machinery's own cost the total stays
    under 5% even on a toy run; on real runs, whose epochs are long, it never binds).
    Any explicit schedule (``every_n_steps=...``) is kept exactly unless ``max_overhead`` is passed.

    Cost per measurement: one forward and ``C`` input-gradient backwards over the probe set
    (``estimator="exact"``), or ``k`` backwards with ``estimator="projection"`` — choose that for
    models with many outputs. Computed in eval mode, where samples do not interact.

    Args:
        output: ``"logits"`` (default), ``"probs"`` or ``"log_probs"``: which function's energy.
        estimator: ``"exact"`` or ``"projection"`` (unbiased, ``num_projections`` Rademacher vectors).
        num_projections: ``k`` for the projection estimator.
        seed: seed of the projection vectors (the same vectors at every measurement).
        chunk_size: samples per forward/backward, bounds peak memory.
        **kwargs: probe data, adapters, cadence and failure policy, see :class:`ProbeLogic`.
    """

    name = "gc"
    default_cadence = {"every_n_epochs": 1, "max_overhead": 0.03}
    default_num_samples = 256

    def __init__(
        self,
        output: Literal["logits", "probs", "log_probs"] = "logits",
        estimator: Literal["exact", "projection"] = "exact",
        num_projections: int = 1,
        seed: int = 0,
        chunk_size: Optional[int] = 512,
        **kwargs: Any,
    ) -> None:
        if output not in ("logits", "probs", "log_probs"):
            raise ValueError(f"output must be 'logits', 'probs' or 'log_probs', got {output!r}")
        if estimator not in ("exact", "projection"):
            raise ValueError(f"estimator must be 'exact' or 'projection', got {estimator!r}")
        if not isinstance(num_projections, int) or num_projections < 1:
            raise ValueError(f"num_projections must be a positive integer, got {num_projections!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        super().__init__(**kwargs)
        self.output = output
        self.estimator = estimator
        self.num_projections = num_projections
        self.seed = seed
        self.chunk_size = chunk_size

    def key_fields(self) -> dict:
        return {"output": self.output, "estimator": self.estimator}

    def measure(self, module: nn.Module, probe: ProbeSet) -> dict:
        value = geometric_complexity(
            module, probe.inputs, forward=self.forward, output=self.output, estimator=self.estimator,
            num_projections=self.num_projections, seed=self.seed, chunk_size=self.chunk_size,
        )
        return {self.output: value}
