"""Stochastic-gradient noise: per-sample gradients, the tail index, the gradient noise scale.

- Tail index of the minibatch gradient noise: Şimşekli, Sagun, Gürbüzbalaban (2019), "A Tail-Index
  Analysis of Stochastic Gradient Noise in Deep Neural Networks", ICML 2019, arXiv:1901.06053, with
  the estimator of Mohammadi, Mohammadpour, Ogata (2015), "On estimating the tail index and the
  spectral measure of multivariate α-stable distributions", Metrika 78.
- Simple gradient noise scale: McCandlish, Kaplan, Amodei and the OpenAI Dota team (2018), "An
  Empirical Model of Large-Batch Training", arXiv:1812.06162.
- Gradient signal-to-noise ratio per parameter: Liu, Jiang, Bai, Chen, Wang (2020), "Understanding
  Why Neural Networks Generalize Well Through GSNR of Parameters", ICLR 2020, arXiv:2001.07384.

Per-sample gradients (``method="auto"``, the default) are "structured" for the parameters of
``nn.Linear`` layers called once per forward: one forward recording each layer's input and one
backward of the summed per-sample losses recording its output gradient, whose per-sample outer
products are the gradients (``_per_sample.py``). Every other parameter goes through ``torch.func``:
``vmap`` over ``grad`` of a one-sample loss evaluated through ``functional_call``. Both run in
chunks of samples so that peak memory has a bound. Samples must not interact, so BatchNorm layers
must be in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .._tree import num_rows, slice_rows, tree_map
from ._adapters import ForwardFn, batchnorm_in_train_mode, default_loss, make_generator, model_outputs
from ._per_sample import Plan, make_plan, structured_gradients

LossFn = Callable[[Tensor, Optional[Tensor]], Tensor]
BlockSize = Union[int, Literal["sqrt", "divisor"]]
Method = Literal["auto", "vmap", "loop"]
METHODS = ("auto", "vmap", "loop")

# Automatic chunk: at most this many per-sample gradient entries (chunk x P) at a time, i.e.
# 256 MiB of float32 gradients, whatever the model size.
_AUTO_CHUNK_ELEMENTS = 2**26


# --------------------------------------------------------------------------------------- per-sample gradients
class _ForwardModule(nn.Module):
    """``forward(model, inputs)`` as a module, so ``functional_call`` can swap the model's parameters.

    The user's model becomes a child (parameter names get the prefix ``model.``); the model itself
    is not modified.
    """

    def __init__(self, model: nn.Module, forward: Optional[ForwardFn]) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, inputs: Any) -> Tensor:
        return model_outputs(self.model, inputs, self._forward)


def _trainable_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` for every parameter that requires grad, in ``named_parameters`` order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _check_independent_samples(model: nn.Module, what: str) -> None:
    coupled = batchnorm_in_train_mode(model)
    if coupled:
        raise ValueError(
            f"{what} needs samples that do not interact, but BatchNorm modules are in train mode: "
            f"{coupled[:3]}{' ...' if len(coupled) > 3 else ''}. In train mode BatchNorm normalises every "
            "sample with the statistics of its batch, so one sample's gradient depends on the others (and "
            "a batch of one has no variance); a vmapped forward would also write the running statistics. "
            "Call model.eval() first (the GradientNoise callback measures in eval mode unless it was given "
            "mode='train')."
        )


def _auto_chunk(n: int, num_params: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, min(int(chunk_size), n))
    return max(1, min(n, _AUTO_CHUNK_ELEMENTS // max(1, num_params)))


def _validate_common(model: nn.Module, inputs: Any, targets: Optional[Tensor], chunk_size: Optional[int],
                     method: str, what: str) -> tuple[int, list[tuple[str, Tensor]]]:
    if method not in METHODS:
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None (automatic), got {chunk_size!r}")
    _check_independent_samples(model, what)
    n = num_rows(inputs)
    if targets is not None:
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a tensor or None, got {type(targets).__name__}")
        if targets.dim() == 0 or targets.shape[0] != n:
            raise ValueError(f"targets must have one row per sample ({n}), got shape {tuple(targets.shape)}")
    params = _trainable_parameters(model)
    if not params:
        raise ValueError(f"{what}: the model has no parameter that requires grad")
    return n, params


def _plan(model: nn.Module, params: list[tuple[str, Tensor]], inputs: Any, forward: Optional[ForwardFn],
          method: str) -> Optional[Plan]:
    """The routes of ``method="auto"`` (decided on the first sample); None for the other methods."""
    return make_plan(model, params, slice_rows(inputs, 0, 1), forward) if method == "auto" else None


def _chunk_gradients(model: nn.Module, params: list[tuple[str, Tensor]], inputs: Any, targets: Optional[Tensor],
                     forward: Optional[ForwardFn], loss_fn: LossFn, method: str, plan: Optional[Plan] = None,
                     dest: Optional[list[Tensor]] = None) -> list[Tensor]:
    """Per-sample gradients of one chunk: a list (one entry per parameter) of ``(n, *shape)`` tensors.

    ``dest``: optional ``(n, *shape)`` tensors (one per parameter) the gradients are written into
    (the structured route writes there directly; the other routes' results are copied).
    """
    if method == "loop":
        grads = _loop_gradients(model, params, inputs, targets, forward, loss_fn)
    elif method == "auto":
        assert plan is not None
        found, rest = structured_gradients(model, params, plan, inputs, targets, forward, loss_fn,
                                           num_rows(inputs), dest)
        if rest:
            # The structured parameters are constants of this vmap (the outer no_grad keeps autograd
            # from recording through them; torch.func.grad still differentiates the others).
            with torch.no_grad():
                others = _vmap_gradients(model, [params[j] for j in rest], inputs, targets, forward, loss_fn)
            found.update(zip(rest, others))
        grads = [found[j] for j in range(len(params))]
    else:
        grads = _vmap_gradients(model, params, inputs, targets, forward, loss_fn)
    if dest is not None:
        for d, g in zip(dest, grads):
            if g is not d:
                d.copy_(g.reshape(d.shape))
        return dest
    return grads


def _vmap_gradients(model: nn.Module, params: list[tuple[str, Tensor]], inputs: Any, targets: Optional[Tensor],
                    forward: Optional[ForwardFn], loss_fn: LossFn) -> list[Tensor]:
    """``vmap`` over ``grad`` of one sample's loss with respect to ``params`` (the others are constants)."""
    wrapper = _ForwardModule(model, forward)
    names = [f"model.{name}" for name, _ in params]

    def sample_loss(values: tuple[Tensor, ...], x: Any, y: Optional[Tensor]) -> Tensor:
        # One sample, given back its batch dimension: the model and the loss see a batch of one, so
        # the per-sample loss is exactly the term the minibatch mean averages.
        xb = tree_map(lambda t: t.unsqueeze(0), x)
        yb = None if y is None else y.unsqueeze(0)
        out = functional_call(wrapper, dict(zip(names, values)), (xb,))
        loss = loss_fn(out, yb)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar for a batch of one sample, got shape {tuple(loss.shape)}")
        return loss

    values = tuple(p.detach() for _, p in params)
    # randomness="different": a model run in train mode (mode="train", dropout) gets its own mask per
    # sample, as in a real minibatch; in eval mode nothing is random and this changes nothing.
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, None if targets is None else 0), randomness="different")
    return list(per_sample(values, inputs, targets))


