"""The blockwise attention tangent (jvpgraph.rules.attention): Jv through fused attention one block of query
rows at a time, and its gradient, against torch.func.jvp on PyTorch's math kernel (an independent forward-mode
implementation) and autograd through it; the L x S weights are never made."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import jvpgraph
from jvpgraph.experiments.models import SelfAttention
from jvpgraph.measure import peak_memory
from jvpgraph.rules import attention
from jvpgraph.rules.attention import attention_tangent

D = torch.float64
TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def rn(*shape, dtype=D):
    return torch.randn(*shape, dtype=dtype)


def _math_jvp(f, primals, tangents):
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(f, primals, tangents)


@pytest.fixture
def blockwise(monkeypatch):
    """Every attention takes the blockwise tangent (normally only above EXACT_MAX_SCORES scores)."""
    monkeypatch.setattr(attention, "EXACT_MAX_SCORES", 0)


def _bool_mask(L, S):
    m = torch.rand(L, S, generator=torch.Generator().manual_seed(1)) > 0.3
    m[:, 0] = True  # no row masked everywhere here (see test_fully_masked_rows_get_zero)
    return m


_BOOL_37 = _bool_mask(37, 37)  # made once: a constant of the traced function

# query rows 37 with blocks of 8: a ragged last block; causal with L != S; grouped-query heads; no head dim
CASES = {
    "plain": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), ((2, 3, 37, 8), (2, 3, 37, 8), (2, 3, 37, 8))),
    "causal_rect": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    ((2, 3, 29, 8), (2, 3, 45, 8), (2, 3, 45, 8))),
    "causal_gqa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                   ((2, 4, 37, 8), (2, 2, 37, 8), (2, 2, 37, 8))),
    "scale": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3), ((1, 2, 40, 8),) * 3),
    "bool_mask": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_BOOL_37),
                  ((2, 3, 37, 8),) * 3),
    "padding_mask": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.linspace(-2, 1, 37, dtype=D).expand(2, 1, 1, 37)), ((2, 3, 37, 8),) * 3),
    "three_dims": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), ((3, 37, 8),) * 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_jv_through_the_fused_kernel_equals_forward_mode_on_the_math_kernel(name, blockwise):
    f, shapes = CASES[name]
    torch.manual_seed(0)
    primals = tuple(rn(*s) for s in shapes)
    tangents = tuple(torch.randn_like(p) for p in primals)
    traced = jvpgraph.trace(f, *primals)
    code = traced.flipped.code
    # the blockwise op serves the fused kernel wherever the trace holds it (torch 2.11 records 3-d inputs by the
    # math kernel's ops: no fused kernel, no op; 2.14 fuses every case here)
    fused = "_scaled_dot_product_flash_attention_for_cpu" in code
    assert ("jvpgraph.attention_tangent" in code) == fused and (fused or TORCH < (2, 14))
    assert "[True, False]" in code or not fused  # nothing reads the logsumexp's tangent: switched off
    out, jv = traced.jvp(primals, tangents)
    ref_out, ref = _math_jvp(f, primals, tangents)
    assert ref.norm() > 0
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jv, ref, rtol=1e-11, atol=1e-12)


def test_short_attention_keeps_the_written_exact_rule():
    """Below EXACT_MAX_SCORES the tangent is the written rule's (no loop); above it, blockwise."""
    f, shapes = CASES["plain"]
    primals = tuple(rn(*s) for s in shapes)
    assert "attention_tangent" not in jvpgraph.trace(f, *primals).flipped.code
    q = rn(1, 4, 256, 16)
    assert attention.use_blockwise(q, q) and not attention.use_blockwise(q[..., :128, :], q[..., :128, :])


OP_CASES = {
    "none": dict(),
    "causal": dict(is_causal=True),
    "causal_rect": dict(is_causal=True, L=30, S=47),
    "float_mask_and_its_tangent": dict(mask=(2, 1, 33, 33), t_mask=True),
    "padding_mask_and_its_tangent": dict(mask=(2, 1, 1, 33), t_mask=True),
    "bool_mask": dict(mask="bool"),
    "value_tangent_only": dict(only_v=True),
}


def _op_inputs(spec):
    torch.manual_seed(0)
    L, S = spec.get("L", 33), spec.get("S", 33)
    leaf = lambda *s: rn(*s).requires_grad_()  # noqa: E731
    q, k, v = leaf(2, 3, L, 8), leaf(2, 3, S, 8), leaf(2, 3, S, 5)
    tq, tk, tv = (None, None, leaf(2, 3, S, 5)) if spec.get("only_v") else (leaf(2, 3, L, 8), leaf(2, 3, S, 8),
                                                                              leaf(2, 3, S, 5))
    mask = t_mask = None
    if spec.get("mask") == "bool":
        mask = _bool_mask(L, S)
    elif spec.get("mask"):
        mask = leaf(*spec["mask"])
        t_mask = leaf(*spec["mask"]) if spec.get("t_mask") else None
    return q, k, v, tq, tk, tv, t_mask, mask, spec.get("is_causal", False)


