"""The written local Jacobians, each registered beside its op (the paper's Tables 2-4 and more).

Conventions: ``t`` is the tangent of the argument the edge leaves from, ``out`` the op's primal output,
then the op's own arguments. Derivative factors are computed from primal values only (``x``, ``out``)
and multiplied into ``t`` last, so that a recorded forward can keep them and a tangent pass costs one
multiply per elementwise op.
"""

from __future__ import annotations

import math

import torch

from ..ops import norm_stats
from . import attention
from .registry import (NAMESPACE_RULES, RuleError, WithPrimal, _zeros_if_none, add_tangents, defjvp, deflinear,
                       defrule)

aten = torch.ops.aten


def _expand(t, out):
    """Broadcast a tangent to the output's shape (an argument smaller than the output)."""
    if t is None or t.shape == out.shape:
        return t
    return t.expand(out.shape)


def _reduce_to(t, like):
    """Sum a broadcast tangent down to ``like``'s shape (used by bias-like edges)."""
    if t.shape == like.shape:
        return t
    return t.sum_to_size(like.shape)


def _zero(*_a, **_k):
    return None


# ------------------------------------------------------------------ ops whose output has no tangent
defrule(
    [
        aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like, aten.randn_like,
        aten.randint_like, aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full,
        aten.bernoulli, aten.detach, aten.sign, aten.round, aten.floor, aten.ceil, aten.trunc,
        aten.eq, aten.ne, aten.lt, aten.gt, aten.le, aten.ge, aten.logical_and, aten.logical_or,
        aten.logical_not, aten.logical_xor, aten.argmax, aten.argmin, aten.isnan, aten.isinf,
        aten.bitwise_and, aten.bitwise_or, aten.bitwise_not, aten.fill.Scalar, aten.zero, aten.scalar_tensor,
        aten.lift_fresh_copy, aten.argsort, aten.floor_divide,
        aten.empty_strided, aten.isfinite, aten.signbit,
    ],
    lambda tangents, out, *a, **k: None,
    "structural",
)

# ------------------------------------------------------------------ linear ops (Tables 2-4: bias off)
deflinear(
    [
        aten.reshape, aten.expand, aten.expand_copy,
        aten.permute, aten.permute_copy, aten.transpose, aten.transpose_copy, aten.t, aten.t_copy,
        aten.squeeze, aten.squeeze_copy, aten.unsqueeze, aten.unsqueeze_copy, aten.select, aten.select_copy,
        aten.slice, aten.slice_copy, aten.clone, aten.alias, aten.alias_copy, aten.contiguous,
        aten.repeat, aten.split, aten.split_with_sizes, aten.unbind, aten.unbind_copy, aten.split_copy,
        aten.split_with_sizes_copy, aten.chunk, aten.narrow, aten.unfold, aten.unfold_copy, aten.roll,
        aten.flip, aten.diagonal, aten.diagonal_copy, aten.index_select,
        aten.gather, aten.index, aten.sum, aten.mean, aten.cumsum, aten.neg, aten.avg_pool1d,
        aten.avg_pool2d, aten.avg_pool3d, aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d,
        aten.adaptive_avg_pool1d, aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
        aten.upsample_bilinear2d, aten.upsample_linear1d, aten.upsample_trilinear3d, aten.upsample_bicubic2d,
        aten._upsample_nearest_exact2d, aten.pixel_shuffle, aten.pixel_unshuffle, aten.movedim,
        aten.channel_shuffle, aten.native_channel_shuffle, aten.trace, aten.tril, aten.triu,
        aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d, aten.replication_pad1d,
        aten.replication_pad2d, aten.replication_pad3d, aten.im2col, aten.col2im, aten.view_as_real,
        aten.view_as_complex, aten.squeeze_copy, aten.flatten, aten.real, aten.imag, aten.conj,
        aten._conj, aten.resolve_conj, aten.resolve_neg, aten.lift_fresh, aten.mul.Scalar, aten.div.Scalar,
        aten.expand_as, aten.tile, aten.repeat_interleave.self_int, aten.embedding,
        aten.unsafe_split, aten.unsafe_split_with_sizes, aten.unsafe_chunk,
    ]
)
defrule([aten.add.Scalar, aten.sub.Scalar], lambda ts, out, x, other, alpha=1: ts[0], "linear")  # + constant
deflinear([aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter,
           aten.copy], argnums=(0, 1))
deflinear([aten.index_put], argnums=(0, 2))
deflinear([aten.scatter.src, aten.scatter_add, aten.index_add], argnums=(0, 3))


deflinear([aten.as_strided_scatter], argnums=(0, 1))
# linear in the values: the tangent goes through the same kernel, so where two windows chose the same input
# the tangent is written by the same winner as the value (a decomposition through index_put need not be)
deflinear([aten.max_unpool2d, aten.max_unpool3d], argnums=(0,))
# max_norm's in-place renorm of an embedding table is invisible to autograd: the weight's tangent goes on as is
defrule(aten.embedding_renorm, lambda ts, out, w, *args: ts[0], "linear")
deflinear([aten._unsafe_masked_index_put_accumulate], argnums=(0, 3))


# Backward kernels that appear in a gradient's graph (jvpgraph.hvp), linear in the incoming gradient and
# piecewise constant in the input (a mask, chosen indices, or only its shape): the tangent is the kernel on
# the gradient's tangent, and the input's tangent contributes nothing (almost everywhere). PyTorch gives them no
# derivative, so the theorem's fallback had no route (found by the second-order OpInfo sweep).
def _backward_linear_in_grad(op):
    def fn(ts, out, grad, *args, **kwargs):
        return op(_zeros_if_none(ts[0], grad), *args, **kwargs)
    return fn


for _op in [aten.softshrink_backward, aten.hardshrink_backward, aten.replication_pad1d_backward,
            aten.replication_pad2d_backward, aten.replication_pad3d_backward,
            aten.fractional_max_pool2d_backward, aten.fractional_max_pool3d_backward,
            aten.multilabel_margin_loss_backward]:
    defrule(_op.default, _backward_linear_in_grad(_op.default), "mask")


def _multi_margin_loss_backward(ts, out, grad, x, target, p, margin, weight=None, reduction=1):
    if p != 1:  # p = 2: the derivative moves with x (no rule here: the fallback's error names the op)
        raise NotImplementedError("multi_margin_loss_backward with p = 2 depends on x")
    return aten.multi_margin_loss_backward(_zeros_if_none(ts[0], grad), x, target, p, margin, weight, reduction)


defrule(aten.multi_margin_loss_backward.default, _multi_margin_loss_backward, "mask")


def _scatter_prod_tangent(x, tx, dim, index, src, tsrc, include_self):
    """Tangent of ``scatter_reduce(x, dim, index, src, "prod", include_self)``.

    Each output is a product over the elements ``E`` scattered into it (``x``'s own entry when
    ``include_self``); its tangent is ``sum_e t_e prod_{e' != e} e'``. Zeros are kept exact, without dividing
    by them: with no zero in ``E`` it is ``P * sum_e t_e / e``; with one zero, ``P * t_zero`` where ``P`` is
    the product of the non-zero elements; with two or more, 0.
    """
    src = src[tuple(slice(0, n) for n in index.shape)]  # only the part of src that index covers is read
    tsrc = torch.zeros_like(src) if tsrc is None else tsrc[tuple(slice(0, n) for n in index.shape)]
    tx = torch.zeros_like(x) if tx is None else tx
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    x_zero, s_zero = x == 0, src == 0
    xs, ss = torch.where(x_zero, 1.0, x), torch.where(s_zero, 1.0, src)
    base = (lambda own: own) if include_self else (lambda own: torch.zeros_like(own))
    n_zero = base(x_zero.to(x.dtype)).scatter_add(dim, index, s_zero.to(x.dtype))
    prod = (xs if include_self else one).scatter_reduce(dim, index, ss, "prod", include_self=True)
    ratio = base(torch.where(x_zero, zero, tx / xs)).scatter_add(dim, index, torch.where(s_zero, 0.0, tsrc / ss))
    at_zero = base(torch.where(x_zero, tx, zero)).scatter_add(dim, index, torch.where(s_zero, tsrc, 0.0))
    t = torch.where(n_zero == 0, prod * ratio, torch.where(n_zero == 1, prod * at_zero, zero))
    if not include_self:  # positions no index points at keep x (and its tangent)
        hit = zero.scatter_add(dim, index, torch.ones_like(src)) > 0
        t = torch.where(hit, t, tx)
    return t


