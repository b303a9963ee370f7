"""Private engine of ``per_sample_gradients(method="auto")``: structured per-sample gradients of linear layers.

A linear layer ``z = x W^T + b`` applied once per forward to a batch-first input ``x`` of shape
``(N, ..., in)`` has, for every sample ``i``, the per-sample gradients

    dL_i/dW = sum_p g[i, p]^T x[i, p]        dL_i/db = sum_p g[i, p]

where ``g[i] = dL_i/dz[i]`` is the gradient of sample ``i``'s own loss with respect to the layer's
output and ``p`` runs over the extra dimensions (sequence positions; none for an MLP). Samples do
not interact (eval mode), so ``dL_i/dz[i]`` is also the gradient of the *sum* of the per-sample
losses with respect to ``z[i]``: one forward that records every such layer's input, and one
backward of the summed loss with respect to the layers' outputs give every sample's gradient at
once ("structured" per-sample gradients, as Opacus and BackPACK compute them). The outer products
are one broadcast multiplication per layer (``(N, out, 1) * (N, 1, in)``, written straight into the
result), or a batched matrix product over the positions when there are extra dimensions.

The per-sample losses come from the loss adapter (``(outputs, targets) -> scalar`` for a batch)
applied to each sample's output given back a batch dimension of one, ``vmap``-ped over the samples
(the model is not vmapped); a loss that ``vmap`` cannot run is applied sample by sample instead.
The default loss (mean cross-entropy or mean squared error) uses its closed per-sample form
(``reduction="none"`` averaged over each sample's own positions), which is the same function and
skips ``vmap``'s overhead.
The backward uses ``torch.autograd.grad`` with respect to the recorded outputs only, so no
parameter's ``.grad`` is touched and no batch weight gradient is formed.

Which parameters take this route (:func:`make_plan`) is decided by one forward of a single sample,
with the random number generator state restored afterwards, that counts the
calls of every ``nn.Linear`` and attributes every use of a parameter tensor to the innermost module
running at that moment (a ``TorchFunctionMode``). A parameter is *structured* when it belongs to an
``nn.Linear`` (not a subclass that overrides ``forward``, no hooks of its own, no parametrization)
that is called exactly once, on an input whose first dimension is the sample (1 for the planning
sample), and the parameter is used nowhere else (a weight shared with another module, or read by
the ``forward`` adapter, is not). Every other parameter (convolutions, normalisation layers,
embeddings, custom modules, shared or tied weights) is left to the caller's ``vmap`` route. Each
chunk checks the plan again (one call per layer, the sample first, the layer input not modified in
place afterwards) and hands a layer that fails it to the ``vmap`` route for that chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ._adapters import ForwardFn, default_loss, model_outputs

LossFn = Callable[[Tensor, Optional[Tensor]], Tensor]


@dataclass
class _Route:
    """One structured ``nn.Linear``: the positions of its weight and bias in the parameter list."""

    module: nn.Module
    weight: Optional[int]
    bias: Optional[int]


@dataclass
class Plan:
    """Which parameters (positions in the caller's parameter list) take which route."""

    routes: list[_Route]
    fallback: list[int]  # left to vmap, in parameter order


def _has_own_hooks(module: nn.Module) -> bool:
    return any(len(getattr(module, attr, None) or ()) for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _is_plain_linear(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and not _has_own_hooks(module) and not getattr(module, "parametrizations", None))


def _tensors(obj: Any, out: list) -> list:
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _tensors(v, out)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _tensors(v, out)
    return out


class _UseTracker(TorchFunctionMode):
    """Records, for every watched tensor, which module (innermost running) used it in an operation."""

    def __init__(self, watched: dict[int, int], stack: list[nn.Module]) -> None:
        super().__init__()
        self.watched = watched
        self.stack = stack
        self.users: dict[int, set[int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs), []):
            j = self.watched.get(id(t))
            if j is not None:
                self.users.setdefault(j, set()).add(id(self.stack[-1]) if self.stack else 0)
        return func(*args, **kwargs)


def make_plan(model: nn.Module, params: list[tuple[str, Tensor]], one_sample: Any,
              forward: Optional[ForwardFn]) -> Plan:
    """Route each parameter: structured (plain ``nn.Linear`` called once on batch-first inputs) or vmap.

    ``one_sample``: the inputs of a single sample, with its batch dimension (one forward of it runs;
    the random number generator state is restored afterwards).
    """
    index = {id(p): j for j, (_, p) in enumerate(params)}
    candidates: list[_Route] = []
    for module in model.modules():
        if not _is_plain_linear(module):
            continue
        w, b = module._parameters.get("weight"), module._parameters.get("bias")
        route = _Route(module, index.get(id(w)) if w is not None else None,
                       index.get(id(b)) if b is not None else None)
        if route.weight is not None or route.bias is not None:
            candidates.append(route)
    if not candidates:
        return Plan([], list(range(len(params))))

    stack: list[nn.Module] = []
    calls: dict[int, int] = {}
    batch_first: dict[int, bool] = {}
    by_id = {id(r.module): r for r in candidates}

    def push(module, args, kwargs):
        stack.append(module)
        if id(module) in by_id:
            calls[id(module)] = calls.get(id(module), 0) + 1
            x = args[0] if args else kwargs.get("input")
            batch_first[id(module)] = isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] == 1

    def pop(module, args, output):
        if stack and stack[-1] is module:
            stack.pop()
        if id(module) in by_id and not (isinstance(output, Tensor) and output.dim() >= 2 and output.shape[0] == 1):
            batch_first[id(module)] = False

    handles = []
    watched = {}
    for r in candidates:
        for j in (r.weight, r.bias):
            if j is not None:
                watched[id(params[j][1])] = j
    tracker = _UseTracker(watched, stack)
    devices = sorted({p.device.index or 0 for _, p in params if p.device.type == "cuda"})
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(push, with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(pop, always_call=True))
        # Grad enabled, as in the real forward: some modules (attention) take another code path
        # under no_grad.
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), tracker:
            model_outputs(model, one_sample, forward)
    finally:
        for h in handles:
            h.remove()

    routes = []
    for r in candidates:
        key = id(r.module)
        if calls.get(key, 0) != 1 or not batch_first.get(key, False):
            continue
        # Only a parameter that no other module (nor code outside every module) touched.
        keep = [j if j is not None and tracker.users.get(j, set()) <= {key} else None for j in (r.weight, r.bias)]
        if keep != [None, None]:
            routes.append(_Route(r.module, *keep))
    structured = {j for r in routes for j in (r.weight, r.bias) if j is not None}
    fallback = [j for j in range(len(params)) if j not in structured]
    return Plan(routes, fallback)


