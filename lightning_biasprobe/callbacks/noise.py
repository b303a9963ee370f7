"""Stochastic-gradient noise over training: tail index (Şimşekli et al. 2019), B_simple (McCandlish et al.), GSNR."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

from torch import nn

from ..functional.noise import METHODS, BlockSize, Method, gradient_noise_statistics
from ._data import ProbeSet
from .base import ProbeLogic


class GradientNoiseLogic(ProbeLogic):
    r"""Logs the tail index of the minibatch gradient noise, the gradient noise scale and the GSNR.

    Per-sample gradients of the loss on a fixed probe set (``per_sample_gradients``: structured
    for ``nn.Linear`` layers, ``torch.func`` ``vmap`` over ``grad`` for the other parameters,
    chunked) give, at each measurement:

    - the **tail index** :math:`\alpha` of the minibatch noise :math:`U_k = g_{B,k} - \bar g`
      (Şimşekli, Sagun, Gürbüzbalaban 2019, "A Tail-Index Analysis of Stochastic Gradient Noise in
      Deep Neural Networks"; estimator of Mohammadi et al. 2015): all coordinates of the ``M`` noise
      vectors pooled, as in the reference code (``tail_index``), and the per-coordinate
      standardized control (``tail_index_standardized``): pooling coordinates of different scales
      looks heavy-tailed even when each is Gaussian, so read ``tail_index`` next to it. Values
      below 2 mean heavy tails (2 is Gaussian); ``*_clipped`` are clipped to ``(0, 2]``. Zhou et al.
      (2020) tie heavier-tailed noise to faster escape from sharp minima (SGD's noise being heavier
      than Adam's); Hodgkinson & Mahoney (2021) find heavier tails (of the iterates) with larger
      step sizes and smaller batches.
    - the **simple gradient noise scale** :math:`B_\text{simple} = \mathrm{tr}\,\Sigma/\lVert G\rVert^2`
      (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"), from unbiased
      estimates of both terms (logged as ``trace_cov`` and ``grad_sq_norm``; average those over
      points before dividing for a smoother curve, as McCandlish et al. do). When the
      ``grad_sq_norm`` estimate is not positive the noise scale is beyond what ``N`` samples resolve
      and ``b_simple`` is not logged at that point (a warning says so once); ``snr``
      :math:`= \lVert G\rVert^2/\mathrm{tr}\,\Sigma = 1/B_\text{simple}` is logged at every point
      (zero or negative where the signal is not resolved), so it is the curve to plot when the
      probe set is small.
    - the mean **gradient signal-to-noise ratio** per parameter, :math:`\bar g_j^2/\hat\sigma_j^2`
      averaged over parameters (Liu et al. 2020, "Understanding Why Neural Networks Generalize Well
      Through GSNR of Parameters"), ``gsnr``.

    The counts the estimates used are logged with them: ``num_samples`` (per-sample gradients
    behind ``b_simple``, ``snr``, ``grad_sq_norm``, ``trace_cov`` and ``gsnr``), ``num_minibatches``
    and ``batch_size`` (the noise vectors), ``tail_index_values`` and
    ``tail_index_standardized_values`` (pooled scalars the tail estimates used) and
    ``tail_index_zeros`` (exact zeros dropped, e.g. dead units).

    Logs ``biasprobe/noise/<quantity>`` for the quantities above and ``biasprobe/noise/seconds``.
    Default cadence: at the start, at the end of every epoch and at the end of training, on 256
    training examples (class-balanced), cut into 16 minibatches of 16 in a fixed random order.
    To measure the noise at your training batch size ``B``, pass ``batch_size=B`` and
    ``num_samples`` of at least ``16 * B``.

    Cost per measurement: the per-sample gradients of ``num_samples`` examples (for an MLP on CPU
    about 3x one forward+backward of the same examples; 6-9x with ``method="vmap"``) plus a few
    :math:`O(NP)` reductions and the two tail estimates over ``M x P'`` values, which dominate:
    about 35-40 ms, 30-35x one forward+backward, for the demo MLP (26k parameters) at N = 256 on
    one CPU core (``benchmarks/bench_dynamics.py``); memory
    ``M x P'`` float64 values (``P' = min(P, max_coordinates)``) and one chunk of per-sample
    gradients. Measured in eval mode: BatchNorm in train mode couples
    the samples of a batch, so ``mode="train"`` on a model with BatchNorm is explained (a warning)
    and skipped, not measured; ``mode="train"`` without BatchNorm includes dropout noise.

    Args:
        batch_size: minibatch size ``B`` of the noise; default ``num_samples // num_minibatches``.
        num_minibatches: ``M`` when ``batch_size`` is not given (at least 2).
        chunk_size: samples per vmapped call (bounds memory); None chooses one automatically.
        max_coordinates: the tail index uses at most this many coordinates (a fixed random subset)
            of each noise vector; the noise scale and GSNR always use every parameter.
        seed: the fixed minibatch assignment and coordinate subset.
        block_size: the estimator's block size rule, ``"sqrt"``, ``"divisor"`` (the reference
            code's) or an integer.
        method: ``"auto"`` (structured where possible, vmap for the rest), ``"vmap"`` or ``"loop"``
            (one ``autograd.grad`` per sample, for models vmap cannot run).
        **kwargs: probe data, adapters, cadence and failure policy, see :class:`ProbeLogic`.
    """

    name = "noise"
    default_cadence = {"every_n_epochs": 1}
    default_num_samples = 256
    requires_targets = True

    def __init__(
        self,
        batch_size: Optional[int] = None,
        num_minibatches: int = 16,
        chunk_size: Optional[int] = None,
        max_coordinates: Optional[int] = 2**20,
        seed: int = 0,
        block_size: BlockSize = "sqrt",
        method: Method = "auto",
        **kwargs: Any,
    ) -> None:
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        if isinstance(num_minibatches, bool) or not isinstance(num_minibatches, int) or num_minibatches < 2:
            raise ValueError(f"num_minibatches must be an integer >= 2, got {num_minibatches!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if max_coordinates is not None and (isinstance(max_coordinates, bool) or not isinstance(max_coordinates, int)
                                            or max_coordinates < 1):
            raise ValueError(f"max_coordinates must be a positive integer or None, got {max_coordinates!r}")
        if block_size not in ("sqrt", "divisor") and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                                      or block_size < 2):
            raise ValueError(f"block_size must be 'sqrt', 'divisor' or an integer >= 2, got {block_size!r}")
        if method not in METHODS:
            raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
        super().__init__(**kwargs)
        if batch_size is not None and self.num_samples // batch_size < 2:
            raise ValueError(f"batch_size={batch_size} leaves fewer than two minibatches in num_samples="
                             f"{self.num_samples}; pass num_samples >= {2 * batch_size} (16x batch_size is better)")
        if batch_size is None and self.num_samples < num_minibatches:
            raise ValueError(f"num_samples={self.num_samples} is smaller than num_minibatches={num_minibatches}")
        self.batch_size = batch_size
        self.num_minibatches = num_minibatches
        self.chunk_size = chunk_size
        self.max_coordinates = max_coordinates
        self.seed = seed
        self.block_size = block_size
        self.method = method
        self._warned_b_simple = False

    def key_fields(self) -> dict:
        return {"batch_size": self.batch_size, "num_minibatches": self.num_minibatches}

    def measure(self, module: nn.Module, probe: ProbeSet) -> dict:
        n = len(probe)
        batch_size = self.batch_size or max(1, n // self.num_minibatches)
        stats = gradient_noise_statistics(
            module, probe.inputs, probe.targets, batch_size=batch_size, forward=self.forward, loss_fn=self.loss_fn,
            chunk_size=self.chunk_size, seed=self.seed, max_coordinates=self.max_coordinates,
            block_size=self.block_size, method=self.method,
        )
        scale, tail, control = stats.noise_scale, stats.tail, stats.tail_standardized
        values = {
            "tail_index": tail.alpha,
            "tail_index_clipped": tail.alpha_clipped,
            "tail_index_standardized": control.alpha,
            "tail_index_standardized_clipped": control.alpha_clipped,
            "grad_sq_norm": scale.grad_sq_norm,
            "trace_cov": scale.trace_cov,
            "snr": scale.snr,
            "gsnr": scale.gsnr,
            "num_samples": stats.num_samples,
            "num_minibatches": stats.num_minibatches,
            "batch_size": stats.batch_size,
            "tail_index_values": tail.num_values,
            "tail_index_standardized_values": control.num_values,
            "tail_index_zeros": tail.zeros_dropped,
        }
        if math.isfinite(scale.b_simple):
            values["b_simple"] = scale.b_simple
        elif not self._warned_b_simple:
            self._warned_b_simple = True
            warnings.warn(
                f"{type(self).__name__}: the estimate of ||G||^2 is not positive ({scale.grad_sq_norm:.3g}): the "
                f"gradient noise hides the mean gradient of {stats.num_samples} samples, so B_simple (larger than "
                "about that many samples) cannot be resolved and is not logged at such points; trace_cov and "
                "grad_sq_norm and snr = 1/B_simple are. Pass a larger num_samples to resolve it. (Reported once.)",
                RuntimeWarning, stacklevel=2,
            )
        return values
