r"""The empirical neural tangent kernel (eNTK): kernel, alignment, distance and spectrum.

The eNTK of a model :math:`f_\theta: x \mapsto \mathbb{R}^C` on samples :math:`x_1..x_N` is
:math:`K_{(c,i),(c',j)} = \langle \partial_\theta f_c(x_i), \partial_\theta f_{c'}(x_j)\rangle`
(trainable parameters only). Measurements built on it:

- alignment with the targets: Baratin, George, Laurent, Hjelm, Lajoie, Vincent, Lacoste-Julien
  (2021), "Implicit Regularization via Neural Feature Alignment", AISTATS;
- distance from the initial kernel and kernel velocity: Fort, Dziugaite, Paul, Kharaghani, Roy,
  Ganguli (2020), "Deep learning versus kernel learning", NeurIPS; Ortiz-Jiménez,
  Moosavi-Dezfooli, Frossard (2021), "What can linearized neural networks actually say about
  generalization?", NeurIPS; Vyas, Bansal, Nakkiran (2022), "Limitations of the NTK for
  understanding generalization in deep learning";
- spectrum, effective rank and target energy in the top eigendirections: Xiao (2022),
  "Eigenspace Restructuring: a Principle of Space and Frequency in Neural Networks", COLT;
  Canatar, Bordelon, Pehlevan (2021), "Spectral bias and task-model alignment explain
  generalization in kernel regression and infinitely wide neural networks".

How the kernel is computed fast (``_ntk_structured``): Linear, Conv2d and Embedding layers from
Grams of their inputs and of the gradients at their outputs ("structured derivatives", Novak,
Sohl-Dickstein, Schoenholz 2022, "Fast Finite Width Neural Tangent Kernel"), other modules from
per-sample VJPs through the module alone, and shared/tied/reused weights from whole-model
per-sample Jacobians (``torch.func``); everything chunked over samples.

**Ordering of the block kernel.** Output-major: row ``c * N + i`` is output ``c`` of sample ``i``,
so ``K.view(C, N, C, N)[c, i, c', j]`` is :math:`K_{(c,i),(c',j)}`, the kernel of a linear model
``f(x) = W x + b`` is ``I_C ⊗ (X X^T + 1)``, and the matching target vector is
``Y.T.reshape(-1)`` (the columns of the ``N x C`` target matrix stacked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from .._tree import num_rows, slice_rows
from ._adapters import ForwardFn, model_outputs, per_sample_outputs
from ._lanczos import lanczos_eigenvalues
from ._ntk_structured import (KINDS, Engine, NTKPlan, _Bound, _fmt_bytes, check_independent_samples, make_plan,
                              mirror_block_, run_blocks, symmetrize_)

Kind = Literal["block", "trace", "diagonal"]
Method = Literal["auto", "jacobian"]

#: Features of all chunks are kept (not recomputed per pair of chunks) up to this many bytes.
DEFAULT_CACHE_BYTES = 1 << 30

__all__ = [
    "NTKOperator",
    "NTKPlan",
    "NTKSpectrum",
    "NTKStatistics",
    "center_kernel",
    "empirical_ntk",
    "kernel_alignment",
    "kernel_distance",
    "ntk_plan",
    "ntk_spectrum",
]


def _check_common(kind: str, chunk_size: Any, method: str, max_memory: Any) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if method not in ("auto", "jacobian"):
        raise ValueError(f"method must be 'auto' or 'jacobian', got {method!r}")
    if max_memory is not None and (not isinstance(max_memory, (int, float)) or max_memory <= 0):
        raise ValueError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def ntk_plan(model: nn.Module, inputs: Any, *, forward: Optional[ForwardFn] = None, kind: Kind = "block",
             chunk_size: int = 128, method: Method = "auto") -> NTKPlan:
    """Which route computes each trainable parameter's share of the kernel (see :class:`NTKPlan`).

    ``structured``: Linear/Conv2d/Embedding layers (Gram products or per-layer Jacobians);
    ``per_module``: other modules (VJPs through the module alone); ``jacobian``: whole-model
    per-sample Jacobians (weights shared, tied, read outside their module or used twice);
    ``unused``: not used by the forward pass. Costs one forward on three samples.
    """
    _check_common(kind, chunk_size, method, None)
    check_independent_samples(model, "ntk_plan")
    return make_plan(model, inputs, forward, method, kind=kind, chunk_size=chunk_size)


def empirical_ntk(
    model: nn.Module,
    inputs: Any,
    *,
    kind: Kind = "block",
    chunk_size: int = 128,
    forward: Optional[ForwardFn] = None,
    method: Method = "auto",
    max_memory: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    r"""The empirical neural tangent kernel of ``model`` on ``inputs``, in float64.

    :math:`K_{(c,i),(c',j)} = \langle \partial_\theta f_c(x_i), \partial_\theta f_{c'}(x_j) \rangle`
    over the trainable parameters (``requires_grad=True``); ``f`` is the model's output flattened
    to ``C`` values per sample (logits; see ``forward`` to choose another output).

    Kinds:

    - ``"block"``: the full ``(N*C, N*C)`` kernel, cross-output blocks included (Baratin et al.
      2021), output-major: ``K.view(C, N, C, N)[c, i, c', j]`` (the module docstring has the
      ordering convention).
    - ``"trace"``: ``(N, N)``, :math:`\sum_c K_{cc}`.
    - ``"diagonal"``: ``(C, N, N)``, the output-diagonal blocks :math:`K_{cc}` (neural-tangents'
      ``diagonal_axes`` on the output axis); ``diagonal.sum(0)`` is the trace kernel.

    Algorithm (``method="auto"``): one traced forward on three samples routes every parameter
    (:func:`ntk_plan`). Then, per chunk of ``chunk_size`` samples, one forward with hooks and one
    backward per output give every Linear/Conv2d/Embedding layer's inputs and output gradients;
    such a layer contributes
    :math:`\sum_{p,q} (g_{c i p}\cdot g_{c' j q})(a_{i p}\cdot a_{j q})` (``p, q`` positions that
    share the weight), computed either as a product of the two Grams (no per-sample parameter
    gradient is formed; an MLP layer costs :math:`O(N^2 C^2 d_{out} + N^2 d_{in})`) or, when that
    is cheaper (convs with many output pixels), from per-(output, sample) weight gradients of one
    chunk at a time. Other modules' parameters use VJPs through that module alone; parameters
    that are shared, tied, or used twice per forward use chunked whole-model Jacobians
    (``vmap(jacrev)`` over ``functional_call``). All routes sum to the same kernel.
    ``method="jacobian"`` uses the whole-model Jacobians for every parameter (the reference).

    Cost: ``ceil(N/chunk)`` forwards and ``C`` backwards of each chunk (more when features are
    recomputed, see memory), plus the contractions; a chunk paired with itself contracts only the
    output blocks ``c' <= c``. Memory: the kernel itself, plus the features of two chunks (for a
    Gram-route layer, ``C x`` its activations; for a Jacobian-route parameter set,
    ``chunk * C * P`` values) — never ``N * C * P`` — plus contraction tiles of at most 768 KiB.
    The features of all chunks are cached when they fit in ``max_memory`` (1 GiB when it is
    None), else recomputed per pair of chunks. With a single chunk, trace and diagonal kernels are
    contracted output by output as the gradients arrive (only one output's Jacobian rows are
    alive), and a block kernel with ``C >= 6`` outputs (on CPU) holds the features of about
    ``C/2 + 1`` outputs at a time, for ``C/2`` more backwards.

    Samples must not interact (eval mode: BatchNorm with running statistics, no dropout).

    Args:
        model: the network.
        inputs: a tensor ``(N, ...)`` or a tuple/list/dict of tensors with a leading sample
            dimension (integer inputs such as token ids are fine).
        kind: ``"block"``, ``"trace"`` or ``"diagonal"``.
        chunk_size: samples per pass; bounds the features' memory.
        forward: ``(model, inputs) -> outputs``; default ``model(inputs)``.
        method: ``"auto"`` or ``"jacobian"``.
        max_memory: bytes the kernel and the per-chunk features may take; a ValueError says
            what to change when the computation would need more.
        compute_dtype: dtype of the contractions (default: the model's, at least float32); the
            result is accumulated and returned in float64.

    Returns:
        float64 tensor on the model's device.
    """
    _check_common(kind, chunk_size, method, max_memory)
    check_independent_samples(model)
    N = num_rows(inputs)
    plan = make_plan(model, inputs, forward, method, kind=kind, chunk_size=chunk_size)
    C = plan.num_outputs
    shape = {"block": (C, N, C, N), "trace": (N, N), "diagonal": (C, N, N)}[kind]
    kernel_bytes = 8 * math.prod(shape)
    if max_memory is not None and kernel_bytes > max_memory:
        raise ValueError(
            f"the {kind} kernel of {N} samples x {C} outputs takes {_fmt_bytes(kernel_bytes)}, more than "
            f"max_memory={_fmt_bytes(max_memory)}; use fewer samples, kind='trace' or 'diagonal', or the "
            "matrix-free NTKOperator (top eigenvalues and alignment without the kernel)"
        )
    K = torch.zeros(shape, dtype=torch.float64, device=_model_device(model))
    engine = Engine(model, inputs, forward, plan, kind, compute_dtype)
    cache = DEFAULT_CACHE_BYTES if max_memory is None else max(0, int(max_memory - kernel_bytes))

    def sink(i0, i1, j0, j1, FI, FJ):
        if kind == "block":  # a chunk with itself: the blocks of outputs c' <= c; the rest is symmetry
            engine.contract(FI, FJ, K[:, i0:i1, :, j0:j1], lower=i0 == j0)
            if i0 != j0:
                mirror_block_(K, i0, i1, j0, j1)
        elif kind == "trace":
            engine.contract(FI, FJ, K[i0:i1, j0:j1])
            if i0 != j0:
                K[j0:j1, i0:i1] = K[i0:i1, j0:j1].T
        else:
            engine.contract(FI, FJ, K[:, i0:i1, j0:j1])
            if i0 != j0:
                K[:, j0:j1, i0:i1] = K[:, i0:i1, j0:j1].transpose(1, 2)

    diagonal = (lambda i0, i1: engine.diagonal_block(i0, i1, K)) if kind == "block" else None
    run_blocks(engine, N, chunk_size, sink, cache, feature_budget=_feature_budget(max_memory, kernel_bytes),
               diagonal=diagonal)
    # Blocks of a chunk with itself hold the outputs c' <= c, and Gram blocks are symmetric only up
    # to rounding: fill in and make the result exactly symmetric, in place.
    if kind == "diagonal":
        for c in range(C):
            symmetrize_(K[c])
    else:
        symmetrize_(K.view(C * N, C * N) if kind == "block" else K)
    return K.reshape(C * N, C * N) if kind == "block" else K


def _feature_budget(max_memory: Optional[float], kernel_bytes: int) -> Optional[int]:
    """Bytes left for two chunks' features once the kernel (or accumulators) are allocated."""
    return None if max_memory is None else max(0, int(max_memory - kernel_bytes))


# --------------------------------------------------------------------------------------------- targets
def target_matrix(targets: Tensor, num_samples: int, num_outputs: Optional[int], centered: bool = True) -> Tensor:
    """The ``(N, C)`` float64 target matrix: one-hot classes or float targets, column-centered.

    Integer targets of shape ``(N,)`` are class indices, one-hot over ``num_outputs`` columns
    (over ``max + 1`` when ``num_outputs`` is None); with a single output they are used as the
    0/1 values of that output. Float targets are used as given, ``(N,)`` as one column, and then
    column-centered like one-hot targets (``centered=False`` skips that).
    """
    if not isinstance(targets, Tensor):
        targets = torch.as_tensor(targets)
    if targets.shape[0] != num_samples:
        raise ValueError(f"targets have {targets.shape[0]} rows but the kernel has {num_samples} samples")
    if targets.is_floating_point():
        Y = targets.detach().to(torch.float64).reshape(num_samples, -1)
        if num_outputs is not None and Y.shape[1] != num_outputs:
            raise ValueError(f"float targets have {Y.shape[1]} columns per sample but the kernel has "
                             f"{num_outputs} outputs")
    else:
        if targets.dim() != 1:
            raise ValueError("integer targets must be class indices of shape (N,); pass float targets of shape "
                             f"(N, C) for other layouts, got shape {tuple(targets.shape)}")
        labels = targets.detach().long().cpu()
        if num_outputs == 1:
            Y = labels.to(torch.float64).reshape(-1, 1)
        else:
            classes = int(labels.max()) + 1 if num_outputs is None else num_outputs
            if int(labels.min()) < 0 or int(labels.max()) >= classes:
                raise ValueError(f"class targets must lie in [0, {classes - 1}] for a kernel with {classes} "
                                 f"outputs, got values in [{int(labels.min())}, {int(labels.max())}]")
            Y = torch.nn.functional.one_hot(labels, classes).to(torch.float64)
        Y = Y.to(targets.device)
    return Y - Y.mean(dim=0, keepdim=True) if centered else Y


def _layout(kernel: Tensor, targets: Optional[Tensor], num_outputs: Optional[int] = None) -> tuple[int, int]:
    """``(N, C)`` of a square kernel from the number of targets (or ``num_outputs``)."""
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"expected a square kernel matrix, got shape {tuple(kernel.shape)}")
    D = kernel.shape[0]
    if targets is not None:
        N = targets.shape[0]
    else:
        C = 1 if num_outputs is None else num_outputs
        if D % C:
            raise ValueError(f"a kernel of size {D} is not (N*C) with C={C} outputs")
        N = D // C
    if N == 0 or D % N:
        raise ValueError(f"a kernel of size {D} does not match {N} samples (block kernels are (N*C, N*C))")
    return N, D // N