def _loop_gradients(model, params, inputs, targets, forward, loss_fn) -> list[Tensor]:
    n = num_rows(inputs)
    tensors = [p for _, p in params]
    rows: list[tuple[Tensor, ...]] = []
    with torch.enable_grad():
        for i in range(n):
            x = slice_rows(inputs, i, i + 1)
            y = None if targets is None else targets[i:i + 1]
            loss = loss_fn(model_outputs(model, x, forward), y)
            # autograd.grad, never .backward(): the parameters' .grad stay untouched.
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            rows.append(tuple(torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, tensors)))
    return [torch.stack([row[j] for row in rows]) for j in range(len(tensors))]


def per_sample_gradients(
    model: nn.Module,
    inputs: Any,
    targets: Optional[Tensor] = None,
    *,
    forward: Optional[ForwardFn] = None,
    loss_fn: Optional[LossFn] = None,
    chunk_size: Optional[int] = None,
    flatten: bool = False,
    method: Method = "auto",
) -> Union[dict[str, Tensor], Tensor]:
    r"""Gradients of every sample's own loss, :math:`g_i = \nabla_\theta \ell(f_\theta(x_i), y_i)`.

    ``method="auto"`` (default): the parameters of every ``nn.Linear`` called once per forward on a
    batch-first input ``(N, ..., in)`` are *structured*: one forward records each such layer's
    input ``x``, one backward of the sum of the per-sample losses (the loss adapter applied to each
    sample's output given back a batch dimension of one, ``vmap``-ped over the loss only) records
    the gradient ``g`` of the layer's output, and sample ``i``'s gradients are
    :math:`\sum_p g_{i,p}^\top x_{i,p}` and :math:`\sum_p g_{i,p}` (``p`` over extra dimensions such
    as sequence positions). Every other parameter (convolutions, normalisation layers, embeddings,
    custom modules, a layer called twice, shared or tied weights, parameters the ``forward``
    adapter reads) takes the ``"vmap"`` route, with the structured ones held fixed. The routes are
    decided by one extra forward of one sample (random state restored afterwards). The result is
    the same as ``"vmap"`` up to rounding. In train mode with dropout the two routes draw their
    own masks, so a sample's structured and vmapped coordinates come from different dropout draws
    (each is a valid per-sample gradient; their covariance across the two groups is not).
    ``method="vmap"``: ``torch.func.vmap`` over ``torch.func.grad`` of the loss of one sample (given
    back a batch dimension of one) evaluated through ``functional_call``, for every parameter.
    ``method="loop"``: one ``torch.autograd.grad`` per sample, for models that ``vmap`` cannot trace
    (data-dependent control flow, ``.item()``); much slower.

    For a loss that averages over the batch (the default cross-entropy and MSE), the minibatch
    gradient of an eval-mode model is the mean of these rows. Only parameters with
    ``requires_grad=True`` are differentiated, in ``model.named_parameters()`` order; buffers and
    frozen parameters are constants. ``.grad`` of the parameters is never touched.

    Cost: ``"auto"`` on a model of linear layers is one forward, one backward to the layers'
    outputs (no weight gradients) and the writing of the ``N x P`` values: about 2-3x one
    forward+backward of the same samples for the demo MLP at N = 256 on one CPU thread
    (``benchmarks/bench_dynamics.py``); parameters left to vmap add one vmapped forward and backward
    per chunk. ``"vmap"`` alone: about 6-9x (on CPU the per-sample outer products of linear
    layers run as batched matrix products with an inner dimension of one, which dominates), the
    same as the plain ``torch.func`` recipe. With ``flatten=True`` the structured gradients are
    written into the ``(N, P)`` matrix directly; vmapped ones are copied into it. Memory: the
    output plus one chunk's activations. ``chunk_size=None`` picks chunks of at most
    :math:`2^{26}/P` samples.

    Args:
        model: the network; BatchNorm layers must be in eval mode (train mode couples the samples).
        inputs: a tensor ``(N, ...)`` or a tuple/list/dict of them.
        targets: ``(N, ...)`` or None (then ``loss_fn`` is called with ``None``).
        forward: ``(model, inputs) -> outputs``; default ``model(inputs)``.
        loss_fn: ``(outputs, targets) -> scalar``; default cross-entropy for integer targets, mean
            squared error for float targets.
        chunk_size: samples per forward (structured) and per vmapped call; None for automatic.
        flatten: return one ``(N, P)`` tensor (parameters concatenated in ``named_parameters``
            order) instead of ``{name: (N, *shape)}``.
        method: ``"auto"``, ``"vmap"`` or ``"loop"``.

    Returns:
        ``{name: (N, *shape)}`` in the parameters' dtypes, or an ``(N, P)`` tensor with ``flatten``.
    """
    n, params = _validate_common(model, inputs, targets, chunk_size, method, "per_sample_gradients")
    loss = loss_fn or default_loss
    num_params = sum(p.numel() for _, p in params)
    step = _auto_chunk(n, num_params, chunk_size)
    plan = _plan(model, params, inputs, forward, method)
    device = params[0][1].device
    if flatten:
        dtype = params[0][1].dtype
        for _, p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        out = torch.empty(n, num_params, dtype=dtype, device=device)
    elif step < n:  # several chunks: each writes its rows of the preallocated results
        whole = [torch.empty(n, *p.shape, dtype=p.dtype, device=device) for _, p in params]
    for start in range(0, n, step):
        stop = min(start + step, n)
        y = None if targets is None else targets[start:stop]
        if flatten:
            dest, offset = [], 0
            for _, p in params:
                dest.append(out[start:stop, offset:offset + p.numel()].view(stop - start, *p.shape))
                offset += p.numel()
        else:
            dest = None if step >= n else [w[start:stop] for w in whole]
        grads = _chunk_gradients(model, params, slice_rows(inputs, start, stop), y, forward, loss, method, plan, dest)
    if flatten:
        return out
    results = grads if step >= n else whole
    return {name: g.detach() for (name, _), g in zip(params, results)}


