"""Custom ``torch.autograd.Function``: jvpgraph keeps it opaque and differentiates it the way the user said.

* only ``backward``: the flipped graph flips that backward, so ``J v`` is consistent with it (adjoint
  identity against ``autograd.grad``; ``J v`` equals the backward's linear map applied forward);
* a ``jvp`` staticmethod: it is used (made deliberately different from the backward, so the test can tell);
* ``FlippedGraph.how`` says ``"opaque"`` for the node.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

import jvpgraph

from conftest import F64, assert_adjoint, double_backward_jvp, jac_times_v

D = torch.float64

# ------------------------------------------------------------------ Functions under test
class StraightThroughRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class SinWithScaledBackward(torch.autograd.Function):
    """A backward that is *not* the forward's derivative: Jv must follow the backward (2·v), not cos(x)·v."""

    @staticmethod
    def forward(ctx, x):
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class CubeWithJvp(torch.autograd.Function):
    """Old style (``forward(ctx, x)``) with a ``jvp`` that is deliberately twice the true tangent."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return x * x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * (3 * x * x * t)


class MulAddNewStyle(torch.autograd.Function):
    """New style: ``forward`` without ctx, ``setup_context``; two inputs, two outputs, a non-tensor arg."""

    @staticmethod
    def forward(x, y, alpha):
        return x * y, x + alpha * y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, alpha = inputs
        ctx.save_for_backward(x, y)
        ctx.alpha = alpha

    @staticmethod
    def backward(ctx, g1, g2):
        x, y = ctx.saved_tensors
        return g1 * y + g2, g1 * x + ctx.alpha * g2, None


class ExpNewStyleWithJvp(torch.autograd.Function):
    """New style with ``jvp`` (3x the true tangent) and a correct ``backward``."""

    @staticmethod
    def forward(x):
        return torch.exp(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return 3 * y * t


def _opaque_nodes(traced):
    return {k: h for k, h in traced.flipped.how.items() if "autograd_function" in k}


def _xv(n=7, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, generator=g, dtype=D) * scale, torch.randn(2, n, generator=g, dtype=D)


# ------------------------------------------------------------------ backward only
def test_straight_through_round_jv_is_v():
    x, v = _xv()
    traced = jvpgraph.trace(lambda x: StraightThroughRound.apply(x), x)
    out, jv = traced.jvp(x, v)
    torch.testing.assert_close(out, torch.round(x), rtol=0, atol=0)
    torch.testing.assert_close(jv, v, rtol=0, atol=0)  # the backward is the identity: so is J
    how = _opaque_nodes(traced)
    assert how and set(how.values()) == {"opaque"}, traced.flipped.how


@pytest.mark.parametrize("cls", [StraightThroughRound, Cube, SinWithScaledBackward],
                         ids=["ste", "cube", "scaled_backward"])
def test_backward_only_function_in_a_network(cls):
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(7, 5).double(), nn.Linear(5, 3).double()
    f = lambda x: lin2(torch.tanh(cls.apply(lin1(x))))  # noqa: E731
    x, v = _xv()
    out, jv = jvpgraph.jvp(f, (x,), (v,))
    torch.testing.assert_close(out, f(x), **F64)
    # every reverse-mode reference uses the Function's backward: Jv must agree with all of them
    assert_adjoint(f, (x,), (v,), [jv])
    torch.testing.assert_close(jv, jac_times_v(f, (x,), (v,))[0], **F64)
    torch.testing.assert_close(jv, double_backward_jvp(f, (x,), (v,))[0], **F64)


def test_backward_map_applied_forward():
    x, v = _xv()
    _, jv = jvpgraph.jvp(lambda x: Cube.apply(x), (x,), (v,))
    torch.testing.assert_close(jv, 3 * x * x * v, **F64)
    _, jv = jvpgraph.jvp(lambda x: SinWithScaledBackward.apply(x), (x,), (v,))
    torch.testing.assert_close(jv, 2 * v, **F64)  # not cos(x) v: the backward is what counts


def test_new_style_function_multiple_inputs_outputs():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 4, generator=g, dtype=D), torch.randn(3, 4, generator=g, dtype=D)
    vx, vy = torch.randn(3, 4, generator=g, dtype=D), torch.randn(3, 4, generator=g, dtype=D)
    f = lambda x, y: MulAddNewStyle.apply(x.sin(), y, 0.7)  # noqa: E731
    traced = jvpgraph.trace(f, x, y)
    (o1, o2), (j1, j2) = traced.jvp((x, y), (vx, vy))
    s, c = x.sin(), x.cos()
    torch.testing.assert_close(o1, s * y, **F64)
    torch.testing.assert_close(j1, c * vx * y + s * vy, **F64)
    torch.testing.assert_close(j2, c * vx + 0.7 * vy, **F64)
    assert_adjoint(f, (x, y), (vx, vy), [j1, j2])
    assert set(_opaque_nodes(traced).values()) == {"opaque"}


def test_function_inside_module_reused_on_new_batch():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(Cube.apply(torch.sigmoid(self.a(x))))

    torch.manual_seed(2)
    net = Net().double()
    x, v = torch.randn(5, 4, dtype=D), torch.randn(5, 4, dtype=D)
    traced = jvpgraph.trace(net, x)
    for seed in (3, 4):
        g = torch.Generator().manual_seed(seed)
        x2, v2 = torch.randn(5, 4, generator=g, dtype=D), torch.randn(5, 4, generator=g, dtype=D)
        _, jv = traced.jvp(x2, v2)
        # Cube's backward is exact, so every reverse-mode reference is the true Jv
        torch.testing.assert_close(jv, double_backward_jvp(net, (x2,), (v2,))[0], **F64)
        torch.testing.assert_close(jv, jac_times_v(net, (x2,), (v2,))[0], **F64)
        lin = traced.linearize(x2)
        torch.testing.assert_close(lin.jvp(v2), jv, **F64)


# ------------------------------------------------------------------ jvp staticmethod is used
def test_old_style_jvp_is_used():
    x, v = _xv(scale=1.0)
    traced = jvpgraph.trace(lambda x: CubeWithJvp.apply(x), x)
    out, jv = traced.jvp(x, v)
    torch.testing.assert_close(out, x ** 3, **F64)
    torch.testing.assert_close(jv, 2 * 3 * x * x * v, **F64)  # the jvp formula's answer, not the backward's
    # PyTorch's own forward AD (dual numbers) agrees: it calls the same jvp
    with fwAD.dual_level():
        ref = fwAD.unpack_dual(CubeWithJvp.apply(fwAD.make_dual(x, v))).tangent
    torch.testing.assert_close(jv, ref, **F64)
    assert set(_opaque_nodes(traced).values()) == {"opaque"}


def test_new_style_jvp_is_used():
    x, v = _xv(scale=1.0)
    f = lambda x: ExpNewStyleWithJvp.apply(x) * 2  # noqa: E731
    traced = jvpgraph.trace(f, x)
    _, jv = traced.jvp(x, v)
    torch.testing.assert_close(jv, 2 * 3 * torch.exp(x) * v, **F64)
    assert set(_opaque_nodes(traced).values()) == {"opaque"}


def test_custom_function_is_not_traced_through():
    """The trace holds one opaque node, not the ops of the Function's forward."""
    x, _ = _xv()
    traced = jvpgraph.trace(lambda x: StraightThroughRound.apply(x) * 2, x)
    targets = [str(n.target) for n in traced.graph.gm.graph.nodes if n.op == "call_function"]
    assert any("autograd_function" in t for t in targets), targets
    assert not any("round" in t for t in targets), targets
    # and the user's Function.apply is restored after tracing
    assert StraightThroughRound.apply(torch.tensor([0.4, 1.6])).tolist() == [0.0, 2.0]