def center_kernel(kernel: Tensor, num_outputs: int = 1) -> Tensor:
    r"""Center a block kernel over samples inside every output block: :math:`(I_C \otimes H) K (I_C \otimes H)`.

    ``H = I_N - 11^T/N``; this subtracts, for each output, the mean tangent feature over the
    samples (Baratin et al. 2021). ``num_outputs=1`` centers an ``(N, N)`` kernel. Float64.
    """
    N, C = _layout(kernel, None, num_outputs)
    K = kernel.to(torch.float64).reshape(C, N, C, N)
    K = K - K.mean(dim=1, keepdim=True)
    K = K - K.mean(dim=3, keepdim=True)
    return K.reshape(C * N, C * N)


# --------------------------------------------------------------------------------------------- alignment
def kernel_alignment(kernel: Union[Tensor, "NTKOperator"], targets: Tensor, *, centered: bool = True) -> Tensor:
    r"""Kernel-target alignment :math:`A(K, Y) = y^T K_c y / (\lVert K_c\rVert_F \lVert y\rVert^2)`.

    Centered kernel alignment (Cortes, Mohri, Rostamizadeh 2012) as Baratin et al. (2021),
    "Implicit Regularization via Neural Feature Alignment", use it on the eNTK: ``K_c`` is the
    kernel centered over samples inside every output block (:func:`center_kernel`) and ``y`` the
    column-centered target matrix (one-hot for class indices, see :func:`target_matrix`),
    stacked output-major like the kernel. It is the Frobenius cosine between ``K_c`` and the
    ideal kernel ``y y^T``, in [0, 1] for a PSD kernel, and blind to the kernel's scale (log
    ``‖K‖_F`` beside it). Which variant is computed follows the kernel's shape:

    - ``(N*C, N*C)``: block alignment (Baratin et al.), ``C`` = kernel size / number of targets;
    - ``(N, N)`` (a trace kernel, or one output): :math:`A(K, Y_c Y_c^T)`;
    - ``(C, N, N)`` (output-diagonal blocks): per-output ("per-class", Shan & Bordelon 2021)
      alignments :math:`A(H K_{cc} H, y_c y_c^T)`, a ``(C,)`` tensor.

    Values of the three variants are not comparable with each other. An :class:`NTKOperator`
    gives the block alignment without forming the kernel (:meth:`NTKOperator.statistics`).
    ``centered=False`` gives the uncentered alignment (Cristianini et al. 2001) of ``K`` and the
    uncentered targets. A target with no variance (one class only) gives NaN.

    Cost: :math:`O((NC)^2)`. Returns float64.
    """
    if isinstance(kernel, NTKOperator):
        if not centered:
            raise ValueError("the matrix-free alignment is the centered one; pass a kernel tensor for centered=False")
        return kernel.statistics(targets).alignment
    K = kernel.to(torch.float64)
    if K.dim() == 3:
        C, N, _ = K.shape
        if K.shape[2] != N:
            raise ValueError(f"a per-output kernel must be (C, N, N), got {tuple(K.shape)}")
        Y = target_matrix(targets, N, C, centered).to(K.device)
        if centered:
            K = K - K.mean(dim=1, keepdim=True)
            K = K - K.mean(dim=2, keepdim=True)
        num = torch.einsum("ic,cij,jc->c", Y, K, Y)
        den = K.flatten(1).norm(dim=1) * Y.pow(2).sum(dim=0)
        return num / den
    N, C = _layout(K, targets)
    Y = target_matrix(targets, N, None if C == 1 and not _is_float(targets) else C, centered).to(K.device)
    if C == 1 and Y.shape[1] > 1:  # a trace-like kernel with class targets: ideal kernel Y Y^T
        Kc = center_kernel(K) if centered else K
        num = torch.einsum("ic,ij,jc->", Y, Kc, Y)
        return num / (Kc.norm() * Y.pow(2).sum())
    y = Y.T.reshape(-1)
    Kc = center_kernel(K, C) if centered else K
    return (y @ Kc @ y) / (Kc.norm() * y.dot(y))