def _reference(q, k, v, tq, tk, tv, t_mask, mask, is_causal):
    """(dy, d logsumexp) by torch.func.jvp of the math kernel and of an explicit logsumexp of the scores."""
    L, S = q.shape[-2], k.shape[-2]

    def f(q, k, v, m):
        s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if is_causal:
            s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
        if m is not None:
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal), s.logsumexp(-1)

    zeros = lambda t, like: torch.zeros_like(like) if t is None else t  # noqa: E731
    if t_mask is not None:
        return _math_jvp(f, (q, k, v, mask), (zeros(tq, q), zeros(tk, k), tv, t_mask))[1]
    return _math_jvp(lambda q, k, v: f(q, k, v, mask), (q, k, v), (zeros(tq, q), zeros(tk, k), tv))[1]


@pytest.mark.parametrize("name", list(OP_CASES))
def test_the_op_and_its_gradient_equal_autograd_through_forward_mode(name):
    """``(dy, d logsumexp)`` in blocks of 8 rows, and the gradient of ``<u, dy> + <w, d lse>`` in every input
    that has one (q, k, v, their tangents, a float mask and its tangent) — the regularizer's backward through
    Jv — against autograd through torch.func.jvp of the math kernel."""
    q, k, v, tq, tk, tv, t_mask, mask, is_causal = _op_inputs(OP_CASES[name])
    ty, t_lse = attention_tangent(q, k, v, tq, tk, tv, t_mask, mask, is_causal, None, 8, [True, True])
    ref_ty, ref_lse = _reference(q, k, v, tq, tk, tv, t_mask, mask, is_causal)
    torch.testing.assert_close(ty, ref_ty, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(t_lse, ref_lse, rtol=1e-11, atol=1e-12)
    u, w = torch.randn_like(ty), torch.randn_like(t_lse)
    leaves = [t for t in (q, k, v, tq, tk, tv, t_mask, mask) if t is not None and t.requires_grad]
    got = torch.autograd.grad((ty * u).sum() + (t_lse * w).sum(), leaves)
    want = torch.autograd.grad((ref_ty * u).sum() + (ref_lse * w).sum(), leaves)
    # every gradient is nonzero but v's when only v has a tangent (dy = P dV does not read v)
    assert all(r.norm() > 0 for r, t in zip(want, leaves) if not (name == "value_tangent_only" and t is v))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_an_output_switched_off_is_zeros_and_the_other_unchanged():
    q, k, v, tq, tk, tv, _, _, _ = _op_inputs({"is_causal": True})
    ty, t_lse = attention_tangent(q, k, v, tq, tk, tv, None, None, True, None, 8, [True, True])
    ty_only, zeros = attention_tangent(q, k, v, tq, tk, tv, None, None, True, None, 8, [True, False])
    assert torch.equal(ty_only, ty) and not zeros.any() and t_lse.abs().sum() > 0


def test_fully_masked_rows_get_zero():
    """A query row masked everywhere has weight 0 in the kernels (not softmax's NaN): its tangent is 0, every
    other row is forward mode's, and the gradients stay finite."""
    q, k, v, tq, tk, tv, _, _, _ = _op_inputs({})
    mask = _bool_mask(33, 33)
    mask[5] = False
    ty, t_lse = attention_tangent(q, k, v, tq, tk, tv, None, mask, False, None, 8, [True, True])
    assert torch.equal(ty[..., 5, :], torch.zeros_like(ty[..., 5, :])) and not t_lse[..., 5].any()
    ref_ty = _math_jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v),
                       (tq, tk, tv))[1]
    keep = torch.arange(33) != 5
    torch.testing.assert_close(ty[..., keep, :], ref_ty[..., keep, :], rtol=1e-11, atol=1e-12)
    grads = torch.autograd.grad(ty.sum() + t_lse.sum(), (q, k, v, tq, tk, tv))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("causal", [False, True])