# ------------------------------------------------------------------ the `fn = Function.apply` idiom
class StraightThroughRoundNewStyle(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g


# the common idiom: bind apply once at import time
round_ste = StraightThroughRound.apply
round_ste_new_style = StraightThroughRoundNewStyle.apply

def test_new_style_straight_through_called_via_class():
    x, v = _xv()
    _, jv = jvpgraph.jvp(lambda x: StraightThroughRoundNewStyle.apply(x) * 2, (x,), (v,))
    torch.testing.assert_close(jv, 2 * v, rtol=0, atol=0)


@pytest.mark.xfail(strict=True, raises=jvpgraph.TraceError,
                   reason="LIMITATION: an old-style Function (forward(ctx, ...), no setup_context) whose .apply was "
                   "bound to a name before tracing (`round_ste = RoundSTE.apply`) cannot be made opaque: PyTorch "
                   "refuses old-style Functions under functorch transforms ('must override the setup_context "
                   "staticmethod') before any hook jvpgraph can patch, so the trace fails with a TraceError")
def test_apply_alias_old_style():
    x, v = _xv()
    _, jv = jvpgraph.jvp(lambda x: round_ste(x) * 2, (x,), (v,))
    torch.testing.assert_close(jv, 2 * v, rtol=0, atol=0)


def test_apply_alias_new_style():
    x, v = _xv()
    _, jv = jvpgraph.jvp(lambda x: round_ste_new_style(x) * 2, (x,), (v,))
    torch.testing.assert_close(jv, 2 * v, rtol=0, atol=0)