def _is_float(t: Tensor) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def kernel_distance(K1: Tensor, K2: Tensor) -> Tensor:
    r"""Kernel distance :math:`d(K_1, K_2) = 1 - \langle K_1, K_2\rangle_F / (\lVert K_1\rVert_F \lVert K_2\rVert_F)`.

    Fort et al. (2020), "Deep learning versus kernel learning"; Ortiz-Jiménez et al. (2021),
    "What can linearized neural networks actually say about generalization?" (their
    ``kernel_cos_dist``). Uncentered and blind to scale (``d(K, aK) = 0``); in [0, 1] for PSD
    kernels (rounding below 0 is clipped; identical kernels give exactly 0). Zero kernels give NaN.
    Returns a float64 0-dim tensor.
    """
    if K1.shape != K2.shape:
        raise ValueError(f"kernels of different shapes: {tuple(K1.shape)} and {tuple(K2.shape)}")
    a = K1.to(torch.float64).reshape(-1)
    b = K2.to(device=K1.device, dtype=torch.float64).reshape(-1)
    cos = a.dot(b) / (a.norm() * b.norm())
    if torch.equal(a, b) and bool(cos.isfinite()):
        return torch.zeros((), dtype=torch.float64, device=a.device)  # exactly, not up to rounding
    return (1 - cos).clamp_min(0)


