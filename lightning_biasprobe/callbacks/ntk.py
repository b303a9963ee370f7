"""Tangent-kernel alignment, evolution and spectrum over training (Baratin et al. 2021; Fort et al.
2020; Ortiz-Jiménez et al. 2021; Vyas et al. 2022; Xiao 2022)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .._tree import num_rows, slice_rows
from ..functional._adapters import per_sample_outputs
from ..functional.ntk import (
    NTKOperator,
    empirical_ntk,
    kernel_alignment,
    kernel_distance,
    ntk_spectrum,
    target_matrix,
)
from ._data import ProbeSet
from .base import ProbeLogic


class NTKAlignmentLogic(ProbeLogic):
    r"""Logs the empirical NTK's alignment with the targets, its distance from the initial kernel,
    its velocity and its spectrum, on a fixed probe set.

    The block eNTK :math:`K_{(c,i),(c',j)} = \langle\partial_\theta f_c(x_i), \partial_\theta f_{c'}(x_j)\rangle`
    (``N*C`` square, logits, trainable parameters, eval mode) is computed with
    :func:`lightning_biasprobe.functional.empirical_ntk` (structured Gram products for
    Linear/Conv2d/Embedding layers, Jacobians elsewhere). Targets: class indices become one-hot
    columns, float targets are used as given; both are column-centered.

    Logged under ``biasprobe/ntk/``:

    - ``alignment``: centered block kernel-target alignment
      :math:`y^T K_c y / (\lVert K_c\rVert_F \lVert y\rVert^2)` (Baratin, George, Laurent, Hjelm,
      Lajoie, Vincent, Lacoste-Julien 2021, "Implicit Regularization via Neural Feature
      Alignment"); ``alignment_trace``: the same with the trace kernel :math:`\sum_c K_{cc}`;
      ``alignment_per_class``: the mean over classes of :math:`A(H K_{cc} H, y_c y_c^T)` (classes
      absent from the probe set are left out). The three are not comparable with each other.
    - ``frobenius_norm`` and ``trace`` of ``K`` (the alignment is scale-invariant).
    - ``distance``: :math:`1 - \langle K_0, K_t\rangle_F / (\lVert K_0\rVert_F\lVert K_t\rVert_F)`
      from the kernel of the first measurement (step 0 with the default ``at_start``; Fort et al.
      2020; Ortiz-Jiménez et al. 2021); ``velocity``: the distance between consecutive
      measurements divided by the steps between them (0 at the first measurement). ``K_0`` and
      the previous kernel are saved in the callback's checkpoint state, so a resumed run
      continues the same curves.
    - ``eigenvalue_1`` ... ``eigenvalue_<top_k>``: top eigenvalues of the centered kernel ``K_c``;
      ``effective_rank`` (``exp`` of the spectral entropy) and ``participation_ratio``
      (:math:`(\sum\lambda)^2/\sum\lambda^2`) of ``K_c``; ``target_energy_top<top_k>``: the fraction
      of the centered target's squared norm in the top-``top_k`` eigendirections (Xiao 2022,
      "Eigenspace Restructuring"; Canatar et al. 2021). With TensorBoard, the whole spectrum as a
      histogram ``spectrum_log10`` (``log10(λ_i / Σλ)``, eigenvalues below ``1e-12 λ_1`` left out).

    When ``N*C > max_block_size`` (or the kernels would exceed ``max_memory``) the block kernel is
    never formed: the alignments, norms and trace are computed exactly from streamed blocks, the
    top eigenvalues and target energy by Lanczos on NTK-vector products (seeded), ``distance`` and
    ``velocity`` on the ``(N, N)`` trace kernel and logged as ``distance_trace`` /
    ``velocity_trace``, and no effective rank is logged (it needs the whole spectrum).

    Default cadence: at the start, at Baratin et al.'s log-spaced steps ``⌊5·1.15^k⌋`` and at the
    end, on 100 training examples (Baratin et al.'s "micro" probe, class-balanced). Log spacing
    puts the points where the kernel moves most (early: Fort et al. 2020) and their number grows
    with the logarithm of the run's length (about 16 per decade of steps: 34 in the demo's 460
    steps, about 50 in 10,000 steps, about 85 in a million), so the overhead fades on long runs,
    where an every-epoch cadence would keep paying. One measurement costs one forward and ``C``
    backwards over the 100 examples, the layer Grams, and a ``(N*C)``-square eigendecomposition
    (about 0.13 s in all for ``C = 10`` on the demo MLP, 2 CPU cores, most of it the
    eigendecomposition).

    Measured in eval mode (the default ``mode``): BatchNorm with batch statistics or active
    dropout would make samples interact, and such a measurement is skipped with a warning.

    Args:
        top_k: number of top eigenvalues logged, and the ``k`` of the target energy.
        chunk_size: samples per pass of the kernel computation (bounds its memory).
        max_block_size: largest ``N*C`` for which the block kernel is formed (above it, the
            matrix-free path).
        max_memory: bytes the kernel computation may use; a measurement that would need more is
            skipped with a warning (``strict=True`` raises).
        seed: seed of the Lanczos start vector (matrix-free path).
        **kwargs: probe data, adapters, cadence and failure policy, see :class:`ProbeLogic`.
    """

    name = "ntk"
    default_cadence = {"log_spaced": True}
    default_num_samples = 100
    requires_targets = True

    def __init__(
        self,
        top_k: int = 10,
        chunk_size: int = 128,
        max_block_size: int = 2048,
        max_memory: Optional[float] = 2 * 1024**3,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        for arg, value in (("top_k", top_k), ("chunk_size", chunk_size), ("max_block_size", max_block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        if max_memory is not None and (not isinstance(max_memory, (int, float)) or max_memory <= 0):
            raise ValueError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
        super().__init__(**kwargs)
        self.top_k = top_k
        self.chunk_size = chunk_size
        self.max_block_size = max_block_size
        self.max_memory = max_memory
        self.seed = seed
        self._step = 0
        self._reference: Optional[Tensor] = None      # K_0 (block) or its trace kernel (matrix-free)
        self._reference_step: Optional[int] = None
        self._previous: Optional[Tensor] = None
        self._previous_step: Optional[int] = None
        self._kernel_kind: Optional[str] = None        # "block" or "trace": what _reference holds

    def key_fields(self) -> dict:
        return {"top_k": self.top_k, "max_block_size": self.max_block_size}

    # ----------------------------------------------------------------- checkpoint state
    def extra_state(self) -> dict:
        return {
            "reference": self._reference,
            "reference_step": self._reference_step,
            "previous": self._previous,
            "previous_step": self._previous_step,
            "kernel_kind": self._kernel_kind,
        }

    def load_extra_state(self, state: dict) -> None:
        self._reference = state.get("reference")
        self._reference_step = state.get("reference_step")
        self._previous = state.get("previous")
        self._previous_step = state.get("previous_step")
        self._kernel_kind = state.get("kernel_kind")

    # ----------------------------------------------------------------- measuring
    def run_measurement(self, module: nn.Module, step: int) -> Optional[dict[str, float]]:
        self._step = step  # the velocity needs the steps between measurements
        return super().run_measurement(module, step)

    def _matrix_free(self, n: int, c: int) -> bool:
        dense_bytes = 8 * (n * c) ** 2 * 4  # K, K_0, the previous K and the eigendecomposition
        return n * c > self.max_block_size or (self.max_memory is not None and dense_bytes > self.max_memory)

    def measure(self, module: nn.Module, probe: ProbeSet) -> dict:
        x, targets = probe.inputs, probe.targets
        n = num_rows(x)
        with torch.no_grad():
            c = per_sample_outputs(self.outputs(module, slice_rows(x, 0, 1))).shape[1]
        Y = target_matrix(targets, n, c)
        if not bool((Y.pow(2).sum() > 0)):
            raise ValueError("the probe targets have no variance (a single class?): the alignment is undefined")
        if self._matrix_free(n, c):
            values, kernel, kind = self._measure_matrix_free(module, x, targets)
        else:
            values, kernel, kind = self._measure_block(module, x, targets, n, c)
        suffix = "" if kind == "block" else "_trace"
        if self._kernel_kind is not None and self._kernel_kind != kind:
            raise RuntimeError(f"the saved reference kernel is a {self._kernel_kind} kernel but this measurement "
                               f"computes a {kind} kernel (did num_samples or max_block_size change?)")
        reference = kernel if self._reference is None else self._reference.to(kernel.device)
        if reference.shape != kernel.shape:
            raise RuntimeError(f"the saved reference kernel has shape {tuple(reference.shape)}, this one "
                               f"{tuple(kernel.shape)}: the probe set changed")
        values["distance" + suffix] = kernel_distance(reference, kernel)
        if self._previous is None or self._previous_step is None or self._step <= self._previous_step:
            values["velocity" + suffix] = 0.0
        else:
            values["velocity" + suffix] = kernel_distance(self._previous.to(kernel.device), kernel) / (
                self._step - self._previous_step)
        values = {k: float(v) for k, v in values.items()}
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        if bad:  # checked here so that a failed point does not become the previous kernel
            raise FloatingPointError(f"non-finite value for {', '.join(bad)}")
        stored = kernel.detach().to("cpu", copy=True)
        if self._reference is None:
            self._reference, self._reference_step, self._kernel_kind = stored, self._step, kind
        self._previous, self._previous_step = stored, self._step
        return values

    def _measure_block(self, module: nn.Module, x: Any, targets: Tensor, n: int, c: int) -> tuple[dict, Tensor, str]:
        K = empirical_ntk(module, x, kind="block", chunk_size=self.chunk_size, forward=self.forward,
                          max_memory=self.max_memory)
        blocks = torch.diagonal(K.view(c, n, c, n), dim1=0, dim2=2).permute(2, 0, 1)  # (C, N, N): K_cc
        per_class = kernel_alignment(blocks, targets)
        spectrum = ntk_spectrum(K, targets, k=self.top_k)
        values: dict[str, Any] = {
            "alignment": kernel_alignment(K, targets),
            "alignment_trace": kernel_alignment(blocks.sum(0), targets),
            "alignment_per_class": _mean_finite(per_class),
            "frobenius_norm": K.norm(),
            "trace": K.diagonal().sum(),
        }
        values.update(self._spectrum_values(spectrum.top_eigenvalues, spectrum.target_energy))
        values["effective_rank"] = spectrum.effective_rank
        values["participation_ratio"] = spectrum.participation_ratio
        lam = spectrum.eigenvalues
        kept = lam[lam > 1e-12 * lam[0].clamp_min(1e-300)]
        if kept.numel():
            self.add_histogram("spectrum_log10", (kept / lam.clamp_min(0).sum()).log10())
        return values, K, "block"

    def _measure_matrix_free(self, module: nn.Module, x: Any, targets: Tensor) -> tuple[dict, Tensor, str]:
        op = NTKOperator(module, x, forward=self.forward, chunk_size=self.chunk_size, max_memory=self.max_memory)
        stats = op.statistics(targets)
        spectrum = ntk_spectrum(op, targets, k=self.top_k, seed=self.seed)
        values: dict[str, Any] = {
            "alignment": stats.alignment,
            "alignment_trace": stats.alignment_trace,
            "alignment_per_class": _mean_finite(stats.alignment_per_class),
            "frobenius_norm": stats.frobenius_norm,
            "trace": stats.trace,
            "participation_ratio": stats.participation_ratio,
        }
        values.update(self._spectrum_values(spectrum.top_eigenvalues, spectrum.target_energy))
        ritz = spectrum.top_eigenvalues.clamp_min(0)
        if float(stats.centered_trace) > 0 and bool((ritz > 0).any()):
            self.add_histogram("spectrum_log10", (ritz[ritz > 0] / stats.centered_trace).log10())
        return values, stats.trace_kernel, "trace"

    def _spectrum_values(self, top: Tensor, energy: Optional[Tensor]) -> dict:
        values = {f"eigenvalue_{i + 1}": top[i] for i in range(top.numel())}
        values[f"target_energy_top{self.top_k}"] = energy
        return values


def _mean_finite(values: Tensor) -> Tensor:
    finite = values[torch.isfinite(values)]
    return finite.mean() if finite.numel() else torch.tensor(float("nan"), dtype=torch.float64)
