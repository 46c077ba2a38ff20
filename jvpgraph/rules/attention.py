"""The tangent of scaled-dot-product attention in O(L) memory: blockwise over the queries.

Attention's output is ``y = P V`` with ``P = softmax(S)``, ``S = Q Kᵀ · scale`` (masked). Its tangent is

    dy = P dV + (P ⊙ dS) V − c ⊙ y,    c = rowsum(P ⊙ dS),    dS = (dQ Kᵀ + Q dKᵀ) · scale (+ the mask's tangent)

and ``c`` is also the tangent of the row-wise ``logsumexp`` the flash kernels return. Every term is a row of
``P`` against all keys: a block of query rows needs only its own rows of ``P`` and ``dS``. So the tangent is
computed one block of rows at a time, never holding more than ``rows × S`` scores — fused attention's memory,
where the written rule (:func:`jvpgraph.rules.core._sdpa`) holds the whole ``L × S`` matrix several times.

It is one op in the emitted graph, ``jvpgraph::attention_tangent``, so that the blocks are a loop at run time,
not thousands of unrolled nodes. Its gradient (training through ``Jv``: the spectral regularizer's backward)
is the op ``jvpgraph::attention_tangent_backward``, which recomputes each block and takes the chain rule
through it, written out, as flash attention's backward does: O(L) memory too.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["attention_tangent", "attention_backward", "attention_backward_tangent", "block_rows", "use_blockwise",
           "EXACT_MAX_SCORES", "HESSIAN_MIN_SCORES"]

#: The written rule holds the ``L × S`` attention weights several times (per batch and head: its memory over the
#: forward's grows as ``S / E``, whatever the batch); up to this many scores ``L·S`` it is kept, above it the
#: tangent goes blockwise. From ``benchmarks/attention_length.py`` (both paths forced, one run, one thread):
#: blockwise 1.00x the exact rule's time at L = 128, 0.85x at 256, 0.54x at 1024, 0.29x at 4096.
EXACT_MAX_SCORES = 128 * 128


#: A Hessian's gradient graph keeps the flash kernel of an attention with more scores ``L·S`` than this per batch
#: and head (its backward recorded as :func:`attention_backward`, flipped blockwise); shorter ones go through
#: attention's math, whose graph holds the weights. From ``benchmarks/hessian_length.py`` (one 4-head layer, Hv
#: over its parameters, both routes forced, one run): blockwise 1.85x the math's time at L = 256, 1.11x at 512,
#: 0.56x at 768 and 1024, 0.23x at 4096, with 0.19x, 0.10x, 0.06x, 0.05x, 0.01x its memory.
HESSIAN_MIN_SCORES = 512 * 512


def use_blockwise(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Is the attention of ``q`` against ``k`` ([..., L, E], [..., S, E]) long enough for the blockwise
    tangent (more than :data:`EXACT_MAX_SCORES` scores ``L·S`` per batch and head)?

    Example:
        >>> import torch
        >>> use_blockwise(torch.empty(8, 12, 197, 64), torch.empty(8, 12, 197, 64))  # a ViT-B/16's 197 tokens
        True
        >>> use_blockwise(torch.empty(1, 4, 64, 16), torch.empty(1, 4, 64, 16))
        False
    """
    return q.shape[-2] * k.shape[-2] > EXACT_MAX_SCORES


