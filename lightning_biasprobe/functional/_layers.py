"""Which layers a representation probe reads, and how a layer's output becomes an ``(N, D)`` matrix.

Shared by the effective-rank and nearest-class-center measurements.

Layer selection (``layers=``):

- a module name (``"encoder.block3"``, as in ``model.named_modules()``), a module type
  (``nn.ReLU``: every module of that type, in definition order), or a list mixing both. An
  unknown name raises a ``ValueError`` that lists the module names that exist (and the closest
  matches).
- ``"auto"``: the output of every hidden block of the model's trunk. The rule, applied with one
  forward pass of two examples that records which modules run and in which order:

  1. the trunk: start at the model and, while exactly one of its children runs in the forward,
     step into that child (so ``self.net = nn.Sequential(...)`` inside a LightningModule, or
     a wrapper around a backbone, is looked through; children that never run, such as metric
     objects, are ignored);
  2. the trunk's children are listed in the order they run;
  3. they are grouped into blocks: a child that holds parameters and is not a normalisation
     layer (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm) opens a new block; every other
     child (activations, dropout, pooling, flatten, normalisation) belongs to the open block;
  4. a layer is the output of a block's last child; the last block is the head (its output is the
     model's output) and is not a layer.

  ``Sequential(Linear, ReLU, Linear, ReLU, Linear)`` gives the two post-activation outputs
  ``["1", "3"]``; a torchvision ResNet gives the stem (after max-pooling), ``layer1`` to ``layer3``
  and ``layer4`` after global pooling. A child that runs several times in one forward (a shared
  activation module) is keyed per call, ``<name>-call<k>``.

Reducing an output to ``(N, D)`` (the first dimension is always the sample):

- ``(N, D)``: as is; ``(N,)``: one feature.
- ``(N, C, *spatial)`` with two or more spatial dimensions (conv maps): ``conv_pool="gap"``
  (global average pooling over space, ``D = C``; the default: cheap) or ``"flatten"``
  (``D = C * H * W``, closest to the papers, memory-heavy: combine with a projection). The key of
  the layer names the choice: ``<name>-gap`` / ``<name>-flat``.
- ``(N, T, D)``: a sequence (channels last): ``sequence_pool="mean"`` over positions (the default),
  ``"last"``, ``"first"``, ``"flatten"``, or a callable ``(N, T, D) -> (N, D')``. Keys:
  ``<name>-mean``, ``-last``, ``-first``, ``-flat``, ``-pooled``. A 1-D conv map ``(N, C, L)`` is
  three-dimensional too: pass ``sequence_pool=lambda t: t.mean(-1)`` to pool it over ``L``.

Projection (``max_dim=k``): a layer wider than ``k`` (after pooling) is mapped to ``k`` features by a
seeded CountSketch ``S`` (Charikar, Chen, Farach-Colton 2002; Clarkson & Woodruff 2013): every input
coordinate is added, with a random sign, to one of ``k`` buckets. It costs one pass over the
features (no ``D x k`` matrix is formed or multiplied). What it preserves: it is linear, so class
means and sums are mapped exactly (the projected mean is the mean of the projected features);
``E[S^T S] = I``, so inner products, squared norms, squared distances (hence nearest-class-center
decisions) and the Gram matrix ``Z Z^T`` are unbiased, with relative error ``O(1/sqrt(k))`` for dense
vectors; the spectrum of the sketched features approximates that of ``Z`` when ``k`` is well above
its effective rank, and any rank or effective rank is capped at ``k``. The same sketch is used at
every measurement (seeded by ``seed``, the layer's key and its width), so curves compare like with
like. Layers no wider than ``k`` are not projected (exact).
"""

from __future__ import annotations

import difflib
import zlib
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .._tree import num_rows, slice_rows
from ._adapters import ForwardFn, batchnorm_in_train_mode, call_model, output_tensor

LayerSpec = Union[str, type, Sequence[Union[str, type]]]
SequencePool = Union[str, Callable[[Tensor], Tensor]]

CONV_POOLS = ("gap", "flatten")
SEQUENCE_POOLS = ("mean", "last", "first", "flatten")
_NORM_TYPES: tuple[type, ...] = tuple(
    t for t in (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                nn.LocalResponseNorm, getattr(nn, "RMSNorm", None)) if t is not None
)
# A module may run this many times in one forward before we refuse to key its calls separately.
_MAX_CALLS = 16


