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

import contextlib
import copy
import math
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from . import api, hessian

__all__ = ["func_jvp", "double_backward", "jacobian_times", "finite_differences", "adjoint_gap", "max_rel_err",
           "frozen_batchnorm_jvp", "check_opinfo_sample", "check_opinfo_sample_second_order", "ModelState"]


def _copy(f: Callable) -> Callable:
    return copy.deepcopy(f) if isinstance(f, nn.Module) else f


class ModelState:
    """A snapshot of what no jvpgraph call may change in a model: parameter and buffer values and dtypes
    (running statistics, ``num_batches_tracked``), ``.grad``, ``requires_grad`` and ``training`` flags.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
        >>> state = ModelState(net)
        >>> _ = jvpgraph.jvp(net, (torch.randn(5, 3),), (torch.randn(5, 3),))
        >>> state.changes(net)
        []
        >>> _ = net(torch.randn(5, 3))  # an eager train-mode forward moves the running statistics
        >>> state.changes(net)
        ['buffer 1.running_mean', 'buffer 1.running_var', 'buffer 1.num_batches_tracked']
    """

    def __init__(self, model: nn.Module):
        self.params = {k: (t.detach().clone(), t.requires_grad, None if t.grad is None else t.grad.clone())
                       for k, t in model.named_parameters()}
        self.buffers = {k: t.detach().clone() for k, t in model.named_buffers()}
        self.flags = {name: m.training for name, m in model.named_modules()}

    def changes(self, model: nn.Module) -> list[str]:
        """What differs now, by name (empty when nothing does)."""
        out = []
        for k, t in model.named_parameters():
            value, requires_grad, grad = self.params[k]
            if not (torch.equal(t, value) and t.dtype == value.dtype):
                out.append(f"parameter {k}")
            if t.requires_grad != requires_grad:
                out.append(f"parameter {k}.requires_grad")
            if not (t.grad is None if grad is None else (t.grad is not None and torch.equal(t.grad, grad))):
                out.append(f"parameter {k}.grad")
        for k, t in model.named_buffers():
            if not (torch.equal(t, self.buffers[k]) and t.dtype == self.buffers[k].dtype):
                out.append(f"buffer {k}")
        out += [f"training flag of {n or 'the model'}" for n, m in model.named_modules() if m.training != self.flags[n]]
        return out


def max_rel_err(a, b, floor: float = 0.0) -> float:
    """``max|a - b| / max(max|b|, floor)`` over the finite entries (absolute error when that scale is 0);
    entries that are not finite must match exactly (NaN with NaN), else the error is infinite.

    ``floor`` keeps a reference that is zero up to rounding (a Jacobian that cancels exactly, such as
    ``x / |x|`` along one element) from turning rounding noise into a large relative error. ``a`` and ``b``
    may be lists (or tuples) of tensors, taken pair by pair as their concatenation (no flat copy: the
    Hessian-vector products of 600M-parameter models).

    Example:
        >>> import torch
        >>> max_rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        0.5
        >>> max_rel_err(torch.tensor([3e-16]), torch.tensor([-1e-16]), floor=1e-3) < 1e-12
        True
        >>> max_rel_err([torch.tensor([1.0]), torch.tensor([2.0])], [torch.tensor([1.0]), torch.tensor([4.0])])
        0.5
    """
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if len(a) != len(b):
            raise ValueError(f"max_rel_err: {len(a)} tensors against {len(b)}")
        pairs = list(zip(a, b))
    else:
        pairs = [(a, b)]
    err = scale = 0.0
    any_finite = False
    for x, y in pairs:
        wide = torch.complex128 if x.is_complex() or y.is_complex() else torch.float64
        x, y = x.detach().to(wide), y.detach().to(wide)
        if y.numel() == 0:
            if x.numel() != 0:
                return float("inf")
            continue
        finite = torch.isfinite(x) & torch.isfinite(y)
        # non-finite entries must agree exactly (nan with nan, inf with inf of the same sign)
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        if bool((~finite & ~same).any()):
            return float("inf")
        if bool(finite.any()):
            any_finite = True
            x, y = x[finite], y[finite]
            scale = max(scale, y.abs().max().item())
            err = max(err, (x - y).abs().max().item())
    if not any_finite:
        return 0.0
    scale = max(scale, floor)
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


