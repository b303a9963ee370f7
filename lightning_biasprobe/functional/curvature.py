"""Curvature of the loss: matrix-free Hessian-vector products, eigenvalues, trace and spectral density.

The Hessian ``H = d^2 L / d theta^2`` of a scalar loss ``L(theta) = loss_fn(model(x; theta), y)``
over a fixed batch, with respect to the trainable parameters (or one block of them). Nothing
here materialises ``H``: every quantity is built from products ``H v``.

- :class:`HessianOperator` -- ``v -> H v`` (flat float64 vectors), built once per measurement.
- :func:`hessian_eigenvalues` -- top-k (or bottom-k) eigenvalues by Lanczos.
- :func:`hessian_trace` -- Hutch++ (Meyer, Musco, Musco, Woodruff 2021) or plain Hutchinson.
- :func:`hessian_spectral_density` -- stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019).
- ``params=`` restricts every quantity to a block of parameters (a module name): the diagonal
  block ``H_bb`` of the Hessian, which is what "the curvature of layer b" means.

References: Yao, Gholami, Keutzer, Mahoney (2020), "PyHessian: Neural Networks Through the Lens of
the Hessian" (the per-batch measurements and the power-iteration baseline); Bradley,
Gomez-Uribe, Vuyyuru (2022), "Shift-Curvature, SGD, and Generalization"; Pearlmutter (1994),
"Fast exact multiplication by the Hessian" (the product by double differentiation).

The graph is kept: with ``hvp_method="double_backward"`` (the default) the first-order gradient
``g(theta)`` is built once with ``create_graph=True`` and every product is one more backward
through it, ``H v = d (g . v) / d theta``. Measured on CPU (``benchmarks/bench_curvature.py``)
this is the cheapest variant; recomputing the graph per product, forward-over-reverse
``torch.func.jvp(grad)`` and ``torch.func.linearize(grad)`` are there for comparison and for
memory-bounded use (``chunk_size``).

The products never touch ``.grad``: the loss is evaluated with ``torch.func.functional_call`` on
detached copies of the parameters (sharing their storage), so the graph does not even reach the
user's parameter tensors or any hook registered on them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._tree import num_rows, slice_rows
from ._adapters import ForwardFn, batchnorm_in_train_mode, default_loss, make_generator, model_outputs
from ._lanczos import lanczos_eigenvalues, lanczos_tridiagonal

HVPMethod = Literal["auto", "double_backward", "recompute", "jvp", "linearize", "vjp"]
HVP_METHODS = ("auto", "double_backward", "recompute", "jvp", "linearize", "vjp")
Params = Union[None, str, Sequence[str]]
LossFn = Callable[[Tensor, Tensor], Tensor]


def auto_hvp_method(device: torch.device) -> str:
    """The product variant ``hvp_method="auto"`` uses on ``device``.

    ``"double_backward"`` (graph built once, reused by every product): the cheapest on CPU in
    ``benchmarks/bench_curvature.py`` (2-3x a training step at batch 512 on an MLP, a CNN and a
    1.1M-parameter MLP, against 3-4.5x for recomputing the graph and 3-5.5x for
    ``torch.func.jvp(grad)``; ``vjp`` ties with it, ``linearize`` ties per product but costs 9-75
    training steps to build). Not yet measured on GPU; the same choice is made there until it is.
    """
    return "double_backward"


def parameter_blocks(model: nn.Module) -> list[str]:
    """Names of the modules that directly own trainable parameters (e.g. every Linear/Conv layer).

    The default blocks for per-block curvature: each is a name that ``params=`` accepts.
    """
    return [name for name, m in model.named_modules()
            if name and any(p.requires_grad for p in m.parameters(recurse=False))]


def select_parameters(model: nn.Module, params: Params = None) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters ``[(name, parameter)]`` that ``params`` names, in model order.

    ``params`` is None (every trainable parameter), a module name (all its trainable parameters,
    recursively), a parameter name, or a list of these. Frozen parameters (``requires_grad=False``)
    are constants of the loss and never selected.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    else:
        names = [params] if isinstance(params, str) else list(params)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"params must be None, a module or parameter name, or a list of names, got {params!r}")
        modules = dict(model.named_modules())
        all_params = dict(model.named_parameters())
        wanted: set[str] = set()
        for name in names:
            if name in modules and name != "":
                wanted |= {f"{name}.{n}" for n, _ in modules[name].named_parameters()}
            elif name == "":
                wanted |= set(all_params)
            elif name in all_params:
                wanted.add(name)
            else:
                known = [n for n in modules if n]
                raise ValueError(f"no module or parameter named {name!r}; modules: {known}")
        chosen = [(n, p) for n, p in named if n in wanted]
        if not chosen:
            raise ValueError(f"the parameters selected by params={params!r} are all frozen (requires_grad=False)")
    if not chosen:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False); "
                         "curvature is taken with respect to trainable parameters")
    return chosen


class _Call(nn.Module):
    """``inputs -> output tensor`` through the forward adapter, so ``functional_call`` can swap weights."""

    def __init__(self, model: nn.Module, forward: Optional[ForwardFn]) -> None:
        super().__init__()
        self.model = model
        self.adapter = forward

    def forward(self, inputs: Any) -> Tensor:
        return model_outputs(self.model, inputs, self.adapter)


class HessianOperator:
    r"""``v -> H v`` for the loss of ``model`` on a fixed batch, at the current parameters.

    ``H`` is the Hessian of ``L(theta) = loss_fn(forward(model, inputs), targets)`` with respect
    to the selected trainable parameters (all of them, or the block ``params`` names; the other
    parameters are held fixed). Vectors are flat float64 tensors of length ``dim`` (the selected
    parameters concatenated in model order); products are computed in the parameters' dtype.

    Args:
        model: the network, in the mode it should be measured in (BatchNorm in eval mode is the
            usual choice; train mode is allowed with the graph-reusing methods).
        inputs, targets: the batch.
        loss_fn: ``(outputs, targets) -> scalar``; default cross-entropy for integer targets, MSE
            for float targets.
        forward: ``(model, inputs) -> outputs``; default ``model(inputs)``.
        params: restrict to a block: a module name, a parameter name or a list of them.
        hvp_method: ``"double_backward"`` (first-order graph built once, one backward per
            product; ``"auto"`` picks it), ``"recompute"`` (forward, backward and double backward
            per product), ``"jvp"`` (``torch.func`` forward-over-reverse per product),
            ``"linearize"`` (``torch.func.linearize`` of the gradient, built once), ``"vjp"``
            (``torch.func.vjp`` of the gradient, built once).
        chunk_size: samples per forward; ``None`` (default) for the whole batch. With chunks the
            graph is rebuilt for every chunk and product (peak memory of one chunk, about twice
            the time), and the loss must be a mean over samples: chunk losses are weighted by
            their share of the samples.

    Raises:
        ValueError: the loss is not a scalar, no parameter is trainable, an unknown block name,
            or a method that cannot run on this model.
        FloatingPointError: the loss is not finite at the current parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        targets: Optional[Tensor],
        *,
        loss_fn: Optional[LossFn] = None,
        forward: Optional[ForwardFn] = None,
        params: Params = None,
        hvp_method: HVPMethod = "auto",
        chunk_size: Optional[int] = None,
    ) -> None:
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, got {hvp_method!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if loss_fn is None and targets is None:
            raise ValueError("the loss needs targets: pass targets, or a loss_fn that ignores them")
        selected = select_parameters(model, params)
        self.names = [n for n, _ in selected]
        self.shapes = [p.shape for _, p in selected]
        self.numels = [p.numel() for _, p in selected]
        self.dim = sum(self.numels)
        self.dtypes = [p.dtype for _, p in selected]
        self.device = selected[0][1].device
        self.num_products = 0
        self._call = _Call(model, forward)
        self._loss_fn = loss_fn or default_loss
        self._inputs, self._targets = inputs, targets
        # The selected parameters become leaves of our own (storage-sharing) tensors; every other
        # trainable parameter enters as a detached constant, so only the block is differentiated.
        chosen = set(self.names)
        self._primals = tuple(p.detach() for _, p in selected)
        self._constants = {f"model.{n}": p.detach() for n, p in model.named_parameters()
                           if p.requires_grad and n not in chosen}
        self._keys = [f"model.{n}" for n in self.names]

        method = auto_hvp_method(self.device) if hvp_method == "auto" else hvp_method
        coupled = batchnorm_in_train_mode(model)
        if chunk_size is not None:
            if method in ("linearize", "vjp"):
                raise ValueError(f"hvp_method={method!r} keeps one graph for the whole batch; it cannot be "
                                 "combined with chunk_size (use 'double_backward' or 'jvp')")
            if coupled:
                raise ValueError(f"chunk_size changes the loss of BatchNorm in train mode ({coupled[:3]}): "
                                 "call model.eval() first or pass chunk_size=None")
            n = num_rows(inputs)
            self._chunks = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
            self._n = n
            if method == "double_backward":
                method = "recompute"
        else:
            self._chunks = None
            self._n = None
        if method in ("jvp", "linearize", "vjp") and coupled:
            raise ValueError(f"hvp_method={method!r} (torch.func) needs BatchNorm in eval mode, but {coupled[:3]} "
                             "are in train mode; call model.eval() or use hvp_method='double_backward'")
        self.method = method
        self._graph: Optional[tuple[tuple[Tensor, ...], list[Tensor], list[int]]] = None
        self._fn: Optional[Callable] = None
        self.loss = self._build()

    # ------------------------------------------------------------------ the loss as a function
    def _loss_at(self, tensors: Sequence[Tensor], inputs: Any = None, targets: Any = None) -> Tensor:
        mapping = dict(self._constants)
        mapping.update(zip(self._keys, tensors))
        inputs = self._inputs if inputs is None else inputs
        targets = self._targets if targets is None else targets
        out = functional_call(self._call, mapping, (inputs,))
        return self._loss_fn(out, targets)

    def _chunk_batches(self):
        if self._chunks is None:
            yield 1.0, self._inputs, self._targets
            return
        for s, e in self._chunks:
            tg = None if self._targets is None else self._targets[s:e]
            yield (e - s) / self._n, slice_rows(self._inputs, s, e), tg

    @staticmethod
    def _check_loss(loss: Any) -> Tensor:
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"the loss must be a scalar (0-dim) tensor, got {shape}; pass a loss_fn that reduces "
                             "over samples (e.g. reduction='mean')")
        if not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(f"the loss is not finite ({float(loss.detach())}) at the current parameters")
        return loss

    def _build(self) -> float:
        """Evaluate the loss once (checks it) and, for the graph-reusing methods, keep the graph."""
        if self.method == "double_backward":
            leaves = tuple(p.requires_grad_(True) for p in (t.detach() for t in self._primals))
            with torch.enable_grad():
                loss = self._check_loss(self._loss_at(leaves))
                if not loss.requires_grad:
                    raise ValueError("the loss does not depend differentiably on the parameters (is the forward "
                                     "run under torch.no_grad, or does it detach?)")
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            self._graph = (leaves, list(grads), live)
            return float(loss.detach())
        total = 0.0
        with torch.no_grad():
            for w, x, y in self._chunk_batches():
                total += w * float(self._check_loss(self._loss_at(self._primals, x, y)))
        if self.method in ("linearize", "vjp"):
            def grad_fn(*tensors):
                return torch.func.grad(lambda ts: self._loss_at(ts))(tensors)
            if self.method == "linearize":
                with warnings.catch_warnings():  # torch's constant folding inside linearize is noisy
                    warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
                    _, self._fn = torch.func.linearize(grad_fn, *self._primals)
            else:
                _, self._fn = torch.func.vjp(grad_fn, *self._primals)
        return total

    # ------------------------------------------------------------------ vectors
    def unflatten(self, v: Tensor) -> list[Tensor]:
        """A flat vector of length ``dim`` as a list of tensors shaped like the parameters."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
        parts = torch.split(v.to(self.device), self.numels)
        return [p.reshape(s).to(d) for p, s, d in zip(parts, self.shapes, self.dtypes)]

    def flatten(self, tensors: Sequence[Optional[Tensor]]) -> Tensor:
        """Concatenate per-parameter tensors (None for zero) into one flat float64 vector."""
        return torch.cat([
            torch.zeros(n, dtype=torch.float64, device=self.device) if t is None
            else t.detach().reshape(-1).to(torch.float64)
            for t, n in zip(tensors, self.numels)
        ])

    # ------------------------------------------------------------------ products
    def hvp(self, vs: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """``H v`` for ``v`` given per parameter; None entries of the result are zero blocks."""
        self.num_products += 1
        if self.method == "double_backward":
            leaves, grads, live = self._graph
            if not live:  # the gradient does not depend on the parameters: H = 0
                return [None] * len(leaves)
            with torch.enable_grad():
                out = torch.autograd.grad([grads[i] for i in live], leaves, grad_outputs=[vs[i] for i in live],
                                          retain_graph=True, allow_unused=True)
            return list(out)
        if self.method in ("linearize",):
            return list(self._fn(*vs))
        if self.method == "vjp":
            return list(self._fn(tuple(vs)))
        total: Optional[list[Optional[Tensor]]] = None
        for w, x, y in self._chunk_batches():
            if self.method == "jvp":
                def grad_fn(*tensors, x=x, y=y):
                    return torch.func.grad(lambda ts: self._loss_at(ts, x, y))(tensors)
                _, part = torch.func.jvp(grad_fn, self._primals, tuple(vs))
                part = list(part)
            else:  # recompute: forward, backward with graph, and the second backward
                leaves = tuple(p.detach().requires_grad_(True) for p in self._primals)
                with torch.enable_grad():
                    loss = self._loss_at(leaves, x, y)
                    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                    part = [None] * len(leaves)
                    if live:
                        part = list(torch.autograd.grad([grads[i] for i in live], leaves,
                                                        grad_outputs=[vs[i] for i in live], allow_unused=True))
            if w != 1.0:
                part = [None if t is None else t * w for t in part]
            total = part if total is None else [a if b is None else (b if a is None else a + b)
                                                for a, b in zip(total, part)]
        return total

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` (any float dtype), as a flat float64 vector."""
        return self.flatten(self.hvp(self.unflatten(v)))

    def gradient(self) -> Tensor:
        """The gradient of the loss with respect to the selected parameters, flat float64."""
        if self.method == "double_backward":
            return self.flatten(self._graph[1])
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for w, x, y in self._chunk_batches():
            leaves = tuple(p.detach().requires_grad_(True) for p in self._primals)
            with torch.enable_grad():
                grads = torch.autograd.grad(self._loss_at(leaves, x, y), leaves, allow_unused=True)
            total += w * self.flatten(grads)
        return total

    def close(self) -> None:
        """Free the kept graph (it is also freed when the operator is garbage collected)."""
        self._graph = None
        self._fn = None

    def __enter__(self) -> "HessianOperator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _operator(model: Union[nn.Module, HessianOperator], inputs: Any, targets: Optional[Tensor], **kwargs: Any
              ) -> HessianOperator:
    if isinstance(model, HessianOperator):
        if inputs is not None or targets is not None:
            raise ValueError("pass either a HessianOperator, or a model with inputs and targets, not both")
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a HessianOperator, got {type(model).__name__}")
    if inputs is None:
        raise ValueError("inputs are needed to build the loss")
    return HessianOperator(model, inputs, targets, **kwargs)