def block_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """How many query rows one block holds: its scores (``rows × S`` per batch and head; the loop holds about
    four temporaries that size) half the size of ``q`` and ``v`` together, so that the tangent's peak stays a
    small multiple of the forward's (2.8x at every L up to 16384 for one 4-head layer,
    benchmarks/results/attention_length.md; twice the rows measured 3.2x and 7% faster at L = 1024 with the
    meter before its 2026-12-05 fix); at least 8 rows (fewer only add loop overhead).

    Example:
        >>> import torch
        >>> q = torch.empty(1, 4, 4096, 16)
        >>> block_rows(q, q, q)  # 16 rows x 4096 keys per block and head
        16
    """
    L, S = q.shape[-2], k.shape[-2]
    return max(8, min(L, (L * (q.shape[-1] + v.shape[-1])) // (2 * max(S, 1))))


def _mask_rows(mask: Optional[torch.Tensor], lead: torch.Size, L: int, S: int, i0: int, i1: int, s1: int):
    """The rows ``i0:i1`` (and keys ``:s1``) of a mask broadcast to ``lead + (L, S)`` (a view, no copy)."""
    if mask is None:
        return None
    return mask.expand(*lead, L, S)[..., i0:i1, :s1]


def _blocks(L: int, rows: int):
    return [(i, min(L, i + rows)) for i in range(0, L, rows)]


def _later(i0: int, i1: int, s1: int, device) -> torch.Tensor:
    """Causal (top-left, as the kernels): the keys after each query row of the block ``i0:i1``."""
    return torch.arange(s1, device=device) > torch.arange(i0, i1, device=device).unsqueeze(-1)


def _flat(t: Optional[torch.Tensor], n: int, factor: Optional[float] = None) -> Optional[torch.Tensor]:
    """``t`` as ``[batch·heads, n, ·]`` (times ``factor``); ``None`` stays ``None``."""
    if t is None:
        return None
    t = t.reshape(-1, n, t.shape[-1])
    return t * factor if factor is not None else t


def _block_probs(qb, ktb, attn_mask, is_causal: bool, lead, L: int, S: int, i0: int, i1: int, s1: int):
    """The attention weights of the query rows ``i0:i1`` against the keys ``:s1``, from the scaled queries ``qb``
    and the keys ``ktb`` (``[B, E, s1]``): masked as the kernels mask, a row masked everywhere weighing 0 (as
    the kernels give it), not softmax's NaN."""
    s = torch.bmm(qb, ktb)
    if is_causal:
        s.masked_fill_(_later(i0, i1, s1, qb.device), float("-inf"))
    if attn_mask is not None:
        m = _mask_rows(attn_mask, lead, L, S, i0, i1, s1).reshape(qb.shape[0], i1 - i0, s1)
        s = s.masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else s.add_(m)
    return torch.ops.aten._safe_softmax(s, -1) if attn_mask is not None else torch.softmax(s, -1)


def _run(q, k, v, tq, tk, tv, t_mask, attn_mask, is_causal, scale, rows, output_mask):
    """The blocks' loop, on ``[batch·heads, rows, ·]`` slices: per block one matmul for the scores, the
    softmax, one or two for ``dS``, softmax's backward kernel for ``P ⊙ (dS − c)``, one or two for ``dy``."""
    L, S, Ev = q.shape[-2], k.shape[-2], v.shape[-1]
    lead = q.shape[:-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qs, tqs = _flat(q, L, scale), _flat(tq, L, scale)
    kt, tkt = _flat(k, S).transpose(1, 2), None if tk is None else _flat(tk, S).transpose(1, 2)
    vf, tvf = _flat(v, S), _flat(tv, S)
    B = qs.shape[0]
    want_y, want_lse = output_mask
    ty = q.new_zeros((B, L, Ev))
    t_lse = q.new_zeros((B, L))
    for i0, i1 in _blocks(L, rows):
        s1 = min(S, i1) if is_causal else S
        qb = qs[:, i0:i1]
        p = _block_probs(qb, kt[..., :s1], attn_mask, is_causal, lead, L, S, i0, i1, s1)
        ds = None
        if tqs is not None:
            ds = torch.bmm(tqs[:, i0:i1], kt[..., :s1])
        if tkt is not None:
            ds = torch.bmm(qb, tkt[..., :s1]) if ds is None else ds.baddbmm_(qb, tkt[..., :s1])
        if t_mask is not None:
            tm = _mask_rows(t_mask, lead, L, S, i0, i1, s1).reshape(B, i1 - i0, s1)
            ds = tm if ds is None else ds.add_(tm)
        out = None
        if ds is not None:
            if want_lse:
                t_lse[:, i0:i1] = (p * ds).sum(-1)
            if want_y:
                out = torch.bmm(torch.ops.aten._softmax_backward_data(ds, p, -1, p.dtype), vf[:, :s1])
        if tvf is not None and want_y:
            out = torch.bmm(p, tvf[:, :s1]) if out is None else out.baddbmm_(p, tvf[:, :s1])
        if out is not None:
            ty[:, i0:i1] = out
    return ty.view(lead + (L, Ev)), t_lse.view(lead + (L,))


@torch.library.custom_op("jvpgraph::attention_tangent", mutates_args=())
def attention_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: Optional[torch.Tensor],
                      tk: Optional[torch.Tensor], tv: Optional[torch.Tensor], t_mask: Optional[torch.Tensor],
                      attn_mask: Optional[torch.Tensor], is_causal: bool, scale: Optional[float],
                      rows: int, output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy, d logsumexp)`` of ``scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal,
    scale=scale)`` along ``(tq, tk, tv)`` (``None``: no tangent) and ``t_mask`` (the tangent of a float mask),
    ``rows`` query rows at a time; an output ``output_mask`` switches off is zeros, not computed (the emitted
    graph switches off what nothing reads). ``k``, ``v`` have ``q``'s number of heads (grouped-query attention
    repeated by the caller). Memory: a few ``rows × S`` blocks beyond the inputs and outputs.

    Example:
        >>> import torch
        >>> q, k, v = (torch.randn(1, 2, 64, 8, dtype=torch.double) for _ in range(3))
        >>> tq, tk, tv = (torch.randn_like(q) for _ in range(3))
        >>> ty, t_lse = attention_tangent(q, k, v, tq, tk, tv, None, None, False, None, 16, [True, True])
        >>> f = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
        >>> with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # forward AD needs the math
        ...     ref = torch.func.jvp(f, (q, k, v), (tq, tk, tv))[1]
        >>> torch.testing.assert_close(ty, ref)
    """
    return _run(q, k, v, tq, tk, tv, t_mask, attn_mask, is_causal, scale, rows, output_mask)


@attention_tangent.register_fake
def _(q, k, v, tq, tk, tv, t_mask, attn_mask, is_causal, scale, rows, output_mask):
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    return q.new_empty(lead + (q.shape[-2], v.shape[-1])), q.new_empty(lead + (q.shape[-2],))


_DIFF = (0, 1, 2, 3, 4, 5, 6, 7)  # q, k, v, tq, tk, tv, t_mask, attn_mask


def _setup(ctx, inputs, output):
    tensors = inputs[:8]
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*[t for t in tensors if t is not None])
    ctx.is_causal, ctx.scale, ctx.rows = inputs[8], inputs[9], inputs[10]


def _backward(ctx, g_ty, g_lse):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if p else None for p in ctx.present]
    needs = [bool(ctx.needs_input_grad[i]) and tensors[i] is not None
             and (tensors[i].is_floating_point() or tensors[i].is_complex()) for i in _DIFF]
    if not any(needs):
        return (None,) * 12
    grads = attention_tangent_backward(g_ty, g_lse, *tensors, ctx.is_causal, ctx.scale, ctx.rows, needs)
    it = iter(grads)
    return (*(next(it) if n else None for n in needs), None, None, None, None)


attention_tangent.register_autograd(_backward, setup_context=_setup)


def _sum_to(g: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``g`` summed over the dimensions a tensor of ``shape`` (as many dimensions) was broadcast along."""
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(dims, keepdim=True) if dims else g


