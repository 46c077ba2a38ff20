"""Errors are clear: they name the input, the shapes, the op, or the user's line."""

from __future__ import annotations

import inspect
import re

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jvpgraph
from jvpgraph.rules import RULES, defjvp, defrule

from conftest import seeded

aten = torch.ops.aten
D = torch.float64


def _f2(x, y):
    return torch.sigmoid(x) * y.sum()


# ------------------------------------------------------------------ tangents
def test_tangent_wrong_shape_names_input_and_both_shapes():
    x, y = torch.randn(3, 4, dtype=D), torch.randn(2, 5, dtype=D)
    traced = jvpgraph.trace(_f2, x, y)
    with pytest.raises(ValueError) as e:
        traced.jvp((x, y), (torch.randn(3, 4, dtype=D), torch.randn(5, 2, dtype=D)))
    msg = str(e.value)
    assert "input 1" in msg and "(5, 2)" in msg and "(2, 5)" in msg, msg
    with pytest.raises(ValueError) as e:
        jvpgraph.jvp(torch.sin, (x,), (torch.randn(4, 3, dtype=D),))
    msg = str(e.value)
    assert "input 0" in msg and "(4, 3)" in msg and "(3, 4)" in msg, msg


def test_tangent_wrong_dtype():
    x = torch.randn(3, 4, dtype=D)
    with pytest.raises(ValueError) as e:
        jvpgraph.jvp(torch.tanh, (x,), (torch.randn(3, 4, dtype=torch.float32),))
    msg = str(e.value)
    assert "input 0" in msg and "float32" in msg and "float64" in msg, msg


def test_tangent_wrong_device():
    x = torch.randn(3, 4, dtype=D)
    with pytest.raises(ValueError) as e:
        jvpgraph.jvp(torch.tanh, (x,), (torch.empty(3, 4, dtype=D, device="meta"),))
    msg = str(e.value)
    assert "input 0" in msg and "meta" in msg and "cpu" in msg, msg


def test_tangent_for_integer_input():
    x, i = torch.randn(4, 3, dtype=D), torch.tensor([0, 2])
    f = lambda x, i: x[i]  # noqa: E731
    with pytest.raises(ValueError) as e:
        jvpgraph.jvp(f, (x, i), (torch.randn_like(x), torch.ones(2)))
    msg = str(e.value)
    assert "input 1" in msg and "integer" in msg and "None" in msg, msg
    # what the message suggests works, and so does a tangent for the differentiable inputs only
    v = torch.randn_like(x)
    _, jv1 = jvpgraph.jvp(f, (x, i), (v, None))
    _, jv2 = jvpgraph.jvp(f, (x, i), (v,))
    torch.testing.assert_close(jv1, v[i], rtol=0, atol=0)
    torch.testing.assert_close(jv2, v[i], rtol=0, atol=0)


def test_wrong_number_of_tangents():
    x = torch.randn(3, dtype=D)
    with pytest.raises(ValueError, match=r"2 tangents for 1 inputs"):
        jvpgraph.jvp(torch.sin, (x,), (x, x))


def test_tangent_not_a_tensor():
    x = torch.randn(3, dtype=D)
    with pytest.raises(TypeError, match=r"tangent for input 0 is a float"):
        jvpgraph.jvp(torch.sin, (x,), (1.0,))


def test_none_tangent_is_zero():
    x, y = torch.randn(3, 4, dtype=D), torch.randn(2, 5, dtype=D)
    vx = torch.randn_like(x)
    _, jv = jvpgraph.jvp(_f2, (x, y), (vx, None))
    torch.testing.assert_close(jv, torch.func.jvp(_f2, (x, y), (vx, torch.zeros_like(y)))[1])


# ------------------------------------------------------------------ tracing
def _branchy(x):
    if x.sum() > 0:  # data-dependent control flow
        return x * 2
    return x


class _ItemModel(nn.Module):
    def forward(self, x):
        scale = x.abs().max().item()  # a Python number from a tensor value (an unbacked symbol)
        return x * int(scale * 3)  # ... that has to become a concrete int here


