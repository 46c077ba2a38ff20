"""Independent references for Jv, for your own test suites (and ours).

Each reference computes ``J v`` without jvpgraph, on a *copy* of the model (so running statistics of the
caller's model are never touched), or says why it cannot:

* :func:`func_jvp` — PyTorch's forward-mode AD (``torch.func.jvp``);
* :func:`double_backward` — the double-backward trick (``torch.autograd.functional.jvp``), run with the
  math attention kernel (the CPU flash kernel's backward is not differentiable);
* :func:`jacobian_times` — the full Jacobian by reverse mode (``torch.func.jacrev``), times ``v``;
* :func:`finite_differences` — central differences on a float64 copy;
* :func:`adjoint_gap` — ``|<u, Jv> - <Jᵀu, v>|`` relative, with ``Jᵀu`` from autograd.

Example:
    >>> import torch, torch.nn as nn, jvpgraph
    >>> from jvpgraph import testing
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    >>> x, v = torch.randn(2, 3, dtype=torch.double), torch.randn(2, 3, dtype=torch.double)
    >>> jv = jvpgraph.jvp(net, (x,), (v,))[1]
    >>> testing.max_rel_err(jv, testing.jacobian_times(net, x, v)) < 1e-12
    True
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["func_jvp", "double_backward", "jacobian_times", "finite_differences", "adjoint_gap", "max_rel_err",
           "frozen_batchnorm_jvp"]


def _copy(f: Callable) -> Callable:
    return copy.deepcopy(f) if isinstance(f, nn.Module) else f


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` over the finite entries (absolute error when ``b`` is all zeros); entries
    that are not finite must match exactly (NaN with NaN), else the error is infinite.

    Example:
        >>> import torch
        >>> max_rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        0.5
    """
    a, b = a.detach().double(), b.detach().double()
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else float("inf")
    finite = torch.isfinite(a) & torch.isfinite(b)
    # non-finite entries must agree exactly (nan with nan, inf with inf of the same sign)
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if bool((~finite & ~same).any()):
        return float("inf")
    if not bool(finite.any()):
        return 0.0
    a, b = a[finite], b[finite]
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    return err / scale if scale > 0 else err


def func_jvp(f: Callable, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``torch.func.jvp`` on a copy of ``f`` (raises what PyTorch raises).

    Example:
        >>> import torch
        >>> func_jvp(torch.sin, torch.zeros(2), torch.ones(2))
        tensor([1., 1.])
    """
    return torch.func.jvp(_copy(f), (x,), (v,))[1]


def double_backward(f: Callable, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The double-backward trick ``d/dw <Jᵀw, v>`` via ``torch.autograd.functional.jvp``.

    Example:
        >>> import torch
        >>> double_backward(torch.sin, torch.zeros(2), torch.ones(2))
        tensor([1., 1.])
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.jvp(_copy(f), x, v)[1]


def jacobian_times(f: Callable, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The full Jacobian (reverse mode, ``torch.func.jacrev``) contracted with ``v``.

    Example:
        >>> import torch
        >>> jacobian_times(torch.sin, torch.zeros(2), torch.ones(2))
        tensor([1., 1.])
    """
    g = _copy(f)
    J = torch.autograd.functional.jacobian(g, x)  # shape out.shape + x.shape
    out_ndim = J.dim() - x.dim()
    return (J.reshape(*J.shape[:out_ndim], -1) @ v.reshape(-1)).reshape(J.shape[:out_ndim])


def finite_differences(f: Callable, x: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences ``(f(x + eps v) - f(x - eps v)) / 2 eps`` on a float64 copy.

    Train-mode randomness (dropout) must be off or seeded by the caller.

    Example:
        >>> import torch
        >>> torch.testing.assert_close(finite_differences(torch.sin, torch.zeros(2), torch.ones(2)),
        ...                            torch.ones(2, dtype=torch.float64))
    """
    g = _copy(f)
    if isinstance(g, nn.Module):
        g = g.double()
    xd, vd = x.detach().double(), v.detach().double()
    with torch.no_grad():
        return (g(xd + eps * vd) - g(xd - eps * vd)) / (2 * eps)


def adjoint_gap(jv: torch.Tensor, f: Callable, x: torch.Tensor, v: torch.Tensor, u: torch.Tensor | None = None
                ) -> float:
    """Relative gap ``|<u, Jv> - <Jᵀu, v>| / (|u| |Jv| + |Jᵀu| |v|)`` with ``Jᵀu`` from autograd.

    Example:
        >>> import torch
        >>> x, v = torch.randn(3), torch.randn(3)
        >>> adjoint_gap(torch.cos(x) * v, torch.sin, x, v) < 1e-6
        True
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = _copy(f)
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        out = g(xr)
    if u is None:
        u = torch.randn_like(out)
    jtu = torch.autograd.grad(out, xr, u)[0]
    lhs = (u * jv).sum().item()
    rhs = (jtu * v).sum().item()
    scale = u.norm().item() * jv.norm().item() + jtu.norm().item() * v.norm().item()
    return abs(lhs - rhs) / scale if scale > 0 else abs(lhs - rhs)


def frozen_batchnorm_jvp(model: nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference for ``bn="frozen"``: ``Jv`` with every BatchNorm's batch mean and variance (computed from
    ``x`` in a train-mode forward) held constant, by ``torch.func.jvp`` on a copy whose BatchNorm layers
    are put in eval mode with those statistics as running statistics.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double().train()
        >>> x, v = torch.randn(5, 3, dtype=torch.double), torch.randn(5, 3, dtype=torch.double)
        >>> bn = net[1]; h = net[0](x)
        >>> expected = net[0](v) - net[0](torch.zeros_like(v))  # the linear part of Jv
        >>> expected = expected / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight
        >>> torch.testing.assert_close(frozen_batchnorm_jvp(net, x, v), expected)
    """
    ref = copy.deepcopy(model)
    stats = {}
    hooks = []
    for name, m in ref.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            def pre(mod, inp, name=name):
                x_ = inp[0].detach()
                dims = [0] + list(range(2, x_.dim()))
                stats[name] = (x_.mean(dims), x_.var(dims, unbiased=False))
            hooks.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    for name, m in ref.named_modules():
        if name in stats:
            m.running_mean = stats[name][0].clone()
            m.running_var = stats[name][1].clone()
            m.eval()
    return torch.func.jvp(ref, (x,), (v,))[1]