def _block_backward(g_ty, g_c, q, k, v, tq, tk, tv, t_mask, attn_mask, is_causal: bool, scale: float,
                    i0: int, i1: int):
    """The gradients of one block's ``(ty, c)`` (:func:`_run`'s loop body) in ``(q, k, v, tq, tk, tv, t_mask, mask)``
    (``k``, ``v``, ``tk``, ``tv``'s only for the keys ``:s1`` the block reads), by the chain rule through

        s = σ q kᵀ + mask,  p = softmax(s),  ds = σ (tq kᵀ + q tkᵀ) + t_mask,  y = p v,
        c = rowsum(p ⊙ ds),  ty = (p ⊙ ds) v − c ⊙ y + p tv.
    """
    S = k.shape[-2]
    s1 = min(S, i1) if is_causal else S
    k, v = k[..., :s1, :], v[..., :s1, :]
    tk = None if tk is None else tk[..., :s1, :]
    tv = None if tv is None else tv[..., :s1, :]
    kt = k.transpose(-2, -1)
    s = torch.matmul(q, kt) * scale
    if is_causal:
        s = s.masked_fill(_later(i0, i1, s1, q.device), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    del s
    ds = None
    if tq is not None:
        ds = torch.matmul(tq, kt)
    if tk is not None:
        d = torch.matmul(q, tk.transpose(-2, -1))
        ds = d if ds is None else ds + d
    if ds is not None:
        ds = ds * scale
    if t_mask is not None:
        ds = t_mask if ds is None else ds + t_mask
    g_ty_vt = torch.matmul(g_ty, v.transpose(-2, -1))  # [rows, s1]
    g = dict()
    if ds is not None:
        y = torch.matmul(p, v)
        c = (p * ds).sum(-1, keepdim=True)
        g_c = g_c.unsqueeze(-1) - (g_ty * y).sum(-1, keepdim=True)  # c's total gradient (ty's -c ⊙ y too)
        g_pds = g_ty_vt + g_c  # through ty's (p ⊙ ds) v and c = rowsum(p ⊙ ds)
        g_p = g_pds * ds - c * g_ty_vt  # through p ⊙ ds and y = p v
        g_ds = g_pds * p
        g["v"] = torch.matmul((p * (ds - c)).transpose(-2, -1), g_ty)
    else:
        g_p = torch.zeros_like(p)
        g["v"] = None
    if tv is not None:
        g_p = g_p + torch.matmul(g_ty, tv.transpose(-2, -1))
        g["tv"] = torch.matmul(p.transpose(-2, -1), g_ty)
    g_s = p * (g_p - (g_p * p).sum(-1, keepdim=True))  # softmax's Jacobian (symmetric)
    g["mask"] = g_s
    g["q"] = torch.matmul(g_s, k) * scale
    g["k"] = torch.matmul(g_s.transpose(-2, -1), q) * scale
    if ds is not None:
        g["t_mask"] = g_ds
        if tq is not None:
            g["tq"] = torch.matmul(g_ds, k) * scale
            g["k"] = g["k"] + torch.matmul(g_ds.transpose(-2, -1), tq) * scale
        if tk is not None:
            g["q"] = g["q"] + torch.matmul(g_ds, tk) * scale
            g["tk"] = torch.matmul(g_ds.transpose(-2, -1), q) * scale
    return g, s1


@torch.library.custom_op("jvpgraph::attention_tangent_backward", mutates_args=())
def attention_tangent_backward(g_ty: torch.Tensor, g_lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               v: torch.Tensor, tq: Optional[torch.Tensor], tk: Optional[torch.Tensor],
                               tv: Optional[torch.Tensor], t_mask: Optional[torch.Tensor],
                               attn_mask: Optional[torch.Tensor], is_causal: bool, scale: Optional[float],
                               rows: int, needs: list[bool]) -> list[torch.Tensor]:
    """The gradients of :func:`attention_tangent`'s outputs (given ``g_ty``, ``g_lse``) in those of
    ``(q, k, v, tq, tk, tv, t_mask, attn_mask)`` that ``needs`` marks, in that order: each block of query rows
    recomputed and differentiated alone (:func:`_block_backward`; the keys' gradients summed over the
    blocks), so that it holds no more than the forward's blocks."""
    L, S = q.shape[-2], k.shape[-2]
    lead = q.shape[:-2]
    scale_ = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    names = ("q", "k", "v", "tq", "tk", "tv", "t_mask", "mask")
    tensors = (q, k, v, tq, tk, tv, t_mask, attn_mask)
    out = {n: torch.zeros(t.shape, dtype=t.dtype, device=t.device)
           for n, t, want in zip(names, tensors, needs) if want}
    for i0, i1 in _blocks(L, rows):
        s1 = min(S, i1) if is_causal else S
        g, s1 = _block_backward(g_ty[..., i0:i1, :], g_lse[..., i0:i1], q[..., i0:i1, :], k, v,
                                None if tq is None else tq[..., i0:i1, :], tk, tv,
                                _mask_rows(t_mask, lead, L, S, i0, i1, s1), _mask_rows(attn_mask, lead, L, S, i0, i1, s1),
                                is_causal, scale_, i0, i1)
        for name, acc in out.items():
            gb = g.get(name)
            if gb is None:
                continue
            if name in ("q", "tq"):
                acc[..., i0:i1, :] += gb
            elif name in ("k", "v", "tk", "tv"):
                acc[..., :s1, :] += gb
            else:  # a mask: this block's part of its (broadcast) shape
                view = acc.view((1,) * (len(lead) + 2 - acc.dim()) + tuple(acc.shape))
                rows_b, keys_b = view.shape[-2] == 1, view.shape[-1] == 1
                part = _sum_to(gb, view.shape[:-2] + (1 if rows_b else i1 - i0, 1 if keys_b else s1))
                view[..., slice(None) if rows_b else slice(i0, i1), slice(None) if keys_b else slice(0, s1)] += part
    return list(out.values())


@attention_tangent_backward.register_fake
def _(g_ty, g_lse, q, k, v, tq, tk, tv, t_mask, attn_mask, is_causal, scale, rows, needs):
    return [t.new_empty(t.shape) for t, n in zip((q, k, v, tq, tk, tv, t_mask, attn_mask), needs) if n]


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "jvpgraph: the blockwise attention tangent's gradient (jvpgraph::attention_tangent_backward) has no "
        "derivative of its own: a second derivative through Jv of a long attention is not supported. Shorten the "
        f"sequence below {EXACT_MAX_SCORES} scores (batch x heads x L x S), where the written rule serves, or "
        "differentiate once.")