def _scatter_reduce(ts, out, x, dim, index, src, reduce, include_self=True):
    if reduce == "prod":
        return _scatter_prod_tangent(x, ts[0], dim, index, src, ts[3], include_self)
    if reduce not in ("sum", "mean"):
        raise NotImplementedError(f"scatter_reduce({reduce!r}) is not linear")  # amax/amin: fallback
    tx = ts[0] if ts[0] is not None else torch.zeros_like(x)
    tsrc = ts[3] if ts[3] is not None else torch.zeros_like(src)
    return aten.scatter_reduce.two(tx, dim, index, tsrc, reduce, include_self=include_self)


def _scatter_with_reduce(ts, out, x, dim, index, src, *, reduce):
    # the legacy scatter(..., reduce="add"|"multiply"): include_self, only index's part of src is read
    if reduce == "multiply":
        return _scatter_prod_tangent(x, ts[0], dim, index, src, ts[3], True)
    tx = ts[0] if ts[0] is not None else torch.zeros_like(x)
    tsrc = torch.zeros_like(src) if ts[3] is None else ts[3]
    return aten.scatter.reduce(tx, dim, index, tsrc, reduce="add")


def _scatter_value_reduce(ts, out, x, dim, index, value, *, reduce):
    # x[index] *= value (a constant scalar) or x[index] += value
    return aten.scatter.value_reduce(ts[0], dim, index, value, reduce="multiply") if reduce == "multiply" else ts[0]


def _index_reduce(ts, out, x, dim, index, source, reduce, *, include_self=True):
    if reduce != "prod":
        raise NotImplementedError(f"index_reduce({reduce!r}): use the fallback")  # mean/amax/amin
    dim = dim % max(x.dim(), 1)
    shape = [1] * source.dim()
    if source.dim():
        shape[dim] = -1
    idx = index.reshape(shape).expand(source.shape)  # the same reduction, written as a scatter
    return _scatter_prod_tangent(x, ts[0], dim, idx, source, ts[3], include_self)


defrule(aten.scatter_reduce.two, _scatter_reduce, "linear")
defrule(aten.scatter.reduce, _scatter_with_reduce, "linear")
defrule(aten.scatter.value_reduce, _scatter_value_reduce, "linear")
defrule(aten.index_reduce, _index_reduce, "linear")


# A tangent need not have its primal's strides (a rule may return a contiguous result where the primal
# was a transposed view), so views of tangents go through reshape, which copies only when it must.
defrule([aten.view, aten._unsafe_view, aten.view_copy], lambda ts, out, x, size: ts[0].reshape(size), "linear")


defrule(aten.fill.Tensor, lambda ts, out, x, value: None if ts[1] is None else ts[1].expand(out.shape).clone(),
        "linear")


def _to_copy(tangents, out, x, *args, **kwargs):
    if not (out.is_floating_point() or out.is_complex()):
        return None
    return aten._to_copy(tangents[0], *args, **kwargs)


defrule([aten._to_copy], _to_copy, "linear")
defrule([aten.constant_pad_nd],
        lambda ts, out, x, pad, value=0: aten.constant_pad_nd(ts[0], pad, 0.0), "linear")
defrule([aten.scatter.value],
        lambda ts, out, x, dim, index, value: aten.scatter(ts[0], dim, index, 0.0), "linear")
defrule([aten.masked_fill.Scalar],
        lambda ts, out, x, mask, value: aten.masked_fill(ts[0], mask, 0.0), "linear")
defrule([aten.masked_fill.Tensor],
        lambda ts, out, x, mask, value: torch.where(
            mask, _expand(ts[2], out) if ts[2] is not None else torch.zeros_like(out),
            ts[0] if ts[0] is not None else torch.zeros_like(out)).expand(out.shape),
        "linear")


def _add(ts, out, x, y, alpha=1):
    tx, ty = ts[0], ts[1] if len(ts) > 1 else None
    if ty is not None and alpha != 1:
        ty = ty * alpha
    return _expand(add_tangents(_expand(tx, out), _expand(ty, out)), out)


def _sub(ts, out, x, y, alpha=1):
    ty = ts[1] if len(ts) > 1 else None
    return _add((ts[0], None if ty is None else -ty), out, x, y, alpha)


def _rsub(ts, out, x, y, alpha=1):  # y - alpha * x
    tx, ty = ts[0], ts[1] if len(ts) > 1 else None
    return _add((ty, None if tx is None else -tx), out, y, x, alpha)


defrule([aten.add.Tensor], _add, "linear")
defrule([aten.sub.Tensor], _sub, "linear")
defrule([aten.rsub.Tensor], _rsub, "linear")
defrule([aten.rsub.Scalar], lambda ts, out, x, y, alpha=1: -alpha * ts[0], "linear")


def _cat(ts, out, tensors, dim=0):
    parts = [t if t is not None else torch.zeros_like(x) for t, x in zip(ts[0], tensors)]
    return aten.cat(parts, dim)


def _stack(ts, out, tensors, dim=0):
    parts = [t if t is not None else torch.zeros_like(x) for t, x in zip(ts[0], tensors)]
    return aten.stack(parts, dim)


defrule([aten.cat], _cat, "linear")
defrule([aten.stack], _stack, "linear")


def _where(ts, out, cond, x, y):
    tx = ts[1] if ts[1] is not None else torch.zeros((), dtype=out.dtype, device=out.device)
    ty = ts[2] if ts[2] is not None else torch.zeros((), dtype=out.dtype, device=out.device)
    return _expand(torch.where(cond, tx, ty), out)


defrule([aten.where.self], _where, "linear")

# ------------------------------------------------------------------ bilinear ops
defjvp(aten.mul.Tensor, lambda t, out, x, y: _expand(t * y, out), lambda t, out, x, y: _expand(x * t, out),
       kind="bilinear")
defjvp(aten.mm, lambda t, out, a, b: t @ b, lambda t, out, a, b: a @ t, kind="bilinear")
defjvp(aten.bmm, lambda t, out, a, b: torch.bmm(t, b), lambda t, out, a, b: torch.bmm(a, t), kind="bilinear")
defjvp(aten.mv, lambda t, out, a, b: aten.mv(t, b), lambda t, out, a, b: aten.mv(a, t), kind="bilinear")
defjvp(aten.dot, lambda t, out, a, b: aten.dot(t, b), lambda t, out, a, b: aten.dot(a, t), kind="bilinear")
defjvp(
    aten.addmm,
    lambda t, out, bias, a, b, beta=1, alpha=1: _expand(t * beta, out),
    lambda t, out, bias, a, b, beta=1, alpha=1: aten.mm(t, b) * alpha if alpha != 1 else aten.mm(t, b),
    lambda t, out, bias, a, b, beta=1, alpha=1: aten.mm(a, t) * alpha if alpha != 1 else aten.mm(a, t),
    kind="bilinear",
)
defjvp(
    aten.baddbmm,
    lambda t, out, bias, a, b, beta=1, alpha=1: _expand(t * beta, out),
    lambda t, out, bias, a, b, beta=1, alpha=1: torch.bmm(t, b) * alpha,
    lambda t, out, bias, a, b, beta=1, alpha=1: torch.bmm(a, t) * alpha,
    kind="bilinear",
)


