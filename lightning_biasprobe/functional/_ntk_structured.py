"""Private engine of the empirical NTK: a per-parameter plan, a capture pass, chunked contractions.

The kernel is a sum over parameters, ``K = sum_l J_l J_l^T``, so each parameter can be handled by
whichever route is cheapest for it, and the routes add up to the same kernel:

``"structured"`` (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``)
    One forward with hooks records each layer's input ``a`` and output ``z``; one backward per
    output (``C`` of them; on accelerators one backward vmapped over the outputs) gives the
    output gradients ``g[c, i] = d f_c(x_i) / d z_i`` (samples do not interact, so the gradient of
    the batch sum of output ``c`` holds every sample's row). A weight used at ``S`` positions (sequence positions, conv
    output pixels) has per-sample Jacobian ``J[c, i] = sum_p g[c, i, p] a[i, p]^T``, so

        K_l[(c, i), (c', j)] = sum_{p, q} (g[c, i, p] . g[c', j, q]) (a[i, p] . a[j, q])

    (Novak, Sohl-Dickstein, Schoenholz 2022, "Fast Finite Width Neural Tangent Kernel", ICML:
    "structured derivatives"). Two contraction orders give the same numbers: ``"gram"`` multiplies
    the Gram of the inputs with the Gram of the output gradients (no per-sample parameter
    gradient is formed; for ``S = 1``, an MLP layer, this is ``(G G^T) * (A A^T + 1)``), and
    ``"jac"`` first sums over positions to per-(output, sample) weight gradients of one chunk,
    formed one output at a time right after its backward.
    The order with fewer flops is chosen per layer (``"gram"`` always wins at ``S = 1``; for a
    conv with many output pixels, summing over positions first is cheaper by orders of
    magnitude). A trailing column of ones in ``a`` accounts for the bias.
``"module"``
    Any other module whose own parameters are used only inside its own (single) call, with
    batch-first tensor inputs and output (LayerNorm, BatchNorm in eval mode, custom modules): the
    same capture gives its input and output gradient, and per-sample Jacobians of its parameters
    come from a vmapped VJP *through that module alone* (``torch.func``).
``"jacobian"``
    Everything else (a module called twice per forward, tied or shared weights, parameters read
    outside their module, modules with user hooks): per-sample Jacobians of the whole model with
    respect to those parameters, ``vmap(jacrev)`` over ``functional_call``, chunk by chunk.

Which parameter takes which route is decided by one traced forward on a few samples: module
calls are counted with hooks and every use of a parameter tensor is attributed to the innermost
module running at the time (a ``TorchFunctionMode``), so a weight used twice, or read by another
module, is never given to a per-call route that would miss its cross terms.

All routes assume that samples do not interact (eval mode: no BatchNorm batch statistics).

Pairs of chunks are contracted into float64 kernel blocks (``run_blocks``). With one chunk and a
trace or diagonal kernel the engine streams: each output's contribution is contracted as soon as
its gradient exists, so neither ``C x`` activations nor ``C x n x P`` Jacobian rows are held.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .._tree import num_rows, slice_rows, tree_leaves, tree_map
from ._adapters import ForwardFn, model_outputs, per_sample_outputs

KINDS = ("block", "trace", "diagonal")
# Largest per-pair workspace (elements) of a "gram" contraction with S > 1 before "jac" is used.
_GRAM_WORKSPACE = 2**25
# Tests set this to "gram" or "jac" to force one contraction order on every layer that has both.
_FORCE_ORDER: Optional[str] = None


# --------------------------------------------------------------------------------------------- plan
@dataclass
class _Entry:
    """A module whose parameters are handled from its captured input and output gradient."""

    name: str
    module: nn.Module
    kind: str                      # "linear", "conv2d", "embedding" or "module"
    params: dict[str, Tensor]      # attribute name -> trainable parameter handled here
    full_names: list[str]
    order: str = "jac"             # "gram" or "jac" (structured kinds); "jac" for "module"
    positions: int = 1             # S: positions sharing the weight in one call


@dataclass
class NTKPlan:
    """Which route computes each trainable parameter's share of the kernel.

    ``structured``: Linear/Conv2d/Embedding parameters from layer Grams or per-layer Jacobians;
    ``per_module``: other modules' parameters from per-sample VJPs through the module alone;
    ``jacobian``: whole-model per-sample Jacobians (shared, tied or reused weights...);
    ``unused``: parameters the forward pass does not use (they contribute nothing).
    ``orders``: the contraction order chosen per structured module (``"gram"`` or ``"jac"``).
    """

    structured: list[str] = field(default_factory=list)
    per_module: list[str] = field(default_factory=list)
    jacobian: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    orders: dict[str, str] = field(default_factory=dict)
    num_outputs: int = 0
    entries: list[_Entry] = field(default_factory=list, repr=False)
    fallback: dict[str, Tensor] = field(default_factory=dict, repr=False)


class _Bound(nn.Module):
    """``inputs -> (n, C)`` outputs through the forward adapter, for ``functional_call``."""

    def __init__(self, model: nn.Module, forward: Optional[ForwardFn]) -> None:
        super().__init__()
        self.model = model
        self._forward_fn = forward

    def forward(self, inputs: Any) -> Tensor:
        return per_sample_outputs(model_outputs(self.model, inputs, self._forward_fn))


def check_independent_samples(model: nn.Module, what: str = "empirical_ntk") -> None:
    """Raise if modules couple the samples of a batch or draw random masks."""
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
            bad.append(f"{name or type(m).__name__} (BatchNorm using batch statistics)")
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            bad.append(f"{name or type(m).__name__} (Dropout in train mode)")
    if bad:
        raise ValueError(
            f"{what} needs a deterministic per-sample function, but {', '.join(bad[:3])} "
            f"{'is' if len(bad) == 1 else 'are'} active; call model.eval() first (BatchNorm also needs "
            "track_running_stats=True)"
        )


def _flat_tensors(obj: Any, out: list) -> None:
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _flat_tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _flat_tensors(o, out)


class _UseTracker(TorchFunctionMode):
    """Attributes every use of a watched tensor to the innermost running module."""

    def __init__(self, watched: dict[int, Any], stack: list) -> None:
        super().__init__()
        self.watched = watched
        self.stack = stack
        self.uses: dict[int, list[int]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in ("__get__", "__set__"):  # .shape, .dtype: not a use
            found: list = []
            _flat_tensors(args, found)
            _flat_tensors(kwargs, found)
            owner = id(self.stack[-1]) if self.stack else 0
            for t in found:
                if id(t) in self.watched:
                    self.uses[id(t)].append(owner)
        return func(*args, **kwargs)


def _base_forward(m: nn.Module) -> Optional[str]:
    """The structured kind of ``m`` if it runs the stock forward of a supported layer."""
    for cls, kind in ((nn.Linear, "linear"), (nn.Conv2d, "conv2d"), (nn.Embedding, "embedding")):
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return kind
    return None


def make_plan(model: nn.Module, inputs: Any, forward: Optional[ForwardFn], method: str, *,
              kind: str = "block", chunk_size: int = 128, plan_rows: int = 3) -> NTKPlan:
    """Trace one forward on ``plan_rows`` samples and route every trainable parameter."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (requires_grad=True): its tangent kernel is zero")
    n_total = num_rows(inputs)
    plan = NTKPlan()
    rows = min(n_total, plan_rows)
    small = slice_rows(inputs, 0, rows)

    owners: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is not None:
                owners[id(p)].append((mname, m, attr))

    stack: list[nn.Module] = []
    calls: dict[int, list] = defaultdict(list)
    had_hooks = {id(m): bool(m._forward_hooks or m._forward_pre_hooks) for m in model.modules()}

    def pre(mod, args):
        stack.append(mod)

    def post(mod, args, kwargs, out):
        if stack and stack[-1] is mod:
            stack.pop()
        calls[id(mod)].append((args, kwargs, out))

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
    watched = {id(p): p for _, p in named}
    tracker = _UseTracker(watched, stack)
    try:
        with torch.enable_grad(), tracker:
            out = per_sample_outputs(model_outputs(model, small, forward))
    finally:
        for h in handles:
            h.remove()
    if not out.requires_grad:
        raise ValueError(_NON_DIFFERENTIABLE)
    plan.num_outputs = out.shape[1]
    del out
    C, N = plan.num_outputs, n_total

    if method == "jacobian":
        for n, p in named:
            plan.jacobian.append(n)
            plan.fallback[n] = p
        return plan

    entries: dict[int, _Entry] = {}
    for name, p in named:
        uses = tracker.uses.get(id(p), [])
        if not uses:
            plan.unused.append(name)
            continue
        own = owners[id(p)]
        route = None
        if len(own) == 1:
            mname, m, attr = own[0]
            if all(u == id(m) for u in uses) and _capturable(m, calls.get(id(m), []), rows, had_hooks.get(id(m))):
                route = (mname, m, attr)
        if route is None:
            plan.jacobian.append(name)
            plan.fallback[name] = p
            continue
        mname, m, attr = route
        entry = entries.get(id(m))
        if entry is None:
            skind = _base_forward(m)
            if skind is not None and not _structured_ok(m, skind, calls[id(m)][0][0]):
                skind = None
            entry = entries[id(m)] = _Entry(mname, m, skind or "module", {}, [])
        if entry.kind != "module" and attr not in ("weight", "bias"):
            entry.kind = "module"
        entry.params[attr] = p
        entry.full_names.append(name)

    for entry in entries.values():
        args, _, output = calls[id(entry.module)][0]
        if entry.kind in ("linear", "conv2d", "embedding"):
            entry.order, entry.positions = _choose_order(entry, args[0], output, N, C, kind, chunk_size)
            if entry.kind == "embedding" and entry.order == "jac":
                entry.kind = "module"  # its per-sample gradient is a scatter: the per-module route
        if entry.kind == "module":
            entry.order = "jac"
            plan.per_module.extend(entry.full_names)
        else:
            plan.structured.extend(entry.full_names)
            plan.orders[entry.name] = entry.order
        plan.entries.append(entry)
    return plan