attention_tangent_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# -------------------------------------------------------------------------------- second order
# The Hessian's gradient graph (jvpgraph/hessian.py) records a long attention's backward as one op,
# ``jvpgraph::attention_backward`` (the CPU flash kernel's backward: O(L) memory), and flipping that graph
# takes its tangent, ``jvpgraph::attention_backward_tangent``, blockwise over the queries like the forward's.
# With s = σ q kᵀ (+ mask), p = softmax(s), dp = g vᵀ, D = rowsum(p ⊙ dp), dS = p ⊙ (dp − D), the backward is
#     dq = σ dS k,   dk = σ dSᵀ q,   dv = pᵀ g
# and along (tq, tk, tv, tg), with ṡ = σ (tq kᵀ + q tkᵀ), ṗ = p ⊙ (ṡ − rowsum(p ⊙ ṡ)), ḋp = tg vᵀ + g tvᵀ,
#     ḊS = ṗ ⊙ (dp − D) + p ⊙ (ḋp − rowsum(ṗ ⊙ dp + p ⊙ ḋp))
#     d(dq) = σ (ḊS k + dS tk),   d(dk) = σ (ḊSᵀ q + dSᵀ tq),   d(dv) = ṗᵀ g + pᵀ tg.
# Every term is a block of query rows against all keys: a few rows × S blocks at a time, never L × S.


