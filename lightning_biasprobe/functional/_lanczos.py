"""Lanczos iteration for symmetric operators given only as matrix-vector products.

Shared by the matrix-free measurements (Hessian spectra, NTK spectra, stochastic Lanczos
quadrature). The basis is kept in float64 and fully reorthogonalized (twice, "twice is enough"),
so the Ritz values are accurate to working precision even after many steps; memory is
``steps x dim`` float64 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass
class LanczosResult:
    """Ritz values (descending), their vectors (columns), the products used and convergence."""

    eigenvalues: Tensor
    eigenvectors: Optional[Tensor]
    num_matvecs: int
    converged: bool
    residuals: Tensor


def lanczos_tridiagonal(matvec: MatVec, v0: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` Lanczos steps from ``v0``: diagonal ``alpha``, off-diagonal ``beta`` and basis ``Q``.

    Returns ``alpha (m,)``, ``beta (m,)`` (``beta[-1]`` is the residual norm after the last step)
    and ``Q (m, dim)``; ``m < steps`` when an invariant subspace is found (``beta`` ~ 0).
    """
    q = v0.to(torch.float64)
    q = q / q.norm()
    basis, alpha, beta = [q], [], []
    for j in range(steps):
        w = matvec(q).to(torch.float64).reshape(-1)
        a = torch.dot(w, q)
        Q = torch.stack(basis)
        for _ in range(2):  # full reorthogonalization, twice
            w = w - Q.T @ (Q @ w)
        b = w.norm()
        alpha.append(a)
        beta.append(b)
        if b <= 1e-12 * max(1.0, abs(float(a))) or j == steps - 1:
            break
        q = w / b
        basis.append(q)
    return torch.stack(alpha), torch.stack(beta), torch.stack(basis[: len(alpha)])


def _tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    m = alpha.shape[0]
    T = torch.diag(alpha)
    if m > 1:
        off = beta[: m - 1]
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


class _Basis:
    """Orthonormal Lanczos vectors in a preallocated float64 buffer that doubles when full."""

    def __init__(self, first: Tensor, capacity: int):
        self.data = torch.empty(max(1, capacity), first.numel(), dtype=torch.float64, device=first.device)
        self.data[0] = first
        self.size = 1

    def append(self, q: Tensor) -> None:
        if self.size == self.data.shape[0]:
            self.data = torch.cat([self.data, torch.empty_like(self.data)])
        self.data[self.size] = q
        self.size += 1

    def orthogonalize(self, w: Tensor) -> Tensor:
        """Remove the basis components of ``w``; a second pass only when the first lost most of
        ``w`` (Kahan-Parlett: "twice is enough")."""
        Q = self.data[: self.size]
        before = w.norm()
        w = w - Q.T @ (Q @ w)
        if w.norm() < 0.7071 * before:
            w = w - Q.T @ (Q @ w)
        return w


def lanczos_eigenvalues(
    matvec: MatVec,
    dim: int,
    *,
    k: int = 1,
    which: Literal["largest", "smallest"] = "largest",
    tol: float = 1e-3,
    max_iter: Optional[int] = None,
    seed: Optional[int] = 0,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    return_vectors: bool = False,
    check_every: int = 1,
    v0: Optional[Tensor] = None,
) -> LanczosResult:
    """Top-k (or bottom-k) eigenvalues of a symmetric operator by Lanczos.

    Stops when every wanted Ritz pair has residual ``|beta_m s_{m,i}| <= tol * |theta_i|``, a bound
    on the distance of ``theta_i`` to the spectrum relative to its size, or after ``max_iter``
    products (default ``min(dim, 100 + 2k)``). Starts from ``v0`` (a warm start, e.g. the previous
    measurement's top eigenvector) or from a seeded random vector (a private generator: the global
    RNG is untouched). Memory: one float64 vector of length ``dim`` per product.
    """
    if k < 1 or k > dim:
        raise ValueError(f"k must be in [1, {dim}], got {k}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    max_iter = min(dim, max_iter if max_iter is not None else 100 + 2 * k)
    if v0 is None:
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        v0 = torch.randn(dim, generator=generator, dtype=torch.float64)
    q = v0.detach().to(device=device, dtype=torch.float64).reshape(-1)
    if q.numel() != dim or not bool(q.norm() > 0):
        raise ValueError(f"v0 must be a non-zero vector of length {dim}")
    q = q / q.norm()
    basis = _Basis(q, min(max_iter, 2 * k + 16))
    alpha: list[Tensor] = []
    beta: list[Tensor] = []
    converged = False
    for j in range(max_iter):
        w = matvec(q).to(torch.float64).reshape(-1)
        alpha.append(torch.dot(w, q))
        w = basis.orthogonalize(w)
        b = w.norm()
        beta.append(b)
        m = j + 1
        exhausted = bool(b <= 1e-12 * max(1.0, float(torch.stack(alpha).abs().max())))
        if m >= k and (m % check_every == 0 or exhausted or m == max_iter):
            theta, S = torch.linalg.eigh(_tridiagonal(torch.stack(alpha), torch.stack(beta)))
            idx = torch.arange(m - 1, m - 1 - k, -1) if which == "largest" else torch.arange(k)
            res = (b * S[-1, idx]).abs()
            if exhausted or bool((res <= tol * theta[idx].abs().clamp_min(1e-30)).all()):
                converged = True
                break
        if exhausted:
            break
        if j < max_iter - 1:
            q = w / b
            basis.append(q)
    m = len(alpha)
    theta, S = torch.linalg.eigh(_tridiagonal(torch.stack(alpha), torch.stack(beta)))
    idx = torch.arange(m - 1, m - 1 - min(k, m), -1) if which == "largest" else torch.arange(min(k, m))
    residuals = (beta[-1] * S[-1, idx]).abs()
    vectors = (basis.data[:m].T @ S[:, idx]) if return_vectors else None
    return LanczosResult(theta[idx], vectors, m, converged, residuals)