def _default_per_sample_losses(outputs: Tensor, targets: Tensor) -> Optional[Tensor]:
    """``default_loss`` of each sample alone, in closed form; None where the closed form does not apply.

    ``default_loss`` averages over the batch (and over positions and output coordinates), so a
    batch of one sample gives that sample's mean: cross-entropy with ``reduction="none"`` averaged
    over the sample's positions, or its mean squared error. Targets equal to the ignore index
    (-100) are left to the general route (a sample whose targets are all ignored has a loss of 0/0).
    """
    n = outputs.shape[0]
    if not targets.is_floating_point():
        if outputs.dim() < 2 or targets.numel() * outputs.shape[-1] != outputs.numel() or bool((targets == -100).any()):
            return None
        if outputs.dim() == 2:
            if targets.shape != (n,):
                return None
            return F.cross_entropy(outputs, targets, reduction="none")
        flat = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="none")
        return flat.reshape(n, -1).mean(dim=1)
    if targets.numel() != outputs.numel():
        return None
    diff = outputs - targets.reshape(outputs.shape).to(outputs.dtype)
    return diff.square().reshape(n, -1).mean(dim=1)


def per_sample_losses(loss_fn: LossFn, outputs: Tensor, targets: Optional[Tensor]) -> Tensor:
    """``(N,)`` losses: ``loss_fn`` on each sample's output (and target) given back a batch dimension of one.

    The default loss has a closed form (:func:`_default_per_sample_losses`, the same values); any
    other loss is ``vmap``-ped over the samples, or called once per sample if ``vmap`` cannot run it.
    """
    if loss_fn is default_loss and targets is not None:
        losses = _default_per_sample_losses(outputs, targets)
        if losses is not None:
            return losses

    def one(o: Tensor, y: Optional[Tensor]) -> Tensor:
        loss = loss_fn(o.unsqueeze(0), None if y is None else y.unsqueeze(0))
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar for a batch of one sample, got shape {tuple(loss.shape)}")
        return loss

    try:
        return vmap(one, in_dims=(0, None if targets is None else 0), randomness="different")(outputs, targets)
    except (RuntimeError, NotImplementedError):
        # A loss vmap cannot run (.item(), data-dependent control flow): one call per sample.
        n = outputs.shape[0]
        return torch.stack([one(outputs[i], None if targets is None else targets[i]) for i in range(n)])


