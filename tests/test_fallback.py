"""The fallback chain: ops without a written rule (and without forward AD in PyTorch) still get a correct Jv,
and each fallback step is exercised on its own.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jvpgraph
import jvpgraph.rules.fallback as fallback
import jvpgraph.rules.propagate as propagate
from jvpgraph.rules import FALLBACK_KINDS, RULES

from conftest import (F64, assert_adjoint, assert_all_close, double_backward_jvp, func_jvp, jac_times_v,
                      jvpgraph_jvp, random_tangents)

aten = torch.ops.aten
D = torch.float64


# torch 2.11 (the oldest version jvpgraph runs on) has no decomposition of _cdist_forward (cdist, pdist) and
# grid_sampler_3d, and their backwards are not differentiable there: no fallback step applies, and jvpgraph
# raises a RuleError naming the op (test_no_route_on_older_torch_is_a_rule_error checks that)
TORCH_2_14 = torch.__version__ >= (2, 14)
NEEDS_214_ROUTES = pytest.mark.skipif(not TORCH_2_14, reason="torch < 2.14: no fallback route for cdist, pdist, "
                                      "grid_sampler_3d (a RuleError names the op)")


def rn(*shape, scale=1.0, seed=None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=D, generator=g) * scale


def _check(f, inputs, expect_how=None, func_jvp_fails=False):
    tangents = random_tangents(inputs)
    out, jv = jvpgraph_jvp(f, inputs, tangents)
    assert_all_close(out, f(*inputs), "primal", **F64)
    assert_all_close(jv, jac_times_v(f, inputs, tangents), "vs jacobian @ v", **F64)
    assert_adjoint(f, inputs, tangents, jv)
    if func_jvp_fails:  # the point of the fallback: PyTorch's forward AD cannot do this one
        assert func_jvp(f, inputs, tangents) is None
    if expect_how is not None:
        how = jvpgraph.trace(f, *inputs).flipped.how
        assert expect_how & set(how.values()), how
    return jv


# ------------------------------------------------------------------ ops without forward AD in PyTorch
GRID = lambda: (rn(2, 3, 5, 4), torch.rand(2, 4, 3, 2, dtype=D) * 2.2 - 1.1)  # noqa: E731


@pytest.mark.parametrize("mode,padding,align", [("bilinear", "zeros", False), ("bilinear", "border", True),
                                                ("nearest", "zeros", True), ("bicubic", "border", False)])
def test_grid_sample(mode, padding, align):
    f = lambda x, g: F.grid_sample(x, g, mode=mode, padding_mode=padding, align_corners=align)  # noqa: E731
    _check(f, GRID(), expect_how=set(FALLBACK_KINDS))


@NEEDS_214_ROUTES
def test_grid_sample_3d():
    f = lambda x, g: F.grid_sample(x, g, align_corners=False)  # noqa: E731
    _check(f, (rn(1, 2, 3, 4, 3), torch.rand(1, 2, 3, 2, 3, dtype=D) * 2 - 1))


def test_affine_grid_then_grid_sample():
    f = lambda x, theta: F.grid_sample(x, F.affine_grid(theta, [2, 3, 5, 4], align_corners=False),  # noqa: E731
                                       align_corners=False)
    theta = torch.eye(2, 3, dtype=D).expand(2, 2, 3) + rn(2, 2, 3, scale=0.1)
    _check(f, (rn(2, 3, 5, 4), theta))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag(mode):
    f = lambda w, i, o: F.embedding_bag(i, w, o, mode=mode)  # noqa: E731
    inputs = (rn(8, 3), torch.tensor([1, 2, 4, 5, 4, 3, 2, 6, 7]), torch.tensor([0, 3, 4, 6]))
    _check(f, inputs, func_jvp_fails=(mode == "max"))


def test_embedding_bag_per_sample_weights():
    f = lambda w, i, o, p: F.embedding_bag(i, w, o, mode="sum", per_sample_weights=p)  # noqa: E731
    _check(f, (rn(8, 3), torch.tensor([1, 2, 4, 5, 4, 3, 2, 6, 7]), torch.tensor([0, 3, 4, 6]), rn(9)))


@NEEDS_214_ROUTES
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 0.5])
def test_cdist(p):
    f = lambda a, b: torch.cdist(a, b, p=p)  # noqa: E731
    _check(f, (rn(2, 4, 3), rn(2, 5, 3)), func_jvp_fails=True)


def test_cdist_mm_mode():
    f = lambda a, b: torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist")  # noqa: E731
    _check(f, (rn(4, 3), rn(5, 3)))


@NEEDS_214_ROUTES
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_pdist(p):
    _check(lambda a: F.pdist(a, p=p), (rn(5, 3),), func_jvp_fails=True)


@pytest.mark.parametrize("p,margin,reduction", [(1, 1.0, "mean"), (2, 0.5, "none")])
def test_multi_margin_loss(p, margin, reduction):
    target = torch.tensor([0, 2, 1, 3])
    f = lambda a: F.multi_margin_loss(a, target, p=p, margin=margin, reduction=reduction)  # noqa: E731
    _check(f, (rn(4, 5),), func_jvp_fails=True)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("tensor_lengths", [False, True])
def test_ctc_loss(reduction, tensor_lengths):
    """aten._ctc_loss has a data-dependent output shape under fake tensors (traced on its values) and no
    forward AD in PyTorch: the written rule (one backward pass, all rows at once) against the Jacobian."""
    targets = torch.tensor([[1, 2, 3], [2, 2, 1]])
    in_lens, tgt_lens = [6, 5], [3, 2]
    if tensor_lengths:
        in_lens, tgt_lens = torch.tensor(in_lens), torch.tensor(tgt_lens)
    f = lambda lp: F.ctc_loss(lp.log_softmax(2), targets, in_lens, tgt_lens, reduction=reduction)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, v = rn(6, 2, 5, seed=0), rn(6, 2, 5, seed=1)
        out, jv = jvpgraph.jvp(f, (x,), (v,))
        torch.testing.assert_close(out, f(x), **F64)  # with list lengths the C++ composite once hid a tensor
        assert_all_close(jv, jac_times_v(f, (x,), (v,)), "ctc_loss Jv vs jacobian @ v", **F64)
        traced = jvpgraph.trace(f, x)
        traced.jvp(x, v)
    assert "batch" in traced.flipped.how.values()


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_ctc_loss_derivative_is_in_log_probs_not_in_logits(zero_infinity):
    """The tangent on log_probs itself (not through a log_softmax): PyTorch's ctc_loss backward returns the
    gradient in the logits before a log_softmax (it holds an extra exp(log_probs) term), so a Jv built on it
    alone is wrong here (-0.90 where the derivative is -2.20). Judged by central finite differences, on
    unnormalized log_probs too; with zero_infinity, the sequence that cannot be aligned (target 2, 2, 2 needs 5
    steps, it has 3) has derivative 0."""
    targets = torch.tensor([[1, 2, 3], [2, 2, 2]])
    in_lens, tgt_lens = torch.tensor([6, 3]), torch.tensor([3, 3])
    f = lambda lp: F.ctc_loss(lp, targets, in_lens, tgt_lens, reduction="none",  # noqa: E731
                              zero_infinity=zero_infinity)
    x = rn(6, 2, 5, seed=0).log_softmax(2) + 0.3 * rn(6, 2, 5, seed=2)
    v = rn(6, 2, 5, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, jv = jvpgraph.jvp(f, (x,), (v,))
        eps = 1e-6
        fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    finite = torch.isfinite(fd)
    assert finite[0] and bool(finite[1]) == zero_infinity
    torch.testing.assert_close(jv[finite], fd[finite], rtol=1e-7, atol=1e-8)
    autograd = (torch.autograd.functional.vjp(f, x, torch.ones(2, dtype=x.dtype))[1] * v).sum((0, 2))
    assert (autograd[0] - fd[0]).abs() > 0.1  # PyTorch's backward alone would be wrong here


@pytest.mark.parametrize("name,f,build", [
    ("max_all", lambda a: a.max(), lambda: (rn(3, 4),)),
    ("sort", lambda a: a.sort(1).values, lambda: (rn(3, 4),)),
    ("topk", lambda a: a.topk(2, 1).values, lambda: (rn(3, 4),)),
    ("solve", lambda a, b: torch.linalg.solve(a, b), lambda: (rn(3, 3) + 3 * torch.eye(3, dtype=D), rn(3, 2))),
    ("det", torch.linalg.det, lambda: (rn(3, 3),)),
    ("svdvals", torch.linalg.svdvals, lambda: (rn(3, 4),)),
    ("logsumexp", lambda a: a.logsumexp(1), lambda: (rn(3, 4),)),
    ("glu", lambda a: F.glu(a, 1), lambda: (rn(3, 4),)),
    ("prelu", F.prelu, lambda: (rn(3, 4), torch.rand(4, dtype=D))),
    ("lerp", torch.lerp, lambda: (rn(3, 4), rn(3, 4), torch.rand(3, 4, dtype=D))),
    ("xlogy", torch.xlogy, lambda: (rn(3, 4), torch.rand(3, 4, dtype=D) + 0.1)),
    ("sinc", torch.sinc, lambda: (rn(3, 4),)),
    ("clamp_tensor", torch.clamp, lambda: (rn(3, 4), rn(3, 4) - 1, rn(3, 4) + 1)),
    ("binary_cross_entropy", lambda a, b: F.binary_cross_entropy(a.sigmoid(), b.sigmoid()),
     lambda: (rn(3, 4), rn(3, 4))),
])
def test_fallback_ops(name, f, build):
    _check(f, build(), expect_how=set(FALLBACK_KINDS))


def test_local_response_norm():
    _check(lambda a: F.local_response_norm(a, 2), (rn(2, 4, 3),))


@pytest.mark.parametrize("name,f,build", [
    pytest.param(name, f, build, id=name)
    for name, f, build in [
        ("amax", lambda a: a.amax(1), lambda: (rn(3, 4),)),
        ("prod", lambda a: a.prod(1), lambda: (rn(3, 4),)),
        ("cumprod", lambda a: a.cumprod(1), lambda: (rn(3, 4),)),
        ("atan2", torch.atan2, lambda: (rn(3, 4), rn(3, 4))),
        ("hypot", torch.hypot, lambda: (rn(3, 4), rn(3, 4))),
        ("fmod", lambda a: torch.fmod(a, 1.3), lambda: (rn(3, 4, scale=3),)),
    ]])
def test_fallback_ops_through_prims(name, f, build):
    _check(f, build(), expect_how=set(FALLBACK_KINDS))


def test_logcumsumexp():
    _check(lambda a: torch.logcumsumexp(a, 1), (rn(3, 4),))


# ------------------------------------------------------------------ each step on its own
@pytest.fixture
def without_rule(monkeypatch):
    def remove(op):
        assert op in RULES
        monkeypatch.delitem(RULES, op)

    return remove


@pytest.mark.parametrize("op,f", [
    (aten.gelu, F.gelu), (aten.silu, F.silu), (aten.softplus, F.softplus), (aten.elu, F.elu),
    (aten.hardswish, F.hardswish), (aten.mish, F.mish),
    (aten._softmax, lambda x: torch.softmax(x, -1)),
    (aten.native_layer_norm, lambda x: F.layer_norm(x, (5,))),
    (aten.relu, torch.relu), (aten.leaky_relu, F.leaky_relu),
    (aten.native_batch_norm, lambda x: F.batch_norm(x, None, None, training=True)),
    (aten.log_sigmoid_forward, F.logsigmoid),
])
def test_deleted_rule_decomposition(without_rule, op, f):
    without_rule(op)
    x = rn(3, 5, scale=2.0, seed=0)
    traced = jvpgraph.trace(f, x)
    v = rn(3, 5, seed=1)
    _, jv = traced.jvp(x, v)
    torch.testing.assert_close(jv, torch.func.jvp(f, (x,), (v,))[1], **F64)
    assert set(traced.flipped.how.values()) & set(FALLBACK_KINDS), traced.flipped.how


@pytest.mark.parametrize("op,f", [(aten.sigmoid, torch.sigmoid), (aten.tanh, torch.tanh), (aten.exp, torch.exp),
                                  (aten.sin, torch.sin), (aten.abs, torch.abs)])
def test_deleted_rule_full_chain_prims(without_rule, op, f):
    without_rule(op)
    x, v = rn(3, 5, seed=0), rn(3, 5, seed=1)
    traced = jvpgraph.trace(f, x)
    _, jv = traced.jvp(x, v)
    # the node's name, not op.__name__: FX renames a node that would shadow a Python builtin (abs -> abs_1)
    names = [n.name for n in traced.graph.gm.graph.nodes
             if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is op]
    assert len(names) == 1, names
    assert traced.flipped.how[names[0]] in FALLBACK_KINDS
    torch.testing.assert_close(jv, torch.func.jvp(f, (x,), (v,))[1], **F64)


def _only(monkeypatch, step):
    steps = dict(fallback._STEPS)
    monkeypatch.setattr(fallback, "_STEPS", ((step, steps[step]),))


OPS_FOR_STEPS = [(aten.sigmoid, torch.sigmoid), (aten.tanh, torch.tanh), (aten.gelu, F.gelu),
                 (aten._softmax, lambda x: torch.softmax(x, -1)),
                 (aten.native_layer_norm, lambda x: F.layer_norm(x, (5,)))]


@pytest.mark.parametrize("step,op,f", [("flipped-vjp", op, f) for op, f in OPS_FOR_STEPS]
                         + [("forward-ad", op, f) for op, f in OPS_FOR_STEPS[:3]])
def test_single_fallback_step(monkeypatch, without_rule, step, op, f):
    """Each fallback step alone gives the right Jv (the others disabled, the written rule removed)."""
    _only(monkeypatch, step)
    without_rule(op)
    x, v = rn(3, 5, seed=0), rn(3, 5, seed=1)
    traced = jvpgraph.trace(f, x)
    _, jv = traced.jvp(x, v)
    torch.testing.assert_close(jv, torch.func.jvp(f, (x,), (v,))[1], **F64)
    assert step in traced.flipped.how.values(), traced.flipped.how


def test_flipped_vjp_step_keeps_jv_differentiable(monkeypatch, without_rule):
    """The flipped VJP is traced into ordinary aten ops, so Jv stays differentiable in the parameters."""
    _only(monkeypatch, "flipped-vjp")
    without_rule(aten.sigmoid)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)).double()
    x, v = rn(3, 4, seed=0), rn(3, 4, seed=1)
    _, jv = jvpgraph.jvp(net, (x,), (v,))
    params = list(net.parameters())
    got = torch.autograd.grad(jv.pow(2).sum(), params, allow_unused=True)
    ref_jv = torch.autograd.functional.jvp(net, x, v, create_graph=True)[1]
    want = torch.autograd.grad(ref_jv.pow(2).sum(), params, allow_unused=True)
    assert got[0] is not None and got[2] is not None
    for g, w, p in zip(got, want, params):
        torch.testing.assert_close(torch.zeros_like(p) if g is None else g, torch.zeros_like(p) if w is None else w,
                                   **F64)


def test_forward_ad_step_outside_tracing():
    """The forward-AD step itself (on real tensors) is PyTorch's formula for that one node."""
    x, t = rn(6, seed=0), rn(6, seed=1)
    got = fallback._via_forward_ad(aten.sigmoid.default, (t,), {}, torch.sigmoid(x), (x,), {})
    torch.testing.assert_close(got, torch.func.jvp(torch.sigmoid, (x,), (t,))[1], **F64)


