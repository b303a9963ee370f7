"""Geometric complexity: the Dirichlet energy of the model function over a data set.

Dherin, Munn, Rosca, Barrett (2022), "Why neural networks find simple solutions: the many
regularizers of geometric complexity", NeurIPS 2022, arXiv:2209.13083.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from .._tree import num_rows, slice_rows, tree_leaves, tree_map
from ._adapters import (
    ForwardFn,
    batchnorm_in_train_mode,
    make_generator,
    model_outputs,
    per_sample_outputs,
)

Output = Literal["logits", "probs", "log_probs"]
Estimator = Literal["exact", "projection"]

_TRANSFORMS = {
    "logits": lambda z: z,
    "probs": lambda z: torch.softmax(z, dim=-1),
    "log_probs": lambda z: torch.log_softmax(z, dim=-1),
}


def geometric_complexity(
    model: nn.Module,
    inputs: Any,
    *,
    forward: Optional[ForwardFn] = None,
    output: Output = "logits",
    estimator: Estimator = "exact",
    num_projections: int = 1,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    chunk_size: Optional[int] = 512,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    r"""Geometric complexity :math:`GC = \frac1N \sum_i \lVert \partial f(x_i)/\partial x_i \rVert_F^2`.

    Dherin, Munn, Rosca, Barrett (2022), "Why neural networks find simple solutions: the many
    regularizers of geometric complexity". ``f`` is the model's output for one sample, flattened
    to ``C`` values (logits by default; ``output="probs"`` or ``"log_probs"`` applies a softmax over
    the last dimension first — values for different ``output`` are not comparable). Gradients are
    taken with respect to every floating tensor of ``inputs`` (the model's input space: input
    normalisation changes GC by ``1/sigma^2``).

    Algorithm. Samples do not interact in an eval-mode model, so the gradient of the batch sum
    :math:`\sum_i f_c(x_i)` with respect to the batch holds row ``c`` of every sample's input
    Jacobian. ``estimator="exact"`` therefore needs one forward and ``C`` input-gradient backward
    passes per chunk of samples. ``estimator="projection"`` draws ``k = num_projections``
    independent vectors :math:`v_i` per sample with :math:`E[v v^T] = I` (Rademacher by default,
    which has lower variance than Gaussian) and averages :math:`\lVert v_i^T J_i \rVert^2`, an
    unbiased estimate, at one forward and ``k`` backward passes. The same vectors are drawn for
    the same ``seed``, so a curve measured with a fixed seed uses common random numbers.

    Cost: ``ceil(N / chunk_size)`` forwards plus ``C`` (exact) or ``k`` (projection) backwards of
    each chunk; peak memory is one chunk's activation graph.

    Args:
        model: the network; BatchNorm layers must be in eval mode (train mode couples samples).
        inputs: a floating tensor ``(N, ...)`` or a tuple/list/dict of tensors (all floating
            tensors are differentiated; integer ones, e.g. masks, are passed through).
        forward: ``(model, inputs) -> output``; default ``model(inputs)`` (``model(*inputs)`` for
            a tuple, ``model(**inputs)`` for a dict).
        output: ``"logits"``, ``"probs"`` or ``"log_probs"``.
        estimator: ``"exact"`` or ``"projection"``.
        num_projections: ``k`` for the projection estimator.
        distribution: of the projection vectors, ``"rademacher"`` or ``"gaussian"``.
        chunk_size: samples per forward/backward; ``None`` for all at once.
        seed, generator: randomness of the projection estimator (a private generator; the global
            RNG is never used).
        reduction: ``"mean"`` (a 0-dim float64 tensor) or ``"none"`` (per-sample energies ``(N,)``).

    Returns:
        float64 tensor on the inputs' device.
    """
    if output not in _TRANSFORMS:
        raise ValueError(f"output must be one of {sorted(_TRANSFORMS)}, got {output!r}")
    if estimator not in ("exact", "projection"):
        raise ValueError(f"estimator must be 'exact' or 'projection', got {estimator!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    if int(num_projections) < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    coupled = batchnorm_in_train_mode(model)
    if coupled:
        raise ValueError(
            "geometric_complexity needs samples that do not interact, but BatchNorm modules are in "
            f"train mode: {coupled[:3]}; call model.eval() first"
        )
    if not any(t.is_floating_point() for t in tree_leaves(inputs)):
        raise ValueError(
            "geometric_complexity differentiates with respect to the inputs, but no input tensor is "
            "floating point (token ids?); pass `forward` that maps embeddings to outputs and give "
            "the embeddings as inputs"
        )
    n = num_rows(inputs)
    step = n if chunk_size is None else int(chunk_size)
    gen = make_generator(seed, generator) if estimator == "projection" else None
    transform = _TRANSFORMS[output]
    energies = [
        _chunk_energy(model, slice_rows(inputs, s, min(s + step, n)), forward, transform, estimator,
                      int(num_projections), distribution, gen)
        for s in range(0, n, step)
    ]
    per_sample = torch.cat(energies)
    return per_sample.mean() if reduction == "mean" else per_sample


def _chunk_energy(model, inputs, forward, transform, estimator, k, distribution, gen) -> Tensor:
    with torch.enable_grad():
        x = tree_map(lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t, inputs)
        leaves = [t for t in tree_leaves(x) if t.requires_grad]
        out = per_sample_outputs(transform(model_outputs(model, x, forward)))
        if not out.requires_grad:
            raise RuntimeError(
                "the model output does not depend differentiably on its inputs (is the forward run "
                "under torch.no_grad, or does it detach?)"
            )
        n, c = out.shape
        # Squared gradients are summed elementwise across passes in the inputs' own dtype (cheap),
        # and reduced over input dimensions once, in float64, at the end.
        squares: list[Optional[Tensor]] = [None] * len(leaves)
        if estimator == "exact":
            # One input-gradient pass per output: the gradient of the batch sum of output c is
            # row c of every sample's Jacobian at once.
            directions = (out[:, j].sum() for j in range(c))
            passes, grad_outputs = c, None
        else:
            directions = (out for _ in range(k))
            passes = k
        for i, target in enumerate(directions):
            if estimator == "projection":
                grad_outputs = _projection(out.shape, distribution, gen).to(out.device, out.dtype)
            grads = torch.autograd.grad(
                target, leaves, grad_outputs=grad_outputs, retain_graph=i < passes - 1, allow_unused=True
            )
            for j, g in enumerate(grads):
                if g is not None:
                    squares[j] = g.square() if squares[j] is None else squares[j].addcmul_(g, g)
        energy = torch.zeros(n, dtype=torch.float64, device=out.device)
        for sq in squares:
            if sq is not None:
                energy += sq.reshape(n, -1).sum(dim=1, dtype=torch.float64)
        return energy / k if estimator == "projection" else energy


def _projection(shape: torch.Size, distribution: str, gen: torch.Generator) -> Tensor:
    if distribution == "gaussian":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    return torch.randint(0, 2, shape, generator=gen).to(torch.float64).mul_(2).sub_(1)
