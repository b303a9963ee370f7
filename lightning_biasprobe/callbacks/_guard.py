"""The isolation guard: every measurement runs inside ``isolated(module)``.

A probe must leave the training run exactly as it found it. Each side effect below was seen to
change a seeded run's final weights, so each is undone here:

- RNG: torch (CPU and the CUDA device in use), NumPy's global RNG and Python's ``random`` are
  saved and restored, also when the measurement raises (Lightning's ``isolate_rng`` does not
  restore on an exception; ``torch.random.fork_rng`` does).
- ``training`` flags: set to eval (or train, on request) and restored module by module, so a
  module the user froze in eval mode stays frozen (a blanket ``model.train()`` would un-freeze it).
- ``requires_grad`` of every parameter: restored one by one.
- buffers (BatchNorm running statistics, ``num_batches_tracked``): snapshotted, and every buffer
  that changed (or was replaced) is put back. Version counters cannot tell: the fused batch-norm
  kernel updates running statistics without bumping them, so values are compared.
- ``.grad``: probes use ``torch.autograd.grad`` / ``torch.func`` and never ``.backward()``. The guard
  checks each parameter's ``.grad`` identity and version and warns if a measurement broke that rule.
- autocast is disabled and grad mode enabled inside the guard (measurements need float32+ and
  gradients, whatever the hook they are called from).
- scaled-dot-product attention uses its math kernel inside the guard: the fused CPU/CUDA kernels
  (flash, memory-efficient) have no double backward and no ``vmap`` batching rule, which Hessian
  products, per-sample gradients and Jacobians need; the math kernel computes the same function.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from typing import Iterator, Literal

import numpy as np
import torch
from torch import nn

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    sdpa_kernel = None


def _cuda_devices(module: nn.Module) -> list[int]:
    devices = {p.device.index for p in module.parameters() if p.device.type == "cuda"}
    devices |= {b.device.index for b in module.buffers() if b.device.type == "cuda"}
    if devices and torch.cuda.is_available():
        return sorted(d if d is not None else torch.cuda.current_device() for d in devices)
    return []


def _device_type(module: nn.Module) -> str:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device.type
    return "cpu"


def differentiable_attention() -> contextlib.AbstractContextManager:
    """Scaled-dot-product attention on its math kernel (higher-order and vmap-able derivatives)."""
    return sdpa_kernel([SDPBackend.MATH]) if sdpa_kernel is not None else contextlib.nullcontext()


@contextlib.contextmanager
def isolated(module: nn.Module, mode: Literal["eval", "train"] = "eval") -> Iterator[nn.Module]:
    """Run a measurement on ``module`` without changing anything training depends on."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    modules = list(module.modules())
    flags = [m.training for m in modules]
    params = list(module.parameters())
    requires = [p.requires_grad for p in params]
    grads = [(p.grad, None if p.grad is None else p.grad._version) for p in params]
    named_buffers = [(m, name, buf) for m in modules for name, buf in m.named_buffers(recurse=False)]
    saved_buffers = [None if buf is None else buf.detach().clone() for _, _, buf in named_buffers]
    np_state = np.random.get_state()
    py_state = random.getstate()
    device_type = _device_type(module)
    try:
        with torch.random.fork_rng(devices=_cuda_devices(module)), torch.enable_grad(), \
                torch.autocast(device_type=device_type, enabled=False), differentiable_attention():
            module.train(mode == "train")
            yield module
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        for m, flag in zip(modules, flags):
            m.training = flag
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
        with torch.no_grad():
            for (m, name, original), copy in zip(named_buffers, saved_buffers):
                if original is None:
                    continue
                if m._buffers.get(name) is not original:
                    m._buffers[name] = original
                if not torch.equal(original, copy):
                    original.copy_(copy)
        if any(p.grad is not g or (g is not None and g._version != v) for p, (g, v) in zip(params, grads)):
            for p, (g, _) in zip(params, grads):
                p.grad = g
            warnings.warn(
                "a probe changed parameter gradients (.grad) in place; gradients were reset to their "
                "tensors but their values may differ. Probes must use torch.autograd.grad, not .backward().",
                RuntimeWarning,
                stacklevel=3,
            )
