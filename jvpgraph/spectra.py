"""Spectra of a symmetric operator known only by its products ``v ↦ A v`` (a Hessian, a Gauss-Newton matrix).

* :func:`lanczos` — the ``k`` largest eigenvalues (and eigenvectors), with each Ritz pair's residual
  ``‖A y − θ y‖`` as its convergence diagnostic;
* :func:`hutchinson` — ``tr A ≈ mean zᵀ A z`` over Rademacher vectors ``z``, with the standard error;
* :func:`slq` — the spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017): per random
  start vector, the Gauss quadrature rule of the Lanczos tridiagonal matrix (its eigenvalues as nodes, the
  squared first components of its eigenvectors as weights), averaged.

Everything runs in torch on the products' device and dtype; random vectors come from a generator seeded here
(the caller's random state is not touched). Lanczos keeps every basis vector and re-orthogonalizes against all
of them (``iters`` vectors of the operator's size in memory), which is what makes its Ritz values trustworthy
at the sizes these tools see.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

__all__ = ["lanczos", "hutchinson", "slq", "Eigen", "TraceEstimate", "SpectralDensity"]


@dataclasses.dataclass
class Eigen:
    """Result of :func:`lanczos`: ``eigenvalues`` (``(k,)``, largest first), ``eigenvectors`` (``(k, n)``,
    unit norm), ``residuals`` (``‖A y − θ y‖`` per pair, from the Lanczos recurrence), ``iterations`` (products
    taken) and ``converged`` (per pair: residual ≤ ``tol`` · max |θ|)."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    converged: torch.Tensor


@dataclasses.dataclass
class TraceEstimate:
    """Result of :func:`hutchinson`: ``estimate`` of the trace, its ``stderr`` (sample standard deviation over
    √samples), and the per-probe ``values`` ``zᵀ A z``."""

    estimate: torch.Tensor
    stderr: torch.Tensor
    samples: int
    values: torch.Tensor