def _conv_edge(which):
    def edge(t, out, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
        if which == 0:
            return aten.convolution(t, w, None, stride, padding, dilation, transposed, output_padding, groups)
        if which == 1:
            return aten.convolution(x, t, None, stride, padding, dilation, transposed, output_padding, groups)
        shape = [1, -1] + [1] * (out.dim() - 2)
        return _expand(t.view(shape), out)

    return edge


defjvp(aten.convolution, _conv_edge(0), _conv_edge(1), _conv_edge(2), kind="bilinear")


def _div(ts, out, x, y, rounding_mode=None):
    if rounding_mode is not None:
        return None  # piecewise constant
    tx, ty = ts[0], ts[1] if len(ts) > 1 else None
    parts = []
    if tx is not None:
        parts.append(_expand(tx / y, out))
    if ty is not None:
        parts.append(_expand(-ty * (out / y), out))
    return add_tangents(*parts)


defrule([aten.div.Tensor], _div, "elementwise")
defrule([aten.div.Tensor_mode], lambda ts, out, x, y, rounding_mode=None: _div(ts, out, x, y, rounding_mode),
        "elementwise")
defrule([aten.div.Scalar_mode],
        lambda ts, out, x, y, rounding_mode=None: None if rounding_mode else ts[0] / y, "linear")

# ------------------------------------------------------------------ elementwise: f'(x) * t


def _real_dot(x, t):
    """``x * t`` for real tensors; ``Re(conj(x) t)`` for complex ones -- the tangent of a real quantity such
    as ``|x|`` or ``|x|²/2`` along ``t`` (what PyTorch's forward AD gives)."""
    return (x.conj() * t).real if x.is_complex() or t.is_complex() else x * t


def _unary(op, deriv, kind="elementwise"):
    """Register ``f'(x, out) * t`` for a unary op; ``deriv(out, x, *args, **kwargs)``."""
    defjvp(op, lambda t, out, x, *a, **k: deriv(out, x, *a, **k) * t, kind=kind)


def _gelu_d(out, x, approximate="none"):
    # GELU's own backward kernel at a unit gradient: f'(x) in one fused pass (written out with erf and exp it
    # was seven elementwise passes, 5x the cost of the GELU itself on the CPU here)
    one = torch.ones((), dtype=x.dtype, device=x.device).expand(x.shape)  # a broadcast 1: no fill pass
    return aten.gelu_backward(one, x, approximate=approximate)


def _silu_d(out, x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _mish_d(out, x):
    tsp = torch.tanh(torch.nn.functional.softplus(x))
    return tsp + x * torch.sigmoid(x) * (1 - tsp * tsp)


def _elu_d(out, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return torch.where(x > 0, torch.full_like(x, scale), input_scale * (out + scale * alpha))


def _softplus_d(out, x, beta=1.0, threshold=20.0):
    return torch.where(x * beta > threshold, torch.ones_like(x), torch.sigmoid(x * beta))


def _hardswish_d(out, x):
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x <= 3, x / 3 + 0.5, torch.ones_like(x)))


def _mask(cond, like):
    return cond.to(like.dtype)


# Elementwise ops have a diagonal local Jacobian, so J = Jᵀ: the flipped edge is the op's own backward
# kernel applied to the tangent (one fused kernel, nothing extra to compute or keep in the forward).
# (With complex tensors the backward kernels multiply by the conjugate derivative: given the conjugate
# output, they multiply by the derivative itself -- conj() of a real tensor is the tensor.)
defjvp(aten.sigmoid, lambda t, out, x: aten.sigmoid_backward(t, out.conj()))
defjvp(aten.tanh, lambda t, out, x: aten.tanh_backward(t, out.conj()))
defjvp(aten.relu, lambda t, out, x: aten.threshold_backward(t, out, 0), kind="mask")
defjvp(aten.threshold, lambda t, out, x, thr, value: aten.threshold_backward(t, x, thr), kind="mask")
defjvp(aten.hardtanh, lambda t, out, x, lo=-1.0, hi=1.0: aten.hardtanh_backward(t, x, lo, hi), kind="mask")
defjvp(aten.leaky_relu, lambda t, out, x, slope=0.01: aten.leaky_relu_backward(t, x, slope, False), kind="mask")
_unary(aten.gelu, _gelu_d)
_unary(aten.silu, _silu_d)
_unary(aten.mish, _mish_d)
_unary(aten.elu, _elu_d)
_unary(aten.softplus, _softplus_d)
_unary(aten.hardswish, _hardswish_d)
_unary(aten.hardsigmoid, lambda out, x: _mask((x > -3) & (x < 3), x) / 6)
_unary(aten.exp, lambda out, x: out)
_unary(aten.exp2, lambda out, x: out * math.log(2.0))
_unary(aten.expm1, lambda out, x: out + 1)
_unary(aten.log, lambda out, x: 1 / x)
_unary(aten.log2, lambda out, x: 1 / (x * math.log(2.0)))
_unary(aten.log10, lambda out, x: 1 / (x * math.log(10.0)))
_unary(aten.log1p, lambda out, x: 1 / (1 + x))
_unary(aten.sqrt, lambda out, x: 0.5 / out)
_unary(aten.rsqrt, lambda out, x: -0.5 * out * out * out)
_unary(aten.reciprocal, lambda out, x: -out * out)
_unary(aten.sin, lambda out, x: torch.cos(x))
_unary(aten.cos, lambda out, x: -torch.sin(x))
_unary(aten.tan, lambda out, x: 1 + out * out)
_unary(aten.sinh, lambda out, x: torch.cosh(x))
_unary(aten.cosh, lambda out, x: torch.sinh(x))
_unary(aten.atan, lambda out, x: 1 / (1 + x * x))
_unary(aten.asin, lambda out, x: torch.rsqrt(1 - x * x))
_unary(aten.acos, lambda out, x: -torch.rsqrt(1 - x * x))
_unary(aten.erf, lambda out, x: (2 / math.sqrt(math.pi)) * torch.exp(-x * x))
defjvp(aten.abs, lambda t, out, x: _real_dot(torch.sgn(x), t), kind="mask")
_unary(aten.square, lambda out, x: 2 * x)
_unary(aten.clamp_min, lambda out, x, lo: _mask(x >= lo, x), kind="mask")
_unary(aten.clamp_max, lambda out, x, hi: _mask(x <= hi, x), kind="mask")


def _clamp_d(out, x, lo=None, hi=None):
    keep = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        keep = keep & (x >= lo)
    if hi is not None:
        keep = keep & (x <= hi)
    return _mask(keep, x)


defjvp(aten.clamp.default, lambda t, out, x, lo=None, hi=None: _clamp_d(out, x, lo, hi) * t, kind="mask")


def _log_sigmoid_forward(ts, out, x):
    # the second output is the buffer the backward reads: exp(-|x|) on the CPU (empty elsewhere). It is a
    # function of x like the first: log_sigmoid_backward's decomposition computes the derivative from it, so
    # without its tangent a gradient graph's Hv through logsigmoid came out 0 (the second-order OpInfo sweep)
    buffer = out[1]
    t_buffer = -torch.sign(x) * buffer * ts[0] if buffer.numel() == x.numel() else None
    return torch.sigmoid(-x) * ts[0], t_buffer


defrule(aten.log_sigmoid_forward, _log_sigmoid_forward, "elementwise")


def _pow_ts(ts, out, x, e):
    if e == 0:
        return None
    return (e * torch.pow(x, e - 1)) * ts[0]


defrule(aten.pow.Tensor_Scalar, _pow_ts, "elementwise")
defjvp(aten.pow.Tensor_Tensor,
       lambda t, out, x, e: _expand(torch.where(e == 0, torch.zeros_like(out), e * torch.pow(x, e - 1)) * t, out),
       lambda t, out, x, e: _expand(out * torch.log(x) * t, out))
defjvp(aten.pow.Scalar, None, lambda t, out, base, e: out * math.log(base) * t if base > 0 else out * 0 * t)


def _minmax(pick_first):
    def fn(ts, out, x, y):
        tx = ts[0] if ts[0] is not None else torch.zeros((), dtype=out.dtype, device=out.device)
        ty = ts[1] if ts[1] is not None else torch.zeros((), dtype=out.dtype, device=out.device)
        first = (x > y) if pick_first else (x < y)
        second = (x < y) if pick_first else (x > y)
        return _expand(torch.where(first, tx, torch.where(second, ty, (tx + ty) / 2)), out)

    return fn


defrule(aten.maximum, _minmax(True), "mask")
defrule(aten.minimum, _minmax(False), "mask")

# ------------------------------------------------------------------ softmax family
def _softmax(t, out, x, dim, half_to_float):
    """``out * (t - sum(out * t))``: softmax's Jacobian is symmetric, so this is its backward kernel (fused)."""
    if half_to_float or t.dtype != out.dtype:
        t = t.to(out.dtype)
        return out * (t - (out * t).sum(dim, keepdim=True))
    return aten._softmax_backward_data(t, out, dim, x.dtype)


defjvp(aten._softmax, _softmax, kind="coupled")
defjvp(aten._log_softmax, lambda t, out, x, dim, half: t - (torch.exp(out) * t).sum(dim, keepdim=True),
       kind="coupled")
# softmax whose fully masked rows (all -inf) give 0 instead of NaN (attention's math path): there out = 0
defjvp(aten._safe_softmax,
       lambda t, out, x, dim, dtype=None: out * (t.to(out.dtype) - (out * t.to(out.dtype)).sum(dim, keepdim=True)),
       kind="coupled")



def _logcumsumexp(t, out, x, dim):
    # t_i = sum_{j<=i} exp(x_j - y_i) t_j, with the positive and negative parts of t summed in log space so
    # that neither exp(x) nor exp(-y) overflows however wide x ranges
    if x.is_complex():  # no sign to split by: shift by the largest real part instead
        m = x.real.amax(dim, keepdim=True)
        return torch.cumsum(torch.exp(x - m) * t, dim) * torch.exp(m - out)
    pos = torch.logcumsumexp(x + torch.log(t.clamp(min=0)), dim)
    neg = torch.logcumsumexp(x + torch.log((-t).clamp(min=0)), dim)
    return torch.exp(pos - out) - torch.exp(neg - out)


defjvp(aten.logcumsumexp, _logcumsumexp, kind="coupled")

# ------------------------------------------------------------------ reductions with a selected element
def _select_reduce(ts, out, x, dim, keepdim=False):
    values, idx = out
    t = ts[0]
    i = idx if keepdim else idx.unsqueeze(dim)
    tv = t.gather(dim, i)
    return (tv if keepdim else tv.squeeze(dim)), None


defrule([aten.max.dim, aten.min.dim], _select_reduce, "mask")


def _pool_with_indices(ndim):
    def fn(ts, out, x, *args):
        y, idx = out
        t = ts[0].flatten(-ndim)
        return t.gather(-1, idx.flatten(-ndim)).view(y.shape), None

    return fn


# Table 4: max-pool's forward mode reads the tangent at the forward's argmax indices.
defrule(aten.max_pool2d_with_indices, _pool_with_indices(2), "mask")
defrule(aten.max_pool3d_with_indices, _pool_with_indices(3), "mask")
defrule(aten.adaptive_max_pool2d, _pool_with_indices(2), "mask")
defrule(aten.adaptive_max_pool3d, _pool_with_indices(3), "mask")


def _var_mean(ts, out, x, dim=None, *, correction=None, keepdim=False):
    t = ts[0]
    dims = list(range(x.dim())) if dim is None else [d % max(x.dim(), 1) for d in dim]
    n = 1
    for d in dims:
        n *= x.shape[d]
    corr = 1 if correction is None else correction
    mean = x.mean(dims, keepdim=True)
    tmean = t.mean(dims, keepdim=True)
    dof = n - corr  # <= 0: PyTorch returns inf/nan variances; so does their tangent
    tvar = _real_dot(x - mean, t - tmean).sum(dims, keepdim=keepdim) * (2.0 / dof if dof > 0 else float("inf"))
    return tvar, (tmean if keepdim else tmean.squeeze(dims) if dims else tmean)


defrule(aten.var_mean.correction, _var_mean, "coupled")
defrule(aten.var.correction, lambda ts, out, x, dim=None, **k: _var_mean(ts, out, x, dim, **k)[0],
        "coupled")
defrule(aten.std.correction,
        lambda ts, out, x, dim=None, **k: _var_mean(ts, out, x, dim, **k)[0] / (2 * out), "coupled")

# ------------------------------------------------------------------ constants for autograd (jvpgraph.ops)
defrule(torch.ops.jvpgraph.constant, lambda tangents, out, x: None, "structural")


# ------------------------------------------------------------------ normalization


def _stats_tangents(t, xc, rstd, dims, keepdim):
    """Tangents of the statistics a normalization returns: ``mean`` and ``rstd = (var + eps)^-1/2`` over
    ``dims`` (``xc = x - mean``): ``t_mean = mean(t)``, ``t_rstd = -rstd³ mean(xc (t - t_mean))``."""
    if t is None:
        return None, None
    t_mean = t.mean(dims, keepdim=True)
    t_rstd = -(rstd * rstd * rstd) * (xc * (t - t_mean)).mean(dims, keepdim=True)
    if not keepdim:
        t_mean, t_rstd = t_mean.squeeze(dims), t_rstd.squeeze(dims)
    return t_mean, t_rstd


def _affine_tangent(t_x, x, mean, rstd, w, tw, tb, shape, out):
    """``t_x`` (the tangent through ``x``, weight applied) plus those of the weight and bias, which need
    ``xhat = (x - mean) * rstd`` (computed only then: weights rarely carry a tangent)."""
    parts = [t_x]
    if tw is not None:
        parts.append(((x - mean) * rstd) * tw.view(shape))
    if tb is not None:
        parts.append(_expand(tb.view(shape), out))
    return add_tangents(*parts)


def _normalize_tangent(t, xhat, rstd, dims):
    """Tangent of ``xhat = (x - mean(x)) * rstd(x)`` over ``dims``."""
    if t is None:
        return None
    return rstd * (t - t.mean(dims, keepdim=True) - xhat * (t * xhat).mean(dims, keepdim=True))


def _scaled(t, w, rstd, shape):
    """``t * w * rstd`` per channel (the statistics held: one multiply)."""
    if t is None:
        return None
    scale = rstd if w is None else rstd * w.view(shape)
    return t * scale


# The normalizations' Jacobians with respect to x are symmetric — rstd (I - 11ᵀ/n - x̂x̂ᵀ/n), then the weight —
# so the flipped edge is the op's own backward kernel applied to the tangent: one fused kernel instead of
# eight elementwise passes. Its gradient in the parameters comes from PyTorch's second-order formulas for
# these kernels (tests/test_second_order.py checks it against central differences).
def _bn_functional(ts, out, x, w, b, rm, rv, training, momentum, eps, *, bn: str = "batch"):
    y, save_mean, save_invstd = out[0], out[1], out[2]
    if not training and (ts[3] is not None or ts[4] is not None):
        raise NotImplementedError("tangents of the running statistics: use the fallback")
    shape = [1, -1] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    # bn="frozen" holds the *batch* statistics of BatchNorm layers. Instance norm also runs through this op
    # (as a batch of one with N*C channels and no running statistics): its statistics are per sample and
    # always differentiated, and so are those of a functional batch_norm without running statistics.
    per_sample = rm is None or x.shape[0] == 1
    coupled = training and (bn != "frozen" or per_sample)
    if not training:
        return (_bn_eval_tangent(ts, y, x, w, rm, rv, eps, shape),) + (None,) * (len(out) - 1)
    mean, rstd = norm_stats(x, save_mean.view(shape).to(x.dtype), save_invstd.view(shape).to(x.dtype), dims)
    t = None
    if ts[0] is not None:
        t = (aten.native_batch_norm_backward(ts[0], x, w, rm, rv, save_mean, save_invstd, True, eps,
                                             [True, False, False])[0] if coupled else _scaled(ts[0], w, rstd, shape))
    t = _affine_tangent(t, x, mean, rstd, w, ts[1], ts[2], shape, y)
    t_mean = t_invstd = None
    if coupled:  # the returned batch statistics move with x too (they are constants when frozen)
        t_mean, t_invstd = _stats_tangents(ts[0], x - mean, rstd, dims, False)
        t_mean = None if t_mean is None else t_mean.to(save_mean.dtype)
        t_invstd = None if t_invstd is None else t_invstd.to(save_invstd.dtype)
    return (t, t_mean, t_invstd) + (None,) * (len(out) - 3)


def _bn_eval_tangent(ts, y, x, w, rm, rv, eps, shape):
    rstd = torch.rsqrt(rv + eps).view(shape)
    return _affine_tangent(_scaled(ts[0], w, rstd, shape), x, rm.view(shape), rstd, w, ts[1], ts[2], shape, y)


def _bn_no_training(ts, out, x, w, b, rm, rv, momentum, eps):
    if ts[3] is not None or ts[4] is not None:
        # running statistics passed as differentiated inputs (a functional batch_norm in eval mode): rare
        raise NotImplementedError("tangents of the running statistics: use the fallback")
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (_bn_eval_tangent(ts, out[0], x, w, rm, rv, eps, shape),) + (None,) * (len(out) - 1)


def _bn_native(ts, out, x, w, b, rm, rv, training, momentum, eps, *, bn: str = "batch"):
    if training:
        return _bn_functional(ts, out, x, w, b, rm, rv, training, momentum, eps, bn=bn)
    return _bn_no_training(ts, out, x, w, b, rm, rv, momentum, eps)


# bn: the mode the trace stamped on the node (jvpgraph.batchnorm)
defrule(aten._native_batch_norm_legit_functional, _bn_functional, "batch", params=("bn",))
defrule(aten._native_batch_norm_legit_no_training, _bn_no_training, "linear")
defrule(aten.native_batch_norm, _bn_native, "batch", params=("bn",))


def _layer_norm(ts, out, x, normalized_shape, w, b, eps):
    y, k_mean, k_rstd = out
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    mean, rstd = norm_stats(x, k_mean, k_rstd, dims)
    # not native_layer_norm_backward: the parameter gradient through its derivative disagrees with the double
    # backward of native_layer_norm (9% on a Linear-LayerNorm MLP), so the tangent is written out
    t = _normalize_tangent(ts[0], (x - mean) * rstd, rstd, dims)
    t = t if t is None or w is None else t * w
    t = _affine_tangent(t, x, mean, rstd, None, ts[2], ts[3], list(normalized_shape), y)
    return (t, *_stats_tangents(ts[0], x - mean, rstd, dims, True))


defrule(aten.native_layer_norm, _layer_norm, "coupled")


def _group_norm(ts, out, x, w, b, N, C, HxW, group, eps):
    y, k_mean, k_rstd = out
    # The channels split into groups with unflatten (a view whatever the strides), not a flattening reshape:
    # PyTorch's CPU kernel keeps a channels_last input's layout while its fake/meta kernel says contiguous, so a
    # reshape traced on fake tensors is a view that fails on the real tensor (diffusers' VAE and UNet mid blocks,
    # whose attention hands GroupNorm a transposed tensor).
    dims = list(range(2, x.dim() + 1))
    stat = [N, group] + [1] * (x.dim() - 1)
    xg = x.unflatten(1, (group, C // group))
    mean, rstd = norm_stats(xg, k_mean.reshape(stat), k_rstd.reshape(stat), dims)
    shape = [1, -1] + [1] * (x.dim() - 2)
    xhat = (xg - mean) * rstd
    t = None
    tg = None if ts[0] is None else ts[0].unflatten(1, (group, C // group))
    if tg is not None:  # native_group_norm_backward has no derivative in PyTorch: written out
        t = _normalize_tangent(tg, xhat, rstd, dims).flatten(1, 2)
        t = t if w is None else t * w.view(shape)
    if ts[1] is not None:  # the weight's tangent: xhat per group, then per channel
        t = add_tangents(t, xhat.flatten(1, 2) * ts[1].view(shape))
    if ts[2] is not None:
        t = add_tangents(t, _expand(ts[2].view(shape), y))
    t_mean, t_rstd = _stats_tangents(tg, xg - mean, rstd, dims, False)
    return (t, t_mean, t_rstd)


defrule(aten.native_group_norm, _group_norm, "coupled")

# ------------------------------------------------------------------ dropout: the forward's mask
def _dropout(ts, out, x, p, train=None):
    if train is False:
        return ts[0], None
    if p >= 1:
        return torch.zeros_like(out[0]), None
    return ts[0] * (out[1] * (1.0 / (1.0 - p))), None


defrule(aten.native_dropout, _dropout, "mask")


# ------------------------------------------------------------------ scaled-dot-product attention
def attention_scores(q, k, is_causal, attn_mask, scale):
    """``(s, scale)``: the scaled scores ``q kᵀ · scale`` with the causal and the given mask applied (-inf where
    masked, a float mask added), as the attention kernels compute them (``k`` with ``q``'s number of heads)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        L, S = q.size(-2), k.size(-2)
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return s, scale


def _attention_probs(q, k, is_causal, attn_mask, scale):
    s, scale = attention_scores(q, k, is_causal, attn_mask, scale)
    if attn_mask is not None:
        # a row masked everywhere (a left-padded query under a causal mask): both kernels give it weight 0,
        # where softmax would give NaN
        return aten._safe_softmax(s, -1), scale
    return torch.softmax(s, dim=-1), scale


def _sdpa(ts, out, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None, tkwargs=None):
    if dropout_p > 0:
        raise NotImplementedError("attention dropout is random: use the fallback")
    tq, tk, tv = ts[0], ts[1], ts[2]
    if k.dim() >= 3 and k.size(-3) != q.size(-3):  # grouped-query attention (enable_gqa): heads share k, v
        k, v, tk, tv = (None if x is None else x.repeat_interleave(q.size(-3) // x.size(-3), dim=-3)
                        for x in (k, v, tk, tv))
    t_mask = (tkwargs or {}).get("attn_mask")  # a float mask (a learned bias) that carries a tangent
    if attention.use_blockwise(q, k) and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        # long: the tangent one block of query rows at a time, never the L x S weights (the kernel's primal
        # output, computed in O(L) memory, stays)
        ty, t_lse = torch.ops.jvpgraph.attention_tangent(q, k, v, tq, tk, tv, t_mask, attn_mask, is_causal, scale,
                                                         attention.block_rows(q, k, v), [True, len(out) > 1])
        rest = [None] * (len(out) - 1)
        if rest:
            rest[0] = t_lse.to(out[1].dtype).reshape(out[1].shape)
        return (ty, *rest)
    p, scale = _attention_probs(q, k, is_causal, attn_mask, scale)
    parts, t_lse = [], None
    if tq is not None or tk is not None or t_mask is not None:
        ts_ = add_tangents(None if tq is None else torch.matmul(tq, k.transpose(-2, -1)) * scale,
                           None if tk is None else torch.matmul(q, tk.transpose(-2, -1)) * scale, t_mask)
        t_lse = (p * ts_).sum(-1)  # d logsumexp(s) = softmax(s) . ds (pruned when the output is unused)
        tp = aten._softmax_backward_data(ts_, p, -1, p.dtype)  # p * (ts_ - t_lse): softmax's symmetric Jacobian
        parts.append(torch.matmul(tp, v))
    if tv is not None:
        parts.append(torch.matmul(p, tv))
    rest = [None] * (len(out) - 1)
    if rest and t_lse is not None:  # flash_for_cpu's second output: the row-wise logsumexp
        rest[0] = t_lse.to(out[1].dtype).reshape(out[1].shape)
    tangent = (add_tangents(*parts), *rest)
    if attn_mask is None and not is_causal and q.dtype in (torch.float32, torch.float64) and len(out) == 2:
        # the tangent needed the attention weights p, which the flash kernel never returns: the primal output
        # is p @ v from them (one matmul), and the kernel call is pruned (measured: 10-20% of a ViT's Jv)
        y = _like(torch.matmul(p, v), out[0])
        lse = torch.logsumexp(torch.matmul(q, k.transpose(-2, -1)) * scale, -1).to(out[1].dtype)
        return WithPrimal((y, _like(lse.reshape(out[1].shape), out[1])), tangent)
    return tangent


def _like(y, ref):
    """``y`` (contiguous) laid out in memory as ``ref`` is (a view after the op may depend on it)."""
    order = sorted(range(ref.dim()), key=lambda i: (-ref.stride(i), i))
    if order == list(range(ref.dim())):
        return y
    inverse = sorted(range(ref.dim()), key=order.__getitem__)
    return y.permute(order).contiguous().permute(inverse)


defrule(aten._scaled_dot_product_flash_attention_for_cpu, _sdpa, "bilinear", kwarg_tangents=True)


def _sdpa_backward(ts, out, g, q, k, v, o, lse, attn_mask=None, is_causal=False, scale=None):
    """A long attention's backward in a Hessian's gradient graph (``jvpgraph::attention_backward``): its tangent
    blockwise, from ``(g, q, k, v)`` and theirs (those of ``o`` and ``lse`` follow from ``q, k, v``'s)."""
    tg, tq, tk, tv = ts[:4]
    if ts[6] is not None:
        raise RuleError("jvpgraph::attention_backward takes a constant mask (the Hessian's graph routes a mask "
                        "that carries a tangent through attention's math)")
    if tg is None and tq is None and tk is None and tv is None:
        return None, None, None
    return torch.ops.jvpgraph.attention_backward_tangent(g, q, k, v, tg, tq, tk, tv, attn_mask, is_causal, scale,
                                                         attention.block_rows(q, k, v))


defrule(torch.ops.jvpgraph.attention_backward, _sdpa_backward, "bilinear")


# ------------------------------------------------------------------ embedding_bag (no forward AD in PyTorch)
def _embedding_bag(ts, out, weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                   per_sample_weights=None, include_last_offset=False, padding_idx=-1):
    y, max_indices = out[0], out[3]
    tw = ts[0]
    tpsw = ts[6] if len(ts) > 6 else None
    parts = []
    if tw is not None:
        if mode == 2:  # max: the tangent at the forward's argmax rows (Table 4's max-pool, per bag)
            bag_size = out[2]
            picked = tw.gather(0, max_indices.clamp_min(0))
            parts.append(torch.where((bag_size > 0).unsqueeze(-1), picked, torch.zeros_like(y)))
        else:  # sum / mean: linear in the table
            parts.append(aten._embedding_bag(tw, indices, offsets, scale_grad_by_freq, mode, sparse,
                                             per_sample_weights, include_last_offset, padding_idx)[0])
    if tpsw is not None:  # sum with per-sample weights: bilinear in (table, weights)
        parts.append(aten._embedding_bag(weight, indices, offsets, scale_grad_by_freq, mode, sparse, tpsw,
                                         include_last_offset, padding_idx)[0])
    return (add_tangents(*parts), None, None, None)


defrule([aten._embedding_bag, aten._embedding_bag_forward_only], _embedding_bag, "linear")


# ------------------------------------------------------------------ packed sequences (nn.utils.rnn)
# packing is a gather of the padded input's valid steps, linear in it; batch_sizes are integers
defrule(aten._pack_padded_sequence,
        lambda ts, out, x, lengths, batch_first: (aten._pack_padded_sequence(ts[0], lengths, batch_first)[0], None),
        "linear")


# ------------------------------------------------------------------ prims that decompositions lower to
# Their tangents are written with aten ops: prims have no autograd formulas, so a prim in the emitted graph
# stops the gradient of Jv (the regularizer's) and Hv ("Trying to backward through prims.neg.default":
# copysign's decomposition, found by the second-order OpInfo sweep).
prims = torch.ops.prims


def _broadcast_in_dim(t, shape, broadcast_dimensions):
    for d in range(len(shape)):
        if d not in broadcast_dimensions:
            t = t.unsqueeze(d)
    return t.expand(shape)


def _split_dim(t, dim, outer):
    return t.unflatten(dim, (outer, t.shape[dim] // outer))


_PRIM_AS_ATEN = {
    prims.broadcast_in_dim: _broadcast_in_dim,
    prims.collapse_view: lambda t, start, end: t.flatten(start, end),  # start..end inclusive, as prims
    prims.collapse: lambda t, start, end: t.flatten(start, end),
    prims.split_dim: _split_dim,
    prims.squeeze: lambda t, dims: t.squeeze(tuple(dims)) if len(dims) else t,
    prims.transpose: lambda t, perm: t.permute(perm),
    prims.view_of: lambda t: t.view_as(t),
    prims.reshape: lambda t, shape: t.reshape(shape),
    prims.rev: lambda t, dims: t.flip(dims),
    prims.sum: lambda t, dims, output_dtype=None: t.sum(dims, dtype=output_dtype),
    prims.neg: lambda t: -t,
}


def _prim_linear(fn):
    return lambda ts, out, x, *args, **kwargs: None if ts[0] is None else fn(ts[0], *args, **kwargs)


for _prim, _fn in _PRIM_AS_ATEN.items():
    defrule(_prim, _prim_linear(_fn), "linear")
defrule(prims.cat, lambda ts, out, tensors, dim: None if ts[0] is None or all(t is None for t in ts[0]) else
        torch.cat([_zeros_if_none(t, x) for t, x in zip(ts[0], tensors)], dim), "linear")
defrule(prims.convert_element_type,
        lambda ts, out, x, dtype: ts[0].to(dtype) if out.is_floating_point() or out.is_complex() else None, "linear")


# ------------------------------------------------------------------ vector norm (subgradient 0 at 0)
def _vector_norm(ts, out, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """``d||x||_p = sum(x |x|^(p-2) t) / ||x||^(p-1)``, with PyTorch's subgradients: ``|x|^(p-2)`` is 0 where
    ``x`` is 0 and the tangent is 0 where the norm is 0 (a decomposition through ``pow(sum, 1/p)`` would give
    inf * 0 = NaN there); for ``p = ±inf`` the tangent of the selected entries, averaged over ties."""
    if ord == 0:
        return None  # counts nonzeros: piecewise constant
    t = ts[0]
    dims = list(range(x.dim())) if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0) else dim
    dims = [dims] if isinstance(dims, int) else list(dims)
    xd = x if dtype is None else x.to(dtype)
    td = t if dtype is None else t.to(dtype)
    if math.isinf(ord):
        norm = out
        if not keepdim:
            for d in sorted(d % max(x.dim(), 1) for d in dims):
                norm = norm.unsqueeze(d) if x.dim() else norm
        mask = (xd.abs() == norm).to(norm.dtype)
        return (_real_dot(torch.sgn(xd), td) * mask).sum(dims, keepdim=keepdim) / mask.sum(dims, keepdim=keepdim)
    if ord == 2:
        num = _real_dot(xd, td).sum(dims, keepdim=keepdim)
        den = out
    else:
        mag = xd.abs()
        scale = torch.where(mag == 0, torch.zeros_like(mag), mag.pow(ord - 2))
        num = (_real_dot(xd, td) * scale).sum(dims, keepdim=keepdim)
        den = out.pow(ord - 1)
    return torch.where(out == 0, torch.zeros_like(out), num / torch.where(out == 0, torch.ones_like(den), den))


defrule(aten.linalg_vector_norm, _vector_norm, "coupled")


# ------------------------------------------------------------------ least squares
def _lstsq(ts, out, A, B, rcond=None, *, driver=None):
    # X = A⁺B with A⁺ from one SVD of A (singular values below rcond·σ_max dropped, as the gelsd/gelss/gelsy
    # drivers do; gels assumes full rank, where nothing is dropped). On a set of constant rank,
    #   dA⁺ = -A⁺ dA A⁺ + A⁺A⁺ᴴ dAᴴ (I - AA⁺) + (I - A⁺A) dAᴴ A⁺ᴴA⁺        (Golub & Pereyra, 1973)
    # so dX = A⁺(dB - dA X) + A⁺A⁺ᴴ dAᴴ R + (I - A⁺A) dAᴴ A⁺ᴴ X, with R = B - AX. The residuals Σ_rows |R|² get
    # 2 Re Σ_rows conj(R) dR, dR = dB - dA X - A dX. The singular values (gelsd, gelss), which PyTorch declares
    # non-differentiable — a zero tangent that finite differences contradict — get dσ_i = Re u_iᴴ dA v_i.
    tA, tB = ts
    solution, residuals, _, sv = out
    vector = B.dim() == A.dim() - 1  # one right-hand side, (m,) against (m, n)
    X = solution.unsqueeze(-1) if vector else solution
    Bm = B.unsqueeze(-1) if vector else B
    tBm = tB.unsqueeze(-1) if vector and tB is not None else tB
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if driver == "gels":
        keep = torch.ones_like(S, dtype=torch.bool)
    else:
        cut = rcond if rcond is not None and rcond > 0 else torch.finfo(S.dtype).eps * max(A.shape[-2:])
        keep = S > cut * S[..., :1]
    inv = torch.where(keep, 1 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
    pinv = Vh.mH @ (inv.unsqueeze(-1).to(U.dtype) * U.mH)  # (n, m)
    R = Bm - A @ X
    rhs = tBm if tA is None else add_tangents(tBm, -(tA @ X))
    tX = None if rhs is None else pinv @ rhs
    if tA is not None:
        tAh = tA.mH
        tX = add_tangents(tX, pinv @ (pinv.mH @ (tAh @ R)))
        Y = tAh @ (pinv.mH @ X)
        tX = add_tangents(tX, Y - pinv @ (A @ Y))
    t_solution = None if tX is None else (tX.squeeze(-1) if vector else tX).expand_as(solution)
    t_residuals = None
    if residuals.numel() and tX is not None:
        dR = -(A @ tX)
        if tBm is not None:
            dR = dR + tBm
        if tA is not None:
            dR = dR - tA @ X
        t_residuals = (2 * (R.conj() * dR).real.sum(-2)).reshape(residuals.shape)
    t_sv = None
    if sv.numel() and tA is not None:
        t_sv = torch.einsum("...mi,...mn,...in->...i", U.conj(), tA, Vh.conj()).real.to(sv.dtype).expand_as(sv)
    return t_solution, t_residuals, None, t_sv


defrule(aten.linalg_lstsq, _lstsq, "coupled")


# ------------------------------------------------------------------ CTC loss (no forward AD in PyTorch)
def _ctc_loss(ts, out, log_probs, targets, input_lengths, target_lengths, blank=0, zero_infinity=False):
    # Each sequence's loss depends on its own slice log_probs[:, b] only, so one backward pass with
    # grad = 1 gives every row of the Jacobian at once: J v = sum over (time, class) of grad * v, per sequence.
    # The second output (log_alpha, kept for the backward) gets no tangent.
    # PyTorch's backward is not the derivative in log_probs: it returns exp(log_probs) - posterior, the
    # gradient in the logits *before* a log_softmax (where the exp(log_probs) term comes from the
    # normalization). The derivative in log_probs is -posterior, so exp(log_probs) is taken off again at every
    # time step the sequence has (t < input_length) and wherever its loss is finite (zero_infinity zeroes the
    # rest). Checked against finite differences on unnormalized log_probs (tests/test_fallback.py).
    if any(t is not None for t in ts[1:]):
        raise NotImplementedError("tangents of targets or lengths")
    nll, log_alpha = out[0], out[1]
    backward = aten._ctc_loss_backward.Tensor if isinstance(input_lengths, torch.Tensor) \
        else aten._ctc_loss_backward.default
    grad = backward(torch.ones_like(nll), log_probs, targets, input_lengths, target_lengths, nll, log_alpha,
                    blank, zero_infinity)
    batch_dim = 1 if log_probs.dim() == 3 else None  # (T, B, C), or (T, C) for one unbatched sequence
    lengths = torch.as_tensor(input_lengths, device=log_probs.device).reshape(-1)
    steps = torch.arange(log_probs.shape[0], device=log_probs.device)
    live = steps[:, None] < lengths[None, :]  # (T, B): the time steps each sequence has
    live = live & torch.isfinite(nll).reshape(1, -1)
    if batch_dim is None:
        live = live[:, 0]
    grad = grad - torch.where(live[..., None], log_probs.exp(), torch.zeros_like(log_probs))
    t = grad * ts[0]
    t = t.sum(dim=(0, 2)) if batch_dim is not None else t.sum()
    return t.reshape(nll.shape), None


defrule([aten._ctc_loss.default, aten._ctc_loss.Tensor], _ctc_loss, "batch")


# ------------------------------------------------------------------ segment_reduce (no forward AD in PyTorch)
# Every element of `data` feeds exactly one segment, so J has one nonzero per column, w (Jᵀ1: 1 for sum, 1/n
# for mean, the tie share for max/min, the product of the others for prod), and J t sums w * t over each
# segment. w is written in differentiable ops, as PyTorch's _segment_reduce_backward computes it: that kernel
# has no derivative, and a rule calling it gave a Jv graph autograd could not differentiate (second order).
class _Segments:
    """The segments of ``segment_reduce(data, ..., lengths= | offsets=, axis=)``: ``at(y)`` spreads a tensor
    of the output's shape onto the elements (each gets its segment's value), ``sum(x)`` sums the elements of
    each segment (the output's shape)."""

    def __init__(self, data, lengths, offsets, axis, unsafe=False):
        self.kw = dict(lengths=lengths, offsets=offsets, axis=axis, unsafe=unsafe)
        axis = axis % data.dim()
        if offsets is None:
            ends = lengths.cumsum(-1)
            offsets = torch.cat([torch.zeros_like(ends[..., :1]), ends], -1)
        n, segments = data.shape[axis], offsets.shape[-1] - 1
        pos = torch.arange(n, device=data.device, dtype=offsets.dtype).expand(*offsets.shape[:-1], n)
        ids = torch.searchsorted(offsets[..., 1:].contiguous(), pos.contiguous(), right=True)
        inside = (pos >= offsets[..., :1]) & (pos < offsets[..., -1:])  # (unsafe=True: the rest is in none)
        ids = ids.clamp(0, max(segments - 1, 0))  # an element outside every segment: sum() leaves it out
        shape = ids.shape + (1,) * (data.dim() - axis - 1)
        self.ids = ids.reshape(shape).expand(data.shape)
        self.inside = inside.reshape(shape).expand(data.shape)
        self.axis = axis

    def at(self, y):
        return torch.gather(y, self.axis, self.ids)

    def sum(self, x):
        return aten.segment_reduce(x, "sum", **self.kw)


def _segment_parts(seg, out, data, reduce, initial):
    """Jᵀ1 of segment_reduce per element, and for prod what its derivative needs (see _segment_weight_tangent)."""
    if reduce == "sum":
        return torch.ones_like(data), None
    if reduce == "mean":  # (sum + initial) / n: 1/n whatever the initial value
        return 1 / seg.at(seg.sum(torch.ones_like(data))).clamp(min=1), None
    if reduce in ("max", "min"):  # the tie share (a NaN is the extremum it gives)
        at_out = seg.at(out)
        hit = (data == at_out) | (data.isnan() & at_out.isnan())
        share = 1 / seg.at(seg.sum(hit.to(data.dtype))).clamp(min=1)
        return torch.where(hit, share, torch.zeros_like(data)), None
    if reduce != "prod":
        raise NotImplementedError(f"segment_reduce with reduce={reduce!r}")
    # A nonzero element: out / x. A zero: the product of the others, written so that its derivative is right
    # too: the nonzero elements' product (times the initial value) times the other zeros' product, which is
    # 1 without other zeros, the other zero itself with one (value 0, derivative 1), 0 with more.
    zero = data == 0
    ones = torch.where(zero, torch.ones_like(data), data)
    nonzero_prod = aten.segment_reduce(ones, "prod", initial=initial, **seg.kw)
    zero_vals = torch.where(zero, data, torch.zeros_like(data))
    other_zeros = seg.at(seg.sum(zero.to(data.dtype))) - 1
    others = seg.at(seg.sum(zero_vals)) - zero_vals
    z = torch.where(other_zeros == 0, torch.ones_like(data), torch.where(other_zeros == 1, others,
                                                                            torch.zeros_like(data)))
    w = torch.where(zero, seg.at(nonzero_prod) * z, seg.at(out) / ones)
    return w, (zero, ones, nonzero_prod, other_zeros, z)


def _segment_weight_tangent(seg, parts, out, data, t_out, t_data):
    """The tangent of prod's Jᵀ1 (``_segment_parts``) for tangents of the output and the data (None: zero)."""
    zero, ones, nonzero_prod, other_zeros, z = parts
    t_out = torch.zeros_like(out) if t_out is None else t_out
    if t_data is None:
        return torch.where(zero, torch.zeros_like(data), seg.at(t_out) / ones)
    nothing = torch.zeros_like(data)
    t_prod = nonzero_prod * seg.sum(torch.where(zero, nothing, t_data / ones))
    t_zero_vals = torch.where(zero, t_data, nothing)
    t_z = torch.where(other_zeros == 1, seg.at(seg.sum(t_zero_vals)) - t_zero_vals, nothing)
    return torch.where(zero, seg.at(t_prod) * z + seg.at(nonzero_prod) * t_z,
                       seg.at(t_out) / ones - seg.at(out) * t_data / (ones * ones))


def _segment_reduce(ts, out, data, reduce, *, lengths=None, indices=None, offsets=None, axis=0, unsafe=False,
                    initial=None):
    if indices is not None:
        raise NotImplementedError("segment_reduce with indices")
    if ts[0] is None:
        return None
    seg = _Segments(data, lengths, offsets, axis, unsafe)
    w, _ = _segment_parts(seg, out, data, reduce, initial)
    return seg.sum(w * ts[0])


defrule(aten.segment_reduce, _segment_reduce, "linear")


def _segment_reduce_backward(ts, out, grad, output, data, reduce, *, lengths=None, offsets=None, axis=0,
                             initial=None):
    # grad spread onto the elements times Jᵀ1: linear in grad; in output and data piecewise constant for sum,
    # mean, max and min (a mask, the counts), and for prod the tangent of Jᵀ1 (it appears in the gradient's
    # graph, jvpgraph.hvp; PyTorch gives the kernel no derivative).
    t_grad, t_out, t_data = ts[0], ts[1], ts[2]
    kw = dict(lengths=lengths, offsets=offsets, axis=axis, initial=initial)
    t = None if t_grad is None else aten._segment_reduce_backward(t_grad, output, data, reduce, **kw)
    if reduce != "prod" or (t_out is None and t_data is None):
        return t
    seg = _Segments(data, lengths, offsets, axis, unsafe=True)  # the kernel does not check the lengths
    _, parts = _segment_parts(seg, output, data, reduce, initial)
    dw = seg.at(grad) * _segment_weight_tangent(seg, parts, output, data, t_out, t_data)
    dw = torch.where(seg.inside, dw, torch.zeros_like(dw))  # the kernel gives an element in no segment 0
    return dw if t is None else t + dw


defrule(aten._segment_reduce_backward.default, _segment_reduce_backward, "coupled")


# ------------------------------------------------------------------ torchvision's detection ops
def _torchvision_rules():
    tv = torch.ops.torchvision

    def roi_align(ts, out, x, rois, *args):
        # bilinear samples of the features at positions the boxes set: linear in the features. The boxes get
        # no tangent, as in torchvision's own backward (which returns no gradient for them): the Jv of what
        # autograd differentiates, the same as double-backward and torch.func would give
        if ts[0] is None:
            return None
        return tv.roi_align(ts[0], rois, *args)

    defrule(tv.roi_align.default, roi_align, "linear")


NAMESPACE_RULES["torchvision"] = _torchvision_rules


# ------------------------------------------------------------------ backward kernels (second order)
# The ops of a gradient's graph, which jvpgraph.hvp flips. Most are linear in the incoming gradient (argument
# 0) and read the primal only through a mask, a window or a shape that is constant almost everywhere (ReLU's
# mask, max pooling's indices, the loss's target): their tangent is the kernel itself on the gradient's
# tangent. The bilinear and smooth ones are written out; the normalizations' backward kernels go through
# PyTorch's decompositions (exact, op by op).
def _grad_linear(op):
    """The kernel on the gradient's tangent; the other arguments' tangents contribute 0 (the kernel reads
    argument 1, the primal, through a mask, indices or its shape only); a tangent on any later argument (a
    loss's class weights) falls back."""

    def fn(ts, out, *args, **kwargs):
        if any(t is not None for t in ts[2:]):
            raise NotImplementedError(f"{op} is linear in its gradient only")
        return None if ts[0] is None else op(ts[0], *args[1:], **kwargs)

    return fn


for _op in (aten.threshold_backward, aten.leaky_relu_backward, aten.hardtanh_backward,
            aten.max_pool2d_with_indices_backward, aten.max_pool3d_with_indices_backward, aten.avg_pool2d_backward,
            aten.avg_pool3d_backward, aten._adaptive_avg_pool2d_backward, aten._adaptive_avg_pool3d_backward,
            aten.nll_loss_backward, aten.nll_loss2d_backward, aten.embedding_dense_backward):
    defrule(_op, _grad_linear(_op), "mask")


def _sigmoid_backward(ts, out, g, y):  # g * y * (1 - y)
    tg, ty = ts[0], ts[1] if len(ts) > 1 else None
    return add_tangents(None if tg is None else aten.sigmoid_backward(tg, y),
                        None if ty is None else g * (1 - 2 * y) * ty)


def _tanh_backward(ts, out, g, y):  # g * (1 - y²)
    tg, ty = ts[0], ts[1] if len(ts) > 1 else None
    return add_tangents(None if tg is None else aten.tanh_backward(tg, y), None if ty is None else -2 * g * y * ty)


def _softmax_backward(ts, out, g, y, dim, input_dtype):  # y * (g - Σ g y)
    tg, ty = ts[0], ts[1] if len(ts) > 1 else None
    if g.dtype != y.dtype or out.dtype != y.dtype:
        raise NotImplementedError("mixed dtypes")
    parts = [None if tg is None else aten._softmax_backward_data(tg, y, dim, input_dtype)]
    if ty is not None:
        parts.append(ty * (g - (g * y).sum(dim, keepdim=True)) - y * (g * ty).sum(dim, keepdim=True))
    return add_tangents(*parts)


def _log_softmax_backward(ts, out, g, y, dim, input_dtype):  # g - exp(y) Σ g
    tg, ty = ts[0], ts[1] if len(ts) > 1 else None
    if g.dtype != y.dtype or out.dtype != y.dtype:
        raise NotImplementedError("mixed dtypes")
    return add_tangents(None if tg is None else aten._log_softmax_backward_data(tg, y, dim, input_dtype),
                        None if ty is None else -torch.exp(y) * ty * g.sum(dim, keepdim=True))


def _convolution_backward(ts, out, go, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
                          groups, mask):
    """``(∂x, ∂w, ∂b)`` of a convolution: ``∂x`` is bilinear in ``(go, w)``, ``∂w`` in ``(go, x)``, ``∂b``
    linear in ``go``; each tangent is the same kernel with one factor replaced by its tangent."""
    ts = list(ts) + [None] * (3 - len(ts))
    tgo, tx, tw = ts[:3]
    if any(t is not None for t in ts[3:]):
        raise NotImplementedError("tangent on a size argument")
    rest = (bias_sizes, stride, padding, dilation, transposed, output_padding, groups)
    parts: list = [None, None, None]
    if tgo is not None:
        for i, r in enumerate(aten.convolution_backward(tgo, x, w, *rest, mask)):
            parts[i] = r if mask[i] else None
    # ∂x's other term needs only w's tangent, ∂w's only x's: one kernel computes both, given (go, tx, tw)
    other = [bool(mask[0]) and tw is not None, bool(mask[1]) and tx is not None, False]
    if any(other):
        r = aten.convolution_backward(go, x if tx is None else tx, w if tw is None else tw, *rest, other)
        for i in (0, 1):
            if other[i]:
                parts[i] = add_tangents(parts[i], r[i])
    return tuple(parts)


defrule(aten.sigmoid_backward, _sigmoid_backward, "elementwise")
defrule(aten.tanh_backward, _tanh_backward, "elementwise")
defrule(aten._softmax_backward_data, _softmax_backward, "coupled")
defrule(aten._log_softmax_backward_data, _log_softmax_backward, "coupled")
defrule(aten.convolution_backward, _convolution_backward, "bilinear")
