"""Curvature of the training loss over training: Hessian eigenvalues, trace, density, per block."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

from torch import nn

from ..functional.curvature import (
    HVP_METHODS,
    HessianOperator,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_trace,
    parameter_blocks,
    select_parameters,
)
from ._data import ProbeSet
from .base import ProbeLogic


def _positive_int(name: str, value: Any, least: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


class HessianCurvatureLogic(ProbeLogic):
    r"""Logs the curvature of the training loss on a fixed probe set: top eigenvalue(s) and trace of its Hessian.

    The Hessian :math:`H = \nabla^2_\theta L(\theta)` of the loss on the probe set at the current
    weights, with respect to the trainable parameters. Sharpness (:math:`\lambda_{max}`) and total
    curvature (:math:`\mathrm{tr}\,H`) are the objects of the flat-minimum biases of gradient
    descent: "Implicit Gradient Regularization" (Barrett & Dherin 2021), "Shift-Curvature, SGD,
    and Generalization" (Bradley, Gomez-Uribe, Vuyyuru 2022); the measurements follow
    "PyHessian" (Yao, Gholami, Keutzer, Mahoney 2020) with faster estimators: Lanczos for the
    eigenvalues (about half the products of power iteration, and a guaranteed error bound) and
    Hutch++ (Meyer et al. 2021) for the trace.

    Logs ``biasprobe/hessian/``:

    - ``top_eigenvalue``, and ``eigenvalue_2`` ... ``eigenvalue_k`` for ``k > 1`` (largest, algebraic);
    - ``min_eigenvalue`` with ``negative=True`` (the most negative: negative curvature early in training);
    - ``trace`` and ``trace_std_error`` with ``trace=True`` (default);
    - ``top_eigenvalue/<block>`` and ``trace/<block>`` for each block of ``blocks`` (the diagonal
      block of the Hessian for that module's parameters: per-layer curvature);
    - ``num_products`` (Hessian-vector products used) and ``seconds``;
    - with ``density=True`` and a TensorBoard logger, the spectral density (stochastic Lanczos
      quadrature) as the histogram ``spectral_density``.

    Default cadence: at the start, every epoch end and at the end, on 512 training examples
    (class-balanced), in eval mode (BatchNorm running statistics; PyHessian does the same).

    Cost per measurement: one forward and backward to build the gradient graph, then about
    ``6-15`` (eigenvalue, ``k=1``) ``+ trace_products`` products, each about 2-3 training steps
    on a batch of the probe set's size; per block the same again (``blocks`` is off by default).

    Args:
        k: how many of the largest eigenvalues.
        tol: relative residual tolerance of the Lanczos eigenvalues (a bound on their relative error).
        max_iter: at most this many products per eigenvalue computation (default ``100 + 2k``).
        negative: also the most negative eigenvalue (a second Lanczos run).
        trace: estimate the trace (Hutch++).
        trace_products: products for the trace (``>= 4``); the error falls about as ``1/trace_products``.
        density: spectral density by SLQ, logged as a histogram where the logger supports it.
        density_steps: Lanczos steps per run of the stochastic Lanczos quadrature (SLQ).
        density_runs: independent SLQ runs (random start vectors) averaged into the density.
        blocks: ``None`` (default, off), ``"auto"`` (every module that owns trainable
            parameters) or a list of module names: per-block top eigenvalue and trace.
        hvp_method: Hessian-vector product variant, see
            :class:`~lightning_biasprobe.functional.curvature.HessianOperator`.
        chunk_size: samples per forward (memory bound; about twice the time).
        seed: of the Lanczos start vectors and the trace's Rademacher vectors (the same at every
            measurement: common random numbers along the curve).
        **kwargs: probe data, adapters, cadence and failure policy, see :class:`ProbeLogic`.
    """

    name = "hessian"
    default_cadence = {"every_n_epochs": 1}
    default_num_samples = 512
    requires_targets = True

    def __init__(
        self,
        k: int = 1,
        tol: float = 1e-3,
        max_iter: Optional[int] = None,
        negative: bool = False,
        trace: bool = True,
        trace_products: int = 30,
        density: bool = False,
        density_steps: int = 30,
        density_runs: int = 1,
        blocks: Union[None, str, Sequence[str]] = None,
        hvp_method: Literal["auto", "double_backward", "recompute", "jvp", "linearize", "vjp"] = "auto",
        chunk_size: Optional[int] = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        _positive_int("k", k)
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
            raise ValueError(f"tol must be a positive number, got {tol!r}")
        if max_iter is not None:
            _positive_int("max_iter", max_iter)
        _positive_int("trace_products", trace_products, 4)
        _positive_int("density_steps", density_steps, 2)
        _positive_int("density_runs", density_runs)
        if blocks is not None and blocks != "auto":
            if isinstance(blocks, str):
                blocks = [blocks]
            if not isinstance(blocks, Sequence) or not blocks or not all(isinstance(b, str) and b for b in blocks):
                raise ValueError(f"blocks must be None, 'auto' or a list of module names, got {blocks!r}")
            blocks = list(blocks)
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")
        if chunk_size is not None:
            _positive_int("chunk_size", chunk_size)
        super().__init__(**kwargs)
        self.k = k
        self.tol = float(tol)
        self.max_iter = max_iter
        self.negative = bool(negative)
        self.trace = bool(trace)
        self.trace_products = trace_products
        self.density = bool(density)
        self.density_steps = density_steps
        self.density_runs = density_runs
        self.blocks = blocks
        self.hvp_method = hvp_method
        self.chunk_size = chunk_size
        self.seed = seed
        self._unconverged_warned = False

    def key_fields(self) -> dict:
        return {"k": self.k, "negative": self.negative, "trace": self.trace, "density": self.density,
                "blocks": self.blocks}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Bad block names are configuration errors: fail before training, naming what exists.
        for block in self._block_names(pl_module):
            select_parameters(pl_module, block)

    def _block_names(self, module: nn.Module) -> list[str]:
        if self.blocks is None:
            return []
        return parameter_blocks(module) if self.blocks == "auto" else list(self.blocks)

    def _operator(self, module: nn.Module, probe: ProbeSet, params: Any = None) -> HessianOperator:
        return HessianOperator(module, probe.inputs, probe.targets, loss_fn=self.loss_fn, forward=self.forward,
                               params=params, hvp_method=self.hvp_method, chunk_size=self.chunk_size)

    def _eigen(self, op: HessianOperator, k: int, which: str):
        result = hessian_eigenvalues(op, k=min(k, op.dim), which=which, tol=self.tol, max_iter=self.max_iter,
                                     seed=self.seed)
        if not result.converged and not self._unconverged_warned:
            self._unconverged_warned = True
            warnings.warn(f"{type(self).__name__}: Lanczos stopped after {result.num_products} products before "
                          f"reaching tol={self.tol} (residuals {result.residuals.tolist()}); the values are logged "
                          "anyway. Raise max_iter or tol. Not reported again.", RuntimeWarning, stacklevel=2)
        return result

    def measure(self, module: nn.Module, probe: ProbeSet) -> dict:
        values: dict[str, float] = {}
        products = 0
        with self._operator(module, probe) as op:
            top = self._eigen(op, self.k, "largest")
            values["top_eigenvalue"] = float(top.eigenvalues[0])
            for i in range(1, self.k):
                values[f"eigenvalue_{i + 1}"] = float(top.eigenvalues[i]) if i < top.eigenvalues.numel() \
                    else float(top.eigenvalues[-1])
            if self.negative:
                values["min_eigenvalue"] = float(self._eigen(op, 1, "smallest").eigenvalues[0])
            if self.trace:
                tr = hessian_trace(op, num_products=self.trace_products, seed=self.seed)
                values["trace"] = float(tr.estimate)
                values["trace_std_error"] = float(tr.std_error)
            if self.density:
                sd = hessian_spectral_density(op, num_steps=self.density_steps, num_runs=self.density_runs,
                                              seed=self.seed)
                self.add_histogram("spectral_density", sd.sample(1000))
            products += op.num_products
        for block in self._block_names(module):
            with self._operator(module, probe, params=block) as op:
                values[f"top_eigenvalue/{block}"] = float(self._eigen(op, 1, "largest").eigenvalues[0])
                if self.trace:
                    values[f"trace/{block}"] = float(hessian_trace(op, num_products=self.trace_products,
                                                                   seed=self.seed).estimate)
                products += op.num_products
        values["num_products"] = float(products)
        return values