# --------------------------------------------------------------------------------------------- spectrum
@dataclass
class NTKSpectrum:
    """Spectral statistics of a (centered) kernel.

    ``eigenvalues``: all eigenvalues, descending (dense kernel), or the top-``k`` Ritz values
    (operator); ``top_eigenvalues``: the first ``k``; ``effective_rank``:
    ``exp(entropy(λ/Σλ))`` (dense only); ``participation_ratio``: ``(Σλ)²/Σλ²`` (dense only);
    ``target_energy``: fraction of the centered target's squared norm in the span of the top-``k``
    eigenvectors, ``Σ_{i≤k} (u_i^T y)² / ‖y‖²`` (Canatar et al.'s cumulative power ``C(k)``;
    None without targets); ``eigenvectors``: the top-``k`` eigenvectors as columns.
    """

    eigenvalues: Tensor
    top_eigenvalues: Tensor
    k: int
    centered: bool
    effective_rank: Optional[Tensor] = None
    participation_ratio: Optional[Tensor] = None
    target_energy: Optional[Tensor] = None
    eigenvectors: Optional[Tensor] = None
    converged: bool = True
    num_matvecs: int = 0


def _entropy_effective_rank(eigenvalues: Tensor) -> Tensor:
    """``exp`` of the Shannon entropy of the normalized (clipped non-negative) eigenvalues (Roy & Vetterli 2007)."""
    lam = eigenvalues.to(torch.float64).clamp_min(0)
    p = lam / lam.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum())