# --------------------------------------------------------------------------------------- tail index
@dataclass
class TailIndex:
    """Result of :func:`tail_index`.

    ``alpha`` is the raw estimate ``1 / inv_alpha`` (may fall outside ``(0, 2]`` on finite samples:
    ``inv_alpha`` near zero or negative means the two mean-log terms were too close to tell);
    ``alpha_clipped = 1 / max(inv_alpha, 1/2)`` lies in ``(0, 2]``.
    """

    alpha: float
    alpha_clipped: float
    inv_alpha: float
    num_values: int  # scalars the estimate used (K1 * K2)
    block_size: int  # K1
    num_blocks: int  # K2
    zeros_dropped: int  # exact zeros removed before estimating (log 0)
    coordinates_dropped: int  # columns without variance, removed by the standardized control
    values_trimmed: int  # values left over after the last whole block


def _block_size(k: int, rule: BlockSize) -> int:
    if isinstance(rule, bool) or not isinstance(rule, (int, str)):
        raise ValueError(f"block_size must be a positive integer, 'sqrt' or 'divisor', got {rule!r}")
    if isinstance(rule, int):
        if rule < 2 or rule > k // 2:
            raise ValueError(f"block_size must lie in [2, K/2] = [2, {k // 2}] for K={k} values, got {rule}")
        return rule
    if rule == "sqrt":
        return max(2, math.isqrt(k))
    if rule == "divisor":
        # The reference implementation's rule: the largest divisor of K not above sqrt(K).
        best = 1
        for i in range(2, math.isqrt(k) + 1):
            if k % i == 0:
                best = i
        if best < 2:
            raise ValueError(f"block_size='divisor' needs K with a divisor in [2, sqrt(K)], but K={k} has none "
                             "(prime); use block_size='sqrt'")
        return best
    raise ValueError(f"block_size must be a positive integer, 'sqrt' or 'divisor', got {rule!r}")


