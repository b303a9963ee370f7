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

Pairs of chunks are contracted into float64 kernel blocks (``run_blocks``): products are formed in
the compute dtype, a tile of at most ``_SLAB`` elements at a time in reused buffers, and added into
the float64 kernel (so every layer's share is accumulated in float64). A chunk paired with itself
gives only the blocks of outputs ``c' <= c``; the mirror images are copied at the end
(``symmetrize_``, in place). With one chunk and a trace or diagonal kernel the engine streams: each
output's contribution is contracted as soon as its gradient exists, so neither ``C x``
activations nor ``C x n x P`` Jacobian rows are held. With one chunk and a block kernel (on CPU,
``C >= 6``) the outputs are split in two groups and the features of one group (plus one output)
are held at a time, the outputs before a group being recomputed by one more backward each
(``Engine.diagonal_block``). "jac"-order convolutions rebuild their input patches per output, a
few samples at a time, instead of holding them (``kh*kw`` times the input).
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
    or token ids ``(n, S)``, and output gradients ``g (m, n, S, d)``."""

    a: Tensor
    g: Tensor
    tokens: bool = False
    padding_idx: Optional[int] = None


@dataclass
class _Features:
    """One chunk's features for ``m`` consecutive outputs (all ``C`` of them, or a group): Jacobian
    rows ``(m, n, P_l)`` (output-major, like the kernel) of "jac"-route parameters, and the factors
    of "gram"-order layers."""

    n: int
    m: int
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


class _Scratch:
    """Buffers reused by every slab of one contraction.

    Products are formed in the compute dtype into a reused buffer, cast into a second (float64)
    one and added from there: ``out.add_(float32_tensor)`` on a float64 ``out`` would allocate a
    converted copy of the operand (and one more for a strided ``out``) at every call.
    """

    def __init__(self) -> None:
        self.flat: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        dtype = dtype or like.dtype
        numel = math.prod(shape)
        buf = self.flat.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.flat[(name, dtype)] = torch.empty(numel, dtype=dtype, device=like.device)
        return buf[:numel].view(shape)

    def add_into(self, out: Tensor, src: Tensor) -> None:
        if src.dtype != out.dtype:
            src = self.get("cast", tuple(src.shape), src, out.dtype).copy_(src)
        out.add_(src)


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
        # Input Grams of a chunk with itself, kept while one chunk is contracted group by group.
        self._input_grams: Optional[dict[int, tuple[Tensor, Tensor]]] = None
        # Feature buffers let go of, reused while one chunk is contracted group by group (fresh
        # memory costs page faults; the groups and the recomputed outputs have the same shapes).
        self._pool: Optional[list[Tensor]] = None
        self._patches: Optional[Tensor] = None

    def empty(self, slots: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialized ``(slots, *shape)`` buffer, from the pool when one fits."""
        if self._pool:
            fits = [i for i, t in enumerate(self._pool)
                    if t.shape[1:] == shape and t.dtype == dtype and t.device == device and t.shape[0] >= slots]
            if fits:
                return self._pool.pop(min(fits, key=lambda i: self._pool[i].shape[0]))[:slots]
        return torch.empty((slots,) + tuple(shape), dtype=dtype, device=device)

    def patch_buffer(self, windows: Tensor) -> Tensor:
        """A copy of conv ``windows`` in one buffer that every conv layer of this engine reuses
        (fresh memory for each output's patches would cost page faults)."""
        numel = windows.numel()
        if self._patches is None or self._patches.numel() < numel or self._patches.dtype != windows.dtype \
                or self._patches.device != windows.device:
            self._patches = torch.empty(numel, dtype=windows.dtype, device=windows.device)
        return self._patches[:numel].view(windows.shape).copy_(windows)

    def release(self, feats: _Features) -> None:
        """Give the feature buffers of ``feats`` back to the pool (the caller drops ``feats``)."""
        if self._pool is not None:
            for t in feats.jac + [g.g for g in feats.grams]:
                self._pool.append(t if t._base is None else t._base)

    # ---------------------------------------------------------------- one chunk
    def features(self, start: int, stop: int) -> _Features:
        x = slice_rows(self.inputs, start, stop)
        n = stop - start
        feats = _Features(n, self.C, [], [])
        if self.streaming:
            feats.partial = torch.zeros(self.block_shape(n, n), dtype=torch.float64, device=_model_device(self.model))
        if self.plan.entries:
            self._capture(x, n, feats)
        if self.plan.fallback:
            self._add_jacobian(feats, self._fallback_jacobian(x, n))
        return feats

    def _add_jacobian(self, feats: _Features, parts: list[Tensor]) -> None:
        """Keep Jacobian parts ``(m, n, P)`` as features, or contract them at once when streaming."""
        if feats.partial is None:
            feats.jac.extend(parts)
        else:
            tmp = _Features(feats.n, feats.m, parts, [])
            self.contract(tmp, tmp, feats.partial)

    def _cast(self, t: Tensor) -> Tensor:
        dtype = self.compute_dtype or torch.promote_types(t.dtype, torch.float32)
        return t if t.dtype == dtype else t.to(dtype)

    def _forward(self, x: Any, n: int, partial: Optional[Tensor]) -> tuple[Tensor, list[Tensor], list[int], list]:
        """One forward with hooks: the outputs, the captured layer outputs that need a gradient,
        their indices among the plan's entries, and one feature sink per entry."""
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
        sinks = [_OutputSink(self, e, [a.detach() for a in records[id(e.module)][0][0]], n, partial)
                 for e in entries]
        # An output computed without grad (e.g. a frozen branch run under no_grad) contributes nothing.
        live = [i for i, z in enumerate(zs) if z.requires_grad]
        return out, [zs[i] for i in live], live, sinks

    @staticmethod
    def _feed(sinks: list, live: list[int], c: int, grads) -> None:
        grads = list(grads)
        for pos, i in enumerate(live):
            g, grads[pos] = grads[pos], None  # let each gradient go once its features are formed
            if g is not None:
                sinks[i].add(c, g.detach())
            del g

    def _capture(self, x: Any, n: int, feats: _Features) -> None:
        out, zs, live, sinks = self._forward(x, n, feats.partial)
        for c, grads in (self._output_gradients(out, zs) if zs else ()):
            self._feed(sinks, live, c, grads)
        del out, zs
        for sink in sinks:
            sink.finish(feats)

    def _output_gradients(self, out: Tensor, zs: list[Tensor]):
        """Yield ``(c, [d f_c / d z for each captured z])``, one output at a time.

        On CPU one backward per output (cheaper than a vmapped backward for conv nets, and only one
        output's intermediate gradients are alive); elsewhere one backward vmapped over the outputs.
        """
        C = self.C
        if C > 1 and out.device.type != "cpu":
            eye = torch.eye(C, dtype=out.dtype, device=out.device)
            cotangents = eye.unsqueeze(1).expand(C, out.shape[0], C)
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
            yield c, self._gradient(out, zs, c, retain=c < C - 1)

    def _gradient(self, out: Tensor, zs: list[Tensor], c: int, retain: bool):
        """``d f_c / d z`` for each captured ``z`` (one backward of output ``c`` summed over samples)."""
        cotangent = torch.zeros_like(out)
        cotangent[:, c] = 1
        return torch.autograd.grad(out, zs, grad_outputs=cotangent, allow_unused=True, retain_graph=retain)

    def output_groups(self) -> int:
        """Groups of outputs that a one-chunk block kernel holds features for (see ``diagonal_block``)."""
        if self.kind != "block" or self.C < _GROUP_MIN_OUTPUTS or _model_device(self.model).type != "cpu":
            return 1
        return max(1, min(_OUTPUT_GROUPS, self.C))

    def diagonal_block(self, start: int, stop: int, out: Tensor) -> None:
        """Add the block kernel of one chunk with itself to ``out`` ``(C, n, C, n)``: the blocks of
        outputs ``c' <= c`` only (the rest is their mirror image; ``symmetrize_`` fills it in).

        With ``g = output_groups() > 1`` the features of only one group of ``h = ceil(C/g)`` outputs
        are held at a time: for each group, its outputs' features are formed (one backward each) and
        contracted with themselves, then the outputs before the group are recomputed one at a time
        (one more backward each, on the same forward) and contracted with the group. Peak features:
        ``h + 1`` outputs instead of ``C``, for ``C (g - 1) / 2`` extra backwards. Parameters on the
        whole-model Jacobian route are computed for all outputs at once, before the pass.
        """
        groups = self.output_groups()
        n, C = stop - start, self.C
        if groups == 1 or not self.plan.entries:
            feats = self.features(start, stop)
            self.contract(feats, feats, out, lower=True)
            return
        x = slice_rows(self.inputs, start, stop)
        if self.plan.fallback:
            parts = self._fallback_jacobian(x, n)
            feats = _Features(n, C, parts, [])
            self.contract(feats, feats, out, lower=True)
            del feats, parts
        h = -(-C // groups)
        bounds = [(g0, min(g0 + h, C)) for g0 in range(0, C, h)]
        calls = C + sum(g0 for g0, _ in bounds)
        done = 0
        model_out, zs, live, sinks = self._forward(x, n, None)
        if not zs:
            return  # no captured layer is on the graph of the outputs

        def collect(c0: int, c1: int) -> _Features:
            nonlocal done
            for sink in sinks:
                sink.begin(c0, c1 - c0)
            for c in range(c0, c1):
                done += 1
                self._feed(sinks, live, c, self._gradient(model_out, zs, c, retain=done < calls))
            feats = _Features(n, c1 - c0, [], [])
            for sink in sinks:
                sink.finish(feats)
            return feats

        self._input_grams, self._pool = {}, []
        try:
            for g0, g1 in bounds:
                held = collect(g0, g1)
                self.contract(held, held, out[g0:g1, :, g0:g1], lower=True)
                for c in range(g0):
                    one = collect(c, c + 1)
                    self.contract(held, one, out[g0:g1, :, c:c + 1])
                    del one  # not pooled: it would be alive during the next backward
                self.release(held)
                del held
        finally:
            self._input_grams, self._pool = None, None

    def _module_jacobian(self, e: _Entry, args: list[Tensor], g: Tensor) -> list[Tensor]:
        """Per-sample Jacobians ``(m, n, P)`` of a module's own parameters by VJPs through that module
        alone, from the output gradients ``g (m, n, ...)`` of ``m`` outputs."""
        m = e.module
        names = list(e.params)
        params = {k: e.params[k].detach() for k in names}

        def single(p, *xs):
            return functional_call(m, p, tuple(t.unsqueeze(0) for t in xs)).squeeze(0)

        def per_sample(gi, *xs):
            _, pullback = vjp(lambda p: single(p, *xs), params)
            return vmap(pullback)(gi)[0]

        n, outputs = args[0].shape[0], g.shape[0]
        gs = g.transpose(0, 1)  # (n, m, *out)
        result = None
        if self._vmap_ok:
            try:
                with torch.no_grad():  # torch.func still differentiates; the result keeps no graph
                    result = vmap(per_sample)(gs, *args)
            except Exception:  # noqa: BLE001 - an op vmap cannot batch: per-sample loop below
                self._vmap_ok = False
        if result is None:
            result = self._vjp_loop(single, params, args, gs)
        return [self._cast(result[k].reshape(n, outputs, -1).transpose(0, 1)).contiguous() for k in names]

    def _fallback_jacobian(self, x: Any, n: int) -> list[Tensor]:
        """Whole-model per-sample Jacobians w.r.t. the fallback parameters, ``(C, n, P)`` each."""
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
        outputs = gs.shape[1]
        for i in range(gs.shape[0]):
            with torch.enable_grad():
                p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
                out = single(p, *(t[i] for t in args))
                per_c = [torch.autograd.grad(out, list(p.values()), gs[i, c], retain_graph=c < outputs - 1,
                                             allow_unused=True) for c in range(outputs)]
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

    def contract(self, FI: _Features, FJ: _Features, out: Tensor, lower: bool = False) -> Tensor:
        """Add the kernel block between two chunks to ``out`` (float64): block ``(FI.m, nI, FJ.m, nJ)``,
        trace ``(nI, nJ)``, diagonal ``(C, nI, nJ)``.

        ``lower`` (block kernel, ``FI`` and ``FJ`` the same outputs of the same samples): only the
        blocks of outputs ``c' <= c`` are added, half the work; the others are their mirror image.
        Products are formed in the compute dtype a slab of rows at a time (at most ``_SLAB``
        elements) in reused buffers, then added into ``out`` in float64.
        """
        scratch = _Scratch()
        if FI.partial is not None:
            out.add_(FI.partial)
        if self.kind == "block":
            self._contract_block(FI, FJ, out, lower, scratch)
            return out
        C, nI, nJ = self.C, FI.n, FJ.n
        for JI, JJ in zip(FI.jac, FJ.jac):  # (C, n, P), output-major like the kernel
            for c0, c1 in _slabs(C, nI * nJ):
                prod = torch.bmm(JI[c0:c1], JJ[c0:c1].transpose(1, 2),
                                 out=scratch.get("prod", (c1 - c0, nI, nJ), JI))
                self._add_outputs(out, c0, c1, prod, scratch)
        for gi, gj in zip(FI.grams, FJ.grams):
            Ga = self._input_gram(gi, gj, nI, nJ)
            S, d = gi.g.shape[2], gi.g.shape[3]
            for c0, c1 in _slabs(C, nI * nJ * S * S):
                Gg = torch.bmm(gi.g[c0:c1].reshape(c1 - c0, nI * S, d),
                               gj.g[c0:c1].reshape(c1 - c0, nJ * S, d).transpose(1, 2),
                               out=scratch.get("prod", (c1 - c0, nI * S, nJ * S), gi.g))
                if self.kind == "trace":  # sum_c g_c g_c^T first: one product with the input Gram
                    Gg = Gg[0] if c1 - c0 == 1 else torch.sum(Gg, dim=0, out=scratch.get("sum0", Gg.shape[1:], Gg))
                prod = Gg.mul_(Ga)
                if S > 1:
                    lead = prod.shape[:-2]
                    prod = torch.sum(prod.view(*lead, nI, S, nJ, S), dim=(-3, -1),
                                     out=scratch.get("sum", (*lead, nI, nJ), prod))
                if self.kind == "trace":
                    scratch.add_into(out, prod)
                else:
                    scratch.add_into(out[c0:c1], prod)
        return out

    def _add_outputs(self, out: Tensor, c0: int, c1: int, prod: Tensor, scratch: _Scratch) -> None:
        """Trace: add ``sum_c prod[c]``; diagonal: add ``prod`` to outputs ``c0..c1-1``."""
        if self.kind == "trace":
            prod = prod[0] if c1 - c0 == 1 else torch.sum(prod, dim=0, out=scratch.get("sum0", prod.shape[1:], prod))
            scratch.add_into(out, prod)
        else:
            scratch.add_into(out[c0:c1], prod)

    def _input_gram(self, gi: _Gram, gj: _Gram, nI: int, nJ: int) -> Tensor:
        """``(nI*S, nJ*S)`` Gram of two chunks' layer inputs at every position (token equality for
        embeddings), in the dtype of the output gradients."""
        cache = self._input_grams
        same = cache is not None and gi.a is gj.a
        if same and id(gi.a) in cache:
            return cache[id(gi.a)][1]
        S = gi.g.shape[2]
        if gi.tokens:
            ti, tj = gi.a.reshape(-1), gj.a.reshape(-1)
            Ga = (ti[:, None] == tj[None, :])
            if gi.padding_idx is not None:
                Ga &= (ti != gi.padding_idx)[:, None]
            Ga = Ga.to(gi.g.dtype)
        else:
            Ga = gi.a.reshape(nI * S, -1) @ gj.a.reshape(nJ * S, -1).T
        if same:
            cache[id(gi.a)] = (gi.a, Ga)  # holding the tensor keeps its id from being reused
        return Ga

    def _contract_block(self, FI: _Features, FJ: _Features, out: Tensor, lower: bool, scratch: _Scratch) -> None:
        mI, mJ, nI, nJ = FI.m, FJ.m, FI.n, FJ.n
        grams = [(gi, gj, self._input_gram(gi, gj, nI, nJ)) for gi, gj in zip(FI.grams, FJ.grams)]
        widest = max([gi.g.shape[2] ** 2 for gi in FI.grams], default=1)
        # Square-ish tiles of the (rows (c, i)) x (columns (c', j)) product: each operand is read
        # about (its size / tile side) times, not once per row slab.
        budget = max(1, _SLAB // widest)
        row_size = max(1, budget // min(mJ * nJ, math.isqrt(budget)))
        for c0, c1, r0, r1 in _spans(mI, nI, row_size):
            rows = (c1 - c0) * (r1 - r0)
            for d0, d1, j0, j1 in _spans(c1 if lower else mJ, nJ, max(1, budget // rows)):
                cols = (d1 - d0) * (j1 - j0)
                dst = out[c0:c1, r0:r1, d0:d1, j0:j1]
                shape = (c1 - c0, r1 - r0, d1 - d0, j1 - j0)
                for JI, JJ in zip(FI.jac, FJ.jac):  # (m, n, P)
                    P = JI.shape[2]
                    prod = torch.mm(JI[c0:c1, r0:r1].reshape(-1, P), JJ[d0:d1, j0:j1].reshape(-1, P).T,
                                    out=scratch.get("prod", (rows, cols), JI))
                    scratch.add_into(dst, prod.view(shape))
                for gi, gj, Ga in grams:  # sum_{p,q} (g_cip . g_c'jq)(a_ip . a_jq) on this tile
                    S, d = gi.g.shape[2], gi.g.shape[3]
                    Gg = torch.mm(gi.g[c0:c1, r0:r1].reshape(-1, d), gj.g[d0:d1, j0:j1].reshape(-1, d).T,
                                  out=scratch.get("prod", (rows * S, cols * S), gi.g))
                    if S == 1:
                        prod = Gg.view(shape).mul_(Ga[r0:r1, j0:j1][None, :, None, :])
                    else:
                        Gg = Gg.view(c1 - c0, r1 - r0, S, d1 - d0, j1 - j0, S)
                        Gg.mul_(Ga.view(nI, S, nJ, S)[r0:r1, :, j0:j1][None, :, :, None])
                        prod = torch.sum(Gg, dim=(2, 5), out=scratch.get("sum", shape, Gg))
                    scratch.add_into(dst, prod)


# Largest temporary (elements) of one slab of a contraction (float32 product + its float64 copy:
# 12 bytes per element).
_SLAB = 2**16
# One-chunk block kernels on CPU hold the features of one of this many groups of outputs at a time
# (``Engine.diagonal_block``), when there are at least _GROUP_MIN_OUTPUTS outputs.
_OUTPUT_GROUPS = 2
_GROUP_MIN_OUTPUTS = 6
# A "jac"-order Conv2d rebuilds its input patches per output, this many elements at a time (64
# times as many on accelerators, where each piece costs kernel launches).
_PATCH_ELEMENTS = 2**17


def _slabs(C: int, per_output: int) -> list[tuple[int, int]]:
    """Ranges of outputs whose temporaries (``per_output`` elements each) stay within ``_SLAB``."""
    step = max(1, min(C, _SLAB // max(1, per_output)))
    return [(c, min(c + step, C)) for c in range(0, C, step)]


def _spans(m: int, n: int, size: int) -> list[tuple[int, int, int, int]]:
    """``(c0, c1, r0, r1)``: consecutive spans of the ``m*n`` indices ``(c, i)``, each of at most
    ``size`` of them: several whole outputs, or equal parts of one output's ``n``."""
    if size >= n:
        step = min(m, size // n)
        return [(c, min(c + step, m), 0, n) for c in range(0, m, step)]
    part = -(-n // -(-n // size))
    return [(c, c + 1, r, min(r + part, n)) for c in range(m) for r in range(0, n, part)]


class _OutputSink:
    """Turns one captured module's output gradients, one output ``c`` at a time, into features.

    "jac"-order Linear/Conv2d layers form their per-(output, sample) weight gradients at once, so
    only one output's gradient is ever held for them; "gram"-order layers, embeddings and
    per-module entries keep the gradients of the collected outputs (``m x`` their activations).
    ``begin(c0, m)`` starts collecting outputs ``c0 .. c0+m-1`` (all ``C`` by default).
    """

    def __init__(self, engine: Engine, e: _Entry, args: list[Tensor], n: int, partial: Optional[Tensor]) -> None:
        self.engine, self.e, self.args, self.n = engine, e, args, n
        self.C = engine.C
        self.partial = partial
        self.offset, self.slots = 0, engine.C
        self.buffers: list[Tensor] = []
        self.a: Optional[Tensor] = None
        self.Ga: Optional[Tensor] = None
        self.aT: Optional[Tensor] = None
        self.x: Optional[Tensor] = None
        if e.kind in ("linear", "conv2d"):
            x = engine._cast(args[0])
            if e.kind == "conv2d" and e.order == "jac" and e.module.groups == 1 and partial is None:
                # Patches are ~kh*kw times the input (which the graph holds anyway): while the
                # features of many outputs are held, rebuild them a few samples at a time per output
                # instead of holding them too. (Streaming holds one output's rows: keep them.)
                k, L = _conv_patches(e.module, x[:1]).shape[1:]
                self.x, self.k = x, k
                budget = _PATCH_ELEMENTS if x.device.type == "cpu" else 64 * _PATCH_ELEMENTS  # fewer launches
                self.patch_rows = max(1, budget // max(1, k * L))
                return
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

    def begin(self, offset: int, slots: int) -> None:
        """Collect the features of outputs ``offset .. offset+slots-1`` into fresh buffers."""
        self.offset, self.slots = offset, slots
        self.buffers = []

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
        e, n = self.e, self.n
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
                self.buffers = [self.engine.empty(self.slots, tuple(gathered.shape), gathered.dtype, gathered.device)]
            self.buffers[0][c - self.offset] = gathered
            return
        # "jac" order: per-(output, sample) gradients of the weight (and bias) for output c, as
        # A_i^T G_ci (k x d, the weight's entries transposed: any fixed order of P will do)
        gs = gathered.transpose(1, 2) if e.kind == "conv2d" else gathered  # (n, S, d)
        S, d = gs.shape[1], gs.shape[2]
        G = _groups(e)
        k = self.k if self.x is not None else self.a.shape[2]
        if not self.buffers:
            shapes = []
            if "weight" in e.params:
                shapes.append((n, d * (k // G)))
            if "bias" in e.params:
                shapes.append((n, d))
            # streaming keeps one output's rows only
            slots = 1 if self.partial is not None else self.slots
            self.buffers = [self.engine.empty(slots, shape, gs.dtype, gs.device) for shape in shapes]
        slot = 0 if self.partial is not None else c - self.offset
        i = 0
        if "weight" in e.params:
            if G > 1:
                w = torch.einsum("nsgo,nsgk->ngko", gs.reshape(n, S, G, d // G), self.a.reshape(n, S, G, k // G))
                self.buffers[0][slot] = w.reshape(n, -1)
            elif self.x is not None:
                rows, b = self.buffers[0][slot].view(n, k, d), self.patch_rows
                windows = _conv_windows(e.module, _conv_pad(e.module, self.x))
                for s0 in range(0, n, b):
                    patches = self.engine.patch_buffer(windows[s0:s0 + b])
                    torch.bmm(patches.view(patches.shape[0], k, -1), gs[s0:s0 + b], out=rows[s0:s0 + b])
                del windows
            else:
                torch.bmm(self.aT, gs, out=self.buffers[0][slot].view(n, k, d))
            i = 1
        if "bias" in e.params:
            torch.sum(gs, dim=1, out=self.buffers[i][slot])
        if self.partial is not None:  # streaming: contract this output's rows at once
            for J in self.buffers:
                self._stream(c, J[0] @ J[0].T)

    def finish(self, feats: _Features) -> None:
        """Hand the collected features to ``feats`` (and let go of them here)."""
        e, buffers = self.e, self.buffers
        self.buffers = []
        if not buffers:
            return  # no gradient reached this module's output
        if e.kind == "module":
            self.engine._add_jacobian(feats, self.engine._module_jacobian(e, self.args, buffers[0]))
        elif self.partial is not None:
            return  # contracted while streaming
        elif e.kind == "embedding":
            feats.grams.append(_Gram(self.args[0].reshape(self.n, -1), buffers[0], True, e.module.padding_idx))
        elif e.order == "gram":
            feats.grams.append(_Gram(self.a, buffers[0]))
        else:
            feats.jac.extend(buffers)


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


def _conv_pad(m: nn.Conv2d, x: Tensor) -> Tensor:
    """A Conv2d's input padded as the module pads it (its padding mode; ``"same"``/``"valid"``)."""
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        else:  # "same": total dilation*(k-1) per dimension, the extra one on the right/bottom
            th = m.dilation[0] * (m.kernel_size[0] - 1)
            tw = m.dilation[1] * (m.kernel_size[1] - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        pads = (padding[1], padding[1], padding[0], padding[0])
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)


def _conv_windows(m: nn.Conv2d, xpad: Tensor) -> Tensor:
    """Strided view ``(n, C_in, kh, kw, H_out, W_out)`` of a padded input: the patches, uncopied."""
    (kh, kw), (dh, dw), (sh, sw) = m.kernel_size, m.dilation, m.stride
    windows = xpad.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    return windows.permute(0, 1, 4, 5, 2, 3)


def _conv_patches(m: nn.Conv2d, x: Tensor) -> Tensor:
    """im2col of a Conv2d's input, ``(n, C_in*kh*kw, L)`` (``F.unfold``'s layout), with the module's
    padding mode; one copy of a strided view (several times faster than ``F.unfold`` on CPU)."""
    w = _conv_windows(m, _conv_pad(m, x))
    n, c, kh, kw, ho, wo = w.shape
    return w.reshape(n, c * kh * kw, ho * wo)


def symmetrize_(K: Tensor, tile: int = 128) -> Tensor:
    """Make a square matrix exactly symmetric in place (lower triangle wins).

    Off-diagonal ``tile``-square blocks are copied transposed; the diagonal ones recursively in
    32-square tiles, whose triangles are the only temporaries (8 KiB each in float64).
    """
    D = K.shape[0]
    if D <= 32:
        K.copy_(torch.tril(K) + torch.tril(K, -1).T)
        return K
    for r in range(0, D, tile):
        r1 = min(r + tile, D)
        for c in range(0, r, tile):
            K[c:c + tile, r:r1].copy_(K[r:r1, c:c + tile].T)
        symmetrize_(K[r:r1, r:r1], 32)
    return K


def mirror_block_(K: Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
    """``K[c', j, c, i] = K[c, i, c', j]`` for a ``(C, N, C, N)`` block kernel and all outputs.

    One ``(n_i, n_j)`` transpose per pair of outputs (a permuted copy of the whole block inside
    the same tensor would first copy the block); for small chunks one output at a time.
    """
    C = K.shape[0]
    if (i1 - i0) * (j1 - j0) >= 4096:
        for c in range(C):
            for c2 in range(C):
                K[c2, j0:j1, c, i0:i1].copy_(K[c, i0:i1, c2, j0:j1].T)
    else:
        for c in range(C):
            K[:, j0:j1, c, i0:i1].copy_(K[c, i0:i1, :, j0:j1].permute(1, 2, 0))


# --------------------------------------------------------------------------------------------- driver
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fit_chunk(engine: Engine, chunk: int, feature_budget: Optional[int]) -> int:
    """The chunk shrunk so that two chunks' features fit in ``feature_budget`` bytes (None: as is).

    Features grow linearly with the samples, so one sample's features give the size (a wide model
    under the Jacobian route needs ``C x P`` floats per sample, and a fixed chunk would otherwise
    allocate gigabytes before any check).
    """
    if feature_budget is None:
        return chunk
    per_sample = engine.features(0, 1).nbytes()
    fit = int(feature_budget // max(1, 2 * per_sample))
    if fit < 1:
        raise ValueError(
            f"one sample's kernel features take {_fmt_bytes(per_sample)} (two are alive at once), more than the "
            f"{_fmt_bytes(feature_budget)} that max_memory leaves besides the kernel; raise max_memory")
    return min(chunk, fit)


def run_blocks(engine: Engine, n: int, chunk: int, sink: Callable[[int, int, int, int, _Features, _Features], None],
               cache_bytes: Optional[int], feature_budget: Optional[int] = None,
               diagonal: Optional[Callable[[int, int], None]] = None) -> None:
    """Call ``sink(i0, i1, j0, j1, FI, FJ)`` for every pair of chunks with ``j <= i``.

    Features of every chunk are kept when they fit in ``cache_bytes`` (estimated from the first
    chunk), and always with two chunks (the pair of them is alive at once anyway); otherwise the
    features of earlier chunks are recomputed for each pair, so that peak memory stays at two
    chunks' features. With ``feature_budget`` (bytes for those two chunks), the chunk is first
    shrunk to fit (:func:`fit_chunk`). When all samples fit one chunk and ``diagonal`` is given,
    ``diagonal(0, n)`` is called instead (the engine's one-chunk pass, which needs no features
    of all outputs at once).
    """
    chunk = fit_chunk(engine, chunk, feature_budget)
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if diagonal is not None and len(bounds) == 1:
        diagonal(0, n)
        return
    engine.streaming = len(bounds) == 1 and engine.kind != "block"
    cache: dict[int, _Features] = {}
    keep = None
    for bi, (i0, i1) in enumerate(bounds):
        FI = cache.get(bi) or engine.features(i0, i1)
        if keep is None:
            keep = len(bounds) == 2 or (len(bounds) > 2 and (cache_bytes is None
                                                            or FI.nbytes() * len(bounds) <= cache_bytes))
        if keep:
            cache[bi] = FI
        for bj in range(bi + 1):
            j0, j1 = bounds[bj]
            FJ = FI if bj == bi else (cache.get(bj) or engine.features(j0, j1))
            sink(i0, i1, j0, j1, FI, FJ)
            del FJ