def _names_listing(model: nn.Module, wanted: Optional[str] = None, limit: int = 60) -> str:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(wanted, names, n=3) if wanted else []
    shown = ", ".join(repr(n) for n in names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit
                                                           else "")
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{hint} The model's modules are: {shown or '(none: the model has no submodules)'}"


def resolve_layer_names(model: nn.Module, layers: LayerSpec) -> Optional[list[str]]:
    """Module names for an explicit ``layers`` (names and/or types); ``None`` for ``"auto"``.

    Raises ``ValueError`` for a name that does not exist (listing the names that do) or a type
    with no module, ``TypeError`` for anything else.
    """
    if isinstance(layers, str) and layers == "auto":
        return None
    items = [layers] if isinstance(layers, (str, type)) else list(layers)
    if not items:
        raise ValueError("layers is empty; pass 'auto', module names or module types")
    modules = dict(model.named_modules())
    names: list[str] = []
    for item in items:
        if isinstance(item, str):
            if item == "auto":
                raise ValueError("'auto' cannot be combined with other layers; pass layers='auto' alone")
            if not item or item not in modules:
                raise ValueError(f"layers: the model has no module named {item!r}.{_names_listing(model, item)}")
            names.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            found = [n for n, m in modules.items() if n and isinstance(m, item)]
            if not found:
                types = sorted({type(m).__name__ for n, m in modules.items() if n})
                raise ValueError(f"layers: the model has no module of type {item.__name__}; its module types are "
                                 f"{types}")
            names.extend(found)
        else:
            raise TypeError(f"layers must be 'auto', module names or nn.Module types, got {item!r}")
    return list(dict.fromkeys(names))  # de-duplicated, in order


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def auto_layers(model: nn.Module, inputs: Any, forward: Optional[ForwardFn] = None) -> list[tuple[str, Optional[int]]]:
    """The ``"auto"`` layers of ``model`` (see the module docstring) as ``(name, call)`` pairs.

    ``call`` is the 1-based call index for a module that runs several times in one forward, else
    ``None``. ``inputs`` are a few examples; the model runs once on them (no gradients).
    """
    calls: list[str] = []
    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(lambda m, i, o, name=name: calls.append(name)))
        with torch.no_grad():
            (forward or call_model)(model, inputs)
    finally:
        for h in handles:
            h.remove()
    ran = set(calls)
    trunk_name, trunk = "", model
    while True:
        children = [(_join(trunk_name, n), m) for n, m in trunk.named_children() if _join(trunk_name, n) in ran]
        if len(children) != 1:
            break
        trunk_name, trunk = children[0]
    child_names = {n for n, _ in children}
    modules = dict(model.named_modules())
    sequence = [n for n in calls if n in child_names]  # the trunk's children, in the order they ran
    blocks: list[list[str]] = []
    for n in sequence:
        opens = _has_parameters(modules[n]) and not isinstance(modules[n], _NORM_TYPES)
        if opens or not blocks:
            blocks.append([])
        blocks[-1].append(n)
    counts = {n: sequence.count(n) for n in child_names}
    layers: list[tuple[str, Optional[int]]] = []
    position = 0
    for block in blocks[:-1]:
        position += len(block)
        last = block[-1]
        # A module that ran several times: keep the call that ends this block (its k-th run).
        layers.append((last, None) if counts[last] == 1 else (last, sequence[:position].count(last)))
    if not layers:
        where = f"module {trunk_name!r}" if trunk_name else "the model"
        raise ValueError(f"layers='auto' found no hidden block in {where} (the rule needs at least two blocks of "
                         f"parametrised children, the last being the head); pass layers=[module names]."
                         f"{_names_listing(model)}")
    return layers


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _sketch(dim: int, k: int, seed: int, key: str) -> tuple[Tensor, Tensor]:
    """CountSketch buckets and signs for a ``dim``-wide layer, fixed by ``(seed, key, dim)``.

    ``zlib.crc32`` (not ``hash``, which is salted per process) so every DDP rank draws the same.
    """
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode()) * 7919 + dim) % (2**62))
    buckets = torch.randint(0, k, (dim,), generator=g)
    signs = torch.randint(0, 2, (dim,), generator=g, dtype=torch.int8).float() * 2 - 1
    return buckets, signs