def structured_gradients(model: nn.Module, params: list[tuple[str, Tensor]], plan: Plan, inputs: Any,
                         targets: Optional[Tensor], forward: Optional[ForwardFn], loss_fn: LossFn, n: int,
                         dest: Optional[list[Tensor]] = None) -> tuple[dict[int, Tensor], list[int]]:
    """Per-sample gradients of the plan's structured parameters for one chunk of ``n`` samples.

    Returns ``({position: (n, *shape)}, positions left to vmap)``. ``dest``: optional
    ``(n, *shape)`` views (one per parameter) the gradients are written into.
    """
    if not plan.routes:
        return {}, list(plan.fallback)
    records: dict[int, list[tuple[Tensor, int, Tensor]]] = {id(r.module): [] for r in plan.routes}

    def record(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("input")
        if not isinstance(output, Tensor) or not isinstance(x, Tensor):
            records[id(module)].append(None)  # type: ignore[arg-type]
            return None
        # The layer's own output, before anything downstream (an in-place activation) can change it:
        # the rest of the model sees a copy, and the backward is taken with respect to this tensor.
        records[id(module)].append((x, x._version, output))
        return output.clone()

    handles = [r.module.register_forward_hook(record, with_kwargs=True, prepend=True) for r in plan.routes]
    try:
        with torch.enable_grad():
            outputs = model_outputs(model, inputs, forward)
            if outputs.dim() == 0 or outputs.shape[0] != n:
                return {}, list(range(len(params)))  # not one output row per sample: vmap decides
            total = per_sample_losses(loss_fn, outputs, targets).sum()
    finally:
        for h in handles:
            h.remove()

    active: list[tuple[_Route, Tensor, Tensor]] = []
    rest = list(plan.fallback)
    for r in plan.routes:
        rec = records[id(r.module)]
        good = (len(rec) == 1 and rec[0] is not None and rec[0][0]._version == rec[0][1]
                and rec[0][0].dim() >= 2 and rec[0][0].shape[0] == n and rec[0][2].shape[0] == n
                and rec[0][2].requires_grad)
        if good:
            active.append((r, rec[0][0], rec[0][2]))
        else:
            rest.extend(j for j in (r.weight, r.bias) if j is not None)
    if active and total.requires_grad:
        grads = torch.autograd.grad(total, [z for _, _, z in active], allow_unused=True)
    else:
        grads = (None,) * len(active)

    result: dict[int, Tensor] = {}
    with torch.no_grad():
        for (r, x, z), g in zip(active, grads):
            if g is None:  # the loss does not depend on this layer
                g = torch.zeros_like(z)
            x = x.detach()
            if r.weight is not None:
                result[r.weight] = _weight_rows(g, x, params[r.weight][1].dtype,
                                                None if dest is None else dest[r.weight])
            if r.bias is not None:
                b = g if g.dim() == 2 else g.reshape(n, -1, g.shape[-1]).sum(dim=1)
                b = b.to(params[r.bias][1].dtype)
                if dest is not None:
                    dest[r.bias].copy_(b)
                    b = dest[r.bias]
                result[r.bias] = b
    return result, sorted(rest)


def _weight_rows(g: Tensor, x: Tensor, dtype: torch.dtype, out: Optional[Tensor]) -> Tensor:
    """``(n, out, in)`` per-sample weight gradients ``sum_p g[i, p]^T x[i, p]``."""
    n = g.shape[0]
    if g.dtype != dtype or x.dtype != dtype:
        g, x = g.to(dtype), x.to(dtype)
    if g.dim() == 2:
        # Outer products as a broadcast multiplication: a batched matrix product with an inner
        # dimension of one is several times slower on CPU.
        if out is None:
            return g.unsqueeze(2) * x.unsqueeze(1)
        return torch.mul(g.unsqueeze(2), x.unsqueeze(1), out=out)
    gs = g.reshape(n, -1, g.shape[-1]).transpose(1, 2)  # (n, out, positions)
    xs = x.reshape(n, -1, x.shape[-1])  # (n, positions, in)
    if out is None:
        return torch.bmm(gs, xs)
    if out.is_contiguous():
        return torch.bmm(gs, xs, out=out)
    out.copy_(torch.bmm(gs, xs))
    return out