def test_only_decomposition_step_reports_what_failed(monkeypatch, without_rule):
    """With the decomposition step alone, an op whose decomposition reaches a prim without a rule raises a
    RuleError naming the op and the inner failure (never a silent zero)."""
    _only(monkeypatch, "decomposition")
    without_rule(aten.tanh)
    with pytest.raises(jvpgraph.RuleError) as e:
        jvpgraph.trace(torch.tanh, rn(3, 5))
    assert "aten.tanh" in str(e.value) and "decomposition" in str(e.value)


def test_no_step_left_raises_rule_error(monkeypatch, without_rule):
    monkeypatch.setattr(fallback, "_STEPS", ())
    without_rule(aten.sigmoid)
    with pytest.raises(jvpgraph.RuleError, match=r"aten\.sigmoid"):
        jvpgraph.trace(torch.sigmoid, rn(3))


@NEEDS_214_ROUTES
def test_fallback_warns_once_per_op(monkeypatch):
    monkeypatch.setattr(fallback, "_WARNED", set())
    a, b = rn(4, 3), rn(5, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jvpgraph.trace(lambda a, b: torch.cdist(a, b) + torch.cdist(b, a).T, a, b)
        jvpgraph.trace(lambda a, b: torch.cdist(a, b), a, b)
    msgs = [str(w.message) for w in caught if "no written rule" in str(w.message)]
    assert len(msgs) == 1 and "_cdist_forward" in msgs[0] and "flipped-vjp" in msgs[0], msgs


def test_output_declared_non_differentiable_and_used_warns(monkeypatch):
    """A floating output PyTorch's formulas give no tangent (declared non-differentiable: _linalg_det's LU
    factors; lstsq's singular values were one, and silently wrong) gets a zero tangent: when the model uses it,
    a warning names the op, the output and its user; unused (what torch.linalg.det does), nothing is said."""
    monkeypatch.setattr(propagate, "_WARNED_DECLARED", set())
    a = rn(3, 3)
    det = torch.ops.aten._linalg_det.default
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jvpgraph.trace(lambda a: det(a)[0] * 2, a)
        assert not [w for w in caught if "declares it non-differentiable" in str(w.message)]
        jvpgraph.trace(lambda a: det(a)[1] * 2, a)
    msgs = [str(w.message) for w in caught if "declares it non-differentiable" in str(w.message)]
    assert len(msgs) == 1 and "output 1 of aten._linalg_det.default" in msgs[0] and "mul" in msgs[0], msgs


def test_decomposition_route_logs_instead_of_warning(monkeypatch, caplog):
    """An op PyTorch decomposes into ops with rules (nll_loss_forward) is exact: one log line at INFO, no
    warning (a gradient's graph is full of them: Curvature's first call warned for each)."""
    monkeypatch.setattr(fallback, "_WARNED", set())
    target = torch.tensor([0, 2, 1])
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="jvpgraph"):
        warnings.simplefilter("always")
        jvpgraph.trace(lambda a: F.nll_loss(a.log_softmax(1), target), rn(3, 4))
    assert not [w for w in caught if "no written rule" in str(w.message)]
    assert any("nll_loss_forward" in r.getMessage() and "decomposition" in r.getMessage() for r in caplog.records)