class FeatureCapture:
    """Forward hooks that turn chosen layers' outputs into (projected) ``(n, D)`` feature matrices.

    The hooks exist only while :meth:`run` executes (they are removed in a ``finally``, also when
    the forward raises). Each layer's output is reduced and projected inside the hook, so the
    activation itself is not kept: peak memory is one chunk's activations plus ``chunk x k`` per
    layer. See the module docstring for the selection, pooling and projection rules.

    Args:
        layers: ``"auto"``, a module name or type, or a list of them.
        conv_pool: ``"gap"`` or ``"flatten"`` for conv maps ``(N, C, *spatial)``.
        sequence_pool: ``"mean"``, ``"last"``, ``"first"``, ``"flatten"`` or a callable, for ``(N, T, D)``.
        max_dim: project layers wider than this with a CountSketch; ``None``: never project.
        seed: seed of the sketches.
        forward: ``(model, inputs) -> output``; default ``model(inputs)``.
    """

    def __init__(self, layers: LayerSpec = "auto", *, conv_pool: str = "gap", sequence_pool: SequencePool = "mean",
                 max_dim: Optional[int] = 256, seed: int = 0, forward: Optional[ForwardFn] = None) -> None:
        if not (isinstance(layers, (str, type)) or (isinstance(layers, Sequence) and not isinstance(layers, str))):
            raise TypeError(f"layers must be 'auto', a module name or type, or a list of them; got {layers!r}")
        if isinstance(layers, str) and not layers:
            raise ValueError("layers must not be an empty string")
        items = [layers] if isinstance(layers, (str, type)) else list(layers)
        if not items:
            raise ValueError("layers is empty; pass 'auto', module names or module types")
        for item in items:
            if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
                raise TypeError(f"layers must be 'auto', module names or nn.Module types, got {item!r}")
        if len(items) > 1 and "auto" in items:
            raise ValueError("'auto' cannot be combined with other layers; pass layers='auto' alone")
        if conv_pool not in CONV_POOLS:
            raise ValueError(f"conv_pool must be one of {CONV_POOLS}, got {conv_pool!r}")
        if not callable(sequence_pool) and sequence_pool not in SEQUENCE_POOLS:
            raise ValueError(f"sequence_pool must be one of {SEQUENCE_POOLS} or a callable, got {sequence_pool!r}")
        if max_dim is not None and (not isinstance(max_dim, int) or isinstance(max_dim, bool) or max_dim < 1):
            raise ValueError(f"max_dim must be a positive integer or None, got {max_dim!r}")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be a callable, got {type(forward).__name__}")
        self.layers = layers
        self.conv_pool = conv_pool
        self.sequence_pool = sequence_pool
        self.max_dim = max_dim
        self.seed = int(seed)
        self.forward = forward
        # [(module name, call index or None)], resolved on the first run (or set from rank zero).
        self.refs: Optional[list[tuple[str, Optional[int]]]] = None
        self._sketches: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ selection
    def check(self, model: nn.Module) -> None:
        """Raise now (e.g. at setup) if an explicit layer name or type does not exist in ``model``."""
        resolve_layer_names(model, self.layers)

    def resolve(self, model: nn.Module, inputs: Any) -> list[tuple[str, Optional[int]]]:
        if self.refs is None:
            names = resolve_layer_names(model, self.layers)
            if names is None:
                self.refs = auto_layers(model, slice_rows(inputs, 0, min(2, num_rows(inputs))), self.forward)
            else:
                self.refs = [(n, None) for n in names]
        return self.refs

    def describe(self) -> str:
        """The selection in words, for keys and errors (``"auto"`` or the names)."""
        if isinstance(self.layers, str):
            return self.layers
        if isinstance(self.layers, type):
            return self.layers.__name__
        return ",".join(x if isinstance(x, str) else x.__name__ for x in self.layers)

    # ------------------------------------------------------------------ reduction and projection
    def reduce(self, name: str, output: Any, n: int) -> tuple[Tensor, str]:
        """``(n, D)`` features of one layer output and the key suffix naming the reduction."""
        t = output_tensor(output).detach()
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(f"layer {name!r} returned shape {tuple(t.shape)}; a leading sample dimension of {n} is "
                             "needed (pass sequence_pool=callable for time-major outputs, or choose another layer)")
        if not t.is_floating_point():
            raise ValueError(f"layer {name!r} returned a {t.dtype} tensor; features must be floating point")
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        if t.dim() == 1:
            return t.unsqueeze(1), ""
        if t.dim() == 2:
            return t, ""
        if t.dim() == 3:
            pool = self.sequence_pool
            if callable(pool):
                z = pool(t)
                if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != n:
                    raise ValueError(f"sequence_pool returned {getattr(z, 'shape', type(z))} for layer {name!r}; "
                                     f"(N, D) with N={n} is needed")
                return z, "-pooled"
            if pool == "mean":
                return t.mean(dim=1), "-mean"
            if pool == "last":
                return t[:, -1], "-last"
            if pool == "first":
                return t[:, 0], "-first"
            return t.reshape(n, -1), "-flat"
        if self.conv_pool == "gap":
            return t.mean(dim=tuple(range(2, t.dim()))), "-gap"
        return t.reshape(n, -1), "-flat"

    def project(self, key: str, z: Tensor) -> Tensor:
        """The CountSketch of ``z`` (``n x D``) to ``max_dim`` columns; ``z`` itself if not wider."""
        dim = z.shape[1]
        if self.max_dim is None or dim <= self.max_dim:
            return z
        sketch = self._sketches.get((key, dim))
        if sketch is None:
            sketch = self._sketches[(key, dim)] = _sketch(dim, self.max_dim, self.seed, key)
        buckets, signs = sketch
        if buckets.device != z.device:
            buckets, signs = buckets.to(z.device), signs.to(z.device)
            self._sketches[(key, dim)] = (buckets, signs)
        out = z.new_zeros(z.shape[0], self.max_dim)
        return out.index_add_(1, buckets, z * signs.to(z.dtype))

    # ------------------------------------------------------------------ running
    def run(self, model: nn.Module, inputs: Any, consume: Callable[[dict[str, Tensor]], None],
            chunk_size: Optional[int] = 256) -> list[str]:
        """Forward ``inputs`` in chunks; call ``consume({key: features})`` after each chunk.

        Returns the layer keys, in order. Runs under ``torch.no_grad()``. BatchNorm modules in train
        mode are refused (call ``model.eval()``); dropout in train mode is the caller's business.
        """
        coupled = batchnorm_in_train_mode(model)
        if coupled:
            raise ValueError(f"BatchNorm modules are in train mode ({coupled[:3]}): features would depend on how "
                             "examples are chunked and the forward would update running statistics; call "
                             "model.eval() first")
        refs = self.resolve(model, inputs)
        modules = dict(model.named_modules())
        missing = [n for n, _ in refs if n not in modules]
        if missing:
            listing = _names_listing(model, missing[0])
            raise ValueError(f"layers: the model has no module named {missing[0]!r}.{listing}")
        total = num_rows(inputs)
        step = total if chunk_size is None else max(1, int(chunk_size))
        keys: Optional[list[str]] = None
        wanted: dict[str, list[Optional[int]]] = {}
        for name, call in refs:
            wanted.setdefault(name, []).append(call)
        for start in range(0, total, step):
            chunk = slice_rows(inputs, start, min(total, start + step))
            n = min(total, start + step) - start
            captured: dict[str, list[tuple[int, Tensor, str]]] = {name: [] for name in wanted}
            counts = {name: 0 for name in wanted}

            def hook(module: nn.Module, args: Any, output: Any, name: str) -> None:
                counts[name] += 1
                calls = wanted[name]
                if None in calls or counts[name] in calls:
                    if counts[name] > _MAX_CALLS:
                        raise ValueError(f"layer {name!r} ran more than {_MAX_CALLS} times in one forward; choose a "
                                         "module that runs once (e.g. not a module inside a loop)")
                    captured[name].append((counts[name], *self.reduce(name, output, n)))

            handles = [modules[name].register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
                       for name in wanted]
            try:
                with torch.no_grad():
                    (self.forward or call_model)(model, chunk)
            finally:
                for h in handles:
                    h.remove()
            features: dict[str, Tensor] = {}
            for name, call in refs:
                got = captured[name]
                if not got:
                    raise ValueError(f"layer {name!r} did not run in the forward pass; choose a module that runs "
                                     "(see layers=)")
                several = counts[name] > 1
                for index, z, suffix in got:
                    if call is not None and index != call:
                        continue
                    key = name + (f"-call{index}" if several else "") + suffix
                    features[key] = self.project(key, z)
            if keys is None:
                keys = list(features)
            elif list(features) != keys:
                raise ValueError(f"the captured layers changed between chunks ({keys} then {list(features)}); "
                                 "a module that runs a varying number of times cannot be a layer")
            consume(features)
        return keys or []