@torch.library.custom_op("jvpgraph::attention_backward", mutates_args=())
def attention_backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                       scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients in ``(q, k, v)`` of ``scaled_dot_product_attention``'s output, given its gradient ``g``
    (``out``, ``lse``: the CPU flash kernel's outputs): that kernel's backward, in O(L) memory, as one op of the
    Hessian's gradient graph, whose tangent is :func:`attention_backward_tangent` (the kernel has no
    derivative of its own). Contiguous outputs.

    Example:
        >>> import torch
        >>> q, k, v = (torch.randn(1, 2, 64, 8, dtype=torch.double, requires_grad=True) for _ in range(3))
        >>> out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=True)[:2]
        >>> g = torch.randn_like(out)
        >>> ref = torch.autograd.grad(out, (q, k, v), g)
        >>> for a, b in zip(attention_backward(g, q, k, v, out, lse, None, True, None), ref):
        ...     torch.testing.assert_close(a, b)
    """
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g, q, k, v, out, lse, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
    return tuple(t.contiguous() for t in grads[:3])


@attention_backward.register_fake
def _(g, q, k, v, out, lse, attn_mask, is_causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _no_third_order(ctx, *grads):
    raise NotImplementedError(
        "jvpgraph: a long attention's backward (jvpgraph::attention_backward, in a Hessian's gradient graph) has "
        "no derivative of its own: Hv is its tangent, not a third derivative. Differentiate Hv no further, or "
        f"shorten the sequence below {EXACT_MAX_SCORES} scores (L x S per batch and head).")


attention_backward.register_autograd(_no_third_order, setup_context=lambda ctx, inputs, output: None)


def _run_backward_tangent(g, q, k, v, tg, tq, tk, tv, attn_mask, is_causal, scale, rows):
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    lead = q.shape[:-2]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    qs, tqs = _flat(q, L, scale), _flat(tq, L, scale)
    kf, tkf = _flat(k, S), _flat(tk, S)
    vt, tvt = _flat(v, S).transpose(1, 2), None if tv is None else _flat(tv, S).transpose(1, 2)
    gf, tgf = _flat(g, L), _flat(tg, L)
    B = qs.shape[0]
    t_dq, t_dk, t_dv = q.new_zeros((B, L, E)), q.new_zeros((B, S, E)), q.new_zeros((B, S, Ev))
    for i0, i1 in _blocks(L, rows):
        s1 = min(S, i1) if is_causal else S
        qb, gb = qs[:, i0:i1], gf[:, i0:i1]
        kb = kf[:, :s1]
        p = _block_probs(qb, kb.transpose(1, 2), attn_mask, is_causal, lead, L, S, i0, i1, s1)
        dp = torch.bmm(gb, vt[..., :s1])
        d_s = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)  # p ⊙ (dp − rowsum(p ⊙ dp))
        t_p = None
        if tqs is not None or tkf is not None:
            t_s = None if tqs is None else torch.bmm(tqs[:, i0:i1], kb.transpose(1, 2))
            if tkf is not None:
                t_s = torch.bmm(qb, tkf[:, :s1].transpose(1, 2)) if t_s is None else \
                    t_s.baddbmm_(qb, tkf[:, :s1].transpose(1, 2))
            t_p = torch.ops.aten._softmax_backward_data(t_s, p, -1, p.dtype)  # p ⊙ (ṡ − rowsum(p ⊙ ṡ))
            del t_s
        t_dp = None if tgf is None else torch.bmm(tgf[:, i0:i1], vt[..., :s1])
        if tvt is not None:
            t_dp = torch.bmm(gb, tvt[..., :s1]) if t_dp is None else t_dp.baddbmm_(gb, tvt[..., :s1])
        t_ds = None
        if t_dp is not None:
            t_ds = torch.ops.aten._softmax_backward_data(t_dp, p, -1, p.dtype)  # p ⊙ (ḋp − rowsum(p ⊙ ḋp))
        if t_p is not None:
            # ṗ ⊙ (dp − D) − p ⊙ rowsum(ṗ ⊙ dp): the rest of ḊS (D = rowsum(p ⊙ dp))
            D = (p * dp).sum(-1, keepdim=True)
            rest = t_p * (dp - D)
            rest.sub_(p * (t_p * dp).sum(-1, keepdim=True))
            t_ds = rest if t_ds is None else t_ds.add_(rest)
        if t_ds is not None:
            t_dq[:, i0:i1] = torch.bmm(t_ds, kb) * scale
            t_dk[:, :s1].baddbmm_(t_ds.transpose(1, 2), qb)
        if tkf is not None:
            t_dq[:, i0:i1].baddbmm_(d_s, tkf[:, :s1], alpha=scale)
        if tqs is not None:
            t_dk[:, :s1].baddbmm_(d_s.transpose(1, 2), tqs[:, i0:i1])
        if t_p is not None:
            t_dv[:, :s1].baddbmm_(t_p.transpose(1, 2), gb)
        if tgf is not None:
            t_dv[:, :s1].baddbmm_(p.transpose(1, 2), tgf[:, i0:i1])
    return t_dq.view(q.shape), t_dk.view(k.shape), t_dv.view(v.shape)


@torch.library.custom_op("jvpgraph::attention_backward_tangent", mutates_args=())
def attention_backward_tangent(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               tg: Optional[torch.Tensor], tq: Optional[torch.Tensor], tk: Optional[torch.Tensor],
                               tv: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor], is_causal: bool,
                               scale: Optional[float], rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tangent of :func:`attention_backward`'s ``(dq, dk, dv)`` along ``(tg, tq, tk, tv)`` (``None``: no
    tangent; the mask is constant), ``rows`` query rows at a time: what flipping a Hessian's gradient graph
    needs of a long attention, holding a few ``rows × S`` blocks (the formulas above). ``k``, ``v`` have
    ``q``'s heads.

    Example:
        >>> import torch
        >>> q, k, v, g = (torch.randn(1, 2, 64, 8, dtype=torch.double) for _ in range(4))
        >>> tq, tk, tv, tg = (torch.randn_like(q) for _ in range(4))
        >>> ours = attention_backward_tangent(g, q, k, v, tg, tq, tk, tv, None, True, None, 16)
        >>> attend = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> grads = lambda q, k, v, g: torch.func.vjp(attend, q, k, v)[1](g)  # the backward, differentiable
        >>> with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # forward AD needs the math
        ...     ref = torch.func.jvp(grads, (q, k, v, g), (tq, tk, tv, tg))[1]
        >>> for a, b in zip(ours, ref):
        ...     torch.testing.assert_close(a, b)
    """
    return _run_backward_tangent(g, q, k, v, tg, tq, tk, tv, attn_mask, is_causal, scale, rows)


@attention_backward_tangent.register_fake
def _(g, q, k, v, tg, tq, tk, tv, attn_mask, is_causal, scale, rows):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


attention_backward_tangent.register_autograd(_no_third_order, setup_context=lambda ctx, inputs, output: None)


# doctest does not look inside custom-op objects: their examples run from here (``--doctest-modules``)
__test__ = {name: getattr(op, "_init_fn", op).__doc__ for name, op in (
    ("attention_tangent", attention_tangent), ("attention_backward", attention_backward),
    ("attention_backward_tangent", attention_backward_tangent))}