def tail_index(
    samples: Tensor,
    *,
    standardize: bool = False,
    block_size: BlockSize = "sqrt",
) -> TailIndex:
    r"""Tail index :math:`\alpha` of symmetric α-stable samples (Mohammadi et al., as Şimşekli et al. use it).

    Formula (Mohammadi, Mohammadpour, Ogata 2015, Corollary 2.4; Şimşekli, Sagun, Gürbüzbalaban
    2019): with :math:`K = K_1 K_2` scalars :math:`X_j` and the block sums
    :math:`Y_i = \sum_{j=1}^{K_1} X_{(i-1)K_1 + j}`,

    .. math:: \frac{1}{\hat\alpha} = \frac{1}{\log K_1}\Big(\frac{1}{K_2}\sum_i \log|Y_i|
              - \frac{1}{K}\sum_j \log|X_j|\Big).

    Why it works: a sum of :math:`K_1` i.i.d. SαS variables is distributed as :math:`K_1^{1/\alpha}`
    times one of them, so the mean logs differ by :math:`\log(K_1)/\alpha`; the estimate of
    :math:`1/\alpha` is unbiased for SαS data. Gaussian data give 2, Cauchy data 1.

    As in the reference code, ``samples`` of shape ``(M, P)`` (``M`` noise vectors of ``P``
    coordinates) are pooled row-major into ``M * P`` scalars, so a block sums consecutive
    coordinates of one noise vector.

    ``standardize=True`` is the control that METHODS.md §12 asks for: each column (coordinate) is
    divided by its root mean square over the rows first. Pooling coordinates whose scales differ
    makes a *scale mixture*, which looks heavy-tailed even when every coordinate is Gaussian
    (Panigrahi et al. 2019); after standardization Gaussian coordinates give about 2 again. The rows
    are taken as centered (noise vectors are), so no mean is subtracted.

    Exact zeros (dead units, unused parameters) would give :math:`\log 0`; they are dropped and
    counted instead of adding machine epsilon as the reference code does (which makes the result
    depend on the scale of the data). ``block_size="sqrt"`` (default) takes
    :math:`K_1 = \lfloor\sqrt K\rfloor` and drops the fewer than :math:`K_1` values left after the
    last whole block; ``"divisor"`` is the reference code's rule (largest divisor of ``K`` not above
    :math:`\sqrt K`, undefined for prime ``K``); an integer fixes :math:`K_1`.

    Cost: :math:`O(K)` (two logs per value), float64.

    Args:
        samples: ``(K,)`` scalars or ``(M, P)`` noise vectors (any floating dtype).
        standardize: divide every column of a 2-D ``samples`` by its root mean square.
        block_size: ``"sqrt"``, ``"divisor"`` or an integer :math:`K_1 \ge 2`.

    Returns:
        :class:`TailIndex`.
    """
    if not isinstance(samples, Tensor) or not samples.is_floating_point():
        raise TypeError("samples must be a floating-point tensor")
    if samples.dim() not in (1, 2):
        raise ValueError(f"samples must be (K,) scalars or (M, P) noise vectors, got shape {tuple(samples.shape)}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("samples contain NaN or infinite values")
    x = samples.detach().to(torch.float64)
    dropped_columns = 0
    if standardize:
        if x.dim() != 2 or x.shape[0] < 2:
            raise ValueError("standardize=True needs (M, P) samples with M >= 2 rows (noise vectors), got shape "
                             f"{tuple(samples.shape)}")
        rms = x.square().mean(dim=0).sqrt()
        keep = rms > 0
        dropped_columns = int((~keep).sum())
        x = x[:, keep] / rms[keep] if dropped_columns else x / rms
    x = x.reshape(-1)
    nonzero = x != 0
    zeros = int(x.numel() - nonzero.sum())
    if zeros:
        x = x[nonzero]
    k = x.numel()
    if k < 4:
        raise ValueError(f"tail_index needs at least 4 nonzero values, got {k}")
    k1 = _block_size(k, block_size)
    k2 = k // k1
    used = x[: k1 * k2]
    blocks = used.reshape(k2, k1).sum(dim=1)
    block_zeros = blocks == 0  # possible only for discrete data; log 0 has no meaning here
    if bool(block_zeros.all()):
        raise ValueError("every block sum is exactly zero; the tail index is undefined for these samples")
    log_y = blocks[~block_zeros].abs().log().mean()
    log_x = used.abs().log().mean()
    inv = float((log_y - log_x) / math.log(k1))
    alpha = 1.0 / inv if inv != 0 else math.inf
    return TailIndex(
        alpha=alpha,
        alpha_clipped=1.0 / max(inv, 0.5),
        inv_alpha=inv,
        num_values=k1 * k2,
        block_size=k1,
        num_blocks=k2,
        zeros_dropped=zeros,
        coordinates_dropped=dropped_columns,
        values_trimmed=k - k1 * k2,
    )


def _rows_of(g: Tensor) -> Tensor:
    """``(n, *shape)`` -> ``(n, p)``; half-precision gradients are reduced in float32."""
    g = g.detach().reshape(g.shape[0], -1)
    return g.float() if g.dtype in (torch.float16, torch.bfloat16) else g


def _as_rows(per_sample_grads: Union[Tensor, Mapping[str, Tensor]]) -> list[Tensor]:
    """``(N, P)`` tensor or ``{name: (N, *shape)}`` -> list of ``(N, p_j)`` tensors."""
    if isinstance(per_sample_grads, Tensor):
        if per_sample_grads.dim() != 2:
            raise ValueError(f"per_sample_grads must be (N, P), got shape {tuple(per_sample_grads.shape)}")
        return [_rows_of(per_sample_grads)]
    if isinstance(per_sample_grads, Mapping) and per_sample_grads:
        rows = [_rows_of(g) for g in per_sample_grads.values()]
        if len({r.shape[0] for r in rows}) != 1:
            raise ValueError("every per-sample gradient tensor must have the same number of rows (samples)")
        return rows
    raise ValueError("per_sample_grads must be an (N, P) tensor or a non-empty {name: (N, *shape)} dict, as "
                     "per_sample_gradients returns")


def minibatch_noise(per_sample_grads: Union[Tensor, Mapping[str, Tensor]], batch_size: int) -> Tensor:
    r"""Minibatch noise vectors :math:`U_k = g_{B,k} - \bar g` from per-sample gradients.

    Consecutive rows form the minibatches (shuffle the samples first if their order means
    something): :math:`g_{B,k}` is the mean of rows :math:`kB, ..., (k+1)B - 1` — the minibatch
    gradient of a batch-mean loss in eval mode — for :math:`k < M = \lfloor N/B \rfloor` (left-over
    rows are not used) and :math:`\bar g` is the mean of the :math:`M` minibatch gradients, as in
    Şimşekli et al.'s code (so the rows of ``U`` sum to zero).

    Args:
        per_sample_grads: ``(N, P)`` or ``{name: (N, *shape)}`` (:func:`per_sample_gradients`).
        batch_size: ``B``.

    Returns:
        ``(M, P)`` float64 tensor (parameters concatenated in the dict's order).
    """
    rows = _as_rows(per_sample_grads)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = rows[0].shape[0]
    m = n // batch_size
    if m < 2:
        raise ValueError(f"need at least two minibatches: N={n} samples with batch_size={batch_size} give {m}")
    batches = torch.cat([g[: m * batch_size].to(torch.float64).reshape(m, batch_size, -1).mean(dim=1)
                         for g in rows], dim=1)
    return batches - batches.mean(dim=0)


# --------------------------------------------------------------------------------------- noise scale
@dataclass
class NoiseScale:
    r"""Result of :func:`gradient_noise_scale`.

    ``trace_cov`` is the unbiased estimate :math:`S` of :math:`\mathrm{tr}\,\Sigma` (per-example
    gradient covariance), ``grad_sq_norm`` the unbiased estimate of :math:`\lVert G\rVert^2`
    (:math:`\lVert\bar g\rVert^2 - S/N`, which may be negative when the noise hides the mean
    gradient), ``b_simple = trace_cov / grad_sq_norm`` (``inf`` when ``grad_sq_norm <= 0``: the
    probe set is too small to resolve a noise scale that large), ``snr = grad_sq_norm / trace_cov``
    (:math:`1/B_\text{simple}`, defined also where ``b_simple`` is not: zero or negative there),
    ``gsnr`` the mean over coordinates of :math:`\bar g_j^2 / \hat\sigma_j^2`.
    """

    b_simple: float
    snr: float
    trace_cov: float
    grad_sq_norm: float
    mean_grad_sq_norm: float  # ||g_bar||^2, biased upwards by S/N
    gsnr: float
    num_samples: int
    gsnr_coordinates: int  # coordinates with nonzero variance, averaged over by gsnr


class _Moments:
    """Per-coordinate count, mean and sum of squared deviations, merged chunk by chunk in float64.

    Each chunk is reduced in the gradients' own dtype around its own mean (two passes, in place);
    chunks are merged with Chan, Golub, LeVeque's pairwise update in float64, so no
    ``sum(x^2) - N mean^2`` cancellation loses the small variances. A chunk mean can be off by a
    few units in the last place, so a coordinate whose values are all equal may come out with a
    variance of that order: variances below ``(64 eps |mean|)^2`` count as zero (``eps`` of the
    gradients' dtype; 64 eps is 7.6e-6 relative in float32).
    """

    def __init__(self) -> None:
        self.n = 0
        self.eps = 0.0
        self.mean: list[Tensor] = []
        self.m2: list[Tensor] = []

    def add(self, chunks: Sequence[Tensor]) -> None:
        """``chunks``: one ``(n, p_j)`` tensor per parameter group, same ``n``."""
        nb = chunks[0].shape[0]
        n = self.n + nb
        for j, g in enumerate(chunks):
            self.eps = max(self.eps, torch.finfo(g.dtype).eps)
            mean_b = g.mean(dim=0)
            # In place on a fresh difference tensor: one allocation of the chunk's size, not two.
            m2_b = (g - mean_b).square_().sum(dim=0).to(torch.float64)
            mean_b = mean_b.to(torch.float64)
            if self.n == 0:
                self.mean.append(mean_b)
                self.m2.append(m2_b)
            else:
                delta = mean_b - self.mean[j]
                self.mean[j] = self.mean[j] + delta * (nb / n)
                self.m2[j] = self.m2[j] + m2_b + delta.square() * (self.n * nb / n)
        self.n = n

    def noise_scale(self) -> NoiseScale:
        n = self.n
        if n < 2:
            raise ValueError(f"the gradient noise scale needs at least 2 samples, got {n}")
        mean = torch.cat([m.reshape(-1) for m in self.mean])
        m2 = torch.cat([m.reshape(-1) for m in self.m2])
        trace_cov = float(m2.sum()) / (n - 1)
        mean_sq = float(mean.square().sum())
        # E||g_bar||^2 = ||G||^2 + tr(Sigma)/N: subtract the noise's share for an unbiased ||G||^2
        # (McCandlish et al., App. A, with B_small = 1 and B_big = N).
        grad_sq = mean_sq - trace_cov / n
        var = m2 / (n - 1)
        keep = var > (64 * self.eps * mean.abs()).square()
        ratio = mean[keep].square() / var[keep]
        return NoiseScale(
            b_simple=trace_cov / grad_sq if grad_sq > 0 else math.inf,
            snr=grad_sq / trace_cov if trace_cov > 0 else math.copysign(math.inf, grad_sq),
            trace_cov=trace_cov,
            grad_sq_norm=grad_sq,
            mean_grad_sq_norm=mean_sq,
            gsnr=float(ratio.mean()) if ratio.numel() else math.nan,
            num_samples=n,
            gsnr_coordinates=int(keep.sum()),
        )


def gradient_noise_scale(per_sample_grads: Union[Tensor, Mapping[str, Tensor]]) -> NoiseScale:
    r"""Simple gradient noise scale :math:`B_\text{simple} = \mathrm{tr}(\Sigma)/\lVert G\rVert^2` and the GSNR.

    McCandlish et al. (2018), "An Empirical Model of Large-Batch Training": :math:`G` is the mean
    gradient, :math:`\Sigma` the covariance of per-example gradients; :math:`B_\text{simple}`
    approximates the critical batch size (the batch size at which the minibatch gradient's noise
    and signal are of equal size). From :math:`N` per-sample gradients :math:`g_i` with mean
    :math:`\bar g`:

    - :math:`S = \frac{1}{N-1}\sum_i \lVert g_i - \bar g\rVert^2` (unbiased for
      :math:`\mathrm{tr}\Sigma`);
    - :math:`\lVert G\rVert^2 \approx \lVert\bar g\rVert^2 - S/N` (unbiased: McCandlish et al.'s
      two-batch-size estimator, App. A, with :math:`B_\text{small}=1`, :math:`B_\text{big}=N`);
    - :math:`B_\text{simple} = S / \lVert G\rVert^2` (a ratio of unbiased estimates; ``inf`` when the
      :math:`\lVert G\rVert^2` estimate is not positive);
    - ``snr`` :math:`= \lVert G\rVert^2 / S = 1/B_\text{simple}`, the global signal-to-noise ratio of
      one sample's gradient: finite also where the signal is not resolved (then :math:`\le 0`).

    The gradient signal-to-noise ratio (Liu et al. 2020, "Understanding Why Neural Networks
    Generalize Well Through GSNR of Parameters") is per parameter
    :math:`r_j = \bar g_j^2 / \hat\sigma_j^2` with the unbiased per-sample variance
    :math:`\hat\sigma_j^2`; ``gsnr`` is its mean over the coordinates with nonzero variance (Cockpit's
    MeanGSNR divides by ``N`` instead of ``N - 1`` and adds an epsilon).

    Cost: :math:`O(NP)`, float64.

    Args:
        per_sample_grads: ``(N, P)`` or ``{name: (N, *shape)}`` per-sample gradients
            (:func:`per_sample_gradients`), N >= 2.
    """
    rows = _as_rows(per_sample_grads)
    if rows[0].shape[0] < 2:
        raise ValueError(f"the gradient noise scale needs at least 2 samples, got {rows[0].shape[0]}")
    moments = _Moments()
    moments.add(rows)
    return moments.noise_scale()


# --------------------------------------------------------------------------------------- all at once, streamed
@dataclass
class GradientNoiseStatistics:
    """Result of :func:`gradient_noise_statistics`."""

    noise_scale: NoiseScale
    tail: TailIndex
    tail_standardized: TailIndex
    num_samples: int  # per-sample gradients used by the noise scale and GSNR
    batch_size: int  # B of the minibatch noise
    num_minibatches: int  # M noise vectors (M * B samples) used by the tail index
    num_parameters: int  # P
    num_coordinates: int  # coordinates of the noise vectors given to the tail index


def gradient_noise_statistics(
    model: nn.Module,
    inputs: Any,
    targets: Optional[Tensor] = None,
    *,
    batch_size: int,
    forward: Optional[ForwardFn] = None,
    loss_fn: Optional[LossFn] = None,
    chunk_size: Optional[int] = None,
    shuffle: bool = True,
    seed: int = 0,
    max_coordinates: Optional[int] = None,
    block_size: BlockSize = "sqrt",
    method: Method = "auto",
) -> GradientNoiseStatistics:
    r"""Tail index (pooled and standardized), :math:`B_\text{simple}` and GSNR, streaming the per-sample gradients.

    The same numbers as :func:`per_sample_gradients` followed by :func:`minibatch_noise`,
    :func:`tail_index` (``standardize`` False and True) and :func:`gradient_noise_scale`, but the
    ``N x P`` per-sample gradients are never held at once: each chunk is reduced to its minibatch
    gradients and its per-coordinate moments before the next is computed. Memory: ``M x P'`` float64
    minibatch gradients (``P' = min(P, max_coordinates)``), a few ``P``-vectors, and one chunk.

    The samples are put in a fixed random order (``seed``; ``shuffle=False`` keeps theirs) and cut
    into :math:`M = \lfloor N/B\rfloor` minibatches of ``batch_size`` samples, the way SGD draws
    them: a probe set stored class by class would otherwise give one-class minibatches.
    ``max_coordinates``: when ``P`` is larger, the tail index uses a fixed random subset of that
    many coordinates (the same subset for the same ``seed``); the noise scale always uses all.

    Args:
        model, inputs, targets, forward, loss_fn, chunk_size, method: as :func:`per_sample_gradients`
            (``chunk_size`` is rounded down to a multiple of ``batch_size``).
        batch_size: ``B``, the minibatch size of the noise; needs ``N >= 2 B``.
        shuffle, seed: the minibatch assignment (a private generator; the global RNG is untouched).
        max_coordinates: bound on the coordinates given to the tail index; None for all.
        block_size: see :func:`tail_index`.
    """
    n, params = _validate_common(model, inputs, targets, chunk_size, method, "gradient_noise_statistics")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_coordinates is not None and (not isinstance(max_coordinates, int) or max_coordinates < 1):
        raise ValueError(f"max_coordinates must be a positive integer or None, got {max_coordinates!r}")
    m = n // batch_size
    if m < 2:
        raise ValueError(f"need at least two minibatches for the noise: N={n} samples with batch_size={batch_size} "
                         f"give {m}; use more samples or a smaller batch_size")
    gen = make_generator(seed)
    if shuffle:
        order = torch.randperm(n, generator=gen)
        device_order = order.to(targets.device) if targets is not None else order
        inputs = tree_map(lambda t: t[order.to(t.device)] if t.dim() > 0 else t, inputs)
        targets = None if targets is None else targets[device_order]
    sizes = [p.numel() for _, p in params]
    total = sum(sizes)
    device = params[0][1].device
    # Which coordinates the tail index sees, as a per-parameter index (None: all of them).
    picks: list[Optional[Tensor]] = [None] * len(params)
    num_coords = total
    if max_coordinates is not None and total > max_coordinates:
        chosen = torch.randperm(total, generator=gen)[:max_coordinates].sort().values
        offsets = torch.tensor([0] + sizes).cumsum(0)
        picks = [(chosen[(chosen >= lo) & (chosen < hi)] - lo).to(device) for lo, hi in zip(offsets[:-1], offsets[1:])]
        num_coords = max_coordinates
    minibatch_sums = torch.zeros(m, num_coords, dtype=torch.float64, device=device)
    moments = _Moments()
    loss = loss_fn or default_loss
    step = _auto_chunk(n, total, chunk_size)
    step = max(batch_size, step // batch_size * batch_size)  # chunks hold whole minibatches
    plan = _plan(model, params, inputs, forward, method)
    for start in range(0, n, step):
        stop = min(start + step, n)
        y = None if targets is None else targets[start:stop]
        grads = _chunk_gradients(model, params, slice_rows(inputs, start, stop), y, forward, loss, method, plan)
        rows = [_rows_of(g) for g in grads]
        moments.add(rows)
        whole = max(0, min(stop, m * batch_size) - start) // batch_size  # complete minibatches in this chunk
        if whole:
            first = start // batch_size
            column = 0
            for g, pick in zip(rows, picks):
                part = g[: whole * batch_size] if pick is None else g[: whole * batch_size, pick]
                width = part.shape[1]
                minibatch_sums[first:first + whole, column:column + width] = (
                    part.reshape(whole, batch_size, width).sum(dim=1))
                column += width
    batches = minibatch_sums / batch_size
    noise = batches - batches.mean(dim=0)
    return GradientNoiseStatistics(
        noise_scale=moments.noise_scale(),
        tail=tail_index(noise, block_size=block_size),
        tail_standardized=tail_index(noise, standardize=True, block_size=block_size),
        num_samples=n,
        batch_size=batch_size,
        num_minibatches=m,
        num_parameters=total,
        num_coordinates=num_coords,
    )
