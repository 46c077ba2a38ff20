"""The exact spectral norm of a network's input-output Jacobian, per sample.

For a batch ``x`` of ``B`` samples, sample ``b``'s Jacobian ``J_b = d f(x)_b / d x_b`` has a largest singular
value ``σ_b``. Power iteration finds it with two products per step, both on one recorded forward:

* ``J v`` — the flipped graph (Appendix C), one tangent pass;
* ``Jᵀ u`` — the transpose of that pass (the ordinary backward when it is the same map).

``v ← Jᵀ(J v / ‖J v‖)``, normalized per sample, converges to the top right singular vector; then
``σ = ‖J v‖``. ``method="exact"`` builds each sample's whole Jacobian (one transposed pass per output, or one
tangent pass per input, whichever is fewer) and takes its matrix 2-norm: for checking, and for the costs the
paper's Figure 5 compares.

Samples must not interact for "per sample" to mean anything: BatchNorm in train mode couples them through
the batch statistics unless those are held constant, hence ``bn="frozen"`` (the paper's pseudo-inference
mode) by default, or ``bn="eval"`` (running statistics).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

from . import api
from .batchnorm import check_per_sample

__all__ = ["SpectralNorm", "spectral_norm", "power_iteration", "per_sample_norm", "normalize_per_sample"]

_TINY = 1e-30


@dataclasses.dataclass
class SpectralNorm:
    """Result of :func:`spectral_norm`.

    Attributes:
        sigma: ``(B,)`` the largest singular value of each sample's Jacobian.
        u: ``(B, *out)`` left singular vectors (unit norm per sample).
        v: ``(B, *in)`` right singular vectors (unit norm per sample).
        iterations: power iterations run (0 for ``method="exact"``).
        residual: ``(B,)`` ``‖JᵀJ v − σ² v‖`` per sample (0 up to rounding at an exact singular pair).
        converged: ``(B,)`` whether the relative change of ``σ`` fell below ``tol``.
    """

    sigma: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    iterations: int
    residual: torch.Tensor
    converged: torch.Tensor


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """The 2-norm of each sample (all dimensions but the first).

    Example:
        >>> import torch
        >>> per_sample_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([5., 1.])
    """
    return t.flatten(1).norm(dim=1)


def normalize_per_sample(t: torch.Tensor) -> torch.Tensor:
    """``t`` with each sample scaled to unit 2-norm (a zero sample stays zero).

    Example:
        >>> import torch
        >>> normalize_per_sample(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """
    n = per_sample_norm(t).clamp_min(_TINY)
    return t / n.reshape(-1, *([1] * (t.dim() - 1)))


def power_iteration(jvp: Callable[[torch.Tensor], torch.Tensor], vjp: Callable[[torch.Tensor], torch.Tensor],
                    v: torch.Tensor, n_iter: int, tol: float = 0.0):
    """Power iteration on ``JᵀJ`` per sample, given the two products.

    Returns ``(sigma, u, v, iterations, converged)``: ``σ = ‖J v‖`` for the final unit ``v`` and
    ``u = J v / σ``. Stops early once every sample's ``σ`` changes by less than ``tol`` (relative).

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([3.0, 1.0]))[None]          # one sample, J = diag(3, 1)
        >>> mv = lambda v: torch.einsum("bij,bj->bi", A, v)
        >>> sigma, *_ = power_iteration(mv, mv, torch.tensor([[1.0, 1.0]]), n_iter=50)
        >>> torch.testing.assert_close(sigma, torch.tensor([3.0]))
    """
    v = normalize_per_sample(v)
    sigma = None
    converged = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    it = 0
    for it in range(1, n_iter + 1):
        jv = jvp(v)
        new = per_sample_norm(jv)
        v = normalize_per_sample(vjp(normalize_per_sample(jv)))
        if sigma is not None:
            converged = (new - sigma).abs() <= tol * new.abs().clamp_min(_TINY)
            if tol > 0 and bool(converged.all()):
                sigma = new
                break
        sigma = new
    jv = jvp(v)
    sigma = per_sample_norm(jv)
    return sigma, normalize_per_sample(jv), v, it, converged


def spectral_norm(model: Callable, x: torch.Tensor, n_iter: int = 100, tol: float = 1e-7, *, bn: str = "frozen",
                  method: str = "power", v0: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> SpectralNorm:
    """Per-sample largest singular value of the Jacobian of ``model`` at the batch ``x``.

    Args:
        model: an ``nn.Module`` or function mapping a batch ``(B, *in)`` to ``(B, *out)``.
        x: the batch.
        n_iter, tol: at most ``n_iter`` power iterations, fewer once ``σ`` changes by less than ``tol``
            (relative) for every sample; in float16 and bfloat16, by less than four units of rounding (σ
            flips between neighbouring values there instead of settling).
        bn: BatchNorm in train mode: ``"frozen"`` (batch statistics held constant) or ``"eval"``.
        method: ``"power"`` (Jv and Jᵀu) or ``"exact"`` (each sample's whole Jacobian, its 2-norm).
        v0: starting right vectors ``(B, *in)`` (warm start); default random (from ``generator``, else a
            fixed seed: the caller's random number generator is not touched).

    The model is left as it was: parameters, running statistics, ``training`` flags, the caller's RNG
    (train-mode dropout draws one mask, inside a forked generator, used by every product).

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        >>> x = torch.randn(5, 4, dtype=torch.double)
        >>> power = jvpgraph.spectral_norm(net, x)
        >>> exact = jvpgraph.spectral_norm(net, x, method="exact")
        >>> torch.testing.assert_close(power.sigma, exact.sigma)
        >>> power.sigma.shape, bool(power.converged.all())
        (torch.Size([5]), True)
    """
    if method not in ("power", "exact"):
        raise ValueError(f"method={method!r}: expected 'power' or 'exact'")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError("x must be a batch tensor of shape (B, ...)")
    check_per_sample(model, bn)
    traced = api.cached_trace(model, x, bn=bn)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        lin = traced.linearize(x, vjp=False)
        out = lin.out
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0]:
            raise ValueError("spectral_norm needs a model whose output is one tensor of shape (B, ...) for an "
                             f"input of shape (B, ...); got {type(out).__name__} "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
        if method == "exact":
            return _exact(lin, x, out)
        if v0 is None:
            g = generator or torch.Generator(device=x.device).manual_seed(0)
            v0 = torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)
        elif v0.shape != x.shape:
            raise ValueError(f"v0 has shape {tuple(v0.shape)}; it must have the input's shape {tuple(x.shape)}")
        if x.dtype in (torch.float16, torch.bfloat16):
            tol = max(tol, 4 * torch.finfo(x.dtype).eps)
        sigma, u, v, its, converged = power_iteration(lin.jvp, lin.vjp, v0, n_iter, tol)
        residual = per_sample_norm(lin.vjp(lin.jvp(v)) - sigma.reshape(-1, *[1] * (x.dim() - 1)) ** 2 * v)
    return SpectralNorm(sigma, u, v, its, residual, converged)


def jacobian_per_sample(lin: "api.Linearized", x: torch.Tensor, out: torch.Tensor, create_graph: bool = False):
    """Each sample's whole Jacobian ``(B, n_out, n_in)`` from a recorded forward: one transposed pass per
    output, or one tangent pass per input, whichever is fewer."""
    B, n_in, n_out = x.shape[0], x[0].numel(), out[0].numel()
    rows = []
    if n_out <= n_in:
        for k in range(n_out):
            e = torch.zeros(B, n_out, dtype=out.dtype, device=out.device)
            e[:, k] = 1
            rows.append(lin.vjp(e.reshape(out.shape), create_graph=create_graph).reshape(B, n_in))
        return torch.stack(rows, 1)
    cols = []
    for d in range(n_in):
        e = torch.zeros(B, n_in, dtype=x.dtype, device=x.device)
        e[:, d] = 1
        cols.append(lin.jvp(e.reshape(x.shape)).reshape(B, n_out))
    return torch.stack(cols, 2)


def _exact(lin, x, out) -> SpectralNorm:
    J = jacobian_per_sample(lin, x, out)
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    sigma = S[:, 0]
    u, v = U[:, :, 0].reshape(out.shape), Vh[:, 0, :].reshape(x.shape)
    JtJv = torch.einsum("bki,bk->bi", J, torch.einsum("bki,bi->bk", J, v.flatten(1)))
    residual = (JtJv - sigma[:, None] ** 2 * v.flatten(1)).norm(dim=1)
    return SpectralNorm(sigma, u, v, 0, residual, torch.ones_like(sigma, dtype=torch.bool))
