"""Implicit gradient regularization over training, read from the gradients training already computed."""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..functional.igr import gradient_norm_squared
from .base import ProbeLogic, ProbeSkipped


class GradientRegularizationLogic(ProbeLogic):
    r"""Logs the implicit gradient regularizer :math:`\frac{h}{4}\lVert\nabla L\rVert^2` of every optimizer step.

    Barrett & Dherin (2021), "Implicit Gradient Regularization" (ICLR): gradient descent with step
    size ``h`` follows the gradient flow of :math:`L + \frac h4\lVert\nabla L\rVert^2` more closely than
    that of ``L``; the added term is the flatness bias that gradient descent carries implicitly.
    Smith, Dherin, Barrett, De (2021) give the minibatch (SGD) version, which this probe sees:
    the gradient is that of the training step's minibatch.

    Read-only and without extra passes: in ``on_before_optimizer_step`` (after the backward, after
    AMP unscaling, before gradient clipping and before the update), the probe reads the ``.grad``
    of the optimizer's parameters and the learning rate ``h`` of each parameter group, so it costs
    one read of the gradients (no forward, no backward, no host synchronisation until the value
    is logged). It needs no probe set: ``probe_data``, ``num_samples``, ``forward``, ``loss_fn``
    and ``mode`` are accepted for a uniform interface and ignored.

    Logs ``biasprobe/igr/``:

    - ``grad_norm_sq``: :math:`\lVert g\rVert^2`, ``g`` the gradient the optimizer is about to use
      (with gradient accumulation: the accumulated gradient; with DDP: the all-reduced one);
    - ``igr_term``: :math:`\frac14\sum_{groups} h_g \lVert g_g\rVert^2` (``(h/4)||g||^2`` for one learning rate);
    - ``lr``: the learning rate of the first parameter group;
    - ``seconds``.

    Steps. A point at global step ``k`` is the gradient at the weights ``theta_k`` (after ``k``
    optimizer steps), the same weights other probes measure at step ``k``: the first optimizer
    step gives the point at step 0 (``at_start``), and the last optimizer step of a run of ``T``
    steps gives step ``T - 1``. The final weights ``theta_T`` have no training gradient, so
    ``at_end`` makes sure the last optimizer step's point is logged (at ``T - 1``, its own step)
    rather than inventing a point at ``T``. ``every_n_epochs`` logs the last optimizer step of the
    epoch, at its own step.

    The coefficient ``h/4`` is derived for plain gradient descent. With momentum (heavy ball) the
    implicit regularizer is stronger -- by a factor ``(1 + beta)/(1 - beta)`` according to Ghosh,
    Lyu, Zhang, Wang (2023), abstract -- and adaptive optimizers (Adam) are not covered; coupled
    weight decay is added by the optimizer, not in ``.grad``. The probe warns once in these cases
    and logs ``(h/4)||g||^2`` as defined above; ``grad_norm_sq`` is exact regardless.

    Default cadence: every optimizer step.
    """

    name = "igr"
    default_cadence = {"every_n_steps": 1}
    default_num_samples = 1
    needs_probe_set = False
    # No point at the final weights: they have no training gradient (see "Steps" above). Read by
    # the shared tests once they take it into account (proposed with this probe).
    measures_final_weights = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._optimizer: Any = None
        # The latest optimizer step's point: (global step, {quantity: 0-dim tensor or float}, seconds).
        self._latest: Optional[tuple[int, dict[str, Any], float]] = None
        self._optimizer_warned = False

    # ----------------------------------------------------------------- the measurement
    def read_gradients(self, optimizer: Any) -> dict[str, Any]:
        """``{grad_norm_sq, igr_term, lr}`` from ``optimizer``'s parameter groups and their ``.grad``.

        The norms stay 0-dim tensors on the gradients' device (no host synchronisation here).
        """
        norm_sq: Optional[Tensor] = None
        igr: Optional[Tensor] = None
        for group in optimizer.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not grads:
                continue
            part = gradient_norm_squared(grads)
            term = part * (float(group["lr"]) / 4.0)
            norm_sq = part if norm_sq is None else norm_sq + part
            igr = term if igr is None else igr + term
        if norm_sq is None:
            raise ProbeSkipped("no parameter of the optimizer has a gradient at this step "
                               "(training_step returned None, or every parameter is frozen)")
        return {"grad_norm_sq": norm_sq, "igr_term": igr, "lr": float(optimizer.param_groups[0]["lr"])}

    def measure(self, module: nn.Module, probe: Any) -> dict:
        """The values for the gradients now in ``.grad`` of the last optimizer seen (for direct use)."""
        if self._optimizer is None:
            raise ProbeSkipped("GradientRegularization reads the gradients of an optimizer step; none was seen yet")
        return self.read_gradients(self._optimizer)

    def _warn_about_optimizer(self, optimizer: Any) -> None:
        if self._optimizer_warned:
            return
        self._optimizer_warned = True
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        reasons = []
        if not isinstance(inner, torch.optim.SGD):
            reasons.append(f"{type(inner).__name__} is not plain gradient descent")
        groups = optimizer.param_groups
        momentum = max((float(g.get("momentum", 0.0) or 0.0) for g in groups), default=0.0)
        if isinstance(inner, torch.optim.SGD) and momentum > 0:
            reasons.append(f"momentum={momentum} strengthens the implicit regularizer")
        decay = max((float(g.get("weight_decay", 0.0) or 0.0) for g in groups), default=0.0)
        if decay > 0:
            reasons.append(f"weight_decay={decay} is applied by the optimizer and is not in .grad")
        if reasons:
            warnings.warn(
                f"{type(self).__name__}: the IGR coefficient h/4 is derived for plain gradient descent, but "
                f"{'; '.join(reasons)}. biasprobe/{self.log_name}/igr_term is logged as (h/4)*||grad||^2 with the "
                "optimizer's learning rate; grad_norm_sq is exact.", RuntimeWarning, stacklevel=2)

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # No gradient exists before the first backward: the step-0 point is made by the first
        # optimizer step (its gradient is taken at the initial weights).
        self._latest = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Only the training-time bookkeeping (for max_overhead); points are made before the update.
        if self._batch_t0 is not None:
            self._train_seconds += time.perf_counter() - self._batch_t0
            self._batch_t0 = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        due = (step == 0 and self.cadence.at_start) or self.cadence.due_at_step(step)
        keep = self.cadence.at_end or self.cadence.every_n_epochs is not None
        if not (due or keep):
            return
        started = time.perf_counter()
        self._optimizer = optimizer
        self._warn_about_optimizer(optimizer)
        try:
            values = self.read_gradients(optimizer)
        except Exception as err:  # noqa: BLE001 - the failure policy: never kill a training run
            self._latest = None
            self._last_attempted_step = step
            self.fail(step, err)
            return
        self._latest = (step, values, time.perf_counter() - started)
        if due:
            self._emit(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and self.cadence.due_at_epoch_end(trainer.current_epoch):
            self._emit(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.is_global_zero and self.cadence.at_end:
            self._emit(trainer, force=True)

    # ----------------------------------------------------------------- plumbing
    def _emit(self, trainer: Any, force: bool = False) -> None:
        """Log the latest optimizer step's point at its own step, once."""
        if self._latest is None:
            return
        step, tensors, seconds = self._latest
        if not self.claim_step(step, force):
            return
        started = time.perf_counter()
        values = {k: float(v) for k, v in tensors.items()}  # the one host synchronisation
        self.record(trainer, step, values, seconds + time.perf_counter() - started)