def _line_of(fn, needle):
    src, start = inspect.getsourcelines(fn)
    for k, line in enumerate(src):
        if needle in line:
            return start + k, line.strip()
    raise AssertionError(needle)


@pytest.mark.parametrize("f,needle", [(_branchy, "if x.sum() > 0"),
                                      (_ItemModel(), "return x * int(scale * 3)")],
                         ids=["if-sum", "item-in-module"])
def test_data_dependent_control_flow_is_specialized_and_names_the_user_line(f, needle):
    """A branch on a value (or .item()) cannot be one trace for every batch: jvpgraph traces at the values it
    is given, warns with the user's line, and traces again when the values change; Jv is right each time."""
    x = torch.randn(3, 4, dtype=D)
    x = x if f is not _branchy else x.abs()  # the x * 2 branch
    with pytest.warns(UserWarning, match="branches on tensor values") as record:
        traced = jvpgraph.trace(f, x)
    msg = "\n".join(str(w.message) for w in record)
    fn = f if not isinstance(f, nn.Module) else type(f).forward
    lineno, line = _line_of(fn, needle)
    assert needle in msg, msg
    assert __file__ in msg and f"line {lineno}" in msg, msg
    for inputs in (x, -x, x * 3):  # the other branch; another scale
        v = torch.randn_like(inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, jv = traced.jvp(inputs, v)
        ref_out, ref = torch.func.jvp(f, (inputs,), (v,))
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(jv, ref)


def test_value_dependent_sizes_need_no_specialization():
    """masked_select and boolean indexing have sizes that depend on values but no branch on them: one trace
    (on fake tensors, unbacked sizes) serves inputs with other counts, without a warning."""
    f = lambda x: torch.masked_select(x, x > 0.3).pow(2).sum() * x[x < 0].sum()  # noqa: E731
    x = torch.randn(4, 5, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no specialization warning
        warnings.filterwarnings("ignore", message="jvpgraph: no written rule")
        traced = jvpgraph.trace(f, x)
        for inputs in (x, torch.randn(4, 5, dtype=D)):
            v = torch.randn_like(inputs)
            _, jv = traced.jvp(inputs, v)
            torch.testing.assert_close(jv, torch.func.jvp(f, (inputs,), (v,))[1])
    assert traced.graph.program.values is None


class _MaskShortcut(nn.Module):
    """transformers' habit before SDPA: ``if torch.all(mask == 1): mask = None`` (no masking needed), skipped
    while ``torch.compiler.is_compiling()`` (graph capture), where the mask is applied either way."""

    def forward(self, x, mask):
        if not torch.compiler.is_compiling() and torch.all(mask == 1):
            mask = None
        bias = 0.0 if mask is None else (1.0 - mask.to(x.dtype)) * -1e4
        return torch.softmax(x @ x.transpose(-1, -2) + bias, -1) @ x


def test_a_shortcut_skipped_under_graph_capture_needs_no_specialization():
    """A value-dependent shortcut that the model skips under ``torch.compiler.is_compiling()`` is traced as
    torch.export traces it (the flag set on a second attempt): one trace for every mask and batch, no warning;
    Jv equals torch.func.jvp's on the eager model (which takes the shortcut where it can), and the flag is off
    again afterwards."""
    m = _MaskShortcut()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "branches on tensor values"
        for b, full in ((3, True), (3, False), (5, True), (4, False)):
            x = torch.randn(b, 4, 6, dtype=D)
            mask = torch.ones(b, 4, 4, dtype=torch.long) if full else (torch.rand(b, 4, 4) > 0.3).long()
            v = torch.randn_like(x)
            out, jv = jvpgraph.jvp(m, (x, mask), (v, None))
            ref_out, ref = torch.func.jvp(lambda z: m(z, mask), (x,), (v,))
            torch.testing.assert_close(out, ref_out)
            torch.testing.assert_close(jv, ref)
    assert not torch.compiler.is_compiling()
    traced = jvpgraph.cached_trace(m, x, mask)
    assert all(c.graph.program.values is None for b in traced._cache.values() for c in b)
    assert len(traced.history) <= 3, traced.explain()  # batch 3, then symbolic sizes


def test_specialized_trace_leaves_the_model_alone():
    """Tracing on real values runs the model for real: on copies, so running statistics, parameters and the
    caller's RNG are untouched; a new batch re-traces, the same batch does not."""
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.bn(self.lin(x))
            return torch.tanh(h) if h.mean() > 0 else torch.sigmoid(h)

    torch.manual_seed(0)
    net = Gate().double().train()
    state = {k: t.clone() for k, t in net.state_dict().items()}
    x = torch.randn(6, 4, dtype=D)
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match="branches on tensor values"):
        traced = jvpgraph.trace(net, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, jv = traced.jvp(x, torch.ones_like(x))
        traced.jvp(x, torch.ones_like(x))
    assert len(traced._cache) == 1  # same values: the same trace
    assert torch.equal(rng, torch.get_rng_state())
    for k, t in net.state_dict().items():
        assert torch.equal(state[k], t), k
    ref = torch.func.jvp(lambda z: torch.func.functional_call(net, dict(net.named_parameters()) |
                                                            {k: b.clone() for k, b in net.named_buffers()}, (z,)),
                         (x,), (torch.ones_like(x),))[1]
    torch.testing.assert_close(jv, ref)


def test_trace_error_is_runtime_error_subclass():
    assert issubclass(jvpgraph.TraceError, RuntimeError)


def test_non_tensor_input_and_output():
    x = torch.randn(3)
    with pytest.raises(TypeError, match=r"input 1 is a int"):
        jvpgraph.trace(lambda x, n: x * n, x, 3)
    with pytest.raises(jvpgraph.TraceError, match=r"output 1 is 3 \(a int\); jvpgraph returns tensors only"):
        jvpgraph.trace(lambda x: (x, 3), x)


def test_not_callable():
    with pytest.raises(TypeError, match="nn.Module or a function"):
        jvpgraph.trace(3, torch.randn(2))


def test_in_place_write_into_integer_input_is_dropped_with_a_warning():
    """The graph reads the written value; only the write-back into the caller's tensor is dropped."""
    x, i = torch.randn(3, 4, dtype=D), torch.tensor([0, 1])
    v = torch.randn_like(x)
    with pytest.warns(UserWarning, match=r"writes in place into its input"):
        out, jv = jvpgraph.jvp(lambda x, i: x[i.add_(1)], (x, i), (v, None))
    assert i.tolist() == [0, 1]  # the caller's tensor is untouched
    torch.testing.assert_close(out, x[[1, 2]])
    torch.testing.assert_close(jv, v[[1, 2]])


def test_in_place_write_into_float_input():
    """A function that writes into its input is traced on a copy, with a warning: the caller's tensor is left
    as it was, and Jv is that of the function on its value."""
    x, v = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    before = x.clone()
    with pytest.warns(UserWarning, match=r"writes in place into its parameters or inputs"):
        out, jv = jvpgraph.jvp(lambda z: z.mul_(2).sin(), (x,), (v,))
    assert torch.equal(x, before)
    torch.testing.assert_close(out, (2 * before).sin())
    torch.testing.assert_close(jv, 2 * (2 * before).cos() * v)


def test_embedding_module_with_max_norm_leaves_its_weight():
    """nn.Embedding(max_norm=...) renormalizes rows of its own weight in place on every forward; jvpgraph
    never writes into a parameter (it warns), and the output is the renormalized lookup."""
    torch.manual_seed(0)
    emb = nn.Embedding(5, 3, max_norm=1.0).double()
    with torch.no_grad():
        emb.weight.mul_(3)
    before = emb.weight.detach().clone()
    idx = torch.tensor([[0, 1], [1, 4]])
    with pytest.warns(UserWarning, match=r"writes in place"):
        traced = jvpgraph.trace(emb, idx)
    out = traced(idx)
    assert torch.equal(emb.weight, before)
    torch.testing.assert_close(out, copy.deepcopy(emb)(idx))  # eager on a copy: the renormalized rows
    assert (out.norm(dim=-1) <= 1 + 1e-12).all()


def test_bn_mode_validated():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="nonsense"):
        jvpgraph.trace(net, x, bn="nonsense")
    with pytest.raises(ValueError, match=r"'batch'.*'frozen'.*'eval'"):
        jvpgraph.jvp(net, (x,), (x,), bn="nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        jvpgraph.linearize(net, x, bn="nonsense")


def test_wrt_must_be_floating_input():
    with pytest.raises(ValueError, match=r"input 1 is not a floating-point"):
        jvpgraph.trace(lambda x, i: x[i], torch.randn(3), torch.tensor([0]), wrt=[1])
    with pytest.raises(ValueError, match=r"input 5"):
        jvpgraph.trace(lambda x: x, torch.randn(3), wrt=[5])


def test_vjp_without_a_recorded_backward_transposes_the_tangent_pass():
    """A forward recorded without autograd still gives Jᵀu: the backward of the (linear) tangent pass."""
    x, u = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    with torch.no_grad():
        lin = jvpgraph.trace(torch.sin, x).linearize(x, vjp=False)
    torch.testing.assert_close(lin.vjp(u), torch.cos(x) * u)


# ------------------------------------------------------------------ rules
@pytest.fixture
def restore_rules(monkeypatch):
    """Every key a test (re)registers is put back by monkeypatch when the test ends."""

    def guard(*ops):
        for op in ops:  # setitem of an absent key is undone by deleting it; RULES.get(op) None == no rule
            monkeypatch.setitem(RULES, op, RULES.get(op))

    return guard


def _broken_shape(ts, out, x):
    return ts[0][..., :1]  # wrong shape


def _broken_dtype(ts, out, x):
    return ts[0].float()


def _broken_arity(ts, out, *a, **k):
    return (ts[0], ts[0])


@pytest.mark.parametrize("broken,what", [(_broken_shape, r"shape \(3, 1\)"), (_broken_dtype, "float32"),
                                         (_broken_arity, r"2 tangents for 1 outputs")],
                         ids=["shape", "dtype", "arity"])
def test_broken_rule_raises_rule_error_naming_the_op(restore_rules, broken, what):
    original = RULES[aten.sigmoid]
    restore_rules(aten.sigmoid)
    defrule(aten.sigmoid, broken, "elementwise", override=True)
    x = torch.randn(3, 4, dtype=D)
    with pytest.raises(jvpgraph.RuleError) as e:
        jvpgraph.trace(lambda x: torch.sigmoid(x) * 2, x)
    msg = str(e.value)
    assert "sigmoid" in msg and re.search(what, msg), msg
    # restored afterwards by monkeypatch (checked in the next test too)
    assert RULES[aten.sigmoid] is not original


def test_registry_restored_after_broken_rule_test():
    x, v = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    _, jv = jvpgraph.jvp(torch.sigmoid, (x,), (v,))
    torch.testing.assert_close(jv, torch.func.jvp(torch.sigmoid, (x,), (v,))[1])


def test_rule_declining_falls_back(restore_rules):
    """A rule that raises NotImplementedError declines: the fallback chain gives the right answer."""
    restore_rules(aten.gelu)

    def declines(ts, out, x, approximate="none"):
        raise NotImplementedError

    defrule(aten.gelu, declines, "elementwise", override=True)
    x, v = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    traced = jvpgraph.trace(torch.nn.functional.gelu, x)
    _, jv = traced.jvp(x, v)
    torch.testing.assert_close(jv, torch.func.jvp(torch.nn.functional.gelu, (x,), (v,))[1], rtol=1e-9, atol=1e-12)
    assert traced.flipped.how["gelu"] in jvpgraph.rules.FALLBACK_KINDS


# A custom op with no autograd formula, no decomposition and no forward AD: nothing can differentiate it.
@torch.library.custom_op("jvpgraph_tests::cube", mutates_args=())
def _cube(x: torch.Tensor) -> torch.Tensor:
    return x * x * x


@_cube.register_fake
def _(x):
    return torch.empty_like(x)


def test_op_without_any_derivative_raises_rule_error():
    op = torch.ops.jvpgraph_tests.cube
    x = torch.randn(3, dtype=D)
    with pytest.raises(jvpgraph.RuleError) as e:
        jvpgraph.trace(lambda x: op(x) + 1, x)
    msg = str(e.value)
    assert "jvpgraph_tests.cube" in msg or "jvpgraph_tests::cube" in msg, msg
    for step in ("decomposition", "flipped-vjp", "forward-ad"):
        assert step in msg, msg  # what each step said
    assert "defjvp" in msg  # what to do


def test_registered_rule_for_custom_op_is_used(restore_rules):
    op = torch.ops.jvpgraph_tests.cube
    x, v = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    restore_rules(op)
    defjvp(op, lambda t, out, x: 3 * x * x * t)
    _, jv = jvpgraph.jvp(lambda x: op(x) + 1, (x,), (v,))
    torch.testing.assert_close(jv, 3 * x * x * v)


def test_uninitialized_tensor_in_the_trace_is_reported(monkeypatch):
    """A C++ composite that fills a tensor by a raw copy (ctc_loss with list lengths, without jvpgraph's
    rewrite) leaves an unfilled ``empty`` in the trace: a warning names the op that reads it."""
    import sys

    import torch.nn.functional as F

    monkeypatch.setattr(sys.modules["jvpgraph.trace"], "_TORCH_REWRITES", {})
    targets = torch.tensor([[1, 2, 3], [2, 2, 1]])
    f = lambda lp: F.ctc_loss(lp.log_softmax(2), targets, [6, 5], [3, 2])  # noqa: E731
    with pytest.warns(UserWarning, match=r"clamp_min.*reads a tensor that the trace created empty"):
        jvpgraph.trace(f, torch.randn(6, 2, 5, dtype=D))


def test_float32_input_to_a_float64_model_says_so():
    """Fake tensors let a float32 input meet float64 weights, so a rule saw mixed dtypes and the error looked
    like a jvpgraph bug; eager PyTorch refuses the call, and the message says that, with what to pass."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError) as eager:
        net(x)
    with pytest.raises(jvpgraph.TraceError) as e:
        jvpgraph.jvp(net, (x,), (x,))
    msg = str(e.value)
    assert "in eager mode too" in msg and str(eager.value).splitlines()[0][:40] in msg, msg
    assert "pass x.to(torch.float64)" in msg and "RuleError" not in msg, msg
    out, jv = jvpgraph.jvp(net, (x.double(),), (x.double(),))  # and what it says to do works
    torch.testing.assert_close(jv, torch.func.jvp(net, (x.double(),), (x.double(),))[1])


@pytest.mark.parametrize("kind", ["dataclass", "dict subclass", "None leaf"])
def test_non_tensor_outputs_say_what_to_do(kind):
    import collections
    import dataclasses

    @dataclasses.dataclass
    class Out:
        y: torch.Tensor

    class OD(collections.OrderedDict):
        pass

    lin = nn.Linear(2, 2)
    wrap = {"dataclass": Out, "dict subclass": lambda y: OD(y=y), "None leaf": lambda y: (y, None)}[kind]
    with pytest.raises(jvpgraph.TraceError) as e:
        jvpgraph.jvp(lambda x: wrap(lin(x)), (torch.randn(3, 2),), (torch.randn(3, 2),))
    msg = str(e.value)
    hint = "register_dataclass" if kind == "dataclass" else "register_pytree_node" if kind == "dict subclass" \
        else "return the tensors alone"
    assert hint in msg and "eager mode too" not in msg, msg


class _DropThenBranch(nn.Module):
    """Dropout, then a branch on the values (MoE routing's habit), then dropout again."""

    def forward(self, x):
        x = F.dropout(x, 0.5, training=True)
        if (x.sum() > -1e9).item():
            x = x * 2
        return F.dropout(x, 0.5, training=True)


class _LayerDrop(nn.Module):
    """OPT's LayerDrop: a draw read only by a Python branch, then dropout."""

    def __init__(self, p):
        super().__init__()
        self.p, self.lin = p, nn.Linear(4, 4)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if torch.rand([]) < self.p:
            return h
        return F.dropout(torch.sin(self.lin(h)), 0.5, training=True)


class _BranchThenInplaceDropout(nn.Module):
    """A branch on values, then dropout on the attention weights the way transformers' eager attention calls it
    inside sdpa's math path (an in-place bernoulli_ below functionalization: the graph is functionalized again
    on the real values)."""

    def forward(self, x):
        if (x.sum() > -1e9).item():
            x = x * 2
        return torch.nn.functional.scaled_dot_product_attention(x[None], x[None], x[None], dropout_p=0.5)[0]


@pytest.mark.parametrize("make", [_DropThenBranch, lambda: _LayerDrop(0.0), lambda: _LayerDrop(0.5),
                                  _BranchThenInplaceDropout],
                         ids=["dropout-then-branch", "layerdrop-0", "layerdrop-0.5", "branch-then-sdpa-dropout"])
def test_traces_on_values_draw_what_eager_draws(make):
    """A trace on real values runs the model: its random draws are on a fork, so the first call after it
    draws what an eager call under the same seed would; an unused draw read only by a branch is kept, so the
    draws after it line up; a branch on a random draw is traced again on every call (it answers only the
    call it was made in). Output and Jv against eager and torch.func.jvp under the same seed, call after
    call."""
    torch.manual_seed(0)
    m = make().double()
    x = torch.randn(4, 4, dtype=D)
    for seed in range(6):
        v = torch.randn_like(x)
        with seeded(seed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, jv = jvpgraph.jvp(m, (x,), (v,))
        with seeded(seed):
            ref_out, ref = torch.func.jvp(m, (x,), (v,))
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(jv, ref, rtol=1e-12, atol=1e-12)


def test_a_second_rule_for_an_op_is_refused_unless_overridden(monkeypatch):
    """Two rules for one op used to leave whichever was imported last, silently."""
    from jvpgraph.rules.registry import RULES, lookup

    monkeypatch.setitem(RULES, aten.sigmoid, RULES[aten.sigmoid])  # restored after the test
    before = lookup(aten.sigmoid.default)
    with pytest.raises(ValueError, match=r"aten\.sigmoid.* has a rule already .*override=True"):
        defjvp(aten.sigmoid, lambda t, out, x: 0 * t)
    assert lookup(aten.sigmoid.default) is before
    defjvp(aten.sigmoid, lambda t, out, x: 0 * t, override=True)
    assert lookup(aten.sigmoid.default) is not before


def test_hessian_products_refuse_a_torch_that_gets_them_wrong():
    """On torch 2.11 the gradient graph jvpgraph flips gives wrong Hv (tanh's, against double-backward): it
    refuses there, saying what to use instead; from 2.14 it answers (tests/test_hessian.py)."""
    from jvpgraph.hessian import _check_torch

    with pytest.raises(RuntimeError, match=r"need torch >= 2\.14: on torch 2\.11\.0\+cpu .*torch\.autograd\.functional\.hvp"):
        _check_torch("2.11.0+cpu")
    _check_torch("2.14.1")
    _check_torch("2.15.0+cu132")
    f, x = (lambda z: z.tanh().pow(2).sum()), torch.randn(3, dtype=D)
    if torch.__version__ < "2.14":
        with pytest.raises(RuntimeError, match="need torch >= 2.14"):
            jvpgraph.hvp(f, x, torch.ones_like(x))
    else:
        hv = jvpgraph.hvp(f, x, torch.ones_like(x))[1]
        torch.testing.assert_close(hv, torch.autograd.functional.hvp(f, x, torch.ones_like(x))[1])