def _capturable(m: nn.Module, calls: list, rows: int, had_hooks: Optional[bool]) -> bool:
    """Called once, positional batch-first tensors in and one batch-first tensor out, no user hooks."""
    if len(calls) != 1 or had_hooks:
        return False
    args, kwargs, out = calls[0]
    if kwargs or not args:
        return False
    if not all(isinstance(a, Tensor) and a.dim() >= 1 and a.shape[0] == rows for a in args):
        return False
    return isinstance(out, Tensor) and out.dim() >= 1 and out.shape[0] == rows and out.is_floating_point()


def _structured_ok(m: nn.Module, skind: str, args: tuple) -> bool:
    x = args[0]
    if len(args) != 1:
        return False
    if skind == "linear":
        return x.dim() >= 2 and x.is_floating_point()
    if skind == "conv2d":
        return x.dim() == 4 and x.is_floating_point()
    return (not x.is_floating_point()) and m.max_norm is None and not m.scale_grad_by_freq and not m.sparse


def _choose_order(entry: _Entry, x: Tensor, z: Tensor, N: int, C: int, kind: str, chunk: int) -> tuple[str, int]:
    """The contraction order with fewer flops (whole kernel), within the workspace limit."""
    m = entry.module
    d = z.shape[-1] if entry.kind != "conv2d" else z.shape[1]
    if entry.kind == "linear":
        S = math.prod(x.shape[1:-1])
        k = x.shape[-1] * ("weight" in entry.params) + ("bias" in entry.params)
    elif entry.kind == "conv2d":
        S = math.prod(z.shape[2:])
        k = (m.in_channels // m.groups) * math.prod(m.kernel_size) * ("weight" in entry.params) + \
            ("bias" in entry.params)
        if m.groups != 1:
            return "jac", S
    else:  # embedding: the input Gram is token equality, P = V * D
        S = math.prod(x.shape[1:])
        k = m.num_embeddings
    ch = min(chunk, N)
    if kind == "block":
        gram = (N * S) ** 2 * k + (C * N * S) ** 2 * (d + 1)
        jac = C * N * S * d * k + (C * N) ** 2 * d * k
        workspace = (C * ch * S) ** 2
    else:
        factor = 1 if kind == "trace" else C
        gram = (N * S) ** 2 * k + C * (N * S) ** 2 * d + factor * (N * S) ** 2
        jac = C * N * S * d * k + C * N * N * d * k
        workspace = factor * (ch * S) ** 2
    if _FORCE_ORDER is not None and not (entry.kind == "conv2d" and m.groups != 1):
        return _FORCE_ORDER, S
    if S == 1 or (gram <= jac and workspace <= _GRAM_WORKSPACE):
        return "gram", S
    return "jac", S


# --------------------------------------------------------------------------------------------- features
@dataclass
class _Gram:
    """Per-chunk factors of a "gram"-order layer: inputs ``a (n, S, k)`` (a ones column for the bias)
    or token ids ``(n, S)``, and output gradients ``g (C, n, S, d)``."""

    a: Tensor
    g: Tensor
    tokens: bool = False
    padding_idx: Optional[int] = None


@dataclass
class _Features:
    """One chunk's features: Jacobian rows ``(C, n, P_l)`` (output-major, like the kernel) of
    "jac"-route parameters, and the factors of "gram"-order layers."""

    n: int
    jac: list[Tensor]
    grams: list[_Gram]
    partial: Optional[Tensor] = None   # streaming mode: this chunk's kernel block, already contracted

    def nbytes(self) -> int:
        total = sum(j.numel() * j.element_size() for j in self.jac)
        if self.partial is not None:
            total += self.partial.numel() * self.partial.element_size()
        for g in self.grams:
            total += g.a.numel() * g.a.element_size() + g.g.numel() * g.g.element_size()
        return total


def _batched_leaves(inputs: Any) -> tuple[list[Tensor], list[bool]]:
    leaves = tree_leaves(inputs)
    return leaves, [t.dim() > 0 for t in leaves]


def _rebuild(inputs: Any, leaves: list) -> Any:
    it = iter(leaves)
    return tree_map(lambda t: next(it), inputs)


class Engine:
    """Computes per-chunk features and contracts pairs of chunks into kernel blocks."""

    def __init__(self, model: nn.Module, inputs: Any, forward: Optional[ForwardFn], plan: NTKPlan,
                 kind: str, compute_dtype: Optional[torch.dtype]) -> None:
        self.model = model
        self.inputs = inputs
        self.forward = forward
        self.plan = plan
        self.kind = kind
        self.C = plan.num_outputs
        self.compute_dtype = compute_dtype
        self.bound = _Bound(model, forward)
        self._vmap_ok = True
        # Streaming (one chunk, trace or diagonal kernel): every output's contribution is contracted
        # as soon as its gradient exists, so neither C x activations nor C x n x P Jacobians are held.
        self.streaming = False

    # ---------------------------------------------------------------- one chunk
    def features(self, start: int, stop: int) -> _Features:
        x = slice_rows(self.inputs, start, stop)
        n = stop - start
        feats = _Features(n, [], [])
        if self.streaming:
            feats.partial = torch.zeros(self.block_shape(n, n), dtype=torch.float64, device=_model_device(self.model))
        if self.plan.entries:
            self._capture(x, n, feats)
        if self.plan.fallback:
            self._add_jacobian(feats, self._fallback_jacobian(x, n))
        return feats

    def _add_jacobian(self, feats: _Features, parts: list[Tensor]) -> None:
        """Keep Jacobian parts ``(C, n, P)`` as features, or contract them at once when streaming."""
        if feats.partial is None:
            feats.jac.extend(parts)
        else:
            tmp = _Features(feats.n, parts, [])
            self.contract(tmp, tmp, feats.partial)

    def _cast(self, t: Tensor) -> Tensor:
        dtype = self.compute_dtype or torch.promote_types(t.dtype, torch.float32)
        return t if t.dtype == dtype else t.to(dtype)

    def _capture(self, x: Any, n: int, feats: _Features) -> None:
        entries = self.plan.entries
        records: dict[int, list] = {id(e.module): [] for e in entries}

        def hook(mod, args, out):
            records[id(mod)].append((args, out))
            # The rest of the network gets a copy, so an in-place op downstream (ReLU(inplace=True))
            # cannot rewrite the tensor whose gradient we ask for.
            return out.clone()

        handles = [e.module.register_forward_hook(hook, prepend=True) for e in entries]
        try:
            with torch.enable_grad():
                out = per_sample_outputs(model_outputs(self.model, x, self.forward))
        finally:
            for h in handles:
                h.remove()
        C = self.C
        if out.shape[1] != C:
            raise RuntimeError(f"the model returned {out.shape[1]} outputs per sample for this chunk, but "
                               f"{C} before; the kernel needs a fixed output size")
        zs = []
        for e in entries:
            rec = records[id(e.module)]
            if len(rec) != 1 or rec[0][1].shape[0] != n or any(a.shape[0] != n for a in rec[0][0]):
                raise RuntimeError(
                    f"module {e.name!r} was called {len(rec)} times (or with other shapes) in this chunk but "
                    "once while planning: the model's structure depends on its inputs; pass method='jacobian'"
                )
            zs.append(rec[0][1])
        if not out.requires_grad:
            raise RuntimeError(_NON_DIFFERENTIABLE)
        sinks = [_OutputSink(self, e, [a.detach() for a in records[id(e.module)][0][0]], n, feats.partial)
                 for e in entries]
        # An output computed without grad (e.g. a frozen branch run under no_grad) contributes nothing.
        live = [i for i, z in enumerate(zs) if z.requires_grad]
        for c, grads in self._output_gradients(out, [zs[i] for i in live]):
            for i, g in zip(live, grads):
                if g is not None:
                    sinks[i].add(c, g.detach())
        del out, zs, records
        for sink in sinks:
            sink.finish(feats)

    def _output_gradients(self, out: Tensor, zs: list[Tensor]):
        """Yield ``(c, [d f_c / d z for each captured z])``, one output at a time.

        On CPU one backward per output (cheaper than a vmapped backward for conv nets, and only one
        output's intermediate gradients are alive); elsewhere one backward vmapped over the outputs.
        """
        C = self.C
        eye = torch.eye(C, dtype=out.dtype, device=out.device)
        cotangents = eye.unsqueeze(1).expand(C, out.shape[0], C)
        if C > 1 and out.device.type != "cpu":
            try:
                batched = torch.autograd.grad(out, zs, grad_outputs=cotangents, is_grads_batched=True,
                                              allow_unused=True, retain_graph=True)
            except RuntimeError:  # an op without a batching rule for its backward: one pass per output
                batched = None
            if batched is not None:
                for c in range(C):
                    yield c, [None if g is None else g[c] for g in batched]
                return
        for c in range(C):
            yield c, torch.autograd.grad(out, zs, grad_outputs=cotangents[c], allow_unused=True,
                                         retain_graph=c < C - 1)

    def _module_jacobian(self, e: _Entry, args: list[Tensor], g: Tensor) -> list[Tensor]:
        """Per-sample Jacobians of a module's own parameters by VJPs through that module alone."""
        m = e.module
        names = list(e.params)
        params = {k: e.params[k].detach() for k in names}

        def single(p, *xs):
            return functional_call(m, p, tuple(t.unsqueeze(0) for t in xs)).squeeze(0)

        def per_sample(gi, *xs):
            _, pullback = vjp(lambda p: single(p, *xs), params)
            return vmap(pullback)(gi)[0]

        n = args[0].shape[0]
        gs = g.transpose(0, 1)  # (n, C, *out)
        result = None
        if self._vmap_ok:
            try:
                with torch.no_grad():  # torch.func still differentiates; the result keeps no graph
                    result = vmap(per_sample)(gs, *args)
            except Exception:  # noqa: BLE001 - an op vmap cannot batch: per-sample loop below
                self._vmap_ok = False
        if result is None:
            result = self._vjp_loop(single, params, args, gs)
        return [self._cast(result[k].reshape(n, self.C, -1).transpose(0, 1)).contiguous() for k in names]

    def _fallback_jacobian(self, x: Any, n: int) -> list[Tensor]:
        """Whole-model per-sample Jacobians w.r.t. the fallback parameters, ``(n, C, P)`` each."""
        names = list(self.plan.fallback)
        params = {"model." + k: v.detach() for k, v in self.plan.fallback.items()}
        leaves, batched = _batched_leaves(x)
        fixed = [None if b else t for t, b in zip(leaves, batched)]
        moving = [t for t, b in zip(leaves, batched) if b]

        def single(p, *xs):
            it = iter(xs)
            full = [t if t is not None else next(it).unsqueeze(0) for t in fixed]
            return functional_call(self.bound, p, (_rebuild(x, full),))[0]

        result = None
        if self._vmap_ok:
            try:
                with torch.no_grad():
                    result = vmap(jacrev(single), in_dims=(None,) + (0,) * len(moving))(params, *moving)
            except Exception:  # noqa: BLE001
                self._vmap_ok = False
        if result is None:
            result = self._jacobian_loop(single, params, moving, n)
        return [self._cast(result["model." + k].reshape(n, self.C, -1).transpose(0, 1)).contiguous()
                for k in names]

    def _vjp_loop(self, single: Callable, params: dict, args: list[Tensor], gs: Tensor) -> dict:
        """Per-sample VJPs one sample and one output at a time (models that vmap cannot batch)."""
        rows = []
        for i in range(gs.shape[0]):
            with torch.enable_grad():
                p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
                out = single(p, *(t[i] for t in args))
                per_c = [torch.autograd.grad(out, list(p.values()), gs[i, c], retain_graph=c < self.C - 1,
                                             allow_unused=True) for c in range(self.C)]
            rows.append({k: torch.stack([pc[j].detach() if pc[j] is not None else torch.zeros_like(p[k])
                                         for pc in per_c]).detach() for j, k in enumerate(p)})
        return {k: torch.stack([r[k] for r in rows]) for k in params}

    def _jacobian_loop(self, single: Callable, params: dict, moving: list[Tensor], n: int) -> dict:
        rows = []
        for i in range(n):
            with torch.enable_grad():
                p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
                out = single(p, *(t[i] for t in moving))
                if not out.requires_grad:
                    raise RuntimeError(_NON_DIFFERENTIABLE)
                per_c = [torch.autograd.grad(out[c], list(p.values()), retain_graph=c < self.C - 1,
                                             allow_unused=True) for c in range(self.C)]
            rows.append({k: torch.stack([pc[j].detach() if pc[j] is not None else torch.zeros_like(p[k])
                                         for pc in per_c]).detach() for j, k in enumerate(p)})
        return {k: torch.stack([r[k] for r in rows]) for k in params}

    # ---------------------------------------------------------------- a pair of chunks
    def block_shape(self, nI: int, nJ: int) -> tuple[int, ...]:
        C = self.C
        return {"block": (C, nI, C, nJ), "trace": (nI, nJ), "diagonal": (C, nI, nJ)}[self.kind]

    def contract(self, FI: _Features, FJ: _Features, out: Tensor) -> Tensor:
        """Add the kernel block between two chunks to ``out`` (float64): block ``(C, nI, C, nJ)``,
        trace ``(nI, nJ)``, diagonal ``(C, nI, nJ)``. Temporaries are bounded by slicing the outputs."""
        C, nI, nJ, kind = self.C, FI.n, FJ.n, self.kind
        if FI.partial is not None:
            out.add_(FI.partial)
        for JI, JJ in zip(FI.jac, FJ.jac):  # (C, n, P), output-major like the kernel
            P = JI.shape[2]
            if kind == "block":
                right = JJ.reshape(C * nJ, P).T
                for c0, c1 in _slabs(C, C * nI * nJ):
                    out[c0:c1].add_((JI[c0:c1].reshape(-1, P) @ right).view(c1 - c0, nI, C, nJ))
            elif kind == "trace":
                for c0, c1 in _slabs(C, nI * nJ):
                    out.add_(torch.bmm(JI[c0:c1], JJ[c0:c1].transpose(1, 2)).sum(dim=0))
            else:
                out.add_(torch.bmm(JI, JJ.transpose(1, 2)))
        for gi, gj in zip(FI.grams, FJ.grams):
            self._gram_block(gi, gj, nI, nJ, out)
        return out

    def _gram_block(self, gi: _Gram, gj: _Gram, nI: int, nJ: int, out: Tensor) -> None:
        C, kind = self.C, self.kind
        S = gi.g.shape[2]
        d = gi.g.shape[3]
        if gi.tokens:
            ti, tj = gi.a.reshape(-1), gj.a.reshape(-1)
            Ga = (ti[:, None] == tj[None, :])
            if gi.padding_idx is not None:
                Ga &= (ti != gi.padding_idx)[:, None]
            Ga = Ga.to(gi.g.dtype)
        else:
            Ga = gi.a.reshape(nI * S, -1) @ gj.a.reshape(nJ * S, -1).T
        if kind == "block":
            right = gj.g.reshape(C * nJ * S, d).T
            for c0, c1 in _slabs(C, C * nI * nJ * S * S):
                Gg = gi.g[c0:c1].reshape(-1, d) @ right
                if S == 1:
                    out[c0:c1].add_(Gg.view(c1 - c0, nI, C, nJ).mul_(Ga.view(1, nI, 1, nJ)))
                else:
                    prod = Gg.view(c1 - c0, nI, S, C, nJ, S).mul_(Ga.view(1, nI, S, 1, nJ, S))
                    out[c0:c1].add_(prod.sum(dim=(2, 5)))
            return
        if kind == "trace":
            for c0, c1 in _slabs(C, nI * nJ * S * S):  # sum_c g_c g_c^T without copying g
                Gg = torch.bmm(gi.g[c0:c1].reshape(c1 - c0, nI * S, d),
                               gj.g[c0:c1].reshape(c1 - c0, nJ * S, d).transpose(1, 2)).sum(dim=0)
                prod = Gg.mul_(Ga)
                out.add_(prod if S == 1 else prod.view(nI, S, nJ, S).sum(dim=(1, 3)))
            return
        Gg = torch.bmm(gi.g.reshape(C, nI * S, d), gj.g.reshape(C, nJ * S, d).transpose(1, 2))
        prod = Gg.mul_(Ga.unsqueeze(0))
        out.add_(prod if S == 1 else prod.view(C, nI, S, nJ, S).sum(dim=(2, 4)))


# Largest temporary (elements) of one slab of a contraction.
_SLAB = 2**18


def _slabs(C: int, per_output: int) -> list[tuple[int, int]]:
    """Ranges of outputs whose temporaries (``per_output`` elements each) stay within ``_SLAB``."""
    step = max(1, min(C, _SLAB // max(1, per_output)))
    return [(c, min(c + step, C)) for c in range(0, C, step)]


class _OutputSink:
    """Turns one captured module's output gradients, one output ``c`` at a time, into features.

    "jac"-order Linear/Conv2d layers form their per-(output, sample) weight gradients at once, so
    only one output's gradient is ever held for them; "gram"-order layers, embeddings and
    per-module entries keep the gradients of all outputs (``C x`` their activations).
    """

    def __init__(self, engine: Engine, e: _Entry, args: list[Tensor], n: int, partial: Optional[Tensor]) -> None:
        self.engine, self.e, self.args, self.n = engine, e, args, n
        self.C = engine.C
        self.partial = partial
        self.buffers: list[Tensor] = []
        self.a: Optional[Tensor] = None
        self.Ga: Optional[Tensor] = None
        self.aT: Optional[Tensor] = None
        if e.kind in ("linear", "conv2d"):
            x = engine._cast(args[0])
            if e.kind == "linear":
                a = x.reshape(n, -1, x.shape[-1])                        # (n, S, k)
                aT = a.transpose(1, 2)
            else:
                aT = _conv_patches(e.module, x)                          # (n, k, L), im2col
                a = aT.transpose(1, 2)
            if e.order == "gram":
                self.a = self._with_bias_column(a)
            else:
                self.a, self.aT = a, aT

    def _with_bias_column(self, a: Tensor) -> Tensor:
        parts = []
        if "weight" in self.e.params:
            parts.append(a)
        if "bias" in self.e.params:
            parts.append(torch.ones(a.shape[:-1] + (1,), dtype=a.dtype, device=a.device))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0].contiguous()

    def _stream(self, c: int, contribution: Tensor) -> None:
        """Add output c's ``(n, n)`` block to the streamed kernel (trace: summed over outputs)."""
        if self.engine.kind == "trace":
            self.partial.add_(contribution)
        else:
            self.partial[c].add_(contribution)

    def add(self, c: int, g: Tensor) -> None:
        e, n, C = self.e, self.n, self.C
        if e.kind == "module":
            gathered = g
        elif e.kind == "conv2d":
            gathered = self.engine._cast(g.reshape(n, g.shape[1], -1))  # (n, d, L)
        else:
            gathered = self.engine._cast(g.reshape(n, -1, g.shape[-1]))  # (n, S, d)
        if e.kind in ("module", "embedding") or e.order == "gram":
            if e.kind == "conv2d":
                gathered = gathered.transpose(1, 2)                      # (n, L, d)
            if self.partial is not None and e.kind != "module":
                if self.Ga is None:
                    self.Ga = _input_gram(self.a, self.args[0], e).to(gathered.dtype)
                S = gathered.shape[1]
                flat = gathered.reshape(n * S, -1)
                prod = (flat @ flat.T).mul_(self.Ga)
                self._stream(c, prod if S == 1 else prod.view(n, S, n, S).sum(dim=(1, 3)))
                self.buffers = [self.Ga]  # marks that a gradient arrived
                return
            if not self.buffers:
                self.buffers = [torch.empty((C,) + tuple(gathered.shape), dtype=gathered.dtype,
                                            device=gathered.device)]
            self.buffers[0][c] = gathered
            return
        # "jac" order: per-(output, sample) gradients of the weight (and bias) for output c, as
        # A_i^T G_ci (k x d, the weight's entries transposed: any fixed order of P will do)
        gs = gathered.transpose(1, 2) if e.kind == "conv2d" else gathered  # (n, S, d)
        S, d = gs.shape[1], gs.shape[2]
        G = _groups(e)
        k = self.a.shape[2]
        if not self.buffers:
            shapes = []
            if "weight" in e.params:
                shapes.append((C, n, d * (k // G)))
            if "bias" in e.params:
                shapes.append((C, n, d))
            # streaming keeps one output's rows only
            self.buffers = [torch.empty((1 if self.partial is not None else C,) + shape[1:], dtype=gs.dtype,
                                        device=gs.device) for shape in shapes]
        slot = 0 if self.partial is not None else c
        i = 0
        if "weight" in e.params:
            if G > 1:
                w = torch.einsum("nsgo,nsgk->ngko", gs.reshape(n, S, G, d // G), self.a.reshape(n, S, G, k // G))
                self.buffers[0][slot] = w.reshape(n, -1)
            else:
                torch.bmm(self.aT, gs, out=self.buffers[0][slot].view(n, k, d))
            i = 1
        if "bias" in e.params:
            torch.sum(gs, dim=1, out=self.buffers[i][slot])
        if self.partial is not None:  # streaming: contract this output's rows at once
            for J in self.buffers:
                self._stream(c, J[0] @ J[0].T)

    def finish(self, feats: _Features) -> None:
        e = self.e
        if not self.buffers:
            return  # no gradient reached this module's output
        if e.kind == "module":
            self.engine._add_jacobian(feats, self.engine._module_jacobian(e, self.args, self.buffers[0]))
        elif self.partial is not None:
            return  # contracted while streaming
        elif e.kind == "embedding":
            feats.grams.append(_Gram(self.args[0].reshape(self.n, -1), self.buffers[0], True, e.module.padding_idx))
        elif e.order == "gram":
            feats.grams.append(_Gram(self.a, self.buffers[0]))
        else:
            feats.jac.extend(self.buffers)


def _groups(e: _Entry) -> int:
    return e.module.groups if e.kind == "conv2d" else 1


def _input_gram(a: Optional[Tensor], tokens: Tensor, e: _Entry) -> Tensor:
    """``(n*S, n*S)`` Gram of a layer's inputs at every position (token equality for embeddings)."""
    if e.kind == "embedding":
        t = tokens.reshape(-1)
        Ga = t[:, None] == t[None, :]
        if e.module.padding_idx is not None:
            Ga &= (t != e.module.padding_idx)[:, None]
        return Ga
    flat = a.reshape(-1, a.shape[-1])
    return flat @ flat.T


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


_NON_DIFFERENTIABLE = (
    "the model output does not depend differentiably on its trainable parameters (a forward under "
    "torch.no_grad, a detach, or a non-differentiable op such as argmax or round)"
)


def _conv_patches(m: nn.Conv2d, x: Tensor) -> Tensor:
    """im2col of a Conv2d's input, ``(n, C_in*kh*kw, L)``, with the module's padding mode."""
    padding = m.padding
    if isinstance(padding, str) or m.padding_mode != "zeros":
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            else:  # "same": total dilation*(k-1) per dimension, the extra one on the right/bottom
                th = m.dilation[0] * (m.kernel_size[0] - 1)
                tw = m.dilation[1] * (m.kernel_size[1] - 1)
                pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            pads = (padding[1], padding[1], padding[0], padding[0])
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, pads, mode=mode)
        padding = 0
    return F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)


def symmetrize_(K: Tensor, tile: int = 256) -> Tensor:
    """Make a square matrix exactly symmetric in place (lower triangle wins), ``tile``-square temporaries."""
    D = K.shape[0]
    for r in range(0, D, tile):
        r1 = min(r + tile, D)
        diag = K[r:r1, r:r1]
        diag.copy_(torch.tril(diag) + torch.tril(diag, -1).T)
        for c in range(0, r, tile):
            c1 = min(c + tile, D)
            K[c:c1, r:r1].copy_(K[r:r1, c:c1].T)
    return K


# --------------------------------------------------------------------------------------------- driver
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def run_blocks(engine: Engine, n: int, chunk: int, sink: Callable[[int, int, int, int, _Features, _Features], None],
               cache_bytes: Optional[int], feature_budget: Optional[int] = None) -> None:
    """Call ``sink(i0, i1, j0, j1, FI, FJ)`` for every pair of chunks with ``j <= i``.

    Features of every chunk are kept when they fit in ``cache_bytes`` (estimated from the first
    chunk); otherwise the features of earlier chunks are recomputed for each pair, so that peak
    memory stays at two chunks' features. With ``feature_budget`` (bytes for those two chunks),
    the chunk is first shrunk to fit: features grow linearly with the samples, so one sample's
    features give the size (a wide model under the Jacobian route needs ``C x P`` floats per
    sample, and a fixed chunk would otherwise allocate gigabytes before any check).
    """
    if feature_budget is not None:
        per_sample = engine.features(0, 1).nbytes()
        fit = int(feature_budget // max(1, 2 * per_sample))
        if fit < 1:
            raise ValueError(
                f"one sample's kernel features take {_fmt_bytes(per_sample)} (two are alive at once), more than the "
                f"{_fmt_bytes(feature_budget)} that max_memory leaves besides the kernel; raise max_memory")
        chunk = min(chunk, fit)
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    engine.streaming = len(bounds) == 1 and engine.kind != "block"
    cache: dict[int, _Features] = {}
    keep = None
    for bi, (i0, i1) in enumerate(bounds):
        FI = cache.get(bi) or engine.features(i0, i1)
        if keep is None:
            keep = len(bounds) > 1 and (cache_bytes is None or FI.nbytes() * len(bounds) <= cache_bytes)
        if keep:
            cache[bi] = FI
        for bj in range(bi + 1):
            j0, j1 = bounds[bj]
            FJ = FI if bj == bi else (cache.get(bj) or engine.features(j0, j1))
            sink(i0, i1, j0, j1, FI, FJ)
            del FJ