def hessian_operator(model: nn.Module, inputs: Any, targets: Optional[Tensor], **kwargs: Any) -> HessianOperator:
    """Build a :class:`HessianOperator` (see there for the arguments)."""
    return HessianOperator(model, inputs, targets, **kwargs)


# ---------------------------------------------------------------------- eigenvalues
@dataclass
class HessianEigenvalues:
    """Eigenvalues (``largest``: descending, ``smallest``: ascending), float64.

    ``num_products`` Hessian-vector products were used; ``converged`` says whether every wanted
    Ritz pair met the tolerance; ``residuals`` are ``||H u - theta u||`` of the Ritz pairs (each
    bounds that eigenvalue's absolute error); ``eigenvectors`` (flat, one per column) on request.
    """

    eigenvalues: Tensor
    num_products: int
    converged: bool
    residuals: Tensor
    eigenvectors: Optional[Tensor] = None


def hessian_eigenvalues(
    model: Union[nn.Module, HessianOperator],
    inputs: Any = None,
    targets: Optional[Tensor] = None,
    *,
    loss_fn: Optional[LossFn] = None,
    forward: Optional[ForwardFn] = None,
    params: Params = None,
    k: int = 1,
    which: Literal["largest", "smallest"] = "largest",
    tol: float = 1e-3,
    max_iter: Optional[int] = None,
    seed: Optional[int] = 0,
    hvp_method: HVPMethod = "auto",
    chunk_size: Optional[int] = None,
    return_vectors: bool = False,
) -> HessianEigenvalues:
    r"""The ``k`` largest (or, ``which="smallest"``, most negative) eigenvalues of the loss Hessian.

    Lanczos with full reorthogonalization (the shared solver in ``functional/_lanczos.py``) on
    Hessian-vector products, from a seeded random start. It stops when every wanted Ritz pair
    :math:`(\theta_i, u_i)` has residual :math:`\lVert H u_i - \theta_i u_i\rVert \le tol\,|\theta_i|`;
    since some eigenvalue lies within the residual of each Ritz value, the returned values are
    then within relative ``tol`` of the spectrum (in practice far closer: the error is about
    residual squared over the spectral gap). "Largest" is algebraic, unlike power iteration
    (PyHessian), which finds the largest *magnitude* and so can return a negative eigenvalue.

    Cost: ``num_products`` products (plus one forward and backward to build the graph); each
    product costs about 2-3 training steps on the same batch. Typically 6-15 products for
    ``k=1`` at ``tol=1e-3`` on trained networks, against 10-50 for power iteration.

    Args:
        model: the network, or a prebuilt :class:`HessianOperator` (then omit inputs/targets).
        inputs, targets, loss_fn, forward, params, hvp_method, chunk_size: see :class:`HessianOperator`.
        k: how many eigenvalues.
        which: ``"largest"`` or ``"smallest"``.
        tol: relative residual tolerance.
        max_iter: at most this many products (default ``min(dim, 100 + 2k)``).
        seed: of the start vector (private generator; the global RNG is not used).
        return_vectors: also return the Ritz vectors (flat float64, ``(dim, k)``).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    op = _operator(model, inputs, targets, loss_fn=loss_fn, forward=forward, params=params,
                   hvp_method=hvp_method, chunk_size=chunk_size)
    if k > op.dim:
        raise ValueError(f"k={k} exceeds the number of parameters ({op.dim})")
    before = op.num_products
    result = lanczos_eigenvalues(op.matvec, op.dim, k=k, which=which, tol=float(tol), max_iter=max_iter, seed=seed,
                                 device=op.device, return_vectors=return_vectors)
    return HessianEigenvalues(result.eigenvalues, op.num_products - before, result.converged, result.residuals,
                              result.eigenvectors)


# ---------------------------------------------------------------------- trace
@dataclass
class HessianTrace:
    """A trace estimate, its standard error and the products it took (float64 0-dim tensors)."""

    estimate: Tensor
    std_error: Tensor
    num_products: int
    method: str


def _rademacher(dim: int, n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return (torch.randint(0, 2, (dim, n), generator=generator, dtype=torch.int8) * 2 - 1).to(device, torch.float64)


def _apply(op: HessianOperator, V: Tensor) -> Tensor:
    return torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


def hessian_trace(
    model: Union[nn.Module, HessianOperator],
    inputs: Any = None,
    targets: Optional[Tensor] = None,
    *,
    loss_fn: Optional[LossFn] = None,
    forward: Optional[ForwardFn] = None,
    params: Params = None,
    num_products: int = 30,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    hvp_method: HVPMethod = "auto",
    chunk_size: Optional[int] = None,
) -> HessianTrace:
    r"""The trace of the loss Hessian, estimated from ``num_products`` products with Rademacher vectors.

    ``method="hutch++"`` (default; Meyer, Musco, Musco, Woodruff 2021, "Hutch++: Optimal
    Stochastic Trace Estimation"): with ``s = num_products // 3`` sketch vectors ``S`` and
    ``r = num_products - 2s`` residual vectors ``G``, take ``Q = orth(H S)`` and

    .. math:: \widehat{\mathrm{tr}} = \mathrm{tr}(Q^T H Q) + \frac1r \sum_j g_j^T (I-QQ^T) H (I-QQ^T) g_j.

    The top of the spectrum, which dominates a network Hessian (a few outlier eigenvalues over a
    bulk near zero), is taken exactly from the sketch, and Hutchinson only sees the deflated rest:
    the error falls as ``1/m`` instead of ``1/sqrt(m)`` when the spectrum decays. Unbiased.
    ``method="hutchinson"``: the plain mean of ``g^T H g`` (Hutchinson 1989), as in PyHessian.

    The standard error is that of the Hutchinson part (sample standard deviation of its terms over
    ``sqrt(r)``); the sketch part is exact given ``Q``. It is a noisy estimate from ``r`` terms.

    Cost: ``num_products`` products (exactly), and ``O(dim * num_products)`` float64 memory.

    Args:
        num_products: ``>= 4`` for Hutch++, ``>= 2`` for Hutchinson (two terms give an error bar).
        seed, generator: of the Rademacher vectors (private; the global RNG is not used).
        Others: see :func:`hessian_eigenvalues`.
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
    least = 4 if method == "hutch++" else 2
    if not isinstance(num_products, int) or isinstance(num_products, bool) or num_products < least:
        raise ValueError(f"num_products must be an integer >= {least} for method={method!r}, got {num_products!r}")
    op = _operator(model, inputs, targets, loss_fn=loss_fn, forward=forward, params=params,
                   hvp_method=hvp_method, chunk_size=chunk_size)
    gen = make_generator(seed, generator)
    before = op.num_products
    if method == "hutchinson":
        G = _rademacher(op.dim, num_products, gen, op.device)
        terms = (G * _apply(op, G)).sum(0)
        exact = torch.zeros((), dtype=torch.float64, device=op.device)
    else:
        s = min(num_products // 3, op.dim)
        r = num_products - 2 * s
        S = _rademacher(op.dim, s, gen, op.device)
        Q, _ = torch.linalg.qr(_apply(op, S))
        exact = (Q * _apply(op, Q)).sum()
        G = _rademacher(op.dim, r, gen, op.device)
        G = G - Q @ (Q.T @ G)
        terms = (G * _apply(op, G)).sum(0)
    estimate = exact + terms.mean()
    std_error = terms.std(unbiased=True) / math.sqrt(terms.numel())
    return HessianTrace(estimate, std_error, op.num_products - before, method)


# ---------------------------------------------------------------------- spectral density
@dataclass
class SpectralDensity:
    r"""A smoothed spectral density from stochastic Lanczos quadrature.

    ``nodes`` and ``weights`` (``(runs, m)``, float64) are the Gauss quadrature rule of each run
    (weights of a run sum to 1), so ``sum(weights * f(nodes)) / runs`` estimates
    :math:`\mathrm{tr} f(H) / \mathrm{dim}`. ``density`` is that rule smoothed by a Gaussian of
    width ``sigma`` and evaluated on ``grid``; it integrates to about 1.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_products: int
    dim: int

    def trace(self) -> Tensor:
        """The trace estimate the quadrature gives, ``dim * mean_runs sum_j w_j theta_j``."""
        return self.dim * (self.weights * self.nodes).sum(1).mean()

    def sample(self, n: int = 1000) -> Tensor:
        """``n`` deterministic points whose histogram is the density (its quantiles at ``(i + 1/2)/n``).

        For loggers that take samples, not weights (TensorBoard's ``add_histogram``).
        """
        cdf = torch.cumsum(self.density, 0)
        cdf = cdf / cdf[-1]
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        idx = torch.searchsorted(cdf, levels).clamp(max=self.grid.numel() - 1)
        return self.grid[idx]


def hessian_spectral_density(
    model: Union[nn.Module, HessianOperator],
    inputs: Any = None,
    targets: Optional[Tensor] = None,
    *,
    loss_fn: Optional[LossFn] = None,
    forward: Optional[ForwardFn] = None,
    params: Params = None,
    num_steps: int = 30,
    num_runs: int = 1,
    num_points: int = 256,
    sigma: Optional[float] = None,
    grid: Optional[Tensor] = None,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    hvp_method: HVPMethod = "auto",
    chunk_size: Optional[int] = None,
) -> SpectralDensity:
    r"""The eigenvalue density of the loss Hessian by stochastic Lanczos quadrature (SLQ).

    Ghorbani, Krishnan, Xiao (2019), "An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density" (ICML). For each of ``num_runs`` Rademacher start vectors ``v`` (unit
    norm), ``m = num_steps`` Lanczos steps give a tridiagonal ``T_m = U diag(theta) U^T``; the
    Gauss rule with nodes ``theta_j`` and weights ``tau_j = U_{1j}^2`` integrates
    :math:`v^T f(H) v` exactly for polynomials ``f`` of degree ``< 2m``, and
    :math:`E[v^T f(H) v] = \mathrm{tr} f(H)/\mathrm{dim}`. The density is

    .. math:: \phi(t) = \frac{1}{n_v}\sum_{runs}\sum_j \tau_j\, \mathcal N(t;\ \theta_j, \sigma^2).

    Cost: ``num_runs * num_steps`` products (fewer if an invariant subspace is found) and
    ``num_steps * dim`` float64 values for the reorthogonalized basis.

    Args:
        num_steps: Lanczos steps per run (PyHessian uses 100; 30 resolves outliers and the bulk's shape).
        num_runs: independent start vectors (PyHessian's default is 1).
        num_points: grid size when ``grid`` is not given.
        sigma: Gaussian width; default 1% of the node range (our choice, not the paper's).
        grid: where to evaluate the density; default the node range padded by ``5 sigma``.
        seed, generator: of the start vectors.
        Others: see :func:`hessian_eigenvalues`.
    """
    for arg, value in (("num_steps", num_steps), ("num_runs", num_runs), ("num_points", num_points)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    op = _operator(model, inputs, targets, loss_fn=loss_fn, forward=forward, params=params,
                   hvp_method=hvp_method, chunk_size=chunk_size)
    gen = make_generator(seed, generator)
    before = op.num_products
    steps = min(num_steps, op.dim)
    nodes, weights = [], []
    for _ in range(num_runs):
        v0 = _rademacher(op.dim, 1, gen, op.device)[:, 0]
        alpha, beta, _ = lanczos_tridiagonal(op.matvec, v0, steps)
        m = alpha.shape[0]
        T = torch.diag(alpha)
        if m > 1:
            T = T + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
        theta, U = torch.linalg.eigh(T)
        tau = U[0, :] ** 2
        # an early stop (invariant subspace) leaves fewer nodes: pad with zero weight
        pad = steps - m
        nodes.append(torch.cat([theta, theta.new_full((pad,), float(theta[-1]))]).cpu())
        weights.append(torch.cat([tau, tau.new_zeros(pad)]).cpu())
    nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else 0.01 * max(abs(hi), 1e-12)
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
    kernel = torch.exp(-0.5 * ((grid[:, None, None] - nodes_t[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (kernel * weights_t[None]).sum(-1).mean(-1)
    return SpectralDensity(grid, density, nodes_t, weights_t, float(sigma), op.num_products - before, op.dim)