def ntk_spectrum(
    kernel: Union[Tensor, "NTKOperator"],
    targets: Optional[Tensor] = None,
    *,
    k: int = 10,
    center: bool = True,
    num_outputs: Optional[int] = None,
    tol: float = 1e-6,
    max_iter: Optional[int] = None,
    seed: int = 0,
) -> NTKSpectrum:
    r"""Top-``k`` eigenvalues, effective rank and target energy of an eNTK (Xiao 2022; Canatar et al. 2021).

    With ``center=True`` (default) the spectrum is that of the kernel centered inside each output
    block, :math:`K_c` — the kernel the alignment uses; this removes the per-output mean-gradient
    mode that dominates an uncentered eNTK's top eigenvalue and lives outside the span of the
    centered targets. The block layout (``N``, ``C``) is read from ``targets`` (``N`` rows) or
    from ``num_outputs`` (default 1: an ``(N, N)`` kernel).

    A dense kernel is diagonalised in float64 (``torch.linalg.eigh``, :math:`O((NC)^3)`); an
    :class:`NTKOperator` uses Lanczos with NTK-vector products (``k`` Ritz values to relative
    residual ``tol``, from a seeded start vector; about 2-3 passes over the samples per product),
    and gives no effective rank or participation ratio (they need the whole spectrum).

    ``target_energy`` uses the targets (:func:`target_matrix`; column-centered when ``center``)
    stacked like the kernel; for an ``(N, N)`` kernel with several target columns the energies of the columns are
    summed: :math:`\lVert U_k^T Y\rVert_F^2 / \lVert Y\rVert_F^2`.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(kernel, NTKOperator):
        op = kernel
        D = op.shape[0]
        kk = min(k, D)
        res = lanczos_eigenvalues(op.centered_matvec if center else op.matvec, D, k=kk, tol=tol,
                                  max_iter=max_iter, seed=seed, return_vectors=targets is not None,
                                  device=op.device)
        energy = None
        if targets is not None:
            Y = target_matrix(targets, op.num_samples, op.num_outputs, center).to(res.eigenvectors.device)
            y = Y.T.reshape(-1, 1)
            energy = (res.eigenvectors.T @ y).pow(2).sum() / y.pow(2).sum()
        return NTKSpectrum(res.eigenvalues, res.eigenvalues, kk, center, target_energy=energy,
                           eigenvectors=res.eigenvectors, converged=res.converged, num_matvecs=res.num_matvecs)
    K = kernel.to(torch.float64)
    N, C = _layout(K, targets, num_outputs)
    Kc = center_kernel(K, C) if center else (K + K.T) / 2
    kk = min(k, K.shape[0])
    if targets is None:
        lam = torch.linalg.eigvalsh(Kc).flip(0)
        vecs = None
    else:
        lam, U = torch.linalg.eigh(Kc)
        lam, U = lam.flip(0), U.flip(1)
        vecs = U[:, :kk]
    pos = lam.clamp_min(0)
    participation = pos.sum() ** 2 / pos.pow(2).sum()
    energy = None
    if targets is not None:
        Y = target_matrix(targets, N, C if C > 1 or _is_float(targets) else None, center).to(K.device)
        Yv = Y if C == 1 else Y.T.reshape(-1, 1)
        energy = (vecs.T @ Yv).pow(2).sum() / Yv.pow(2).sum()
    return NTKSpectrum(lam, lam[:kk], kk, center, _entropy_effective_rank(lam), participation, energy, vecs)


# --------------------------------------------------------------------------------------------- matrix-free
@dataclass
class NTKStatistics:
    """Exact kernel statistics computed block by block, without holding the block kernel.

    ``alignment`` (block, centered), ``alignment_trace`` (trace kernel), ``alignment_per_class``
    (``(C,)``), ``frobenius_norm`` and ``trace`` of the uncentered block kernel,
    ``centered_frobenius_norm`` and ``centered_trace`` of ``K_c``, ``participation_ratio`` of
    ``K_c`` (:math:`(\\mathrm{Tr} K_c)^2/\\lVert K_c\\rVert_F^2`), and the ``(N, N)`` trace kernel.
    Alignments are None when no targets were given.
    """

    frobenius_norm: Tensor
    trace: Tensor
    centered_frobenius_norm: Tensor
    centered_trace: Tensor
    participation_ratio: Tensor
    trace_kernel: Tensor
    alignment: Optional[Tensor] = None
    alignment_trace: Optional[Tensor] = None
    alignment_per_class: Optional[Tensor] = None


class NTKOperator:
    r"""The block eNTK as a linear operator, for kernels too large to hold (``(N*C)²`` floats).

    ``matvec(v)`` computes :math:`K v = J (J^T v)` with one VJP (a backward pass of
    :math:`\sum_{c,i} v_{c,i} f_c(x_i)`) and one JVP (forward-mode, ``torch.func.jvp``; a double
    backward where forward mode is unsupported) per chunk of samples: memory is one chunk's graph
    plus ``P`` values, never the kernel. ``centered_matvec`` applies :math:`K_c`.
    :meth:`statistics` computes the alignment family, ``‖K‖_F``, ``Tr K`` and the trace kernel
    exactly by streaming the structured kernel's blocks (memory: two chunks' features, ``(N, N)``
    and ``(N, C, C)`` accumulators). Vectors follow the block kernel's output-major ordering.
    """

    def __init__(self, model: nn.Module, inputs: Any, *, forward: Optional[ForwardFn] = None, chunk_size: int = 128,
                 method: Method = "auto", compute_dtype: Optional[torch.dtype] = None,
                 max_memory: Optional[float] = None) -> None:
        _check_common("block", chunk_size, method, max_memory)
        check_independent_samples(model, "NTKOperator")
        self.model = model
        self.inputs = inputs
        self.forward = forward
        self.chunk_size = chunk_size
        self.method = method
        self.compute_dtype = compute_dtype
        self.max_memory = max_memory
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=True): its tangent kernel is zero")
        self.num_samples = num_rows(inputs)
        with torch.no_grad():
            self.num_outputs = per_sample_outputs(model_outputs(model, slice_rows(inputs, 0, 1), forward)).shape[1]
        self.device = _model_device(model)
        self._bound = _Bound(model, forward)
        self._forward_mode_ok = True

    @property
    def shape(self) -> tuple[int, int]:
        D = self.num_samples * self.num_outputs
        return D, D

    def _chunks(self):
        for s in range(0, self.num_samples, self.chunk_size):
            e = min(s + self.chunk_size, self.num_samples)
            yield s, e, slice_rows(self.inputs, s, e)

    def matvec(self, v: Tensor) -> Tensor:
        """``K v`` (float64) for ``v`` of length ``N*C`` in output-major order."""
        N, C = self.num_samples, self.num_outputs
        V = v.to(torch.float64, copy=False).reshape(C, N).T.to(self.device)
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        for s, e, x in self._chunks():  # J^T v
            with torch.enable_grad():
                out = per_sample_outputs(model_outputs(self.model, x, self.forward))
                if not out.requires_grad:
                    raise RuntimeError("the model output does not depend differentiably on its parameters")
                grads = torch.autograd.grad(out, self.params, grad_outputs=V[s:e].to(out.dtype), allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a += g.double()
        tangents = tuple(a.to(p.dtype) for a, p in zip(acc, self.params))
        result = torch.empty(N, C, dtype=torch.float64, device=self.device)
        for s, e, x in self._chunks():  # J u
            result[s:e] = self._jvp(x, tangents).double()
        return result.T.reshape(-1)

    def _jvp(self, x: Any, tangents: tuple) -> Tensor:
        primals = tuple(p.detach() for p in self.params)
        names = ["model." + n for n in self.names]
        if self._forward_mode_ok:
            try:
                return jvp(lambda *ps: functional_call(self._bound, dict(zip(names, ps)), (x,)), primals, tangents)[1]
            except Exception:  # noqa: BLE001 - an op without a forward-mode rule: double backward below
                self._forward_mode_ok = False
        with torch.enable_grad():
            ps = [p.detach().requires_grad_(True) for p in self.params]
            out = functional_call(self._bound, dict(zip(names, ps)), (x,))
            w = torch.zeros_like(out, requires_grad=True)
            gs = torch.autograd.grad(out, ps, grad_outputs=w, create_graph=True, allow_unused=True)
            pairs = [(g, t) for g, t in zip(gs, tangents) if g is not None]
            return torch.autograd.grad([g for g, _ in pairs], w, grad_outputs=[t for _, t in pairs])[0]

    def centered_matvec(self, v: Tensor) -> Tensor:
        """``K_c v`` with :math:`K_c = (I_C \\otimes H) K (I_C \\otimes H)`."""
        N, C = self.num_samples, self.num_outputs

        def center(u: Tensor) -> Tensor:
            u = u.reshape(C, N)
            return (u - u.mean(dim=1, keepdim=True)).reshape(-1)

        return center(self.matvec(center(v.to(torch.float64))))

    def statistics(self, targets: Optional[Tensor] = None) -> NTKStatistics:
        """Exact alignment, norms and trace kernel by streaming the kernel's blocks (see the class doc)."""
        N, C = self.num_samples, self.num_outputs
        plan = make_plan(self.model, self.inputs, self.forward, self.method, kind="block", chunk_size=self.chunk_size)
        if plan.num_outputs != C:
            raise RuntimeError("the model's number of outputs changed")
        dev = self.device
        acc_bytes = 8 * (N * N + N * C * C)
        if self.max_memory is not None and acc_bytes > self.max_memory:
            raise ValueError(f"the trace kernel and row sums of {N} samples x {C} outputs take "
                             f"{_fmt_bytes(acc_bytes)}, more than max_memory={_fmt_bytes(self.max_memory)}")
        Y = None if targets is None else target_matrix(targets, N, C).to(dev)
        Yc = None if Y is None else Y.T.contiguous()  # (C, N)
        fro2 = torch.zeros((), dtype=torch.float64, device=dev)
        trace = torch.zeros((), dtype=torch.float64, device=dev)
        R = torch.zeros(C, N, C, dtype=torch.float64, device=dev)      # R[c, i, c'] = sum_j K[(c,i),(c',j)]
        fro2_cc = torch.zeros(C, dtype=torch.float64, device=dev)
        yky = torch.zeros((), dtype=torch.float64, device=dev)
        yky_cc = torch.zeros(C, dtype=torch.float64, device=dev)
        Ktr = torch.zeros(N, N, dtype=torch.float64, device=dev)

        def sink(i0, i1, j0, j1, FI, FJ):
            nonlocal fro2, trace, yky
            same = i0 == j0
            b = engine.contract(FI, FJ, torch.zeros(engine.block_shape(FI.n, FJ.n), dtype=torch.float64, device=dev))
            if same:
                b = (b + b.permute(2, 3, 0, 1)) / 2
            w = 1.0 if same else 2.0
            fro2 = fro2 + w * b.pow(2).sum()
            bd = torch.diagonal(b, dim1=0, dim2=2).permute(2, 0, 1)  # (C, nI, nJ): K_cc blocks
            fro2_cc.add_(w * bd.pow(2).sum(dim=(1, 2)))
            R[:, i0:i1, :] += b.sum(dim=3)
            if same:
                trace = trace + torch.diagonal(bd, dim1=1, dim2=2).sum()
            else:
                R[:, j0:j1, :] += b.sum(dim=1).permute(1, 2, 0)
            tr_block = bd.sum(dim=0)
            Ktr[i0:i1, j0:j1] = tr_block
            if not same:
                Ktr[j0:j1, i0:i1] = tr_block.T
            if Yc is not None:
                yI, yJ = Yc[:, i0:i1], Yc[:, j0:j1]
                yky = yky + w * torch.einsum("ci,cidj,dj->", yI, b, yJ)
                yky_cc.add_(w * torch.einsum("ci,cij,cj->c", yI, bd, yJ))

        engine = Engine(self.model, self.inputs, self.forward, plan, "block", self.compute_dtype)
        cache = DEFAULT_CACHE_BYTES if self.max_memory is None else max(0, int(self.max_memory - acc_bytes))
        run_blocks(engine, N, self.chunk_size, sink, cache,
                   feature_budget=_feature_budget(self.max_memory, acc_bytes))
        Q = R.sum(dim=1)                                             # Q[c, c'] = 1_c^T K 1_c'
        centered_fro2 = fro2 - 2.0 / N * R.pow(2).sum() + Q.pow(2).sum() / N**2
        centered_trace = trace - torch.diagonal(Q).sum() / N
        Rcc = torch.diagonal(R, dim1=0, dim2=2).T                    # (C, N): row sums of K_cc
        centered_fro2_cc = fro2_cc - 2.0 / N * Rcc.pow(2).sum(dim=1) + torch.diagonal(Q).pow(2) / N**2
        cfro = centered_fro2.clamp_min(0).sqrt()
        stats = NTKStatistics(fro2.sqrt(), trace, cfro, centered_trace, centered_trace**2 / centered_fro2, Ktr)
        if Y is not None:
            stats.alignment = yky / (cfro * Y.pow(2).sum())
            stats.alignment_per_class = yky_cc / (centered_fro2_cc.clamp_min(0).sqrt() * Y.pow(2).sum(dim=0))
            stats.alignment_trace = kernel_alignment(Ktr, targets)
            if C == 1:  # one output: the block kernel is the trace kernel (class targets one-hot there)
                stats.alignment = stats.alignment_trace
                stats.alignment_per_class = stats.alignment_trace.reshape(1)
        return stats
