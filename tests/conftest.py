"""Shared helpers for the jvpgraph test suite: independent references for ``J v``.

Every reference here is computed by PyTorch itself, never by jvpgraph:

* :func:`func_jvp` — ``torch.func.jvp`` (forward-mode AD; ``None`` where PyTorch has no forward AD);
* :func:`jac_times_v` — the full Jacobian by reverse mode, one backward per output element
  (``torch.autograd.functional.jacobian``, no vmap), contracted with ``v``;
* :func:`double_backward_jvp` — ``torch.autograd.functional.jvp`` (the double-backward trick);
* :func:`finite_difference_jvp` — central differences ``(f(x + eps v) - f(x - eps v)) / 2 eps``;
* :func:`vjp_ref` / :func:`assert_adjoint` — ``<u, J v> = <Jᵀ u, v>`` against ``torch.autograd.grad``.

Functions may take integer (non-differentiable) inputs: the references differentiate only the floating
point ones (``float_only``), while jvpgraph gets every input and tangents for the floating
point inputs only. ``seed`` reseeds the global RNG before *every* evaluation, so random ops (dropout) draw
the same mask in jvpgraph and in each reference.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import pytest
import torch
import torch.utils._pytree as pytree

import jvpgraph

logging.getLogger("torch.__trace").setLevel(logging.WARNING)  # make_fx's DEBUG chatter in failure reports
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

F64 = dict(rtol=1e-7, atol=1e-9)
F32 = dict(rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def is_diff(x) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def float_positions(inputs) -> list[int]:
    return [i for i, x in enumerate(inputs) if is_diff(x)]


def float_only(f, inputs):
    """``g(*floats) = f(*inputs with the floating-point ones replaced)``: integer inputs become constants."""
    pos = float_positions(inputs)

    def g(*floats):
        items = list(inputs)
        for i, t in zip(pos, floats):
            items[i] = t
        return f(*items)

    return g, tuple(inputs[i] for i in pos)


def random_tangents(inputs, generator=None):
    return tuple(torch.randn(x.shape, dtype=x.dtype, generator=generator) for x in inputs if is_diff(x))


def flat(out) -> list[torch.Tensor]:
    return [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]


@contextlib.contextmanager
def seeded(seed):
    if seed is None:
        yield
        return
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _reseeding(f, seed):
    if seed is None:
        return f

    def g(*a):
        torch.manual_seed(seed)
        return f(*a)

    return g


def _diff_out(f):
    """Only the floating-point outputs, as a tuple (references need tensors to differentiate)."""

    def g(*a):
        return tuple(o for o in flat(f(*a)) if is_diff(o))

    return g


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------
def func_jvp(f, inputs, tangents, seed=None):
    """``torch.func.jvp`` over the floating-point inputs, or ``None`` where PyTorch has no forward AD."""
    g, xs = float_only(_diff_out(f), inputs)
    try:
        with seeded(seed):
            return list(torch.func.jvp(g, xs, tuple(tangents))[1])
    except (NotImplementedError, RuntimeError) as e:  # no forward-AD formula for some op
        msg = str(e)
        if "forward AD" in msg or "forward-mode" in msg or "not implemented" in msg.lower() \
                or "vmap" in msg or "functorch" in msg.lower() or "mutate a captured Tensor" in msg:
            return None
        raise


def jacobian(f, inputs, seed=None):
    """Full Jacobian blocks ``J[out_j][in_i]`` of shape ``out_j.shape + in_i.shape`` by reverse mode."""
    g, xs = float_only(_diff_out(f), inputs)
    g = _reseeding(g, seed)
    # one ordinary backward per output element: no vmap batching rules involved (torch.func.jacrev's
    # batching of _cdist_backward is wrong for p=1 in torch 2.14, for instance)
    with seeded(seed):
        return torch.autograd.functional.jacobian(g, xs, vectorize=False, strategy="reverse-mode")


def jac_times_v(f, inputs, tangents, seed=None):
    """``Σ_i J[out_j][in_i] · v_i`` from the explicit Jacobian."""
    jac = jacobian(f, inputs, seed)
    outs = _diff_out(f)
    with seeded(seed):
        g, xs = float_only(outs, inputs)
        shapes = [o.shape for o in g(*xs)]
    res = []
    for j, shape in enumerate(shapes):
        acc = torch.zeros(shape, dtype=tangents[0].dtype if tangents else torch.float64)
        for i, v in enumerate(tangents):
            block = jac[j][i]
            acc = acc + (block.reshape(shape.numel(), v.numel()) @ v.reshape(-1)).reshape(shape)
        res.append(acc)
    return res


def double_backward_jvp(f, inputs, tangents, seed=None):
    """``torch.autograd.functional.jvp``: J v as the derivative of the VJP with respect to its cotangent."""
    g, xs = float_only(_diff_out(f), inputs)
    with seeded(seed):
        _, jv = torch.autograd.functional.jvp(g, xs, tuple(tangents))
    return list(jv)


def finite_difference_jvp(f, inputs, tangents, eps=1e-6, seed=None):
    """Central differences in the direction ``v`` (only meaningful in float64)."""
    g, xs = float_only(_diff_out(f), inputs)
    with torch.no_grad():
        with seeded(seed):
            plus = g(*[x + eps * v for x, v in zip(xs, tangents)])
        with seeded(seed):
            minus = g(*[x - eps * v for x, v in zip(xs, tangents)])
    return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]


def vjp_ref(f, inputs, cotangents, seed=None):
    """``Jᵀ u`` by ``torch.autograd.grad`` (one tensor per floating-point input)."""
    g, xs = float_only(_diff_out(f), inputs)
    leaves = [x.detach().requires_grad_(True) for x in xs]
    with seeded(seed), torch.enable_grad():
        outs = g(*leaves)
        grads = torch.autograd.grad(outs, leaves, list(cotangents), allow_unused=True)
    return [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, xs)]


def inner(a, b) -> torch.Tensor:
    return sum((x.detach().double() * y.detach().double()).sum() for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------
# assertions
# --------------------------------------------------------------------------------------------------
def assert_all_close(got, want, what="", **tol):
    got, want = flat(got), flat(want)
    assert len(got) == len(want), f"{what}: {len(got)} tensors vs {len(want)}"
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, f"{what}[{k}]: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        torch.testing.assert_close(a, b.to(a.dtype), msg=lambda m: f"{what}[{k}]: {m}", **tol)


def jvpgraph_jvp(f, inputs, tangents, seed=None, bn="batch"):
    """jvpgraph on all inputs, tangents for the floating-point ones only."""
    with seeded(seed):
        out, jv = jvpgraph.jvp(f, tuple(inputs), tuple(tangents), bn=bn)
    return out, [t for t, o in zip(flat(jv), flat(out)) if is_diff(o)]


def assert_adjoint(f, inputs, tangents, jv, seed=None, generator=None, rtol=1e-9, us=None):
    """``<u, J v> == <Jᵀ u, v>`` with ``Jᵀ u`` from ``torch.autograd.grad`` (random ``u``)."""
    g, xs = float_only(_diff_out(f), inputs)
    if us is None:
        with seeded(seed):
            outs = g(*xs)
        us = [torch.randn(o.shape, dtype=o.dtype, generator=generator) for o in outs]
    jtu = vjp_ref(f, inputs, us, seed=seed)
    lhs, rhs = float(inner(us, jv)), float(inner(jtu, tangents))
    norm = lambda ts: float(inner(ts, ts)) ** 0.5  # noqa: E731
    scale = norm(us) * norm(jv) + norm(jtu) * norm(tangents)
    assert abs(lhs - rhs) <= rtol * scale + 1e-12, \
        f"adjoint identity: <u, Jv> = {lhs!r} but <J^T u, v> = {rhs!r} (scale {scale:.3g})"


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow`` tests run only when asked for (``-m slow``, or any ``-m`` naming slow)."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="jvpgraph. no written rule")
        yield


def gradient_along(f, params, direction):
    """``d/dh f(params + h * direction)`` at 0 by central differences, Richardson-extrapolated over
    h = 1e-5 and 5e-6 (float64; strong curvature, as a ViT's, leaves plain differences at 1e-5 off by 2e-5).
    The parameters are restored."""
    def central(h):
        values = []
        with torch.no_grad():
            for sign in (1, -1):
                for p, d in zip(params, direction):
                    p.add_(sign * h * d)
                values.append(float(f()))
                for p, d in zip(params, direction):
                    p.sub_(sign * h * d)
        return (values[0] - values[1]) / (2 * h)

    return (4 * central(5e-6) - central(1e-5)) / 3


class Twice(torch.autograd.Function):
    """``2 x`` as a user's custom Function (traced as one opaque op)."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2