# --------------------------------------------------------------------------------------------------
# PyTorch's OpInfo database
# --------------------------------------------------------------------------------------------------
_OPINFO_RTOL = 1e-7  # float64; finite differences are held to 1e-5 (step 1e-7)
# tangents are N(0, 1): a reference below 1e-3 everywhere is (near) zero, and errors are taken relative to 1e-3
# (so an absolute error below 1e-10 passes where the exact Jv is 0 and both sides are rounding noise)
_OPINFO_FLOOR = 1e-3


def _float_leaves(x):
    """The differentiable tensors of a structure: floating-point and complex."""
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor) and (t.is_floating_point() or
                                                                                 t.is_complex())]


def check_opinfo_sample(op, sample, seed: int = 0) -> tuple[str, str]:
    """Check jvpgraph's Jv on one sample of a PyTorch OpInfo entry (``op_db``, float64 or complex128 on the CPU).

    The function differentiated is ``op.gradcheck_wrapper(op.get_op(), sample.input, *sample.args, **sample.kwargs)``
    in all its floating-point and complex tensor arguments, with random tangents drawn from ``seed``; the
    outputs compared are its floating-point and complex tensors. References, in order: ``torch.func.jvp`` when
    the entry supports forward AD (double-backward as a second opinion when they disagree), else
    double-backward, else central finite differences; finite differences arbitrate a disagreement. With
    complex tensors the derivative is the real-linear one (``J v`` along the complex direction ``v``, what
    ``torch.func.jvp`` gives), and double-backward is not a reference (PyTorch's backward is conjugate). Random ops draw the same numbers in every
    evaluation (the global seed is reset before each). Entries where the function's value is inf/nan are not
    compared (the derivative is undefined there).

    Returns ``(status, detail)`` with status ``"pass"``, ``"fail"``, ``"error"`` (jvpgraph raised) or ``"skip"``
    (nothing to differentiate, or no reference can run).

    Example:
        >>> import torch
        >>> from torch.testing._internal.common_methods_invocations import op_db
        >>> sigmoid = next(o for o in op_db if o.name == "sigmoid")
        >>> sample = next(iter(sigmoid.sample_inputs("cpu", torch.float64)))
        >>> check_opinfo_sample(sigmoid, sample)[0]
        'pass'
    """
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
            return _check_opinfo_sample(op, sample, seed)
    except Exception as e:  # noqa: BLE001 - a reference that cannot run on this sample (as_strided on a copy)
        return "skip", f"no reference runs: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:200]


def _seeded(seed: int, f: Callable, *xs):
    """``f(*xs)`` under ``torch.no_grad()`` after ``torch.manual_seed(seed)``."""
    with torch.no_grad():
        torch.manual_seed(seed)
        return f(*xs)