def test_training_through_jv_of_a_long_attention(causal, blockwise):
    """The spectral regularizer's gradient ``∂θ <u, Jv>`` through the emitted graph (the blockwise op's
    backward) equals autograd through torch.func.jvp on the math kernel."""
    torch.manual_seed(0)
    layer = SelfAttention(width=16, causal=causal).double()
    x, v = rn(2, 41, 16), rn(2, 41, 16)
    traced = jvpgraph.trace(layer, x)
    assert "jvpgraph.attention_tangent" in traced.flipped.code
    _, jv = traced.jvp(x, v)
    u = torch.randn_like(jv)
    params = [layer.qkv.weight, layer.qkv.bias, layer.out.weight]  # (Jv does not read the output's bias)
    got = torch.autograd.grad((u * jv).sum(), params)
    want = torch.autograd.grad((u * _math_jvp(layer, (x,), (v,))[1]).sum(), params)
    for g, r in zip(got, want):
        assert r.norm() > 0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_the_attention_weights_are_never_held():
    """At L = 2048 (4 heads) the blockwise Jv's working memory (tensor storage created and alive at once,
    jvpgraph.measure, which counts inside the op) stays under a quarter of the attention weights' 64 MB; the
    written rule, forced, holds more than the weights (so the check can fail)."""
    torch.manual_seed(0)
    layer = SelfAttention(width=16)
    x, v = rn(1, 2048, 16, dtype=torch.float32), rn(1, 2048, 16, dtype=torch.float32)
    weights = 4 * 2048 * 2048 * 4
    traced = jvpgraph.trace(layer, x)
    traced.jvp(x, v)
    assert peak_memory(lambda: traced.jvp(x, v)) < weights / 4
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "EXACT_MAX_SCORES", 1 << 40)
        exact = jvpgraph.trace(lambda x: layer(x), x)
        exact.jvp(x, v)
        assert "attention_tangent" not in exact.flipped.code
        assert peak_memory(lambda: exact.jvp(x, v)) > weights


def test_a_second_derivative_through_the_blockwise_tangent_is_refused_clearly():
    q, k, v, tq, tk, tv, _, _, _ = _op_inputs({})
    ty, _ = attention_tangent(q, k, v, tq, tk, tv, None, None, False, None, 8, [True, True])
    (gq,) = torch.autograd.grad(ty.pow(2).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivative through Jv of a long attention"):
        torch.autograd.grad(gq.sum(), q)


def test_sequence_lengths_on_both_sides_of_the_threshold():
    """A symbolic sequence length: lengths below EXACT_MAX_SCORES (the written rule) and above it (blockwise)
    through one traced layer, each equal to forward mode on the math kernel at that length."""
    torch.manual_seed(0)
    layer = SelfAttention(width=16, causal=True).double()
    traced = jvpgraph.trace(layer, rn(2, 100, 16))
    paths = set()
    for L in (100, 140, 120, 200, 60, 131):
        x, v = rn(2, L, 16), rn(2, L, 16)
        _, jv = traced.jvp(x, v)
        torch.testing.assert_close(jv, _math_jvp(layer, (x,), (v,))[1], rtol=1e-11, atol=1e-12)
        paths.add("jvpgraph.attention_tangent" in traced._compiled_for((x,)).flipped.code)
    assert paths == {True, False}, traced.explain()


@pytest.mark.skipif(TORCH < (2, 14), reason="torch 2.11's inductor runs the flash kernel's own backward with a "
                    "float32 logsumexp against float64 values (PyTorch's, not the blockwise op's)")
def test_compiled_jv_through_the_blockwise_op(blockwise):
    """``trace(..., compile=True)``: torch.compile runs the emitted graph with the op (its fake shapes) and
    gives the eager Jv; the regularizer-style gradient through it too."""
    torch.manual_seed(0)
    layer = SelfAttention(width=16).double()
    x, v = rn(2, 41, 16), rn(2, 41, 16)
    eager, compiled = jvpgraph.trace(layer, x), jvpgraph.trace(layer, x, compile=True)
    _, jv = eager.jvp(x, v)
    _, jv_c = compiled.jvp(x, v)
    assert "jvpgraph.attention_tangent" in compiled.flipped.code
    torch.testing.assert_close(jv_c, jv, rtol=1e-12, atol=1e-12)
    w = layer.qkv.weight
    (g,), (g_c,) = torch.autograd.grad(jv.pow(2).sum(), w), torch.autograd.grad(jv_c.pow(2).sum(), w)
    torch.testing.assert_close(g_c, g, rtol=1e-10, atol=1e-12)


def test_opcheck():
    """PyTorch's own checks of a custom op: schema, fake kernel (shapes and strides), autograd registration,
    AOT dispatch — for the tangent op (its backward exercised through autograd) on non-contiguous inputs."""
    torch.manual_seed(0)
    q, k, v, tq, tk, tv = (rn(2, 5, 3, 8).transpose(1, 2).requires_grad_() for _ in range(6))  # strided, as
    torch.library.opcheck(attention_tangent, (q, k, v, tq, tk, tv, None, None, True, None, 2, [True, True]))