@NEEDS_214_ROUTES
def test_fallback_inside_model_matches_double_backward():
    """A model mixing written rules and fallback nodes (grid_sample, cdist), train mode with BatchNorm."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.proto = nn.Parameter(torch.randn(4, 3))

        def forward(self, x, grid):
            h = torch.sigmoid(self.bn(self.conv(x)))
            h = F.grid_sample(h, grid, align_corners=False)  # (N, 3, 3, 2)
            feats = h.flatten(2).transpose(1, 2)  # (N, 6, 3)
            return torch.cdist(feats, self.proto.expand(feats.shape[0], 4, 3))

    torch.manual_seed(0)
    net = Net().double().train()
    x, grid = rn(2, 2, 5, 5, seed=0), torch.rand(2, 3, 2, 2, dtype=D) * 2 - 1
    vx, vg = rn(2, 2, 5, 5, seed=1), rn(2, 3, 2, 2, seed=2)
    _, jv = jvpgraph.jvp(net, (x, grid), (vx, vg))
    torch.testing.assert_close(jv, double_backward_jvp(net, (x, grid), (vx, vg))[0], **F64)
    torch.testing.assert_close(jv, jac_times_v(net, (x, grid), (vx, vg))[0], **F64)


@pytest.mark.parametrize("step", ["flipped-vjp", "forward-ad"])
def test_fallback_steps_align_tangents_after_a_list_argument(step):
    """index_put(x, [i, j], values): the indices list (no tangent, collapsed to one ``None``) comes before
    ``values``; each step must still pair ``values`` with its own tangent, and kwargs left out are zeros."""
    x, tx = rn(4, 5, seed=0), rn(4, 5, seed=1)
    vals, tvals = rn(3, seed=2), rn(3, seed=3)
    i, j = torch.tensor([0, 2, 3]), torch.tensor([1, 1, 4])
    op = aten.index_put.default
    out = op(x, [i, j], vals)
    fn = dict(fallback._STEPS)[step]
    got = fn(op, (tx, None, tvals), {}, out, (x, [i, j], vals), {})
    want = torch.func.jvp(lambda a, b: op(a, [i, j], b), (x, vals), (tx, tvals))[1]
    torch.testing.assert_close(got, want, **F64)
    # a kwarg without a tangent is left out of tkwargs (as propagate passes it)
    got = fn(op, (tx, None, tvals), {}, out, (x, [i, j], vals), {"accumulate": False})
    torch.testing.assert_close(got, want, **F64)


def test_empty_tangents_give_a_zero_tangent():
    """det of a 0x0 matrix is 1 and depends on nothing: no fallback step can run on empty tensors, and none
    needs to."""
    x = torch.zeros(0, 0, dtype=torch.float64)
    out, jv = jvpgraph.jvp(torch.linalg.det, (x,), (torch.zeros_like(x),))
    ref_out, ref = torch.func.jvp(torch.linalg.det, (x,), (torch.zeros_like(x),))
    torch.testing.assert_close((out, jv), (ref_out, ref), **F64)


def test_aliasing_prims_from_a_walked_decomposition_survive_refunctionalization():
    """matrix_norm(ord=2, keepdim=True) leaves prims.broadcast_in_dim (an aliasing non-aten op) in the joint
    walk next to in-place ops; functionalizing that graph must not refuse it."""
    x, v = rn(2, 2, seed=0), rn(2, 2, seed=1)
    f = lambda z: torch.linalg.matrix_norm(z, ord=2, dim=(-2, -1), keepdim=True)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, jv = jvpgraph.jvp(f, (x,), (v,))
    torch.testing.assert_close(jv, torch.func.jvp(f, (x,), (v,))[1], **F64)


def test_decomposition_whose_outputs_differ_from_the_op_is_refused():
    """PyTorch's decomposition of the CPU flash-attention kernel returns the attention weights where the op
    returns its logsumexp: the decomposition step must refuse it, not hand back a tangent of another shape."""
    op = aten._scaled_dot_product_flash_attention_for_cpu.default
    q, k, v = rn(2, 2, 3, 4, seed=0), rn(2, 2, 6, 4, seed=1), rn(2, 2, 6, 4, seed=2)
    out = op(q, k, v)
    with pytest.raises(NotImplementedError, match="outputs do not match"):
        fallback._via_decomposition(op, (q, k, v), {}, out, (q, k, v), {})


@pytest.mark.skipif(TORCH_2_14, reason="torch 2.14 has fallback routes for these ops (tested above)")
@pytest.mark.parametrize("f,op", [(lambda a, b: torch.cdist(a, b), "_cdist_forward"),
                                  (lambda a, b: F.grid_sample(a, b, align_corners=False), "grid_sampler_3d")])
def test_no_route_on_older_torch_is_a_rule_error(f, op):
    args = (rn(2, 4, 3), rn(2, 5, 3)) if op == "_cdist_forward" else (rn(1, 2, 3, 3, 3), rn(1, 2, 2, 2, 3))
    with pytest.raises(jvpgraph.RuleError, match=op):
        jvpgraph.jvp(f, args, tuple(torch.ones_like(a) for a in args))


def test_side_tables_are_freed_with_the_graphs_that_use_them(monkeypatch, without_rule):
    """The state behind jvpgraph's custom ops (a user's autograd.Function, PyTorch's forward-AD formula of a
    node) lives in the nodes of the graphs that call it: a copied graph still runs after the original is
    dropped, and once every graph is gone the entries are freed (a value-specialized model traced on every
    call used to grow these tables by an entry per trace, with the trace's tensors)."""
    import copy
    import gc

    from conftest import Twice
    from jvpgraph.ops import FORWARD_AD_NODES, OPAQUE

    _only(monkeypatch, "forward-ad")
    without_rule(aten.tanh)
    f = lambda a: torch.tanh(Twice.apply(a))  # noqa: E731
    x, v = rn(3, 5, seed=0), rn(3, 5, seed=1)
    gc.collect()
    before = len(OPAQUE), len(FORWARD_AD_NODES)
    traced = jvpgraph.trace(f, x)
    assert len(OPAQUE) > before[0] and len(FORWARD_AD_NODES) > before[1]  # both tables were used
    module = copy.deepcopy(traced.flipped.module)
    del traced
    gc.collect()
    ref = torch.func.jvp(lambda a: torch.tanh(2 * a), (x,), (v,))
    torch.testing.assert_close(module(x, v)[1], ref[1], **F64)  # the copy owns the entries it calls
    del module
    gc.collect()
    assert (len(OPAQUE), len(FORWARD_AD_NODES)) == before
