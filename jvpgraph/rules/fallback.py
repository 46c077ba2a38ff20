"""The local Jacobian of one node, whatever the op: a written rule, or the theorem applied to that node.

Order (cheapest and most exact first):

1. a written rule from :mod:`jvpgraph.rules.core`;
2. PyTorch's decomposition of the op into smaller aten ops, each of which goes through this same chain;
3. **the theorem on this node alone**: its backward is the linear map ``w -> J_nodeᵀ w``; differentiating
   ``<J_nodeᵀ w, t>`` with respect to ``w`` gives ``J_node t`` (the node's flipped VJP);
4. PyTorch's own forward-AD formula for this one node (``torch.func.jvp`` on the op alone), run as one
   opaque op of the flipped graph (so that Jv is not differentiable through it: it comes last);
5. a :class:`RuleError` that names the op and what each step said.

Each op that needs steps 2-4 is reported once per process (``warnings.warn``), so users know.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..ops import FORWARD_AD_NODES, diffable, fill, forward_ad_node
from .propagate import propagate
from .registry import Rule, RuleError, lookup, op_name

__all__ = ["RuleError", "node_jvp", "FALLBACK_KINDS"]

#: How a node's local Jacobian was obtained (besides a written rule's own kind).
FALLBACK_KINDS = ("decomposition", "flipped-vjp", "forward-ad")

_WARNED: set[str] = set()


log = logging.getLogger("jvpgraph")


def _is_tensor(x):
    return isinstance(x, torch.Tensor)


def _any_tangent(ts) -> bool:
    return any(t is not None for t in pytree.tree_leaves(ts))


def _aligned_tangents(args, kwargs, tangents, tkwargs) -> list:
    """The tangents as a flat list aligned with ``pytree.tree_flatten((args, kwargs))``: a collapsed zero
    (``None`` for a whole list argument, a kwarg left out) stands for one ``None`` per leaf it covers."""

    def walk(a, t):
        if t is None:
            return [None] * len(pytree.tree_leaves(a))
        if isinstance(a, (list, tuple)) and isinstance(t, (list, tuple)):
            return [x for ai, ti in zip(a, t, strict=True) for x in walk(ai, ti)]
        if isinstance(a, dict) and isinstance(t, dict):
            return [x for k, ai in a.items() for x in walk(ai, t.get(k))]
        return [t]

    flat = walk(tuple(args), tuple(tangents) + (None,) * (len(args) - len(tangents)))
    flat += walk(dict(kwargs), dict(tkwargs or {}))
    return flat


# --------------------------------------------------------------------------------------------------
# 2. decompositions: run the decomposition, pushing tangents through each aten op it calls
# --------------------------------------------------------------------------------------------------
def _decomposition(op):
    from torch._decomp import decomposition_table

    fn = decomposition_table.get(op)
    if fn is not None:
        return fn
    if isinstance(op, torch._ops.OpOverload) and torch._C._dispatch_has_kernel_for_dispatch_key(
        op.name(), "CompositeImplicitAutograd"
    ):
        return op.decompose
    return None


def _via_decomposition(op, tangents, tkwargs, out, args, kwargs):
    """Trace PyTorch's decomposition of ``op`` at these shapes into a small graph, then push the tangents
    through it with the same rules (:func:`~jvpgraph.rules.propagate.propagate`), recursively."""
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx

    fn = _decomposition(op)
    if fn is None:
        raise NotImplementedError("no decomposition")
    flat, spec = pytree.tree_flatten((args, kwargs))
    tflat = _aligned_tangents(args, kwargs, tangents, tkwargs)
    tpos = [i for i, x in enumerate(flat) if _is_tensor(x)]

    def decomposed(*tensors):
        a, k = fill(flat, spec, (tpos, tensors))
        res = fn(*a, **k)
        if res is NotImplemented:
            raise NotImplementedError("decomposition declined these arguments")
        return pytree.tree_leaves(res)

    with disable_proxy_modes_tracing():  # trace the decomposition on its own, not into the caller's graph
        # functionalized: a decomposition that fills a fresh tensor through views (aten.complex writes .real
        # and .imag of an empty one) would otherwise lose the tangents written into the views
        sub = make_fx(torch.func.functionalize(decomposed, remove="mutations_and_views"), tracing_mode="fake",
                      _allow_non_fake_inputs=True)(*[flat[i] for i in tpos])
    mutating = sorted({op_name(n.target) for n in sub.graph.nodes if n.op == "call_function" and isinstance(
        n.target, torch._ops.OpOverload) and n.target._schema.is_mutable})
    if mutating:  # never push tangents through writes the walk cannot see
        raise NotImplementedError(f"the decomposition writes in place ({', '.join(mutating)})")
    phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env = dict(zip(phs, [flat[i] for i in tpos]))
    tenv = {ph: tflat[i] for ph, i in zip(phs, tpos) if tflat[i] is not None}
    _DECOMPOSING.add(op)
    try:
        propagate(sub.graph, env, tenv, node_jvp=node_jvp, owner=sub)
    finally:
        _DECOMPOSING.discard(op)
    results = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    touts = [tenv.get(r) if isinstance(r, torch.fx.Node) else None for r in results]
    outs = pytree.tree_leaves(out)
    values = [env.get(r) if isinstance(r, torch.fx.Node) else r for r in results]
    if len(touts) != len(outs) or any(
            isinstance(o, torch.Tensor) and (not isinstance(d, torch.Tensor) or tuple(d.shape) != tuple(o.shape))
            for o, d in zip(outs, values)):
        # e.g. flash attention's decomposition returns the attention weights where the op returns logsumexp
        raise NotImplementedError("the decomposition's outputs do not match the op's")
    return _rebuild_like(out, touts)


# --------------------------------------------------------------------------------------------------
# PyTorch's forward-AD formula for this node, run when the graph runs
# --------------------------------------------------------------------------------------------------
def _split(args, kwargs, tangents, tkwargs):
    flat, spec = pytree.tree_flatten((args, kwargs))
    tflat = _aligned_tangents(args, kwargs, tangents, tkwargs)
    pos = [i for i, (x, t) in enumerate(zip(flat, tflat)) if t is not None and diffable(x)]

    def call(op, *vals):
        a, k = fill(flat, spec, (pos, vals))
        return op(*a, **k)

    return call, [flat[i] for i in pos], [tflat[i] for i in pos]


def _float_outputs(out):
    return [o if diffable(o) else None for o in pytree.tree_leaves(out)]


def _rebuild_like(out, flat_tangents):
    leaves, spec = pytree.tree_flatten(out)
    return pytree.tree_unflatten(list(flat_tangents), spec)


def _check_forward_ad(op, flat, spec, tpos, dpos, tensors, tangents):
    """Raise unless PyTorch's forward AD gives a tangent for every floating output of ``op``.

    (``torch.func.jvp`` returns a silent zero for an op with no formula, so we ask with dual tensors,
    whose tangent is ``None`` then.)"""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(tensors[tpos.index(i)], t) for i, t in zip(dpos, tangents)]
        a, k = fill(flat, spec, (tpos, tensors), (dpos, duals))
        res = op(*a, **k)
        for o in pytree.tree_leaves(res):
            if diffable(o) and fwAD.unpack_dual(o).tangent is None:
                raise NotImplementedError("PyTorch's forward AD gives no tangent for this op")


def _via_forward_ad(op, tangents, tkwargs, out, args, kwargs):
    if isinstance(op, torch._ops.OpOverload) and op.namespace == "prims":
        raise NotImplementedError("prims have no forward AD (torch.func.jvp would return a silent zero)")
    flat, spec = pytree.tree_flatten((args, kwargs))
    tflat = _aligned_tangents(args, kwargs, tangents, tkwargs)
    tpos = [i for i, x in enumerate(flat) if _is_tensor(x)]
    dpos = [i for i in tpos if tflat[i] is not None and diffable(flat[i])]
    shapes = [(o.shape, o.dtype) for o in _float_outputs(out) if o is not None]
    skeleton = [None if i in tpos else a for i, a in enumerate(flat)]  # tensor slots are filled at every call
    key = FORWARD_AD_NODES.add((op, skeleton, spec, tpos, dpos, shapes))
    # Does PyTorch have a forward-AD formula for this op? Ask on meta tensors now (outside the trace),
    # so a missing one is reported at emission, with the op's name, not when the graph runs.
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with disable_proxy_modes_tracing(), unset_fake_temporarily():
        def meta(t):
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

        _check_forward_ad(op, flat, spec, tpos, dpos, [meta(flat[i]) for i in tpos],
                          [meta(tflat[i]) for i in dpos])
    touts = iter(forward_ad_node([flat[i] for i in tpos], [tflat[i] for i in dpos], key))
    return _rebuild_like(out, [next(touts) if o is not None else None for o in _float_outputs(out)])


# --------------------------------------------------------------------------------------------------
# 3. the theorem on one node: flip its VJP
# --------------------------------------------------------------------------------------------------
def _via_flipped_vjp(op, tangents, tkwargs, out, args, kwargs):
    call, primals, ts = _split(args, kwargs, tangents, tkwargs)
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in primals]
        res = call(op, *leaves)
        outs = [o for o in pytree.tree_leaves(res) if diffable(o) and o.requires_grad]
        if not outs:
            raise NotImplementedError("autograd recorded no derivative for this op")
        # the backward is linear in w, so any w gives the same Jv; ones, not zeros, because some backwards
        # go through log|w| (logcumsumexp) and would give NaN at w = 0
        ws = [torch.ones_like(o).requires_grad_(True) for o in outs]
        # J_nodeᵀ w: the node's backward, kept differentiable in w
        g = torch.autograd.grad(outs, leaves, ws, create_graph=True, allow_unused=True)
        pairs = [(gi, ti) for gi, ti in zip(g, ts) if gi is not None and gi.requires_grad]
        if not pairs:
            # Jᵀw does not depend on w through autograd: the backward itself is not differentiable (a custom
            # op's backward that is another opaque op). Not a zero Jacobian: refuse, the next step may serve.
            raise NotImplementedError("the op's backward is not differentiable in its grad_output")
        # d/dw <J_nodeᵀ w, t> = J_node t, itself differentiable: with create_graph, backward formulas take
        # their differentiable form (linalg_solve's backward solves with A again instead of reusing the LU
        # factors, which autograd treats as constants: without it, the gradient of Jv through linalg.solve in
        # A was off by 125%; the second-order OpInfo sweep)
        jv = torch.autograd.grad([p[0] for p in pairs], ws, [p[1] for p in pairs], allow_unused=True,
                                 create_graph=True)
    it = iter(jv)
    flat = []
    for o in pytree.tree_leaves(res):
        flat.append(next(it) if (diffable(o) and o.requires_grad) else None)
    return _rebuild_like(out, flat)


# --------------------------------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------------------------------
# The flipped VJP comes before PyTorch's forward-AD formula: it is traced into ordinary aten ops, so the
# resulting Jv stays differentiable with respect to the parameters (the regularizer needs that), while
# the forward-AD step runs as one opaque op.
_STEPS = (("decomposition", _via_decomposition), ("flipped-vjp", _via_flipped_vjp),
          ("forward-ad", _via_forward_ad))


_DECOMPOSING: set = set()  # ops whose decomposition is being walked (a prim's aten twin may lead back)


def _aten_twin(op):
    """``prims.tanh`` -> ``aten.tanh`` (the overload packet, which resolves on its arguments), or None."""
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "prims":
        return None
    return getattr(torch.ops.aten, op.overloadpacket.__name__, None)


def node_jvp(op, tangents, tkwargs, out, args, kwargs, *, rule: Rule | None = None,
             params: dict | None = None) -> tuple[Any, str]:
    """Tangent of ``out = op(*args, **kwargs)`` given the inputs' tangents (``None`` = zero); ``params``: what
    the trace stamped on the node (BatchNorm's ``bn``), passed to a written rule that declares it.

    Returns ``(tangent_out, how)`` where ``how`` is the written rule's kind or one of
    :data:`FALLBACK_KINDS`.

    Example:
        >>> import torch
        >>> from jvpgraph.rules import node_jvp
        >>> x = torch.tensor([0.5, 2.0]); t = torch.tensor([1.0, 1.0])
        >>> out = torch.ops.aten.log.default(x)
        >>> node_jvp(torch.ops.aten.log.default, (t,), {}, out, (x,), {})
        (tensor([2.0000, 0.5000]), 'elementwise')
    """
    rule = rule or lookup(op)
    reasons = []
    if rule is not None and (rule.kwarg_tangents or not _any_tangent(tkwargs)):
        try:
            stamped = {k: params[k] for k in rule.params if params and k in params}
            if rule.kwarg_tangents:
                return rule.fn(tangents, out, *args, tkwargs=tkwargs or {}, **kwargs, **stamped), rule.kind
            return rule.fn(tangents, out, *args, **kwargs, **stamped), rule.kind
        except NotImplementedError as e:  # the rule declined these arguments: fall back (and say why, if it did)
            if str(e):
                reasons.append(f"written rule ({rule.kind}): {str(e).splitlines()[0]}")
    outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
    if outs and not any(o.is_floating_point() or o.is_complex() for o in outs):
        return None, "structural"  # integer or boolean outputs only (nms's indices): no tangent, as for autograd
    live = [t for t in pytree.tree_leaves((tangents, tkwargs)) if isinstance(t, torch.Tensor)]
    if live and all(t.numel() == 0 for t in live):
        return None, "structural"  # every tangent is empty (det of a 0x0 matrix): no path carries anything
    twin = _aten_twin(op) if rule is None else None
    if twin is not None:  # a prim from a decomposition: same math as the aten op of the same name
        try:
            return node_jvp(twin, tangents, tkwargs, out, args, kwargs)
        except RuleError:
            pass
    for how, step in _STEPS:
        if step is _via_decomposition and op in _DECOMPOSING:
            continue  # already inside this op's decomposition: the other steps must serve

        try:
            t = step(op, tangents, tkwargs, out, args, kwargs)
        except Exception as e:  # noqa: BLE001 - each step may fail in its own way; we report them all
            reasons.append(f"{how}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        name = op_name(op)
        if name not in _WARNED:
            _WARNED.add(name)
            message = f"jvpgraph: no written rule for {name}; its local Jacobian comes from {how}"
            if step is _via_decomposition:
                # PyTorch's decomposition into ops that have rules: exact, and common in a gradient's graph
                # (native_batch_norm_backward, nll_loss_forward): a log line, not a warning on every first call
                log.info(message)
            else:  # PyTorch's backward or forward-AD formula, taken on trust (ctc_loss's was not the derivative)
                warnings.warn(message, stacklevel=2)
        return t, how
    raise RuleError(
        f"no local Jacobian for {op_name(op)}:\n  " + "\n  ".join(reasons)
        + "\n  Register one with jvpgraph.rules.defjvp / deflinear / defrule."
    )