@dataclasses.dataclass
class SpectralDensity:
    """Result of :func:`slq`: quadrature ``nodes`` and ``weights`` (summing to 1) of the eigenvalue
    distribution, per probe (``(probes, iters)``) and pooled; ``trace`` (``n · Σ wλ``) per probe as a
    consistency check; ``residuals``: the last Lanczos coefficient β per probe (0: an invariant subspace was
    found, the rule is exact)."""

    nodes: torch.Tensor
    weights: torch.Tensor
    dim: int
    trace: torch.Tensor
    residuals: torch.Tensor

    def curve(self, grid: torch.Tensor | int = 200, sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, density)``: the nodes broadened by Gaussians of width ``sigma`` (default: 1% of the spectrum's
        span), on ``grid`` (points, or a count spread over the span with a margin).

        Example:
            >>> import torch
            >>> d = slq(lambda v: torch.arange(1.0, 11.0, dtype=torch.float64) * v, 10, iters=10, probes=1)
            >>> x, rho = d.curve(500)
            >>> round(float(torch.trapezoid(rho, x)), 3)
            1.0
        """
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
        sigma = 0.01 * span if sigma is None else sigma
        if isinstance(grid, int):
            grid = torch.linspace(lo - 5 * sigma - 0.05 * span, hi + 5 * sigma + 0.05 * span, grid,
                                  dtype=self.nodes.dtype)
        diff = grid[:, None] - self.nodes.reshape(-1)[None, :]
        w = self.weights.reshape(-1) / self.weights.sum()
        rho = (torch.exp(-0.5 * (diff / sigma) ** 2) * w).sum(1) / (sigma * math.sqrt(2 * math.pi))
        return grid, rho


def _generator(device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _rademacher(n: int, g: torch.Generator, dtype, device) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=g, device=device).to(dtype) * 2 - 1


def _tridiagonal(matvec: Callable, q: torch.Tensor, iters: int, tol: float = 0.0, k: int = 0,
                 check_every: int = 5):
    """Lanczos with full re-orthogonalization from unit vector ``q``: ``(alpha, beta, Q)`` after at most
    ``iters`` products (fewer at an invariant subspace, or once the ``k`` largest Ritz values' residuals are
    below ``tol`` · max |θ| when ``k`` > 0). ``Q``: ``(m, n)`` orthonormal rows."""
    Q = [q]
    alpha, beta = [], []
    for j in range(iters):
        w = matvec(Q[j]).reshape(-1).to(q.dtype)
        a = torch.dot(w, Q[j])
        alpha.append(a)
        basis = torch.stack(Q)
        for _ in range(2):  # twice is enough (Kahan-Parlett): the basis stays orthogonal to rounding
            w = w - basis.T @ (basis @ w)
        b = torch.linalg.vector_norm(w)
        if j + 1 == iters or b <= 1e-12 * max(float(a.abs()), 1.0):
            beta.append(b)
            break
        if k and (j + 1) % check_every == 0 and j + 1 >= k:
            theta, s = torch.linalg.eigh(_matrix(alpha, beta + [b])[: j + 1, : j + 1])
            res = (b * s[-1, -k:]).abs()
            if bool((res <= tol * theta.abs().max().clamp_min(1e-30)).all()):
                beta.append(b)
                break
        beta.append(b)
        Q.append(w / b)
    return torch.stack(alpha), torch.stack(beta), torch.stack(Q[: len(alpha)])


def _matrix(alpha, beta) -> torch.Tensor:
    alpha = torch.stack(alpha) if isinstance(alpha, list) else alpha
    beta = torch.stack(beta) if isinstance(beta, list) else beta
    m = len(alpha)
    return torch.diag(alpha) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, k: int = 1, *, iters: int | None = None,
            tol: float = 1e-6, seed: int = 0, dtype=torch.float64, device=None) -> Eigen:
    """The ``k`` largest (algebraic) eigenvalues of the symmetric ``n × n`` operator ``matvec``.

    Runs until every one of the ``k`` top Ritz pairs has residual ``‖A y − θ y‖ ≤ tol · max |θ|`` (checked
    every 5 products), or ``iters`` products (default ``min(n, max(4k, 40) + 20)``). ``converged`` says
    which pairs met ``tol``; ``residuals`` the bound for each.

    Example:
        >>> import torch
        >>> A = torch.randn(50, 50, dtype=torch.float64); A = A + A.T
        >>> res = lanczos(lambda v: A @ v, 50, k=3)
        >>> torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:3])
        >>> bool(res.converged.all())
        True
    """
    if not 1 <= k <= n:
        raise ValueError(f"k={k}: expected 1 <= k <= n={n}")
    iters = min(n, max(4 * k, 40) + 20) if iters is None else min(int(iters), n)
    if iters < k:
        raise ValueError(f"iters={iters}: at least k={k} products are needed")
    g = _generator(device or "cpu", seed)
    q = torch.randn(n, generator=g, dtype=dtype, device=device)
    q = q / torch.linalg.vector_norm(q)
    alpha, beta, Q = _tridiagonal(matvec, q, iters, tol, k)
    m = len(alpha)
    theta, s = torch.linalg.eigh(_matrix(alpha, beta))
    top = torch.arange(m - 1, max(m - 1 - k, -1), -1)
    vals = theta[top]
    vecs = (s[:, top].T @ Q)
    res = (beta[-1] * s[-1, top]).abs()
    if m < k:  # an invariant subspace smaller than k: the rest of the spectrum was not reached
        raise RuntimeError(f"Lanczos met an invariant subspace of dimension {m} < k={k} from its start vector; "
                           "try another seed")
    return Eigen(vals, vecs / torch.linalg.vector_norm(vecs, dim=1, keepdim=True), res, m,
                 res <= tol * theta.abs().max().clamp_min(1e-30))


def hutchinson(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, *, samples: int = 100, seed: int = 0,
               dtype=torch.float64, device=None) -> TraceEstimate:
    """Hutchinson's estimate of ``tr A``: the mean of ``zᵀ A z`` over ``samples`` Rademacher vectors ``z``.

    Unbiased; its variance is ``2 Σ_{i≠j} A_ij²`` per sample, estimated by the sample variance: ``stderr``
    is the standard deviation over √samples (the estimate is within 2 stderr of the trace about 95% of the
    time).

    Example:
        >>> import torch
        >>> A = torch.randn(30, 30, dtype=torch.float64); A = A @ A.T
        >>> est = hutchinson(lambda v: A @ v, 30, samples=400)
        >>> bool(abs(est.estimate - A.trace()) < 4 * est.stderr)
        True
    """
    if samples < 2:
        raise ValueError(f"samples={samples}: at least 2 are needed for a standard error")
    g = _generator(device or "cpu", seed)
    vals = []
    for _ in range(samples):
        z = _rademacher(n, g, dtype, device)
        vals.append(torch.dot(z, matvec(z).reshape(-1).to(dtype)))
    vals = torch.stack(vals)
    return TraceEstimate(vals.mean(), vals.std() / math.sqrt(samples), samples, vals)


def slq(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, *, iters: int = 40, probes: int = 4, seed: int = 0,
        dtype=torch.float64, device=None) -> SpectralDensity:
    """The spectral density of the symmetric ``n × n`` operator ``matvec`` by stochastic Lanczos quadrature.

    For each of ``probes`` Rademacher start vectors (normalized), ``iters`` Lanczos steps give a tridiagonal
    ``T = S Θ Sᵀ``; its Gauss rule (nodes ``Θ``, weights ``S[0]²``) integrates polynomials of degree
    ``< 2·iters`` against the start vector's spectral measure exactly; averaging over probes estimates the
    eigenvalue density. ``trace`` per probe (``n Σ wθ``) is Hutchinson's estimate: its spread shows the
    probes' variance.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
        >>> d = slq(lambda v: A @ v, 20, iters=20, probes=3)
        >>> torch.testing.assert_close(d.nodes[0].sort().values, torch.arange(1.0, 21.0, dtype=torch.float64))
        >>> torch.testing.assert_close(d.trace, torch.full((3,), 210.0, dtype=torch.float64))
    """
    iters = min(int(iters), n)
    g = _generator(device or "cpu", seed)
    nodes, weights, traces, res = [], [], [], []
    for _ in range(probes):
        z = _rademacher(n, g, dtype, device)
        alpha, beta, _ = _tridiagonal(matvec, z / math.sqrt(n), iters)
        theta, s = torch.linalg.eigh(_matrix(alpha, beta))
        w = s[0] ** 2
        pad = iters - len(theta)  # an invariant subspace met early: pad with zero-weight nodes
        nodes.append(torch.cat([theta, theta[-1:].expand(pad)]))
        weights.append(torch.cat([w, torch.zeros(pad, dtype=w.dtype, device=w.device)]))
        traces.append(n * (w * theta).sum())
        res.append(beta[-1])
    nodes, weights = torch.stack(nodes), torch.stack(weights)
    return SpectralDensity(nodes, weights / probes, n, torch.stack(traces), torch.stack(res))