def _richardson(g: Callable, h: float = 1e-3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The derivative at 0 of ``g(eps)`` (a list of float64 tensors) by central differences at ``h``, ``h/2``,
    ``h/4`` extrapolated twice (error O(h⁶) for a smooth ``g``), and an error estimate: the gap between the
    two once-extrapolated values (large where a kink or a pole lies within ``h``)."""
    d = []
    for k in range(3):
        e = h / 2 ** k
        d.append([(p - m) / (2 * e) for p, m in zip(g(e), g(-e))])
    r1 = [(4 * b - a) / 3 for a, b in zip(d[0], d[1])]
    r2 = [(4 * b - a) / 3 for a, b in zip(d[1], d[2])]
    return [(16 * b - a) / 15 for a, b in zip(r1, r2)], [(b - a).abs() for a, b in zip(r1, r2)]


class _Skip(Exception):
    """A sample with nothing to judge (its message says why)."""


def _identical(a, b) -> bool:
    """The same values, NaN where the other has NaN (``torch.equal`` calls a NaN output different from itself:
    a deterministic op whose output holds NaN, a mean over an empty segment, was taken for a random one)."""
    return a.shape == b.shape and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


def _repeated_unpool_index(op, sample) -> bool:
    """Whether a ``max_unpool{1,2,3}d`` sample sends two values to one place of a plane (overlapping pooling
    windows that picked the same maximum): the kernel then keeps either write, differently from call to call
    (seen on torch 2.14's CPU kernel), so the output's derivative there does not exist."""
    name = op.name.rsplit(".", 1)[-1]
    if not name.startswith("max_unpool") or not sample.args or not isinstance(sample.args[0], torch.Tensor):
        return False
    dims = int(name[len("max_unpool")])
    idx = sample.args[0]
    planes = idx.reshape(-1, math.prod(idx.shape[-dims:])).sort(dim=1).values
    return bool((planes[:, 1:] == planes[:, :-1]).any())


def _opinfo_function(op, sample, seed: int):
    """``(f, xs, vs, out, random)`` for one OpInfo sample: ``f`` of its floating-point and complex tensor
    arguments, those arguments, random tangents for them, ``f``'s value, and whether two evaluations under
    different seeds differ (a random op). Raises :class:`_Skip` when there is nothing to judge."""
    structure = (sample.input, sample.args, sample.kwargs)
    flat, spec = pytree.tree_flatten(structure)
    pos = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and (t.is_floating_point() or
                                                                              t.is_complex())]
    if not pos:
        raise _Skip("no floating-point input")
    if _repeated_unpool_index(op, sample):
        raise _Skip("duplicate indices: the value at a repeated index is whichever write PyTorch's kernel keeps, "
                    "not always the same one (no derivative; OpInfo checks gradients on the .grad variant)")

    def f(*xs):
        items = list(flat)
        for i, x in zip(pos, xs):
            items[i] = x
        inp, args, kwargs = pytree.tree_unflatten(items, spec)
        out = op.gradcheck_wrapper(op.get_op(), inp, *args, **kwargs)  # e.g. symmetrizes cholesky's input
        outs = _float_leaves(out)
        return tuple(outs) if len(outs) != 1 else outs[0]

    xs = tuple(flat[i].detach() for i in pos)
    gen = torch.Generator().manual_seed(seed)
    vs = tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in xs)
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            out = f(*xs)
            torch.manual_seed(seed + 1)
            random = any(not _identical(a, b) for a, b in zip(_float_leaves(out), _float_leaves(f(*xs))))
    except Exception as e:  # noqa: BLE001
        raise _Skip(f"the sample itself fails: {type(e).__name__}") from None
    if not _float_leaves(out):
        raise _Skip("no floating-point output")
    return f, xs, vs, out, random


def _check_opinfo_sample(op, sample, seed: int) -> tuple[str, str]:
    try:
        f, xs, vs, out, random = _opinfo_function(op, sample, seed)
    except _Skip as e:
        return "skip", str(e)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traced = api.trace(f, *xs)
            torch.manual_seed(seed)  # random ops (dropout, normal) draw the same numbers in every evaluation
            got, jv = traced.jvp(xs, vs)
    except Exception as e:  # noqa: BLE001
        return "error", f"jvpgraph: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
    if any("reseeds the global random number generator" in str(w.message) for w in caught):
        # OpInfo wraps random ops in wrapper_set_seed (torch.manual_seed(42) inside the call): eager draws
        # after that reseed, jvpgraph's graph from the caller's generator. If the graph draws nothing that
        # matters (dropout_p = 0) the comparison stands; else no evaluation pairs the same draws.
        torch.manual_seed(seed + 1)
        again = traced.jvp(xs, vs)[0]
        if any(not _identical(a, b) for a, b in zip(_float_leaves(got), _float_leaves(again))):
            return "skip", "random: the op reseeds the RNG inside the call (OpInfo's wrapper_set_seed)"
    if random and any(not _identical(a, b) for a, b in zip(_float_leaves(got), _float_leaves(out))):
        # a random op (attention dropout) whose graph draws its numbers in another order than eager: no
        # reference sees the same mask, so nothing can be compared (tests/test_rules.py checks such ops on
        # the mask jvpgraph drew)
        return "skip", "random: jvpgraph's graph and eager draw different numbers under the same seed"
    jv = _float_leaves(jv)

    def run_reference(jvp_fn):
        torch.manual_seed(seed)
        primal, tangent = jvp_fn(f, xs, vs)
        if random and any(not _identical(a, b) for a, b in zip(_float_leaves(primal), _float_leaves(out))):
            raise RuntimeError("draws other random numbers than eager under the same seed")
        return _float_leaves(tangent)

    def finite_differences():
        eps = 1e-7
        plus = _float_leaves(_seeded(seed, f, *(x + eps * v for x, v in zip(xs, vs))))
        minus = _float_leaves(_seeded(seed, f, *(x - eps * v for x, v in zip(xs, vs))))
        return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]

    finite = [torch.isfinite(o) for o in _float_leaves(out)]

    def worst(a, b):
        # where the function's own value is inf/nan its derivative is undefined (PyTorch gives nan, a
        # decomposition 0): those entries are not compared
        if len(a) != len(b) or len(a) != len(finite):
            return float("inf")
        return max((max_rel_err(torch.where(m, x, 0.0), torch.where(m, y, 0.0), floor=_OPINFO_FLOOR)
                    for x, y, m in zip(a, b, finite)), default=0.0)

    double_backward = lambda g, p, t: torch.autograd.functional.jvp(g, p, t)  # noqa: E731
    complex_ = any(t.is_complex() for t in [*xs, *_float_leaves(out)])
    refs = ([("torch.func.jvp", torch.func.jvp)] if op.supports_forward_ad else []) + \
        ([] if complex_ else [("double-backward", double_backward)])
    ref = None
    for name, fn in refs:
        try:
            ref, tol = run_reference(fn), _OPINFO_RTOL
            break
        except Exception:  # noqa: BLE001 - fall through to the next reference
            continue
    if ref is None:
        if any(o.dtype not in (torch.float64, torch.complex128) for o in _float_leaves(out)):
            return "skip", "no reference: no forward AD, and finite differences need float64 outputs"
        ref, name, tol = finite_differences(), "finite differences", 1e-5
    def confirmed(detail):
        # double-backward is PyTorch's own backward formula: where it is the only judge, finite differences
        # (Richardson, float64) must not clearly disagree (ctc_loss's backward is the gradient in the logits
        # before a log_softmax, not in its input: jvpgraph once agreed with it and was wrong)
        if complex_ or any(o.dtype != torch.float64 for o in _float_leaves(out)):
            return "pass", detail
        if any(bool(((x + 2.5e-4 * v == x) & (v != 0)).any()) for x, v in zip(xs, vs)):
            return "pass", detail  # inputs as large as 1e308: a step of 1e-3 does not move them
        step = lambda eps: _float_leaves(_seeded(seed, f, *(x + eps * v for x, v in zip(xs, vs))))  # noqa: E731
        fd, fd_err = _richardson(step)
        gap, unsure = worst(jv, fd), worst([r + e for r, e in zip(fd, fd_err)], fd)  # the estimate's own error
        if gap > 1e-5 and unsure < gap / 100:
            return "fail", (f"{detail}, but finite differences disagree with both ({gap:.1e}): PyTorch's "
                            "backward is not the derivative here")
        return "pass", detail + f"; finite differences {gap:.1e}"

    err = worst(jv, ref)
    if err <= tol:
        return confirmed(f"vs {name}: {err:.1e}") if name == "double-backward" else ("pass", f"vs {name}: {err:.1e}")
    if name == "torch.func.jvp" and not complex_:  # a second reference: PyTorch's backward formula, differentiated once more
        try:
            db = run_reference(double_backward)
            if worst(jv, db) <= _OPINFO_RTOL:
                return confirmed(f"torch.func.jvp disagrees ({err:.1e}); double-backward agrees "
                                 f"({worst(jv, db):.1e})")
        except Exception:  # noqa: BLE001
            pass
    if name != "finite differences":  # who is right? finite differences arbitrate
        fd = finite_differences()
        if worst(jv, fd) <= 1e-3 and 100 * worst(jv, fd) <= worst(ref, fd):  # FD picks the closer answer
            return "pass", (f"{name} disagrees with finite differences ({worst(ref, fd):.1e}); jvpgraph agrees "
                            f"({worst(jv, fd):.1e})")
    return "fail", f"vs {name}: rel err {err:.1e}"


_SECOND_ORDER_RTOL = 1e-6  # float64; Richardson differences of first-order values reach ~1e-10


def check_opinfo_sample_second_order(op, sample, seed: int = 0) -> tuple[str, str]:
    """Check the derivatives of jvpgraph's Jv on one float64 sample of a PyTorch OpInfo entry: what a Jacobian
    penalty trains with and what :func:`jvpgraph.hvp` gives, against Richardson finite differences.

    With ``f`` and random tangents ``v`` as in :func:`check_opinfo_sample`, a random cotangent ``u`` and a
    random direction ``w``, the scalar ``s(x) = <u, J(x) v>`` is differentiated three ways and each compared
    with ``d/dε s(x + ε w)`` by Richardson extrapolation of central differences of first-order values
    (``torch.func.jvp`` or double-backward where they agree with jvpgraph at ``x``, else jvpgraph's own Jv):

    * ``<∂x s, w>`` by autograd through jvpgraph's emitted Jv graph (tangents on every input);
    * the same with the tangent on the first input only, traced ``wrt=(0,)`` (the other inputs play the
      parameters of a regularized model: no tangent, but gradients);
    * ``<v, H w>`` with ``H w`` from :func:`jvpgraph.hvp` of ``<u, f>`` (the flipped gradient graph).

    Returns ``(status, detail)`` with status ``"pass"``, ``"fail"``, ``"error"`` (jvpgraph raised),
    ``"undecided"`` (finite differences do not converge: a kink or a pole within the step) or ``"skip"``
    (random, complex or not float64, or nothing to differentiate).

    Example:
        >>> import torch
        >>> from torch.testing._internal.common_methods_invocations import op_db
        >>> tanh = next(o for o in op_db if o.name == "tanh")
        >>> sample = next(iter(tanh.sample_inputs("cpu", torch.float64)))
        >>> check_opinfo_sample_second_order(tanh, sample)[0]
        'pass'
    """
    try:
        with torch.random.fork_rng(devices=[]):
            return _check_second_order(op, sample, seed)
    except _Skip as e:
        return "skip", str(e)
    except Exception as e:  # noqa: BLE001 - a reference that cannot run on this sample
        return "skip", f"no reference runs: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:200]


def _eager_gradient_raises(scalar: Callable[[], torch.Tensor], seed: int, message: str) -> bool:
    """Does eager autograd's gradient of ``scalar()`` (its leaves: the inputs made to require grad inside)
    raise with ``message`` too (``F.embedding(sparse=True, scale_grad_by_freq=True)``'s backward)?"""
    try:
        with torch.enable_grad():
            torch.manual_seed(seed)
            s = scalar()
            s.backward(create_graph=True)
    except Exception as e:  # noqa: BLE001
        return (str(e).splitlines() or [""])[0] == message
    return False


def _check_second_order(op, sample, seed: int) -> tuple[str, str]:
    f, xs, vs, out, random = _opinfo_function(op, sample, seed)
    outs = _float_leaves(out)
    if random:
        raise _Skip("random op: finite differences need the same draws at every point")
    if any(t.dtype != torch.float64 for t in [*xs, *outs]):
        raise _Skip("not all float64 (complex or integer parts): not judged in the second-order sweep")
    finite = [torch.isfinite(o) for o in outs]
    gen = torch.Generator().manual_seed(seed + 7)
    us = [torch.where(m, torch.randn(o.shape, generator=gen, dtype=o.dtype), 0.0) for o, m in zip(outs, finite)]
    ws = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in xs]
    # inputs autograd refuses to differentiate (batch_norm's running statistics): no gradient, no direction
    live = []
    for i in range(len(xs)):
        try:
            with torch.enable_grad():
                torch.manual_seed(seed)
                f(*(x.clone().requires_grad_(j == i) for j, x in enumerate(xs)))
            live.append(True)
        except RuntimeError as e:
            if "is not differentiable with respect to argument" not in str(e):
                raise
            live.append(False)
    ws = [w if ok else torch.zeros_like(w) for w, ok in zip(ws, live)]
    # inputs along which f jumps at x (a ±1 target compared with 1): no derivative there to judge, so no
    # direction along them (f moves by about as much for a step 1e-9 as for 1e-6; continuous f by 1000x less)
    jumps = []
    for i, w in enumerate(ws):
        if not live[i] or not bool(w.any()):
            continue
        moved = []
        for eps in (1e-6, 1e-9):
            step = _float_leaves(_seeded(seed, f, *(x + eps * w if j == i else x for j, x in enumerate(xs))))
            moved.append(max(((a - b).abs()[m & torch.isfinite(a)].max().item() if bool((m & torch.isfinite(a)).any())
                              else 0.0) for a, b, m in zip(step, outs, finite)))
        if moved[0] > 0 and moved[1] > 0.1 * moved[0]:
            jumps.append(i)
            ws[i] = torch.zeros_like(w)
    if jumps and not any(bool(w.any()) for w in ws):
        return "undecided", f"f jumps at x along every input it could be moved in ({jumps}): nothing to judge"

    # outputs autograd treats as constants (native_layer_norm's mean and rstd): PyTorch's gradient, which
    # jvpgraph.hvp differentiates, ignores them, so the Hessian check pairs with the others only
    with torch.enable_grad():
        torch.manual_seed(seed)
        tracked = [o.requires_grad for o in _float_leaves(
            f(*(x.clone().requires_grad_(ok) for x, ok in zip(xs, live))))]
    us_hessian = [u if ok else torch.zeros_like(u) for u, ok in zip(us, tracked)]

    def pair(jv, us=us):  # <u, Jv> over the finite entries
        return sum((u * torch.where(m, t, 0.0)).sum() for u, t, m in zip(us, _float_leaves(jv), finite))

    def emitted(wrt):
        """<∂x s, w> through jvpgraph's Jv graph, and s at x."""
        traced = api.trace(f, *xs, wrt=wrt)
        xr = [x.clone().requires_grad_(ok) for x, ok in zip(xs, live)]
        tangents = tuple(vs[i] if i in wrt else None for i in range(len(xs)))
        torch.manual_seed(seed)
        with torch.enable_grad():
            s = pair(traced.jvp(tuple(xr), tangents)[1])
            req = [x for x in xr if x.requires_grad]
            grads = torch.autograd.grad(s, req, allow_unused=True) if s.requires_grad else [None] * len(req)
        grads = iter(grads)
        grads = [next(grads) if x.requires_grad else None for x in xr]
        dot = sum((g * w).sum() for g, w in zip(grads, ws) if g is not None)
        size = sum(g.norm() ** 2 for g in grads if g is not None) ** 0.5 * sum(w.norm() ** 2 for w in ws) ** 0.5
        return float(dot), float(size), float(s), traced

    def curvature():
        """<v, H w> with H the Hessian of <u, f> (jvpgraph.hvp)."""
        at = [i for i, ok in enumerate(live) if ok]  # the others (running statistics): tangent None
        torch.manual_seed(seed)
        hw = hessian.hvp(lambda *ys: pair(f(*ys), us_hessian), tuple(xs),
                         tuple(w if ok else None for w, ok in zip(ws, live)))[1]
        hw = [torch.zeros_like(x) if h is None else h for h, x in zip(hw, xs)]
        vl = [v for v, ok in zip(vs, live) if ok]
        return float(sum((v * hw[i]).sum() for i, v in zip(at, vl))), \
            float(sum(h.norm() ** 2 for h in hw) ** 0.5 * sum(v.norm() ** 2 for v in vl) ** 0.5)

    checks = [("autograd through the Jv graph", lambda: emitted(tuple(range(len(xs)))))]
    if len(xs) > 1:
        checks.append(("tangent on input 0 only", lambda: emitted((0,))))
    checks.append(("jvpgraph.hvp", curvature))
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, run in checks:
            try:
                results.append((name, run()))
            except Exception as e:  # noqa: BLE001
                first = (str(e).splitlines() or [""])[0]
                if name == "jvpgraph.hvp" and _eager_gradient_raises(
                        lambda: pair(f(*(x.clone().requires_grad_(ok) for x, ok in zip(xs, live))), us_hessian),
                        seed, first):
                    return "skip", f"no Hessian to judge: PyTorch's own gradient raises the same ({first})"[:300]
                return "error", f"{name}: {type(e).__name__}: {first}"[:300]
        # the first-order values differentiated by finite differences: an independent reference where one
        # agrees with jvpgraph at x, else jvpgraph's own (the first-order sweep judged it there)
        traced = results[0][1][3]
        torch.manual_seed(seed)
        jv_here = _float_leaves(traced.jvp(xs, vs)[1])
        refs = ([("torch.func.jvp", torch.func.jvp)] if op.supports_forward_ad else []) + \
            [("double-backward", lambda g, p, t: torch.autograd.functional.jvp(g, p, t))]
        source = ("jvpgraph's Jv", lambda p, t: traced.jvp(p, t))
        for name, fn in refs:
            try:
                torch.manual_seed(seed)
                ref_here = _float_leaves(fn(f, xs, vs)[1])
                if len(ref_here) == len(jv_here) and all(
                        max_rel_err(torch.where(m, a, 0.0), torch.where(m, b, 0.0), floor=_OPINFO_FLOOR) <= 1e-7
                        for a, b, m in zip(jv_here, ref_here, finite)):
                    source = (name, lambda p, t, fn=fn: fn(f, p, t))
                    break
            except Exception:  # noqa: BLE001
                continue

        def s_along(tangents, us):
            def g(eps):
                torch.manual_seed(seed)
                with torch.no_grad() if source[0] != "double-backward" else contextlib.nullcontext():
                    jv = source[1](tuple(x + eps * w for x, w in zip(xs, ws)), tangents)[1]
                    return [pair(jv, us).detach()]
            return g

        verdicts = []
        for name, res in results:
            dot, size = res[0], res[1]
            keep = {"tangent on input 0 only": [i == 0 for i in range(len(vs))], "jvpgraph.hvp": live}.get(
                name, [True] * len(vs))  # hvp: the inputs outside the closure only
            tangents = tuple(v if k else torch.zeros_like(v) for v, k in zip(vs, keep))
            tries = []
            for h in (1e-3, 1e-4, 1e-5):  # a smaller step where a kink or a jump lies within the larger one
                fd, fd_err = _richardson(s_along(tangents, us_hessian if name == "jvpgraph.hvp" else us), h)
                fd, fd_err = float(fd[0]), float(fd_err[0])
                scale = max(size, abs(fd), 1e-3 * (1 + abs(results[0][1][2])))
                tries.append((abs(dot - fd) / scale, fd_err / scale))
                if tries[-1][0] <= _SECOND_ORDER_RTOL:
                    break
            gap, unsure = tries[-1] if tries[-1][0] <= _SECOND_ORDER_RTOL else min(tries, key=lambda t: t[1])
            verdicts.append((name, gap, unsure))
    bad = [(n, g, e) for n, g, e in verdicts if g > _SECOND_ORDER_RTOL]
    where = f"(finite differences of {source[0]}" + (f"; f jumps along input {jumps}: not moved" if jumps else "") + ")"
    if not bad:
        return "pass", "; ".join(f"{n}: {g:.1e}" for n, g, _ in verdicts) + f" {where}"
    n, g, e = bad[0]
    if e > g / 10:  # the differences themselves move by as much as the gap: nothing is decided
        return "undecided", f"{n}: {g:.1e}, but finite differences do not converge ({e:.1e}) {where}"
    return "fail", f"{n}: rel err {g:.1e} {where}"
