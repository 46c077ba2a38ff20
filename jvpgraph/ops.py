"""jvpgraph's own custom ops, in one place: what each one computes, its fake (shape) kernel and its autograd
formula, and the side tables that carry their Python state.

* ``jvpgraph::autograd_function`` (:func:`autograd_function`): a user ``torch.autograd.Function`` kept opaque
  by tracing; its backward is the Function's own (recomputed under autograd). State: :data:`OPAQUE`, the
  Function's class and how to rebuild its arguments.
* ``jvpgraph::forward_ad_node`` (:func:`forward_ad_node`): PyTorch's forward-AD formula of one node with no
  rule (the last step of :mod:`jvpgraph.rules.fallback`), run when the flipped graph runs; its backward is
  reverse mode over that formula. State: :data:`FORWARD_AD_NODES`, the op and its argument skeleton.
* ``jvpgraph::constant`` (:func:`constant`): a value autograd holds constant, where the model detached.
* ``jvpgraph::norm_stats`` (:func:`norm_stats`): a normalization kernel's saved mean and ``rstd``, made
  differentiable in the input.

The attention kernels (``jvpgraph::attention_tangent`` and its backward) stay with their rule in
:mod:`jvpgraph.rules.attention`: they are that rule's implementation, not glue between layers.

Entries of the two tables live as long as the graphs that call them (:mod:`jvpgraph.owned`).

Example:
    >>> import torch
    >>> from jvpgraph.ops import fill
    >>> import torch.utils._pytree as pytree
    >>> flat, spec = pytree.tree_flatten(((torch.zeros(1), 2.0), {"alpha": torch.zeros(1)}))
    >>> fill(flat, spec, ([0, 2], [torch.ones(1), torch.full((1,), 3.0)]))
    ((tensor([1.]), 2.0), {'alpha': tensor([3.])})
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree

from .owned import OwnedTable

__all__ = ["OPAQUE", "FORWARD_AD_NODES", "autograd_function", "forward_ad_node", "constant", "norm_stats",
           "fill", "diffable", "flat_outputs", "forward_only", "orig_apply"]


def diffable(x) -> bool:
    """Is ``x`` a tensor a tangent can live on (floating or complex)?

    Example:
        >>> diffable(torch.ones(1)), diffable(torch.ones(1, dtype=torch.long)), diffable(1.0)
        (True, False, False)
    """
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def fill(flat: Sequence, spec: pytree.TreeSpec, *slots: tuple[Sequence[int], Sequence[Any]]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from the flattened ``flat`` (``pytree.tree_flatten((args, kwargs))``) with each
    ``(positions, values)`` pair written into its positions, later pairs over earlier ones.

    Every op that calls an aten op on new tensors in old arguments' places (a decomposition, a forward-AD
    node, the flipped VJP of one node) rebuilds its arguments this way. See the module's example.
    """
    items = list(flat)
    for positions, values in slots:
        for i, v in zip(positions, values):
            items[i] = v
    return pytree.tree_unflatten(items, spec)


# --------------------------------------------------------------------------------------------------
# jvpgraph::autograd_function: a user autograd.Function, opaque, with its own backward
# --------------------------------------------------------------------------------------------------
#: ``autograd.Function.apply`` as PyTorch defines it (tracing replaces it while it routes user Functions here)
ORIG_APPLY = torch.autograd.Function.__dict__["apply"]
#: key -> (the Function's class, how to rebuild its arguments from the tensors): owned by the graphs calling it
OPAQUE = OwnedTable("autograd.Function")


def orig_apply(cls, *args):
    """``cls.apply(*args)`` through PyTorch's own ``apply``, even while tracing has replaced it.

    Example:
        >>> class Double(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(x): return 2 * x
        ...     @staticmethod
        ...     def setup_context(ctx, inputs, output): pass
        ...     @staticmethod
        ...     def backward(ctx, g): return 2 * g
        >>> orig_apply(Double, torch.ones(2))
        tensor([2., 2.])
    """
    return ORIG_APPLY.__get__(None, cls)(*args)


def flat_outputs(out) -> list[torch.Tensor]:
    """A Function's output as a list (one tensor or a tuple of them).

    Example:
        >>> len(flat_outputs(torch.ones(1))), len(flat_outputs((torch.ones(1), torch.ones(2))))
        (1, 2)
    """
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run_opaque(inputs: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    cls, rebuild = OPAQUE[key]
    with torch.no_grad():
        outs = flat_outputs(orig_apply(cls, *rebuild(list(inputs))))
    ptrs = {i.data_ptr() for i in inputs if isinstance(i, torch.Tensor) and not i.is_meta}
    # a custom op may not return an alias of its input
    return [o.clone() if (not o.is_meta and o.data_ptr() in ptrs) else o for o in outs]


class _ForwardCtx:
    """Stands in for the autograd ctx when only the structure of a Function's output is wanted."""

    def __init__(self, n):
        self.needs_input_grad = (False,) * n
        self.saved_tensors = ()

    def __getattr__(self, name):  # save_for_backward, mark_dirty, set_materialize_grads, ...
        return lambda *a, **k: None


def forward_only(cls, args):
    """``cls.forward`` on ``args`` without autograd: the structure of the Function's output (how many tensors,
    their shapes), for the fake kernel and for tracing. Old-style Functions get a ctx that records nothing.

    Example:
        >>> class Half(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x / 2
        ...     @staticmethod
        ...     def backward(ctx, g): return g / 2
        >>> forward_only(Half, (torch.ones(2),))
        tensor([0.5000, 0.5000])
    """
    if cls.setup_context is not torch.autograd.Function.setup_context:
        return cls.forward(*args)
    return cls.forward(_ForwardCtx(len(args)), *args)


@torch.library.custom_op("jvpgraph::autograd_function", mutates_args=())
def autograd_function(inputs: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    """Opaque call of a user ``torch.autograd.Function``: ``OPAQUE[key]`` holds its class and how to rebuild
    its arguments from ``inputs``; the forward is the Function's, and so is the backward (the Function run
    again under autograd, its own ``backward`` applied). Tracing records this op where the model called
    ``apply``, so neither the trace nor Jv sees through the Function.

    Example:
        >>> class Round(torch.autograd.Function):  # straight-through: backward is the identity
        ...     @staticmethod
        ...     def forward(x): return x.round()
        ...     @staticmethod
        ...     def setup_context(ctx, inputs, output): pass
        ...     @staticmethod
        ...     def backward(ctx, g): return g
        >>> key = OPAQUE.add((Round, lambda ts: ts))
        >>> x = torch.tensor([0.3, 1.6], requires_grad=True)
        >>> (y,) = autograd_function([x], key)
        >>> y.sum().backward()
        >>> y.detach(), x.grad
        (tensor([0., 2.]), tensor([1., 1.]))
    """
    return _run_opaque(inputs, key)


@autograd_function.register_fake
def _(inputs, key):
    cls, rebuild = OPAQUE[key]
    with torch.no_grad():
        return [o.clone() for o in flat_outputs(forward_only(cls, rebuild(list(inputs))))]


def _opaque_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[0])
    ctx.key = inputs[1]


def _opaque_backward(ctx, grads):
    """Recompute the Function under autograd and run *its* backward on ``grads``."""
    cls, rebuild = OPAQUE[ctx.key]
    inputs = list(ctx.saved_tensors)
    with torch.enable_grad():
        leaves = [i.detach().requires_grad_(i.is_floating_point() or i.is_complex()) for i in inputs]
        outs = flat_outputs(orig_apply(cls, *rebuild(leaves)))
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [l for l in leaves if l.requires_grad]
        got = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], wrt, [g for _, g in pairs],
                allow_unused=True, create_graph=torch.is_grad_enabled(),
            )
            if pairs and wrt else [None] * len(wrt)
        )
        res = [next(got) if l.requires_grad else None for l in leaves]
    return [torch.zeros_like(i) if r is None else r for i, r in zip(inputs, res)], None


autograd_function.register_autograd(_opaque_backward, setup_context=_opaque_setup)
OPAQUE.bind(torch.ops.jvpgraph.autograd_function.default, key_arg=1)


@autograd_function.register_vmap
def _opaque_vmap(info, in_dims, inputs, key):
    """Under ``torch.vmap`` inside the traced function: the Function once per slice of the batch, outputs
    stacked. That is vmap's definition, so it holds for any Function (the trace records one opaque node
    per slice; a Function's own ``vmap`` staticmethod or ``generate_vmap_rule`` is not needed)."""
    dims = in_dims[0]
    per_slice = [autograd_function([x if d is None else x.select(d, i) for x, d in zip(inputs, dims)], key)
                 for i in range(info.batch_size)]
    return [torch.stack(outs) for outs in zip(*per_slice)], [0] * len(per_slice[0])


# --------------------------------------------------------------------------------------------------
# jvpgraph::forward_ad_node: PyTorch's forward-AD formula of one node, run when the flipped graph runs
# --------------------------------------------------------------------------------------------------
#: key -> (op, argument skeleton with the tensor slots empty, spec, tensor positions, positions
#: carrying a tangent, output shapes): one entry per node, owned by the graphs that call it
FORWARD_AD_NODES = OwnedTable("forward-AD node")


def forward_ad_call(key, tensors, tangents):
    """The tangents of the floating outputs of node ``key`` (:data:`FORWARD_AD_NODES`) at ``tensors`` in
    the tangent-carrying inputs' directions ``tangents``, by ``torch.func.jvp`` on the op alone.

    Example:
        >>> flat, spec = pytree.tree_flatten(((torch.zeros(2),), {}))
        >>> key = FORWARD_AD_NODES.add((torch.ops.aten.exp.default, [None], spec, [0], [0], [((2,), torch.float)]))
        >>> forward_ad_call(key, [torch.zeros(2)], [torch.tensor([1.0, 3.0])])
        [tensor([1., 3.])]
    """
    op, flat, spec, tpos, dpos, _ = FORWARD_AD_NODES[key]

    def f(*d):
        a, k = fill(flat, spec, (tpos, tensors), (dpos, d))
        return tuple(o for o in pytree.tree_leaves(op(*a, **k)) if diffable(o))

    diff = [tensors[tpos.index(i)] for i in dpos]
    return list(torch.func.jvp(f, tuple(diff), tuple(tangents))[1])


@torch.library.custom_op("jvpgraph::forward_ad_node", mutates_args=())
def forward_ad_node(tensors: list[torch.Tensor], tangents: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    """PyTorch's forward-AD formula of one node (:data:`FORWARD_AD_NODES` ``[key]``) run when the flipped
    graph runs: the last fallback step for an op with no rule, decomposition or differentiable backward. Its
    backward is reverse mode over the formula, so a Jacobian penalty can train through it.

    Example:
        >>> flat, spec = pytree.tree_flatten(((torch.zeros(2),), {}))
        >>> key = FORWARD_AD_NODES.add((torch.ops.aten.sin.default, [None], spec, [0], [0], [((2,), torch.float)]))
        >>> forward_ad_node([torch.zeros(2)], [torch.tensor([1.0, 3.0])], key)
        [tensor([1., 3.])]
    """
    return [t.clone() for t in forward_ad_call(key, tensors, tangents)]


@forward_ad_node.register_fake
def _(tensors, tangents, key):
    shapes = FORWARD_AD_NODES[key][5]
    dev = tensors[0].device
    return [torch.empty(sh, dtype=dt, device=dev) for sh, dt in shapes]


def _forward_ad_node_setup(ctx, inputs, output):
    tensors, tangents, key = inputs
    ctx.n, ctx.key = len(tensors), key
    # which inputs autograd wants a gradient for (a constant such as pinv's rtol must not be asked)
    ctx.wanted = [t.requires_grad for t in (*tensors, *tangents)]
    ctx.save_for_backward(*tensors, *tangents)


def _forward_ad_node_backward(ctx, grads):
    # the gradient of the node's tangent in its inputs (what a Jacobian penalty trains with, through an op
    # with no rule): reverse mode over PyTorch's forward-AD formula. Without it autograd refused with
    # "no autograd formula was registered" (linalg.pinv, angle; the second-order OpInfo sweep).
    saved = ctx.saved_tensors
    tensors, tangents = saved[:ctx.n], saved[ctx.n:]
    with torch.enable_grad():
        ts = [t.detach().requires_grad_(w and diffable(t)) for t, w in zip(tensors, ctx.wanted)]
        ds = [d.detach().requires_grad_(w) for d, w in zip(tangents, ctx.wanted[ctx.n:])]
        outs = forward_ad_call(ctx.key, ts, ds)
        pairs = [(o, g if g is not None else torch.zeros_like(o)) for o, g in zip(outs, grads) if o.requires_grad]
        wrt = [t for t in [*ts, *ds] if t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                   if pairs else [None] * len(wrt))
    res = [next(got) if t.requires_grad else None for t in [*ts, *ds]]
    return res[:ctx.n], res[ctx.n:], None


forward_ad_node.register_autograd(_forward_ad_node_backward, setup_context=_forward_ad_node_setup)
FORWARD_AD_NODES.bind(torch.ops.jvpgraph.forward_ad_node.default, key_arg=2)


# --------------------------------------------------------------------------------------------------
# jvpgraph::constant and jvpgraph::norm_stats
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("jvpgraph::constant", mutates_args=())
def constant(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a constant for autograd (no gradient flows back through it), as an op ``make_fx`` keeps.

    The emitted flipped graph uses it where the model detached a value or computed it under
    ``torch.no_grad()``. ``aten.detach`` cannot serve: ``make_fx`` records it as ``alias`` (torch 2.14), and
    must, because autograd's own saved tensors are detached that way while the flipped VJP is traced.

    Example:
        >>> import torch
        >>> w = torch.ones(2, requires_grad=True)
        >>> (constant(w * 3) * w).sum().backward()
        >>> w.grad
        tensor([3., 3.])
    """
    return x.clone()


@constant.register_fake
def _(x):
    return torch.empty_like(x)


constant.register_autograd(lambda ctx, g: None, setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("jvpgraph::norm_stats", mutates_args=())
def norm_stats(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, dims: list[int]) -> tuple[
        torch.Tensor, torch.Tensor]:
    """The statistics a normalization kernel returned (``mean``, ``rstd = (var + eps)^-1/2`` of ``x`` over
    ``dims``, shaped to broadcast against ``x``), made differentiable in ``x``.

    The kernels return them as outputs autograd does not differentiate: a tangent built on them is right as a
    value, yet its gradient with respect to the parameters (what a Jacobian penalty trains with) would miss how
    the statistics move (measured: the spectral penalty's gradient for the weights feeding a train-mode
    BatchNorm was off by 80-180%). Recomputing them costs a pass over ``x`` (``var_mean`` over the last
    dimension took 4x LayerNorm itself here); this op copies the kernel's numbers and carries their gradient,
    ``d mean = mean(dx)``, ``d rstd = -rstd³ mean((x - mean) dx)``, computed only when a backward asks.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 4.0]], requires_grad=True)
        >>> var, mean = torch.var_mean(x.detach(), dim=1, keepdim=True, correction=0)
        >>> m, r = norm_stats(x, mean, (var + 1e-5).rsqrt(), [1])
        >>> m.sum().backward()
        >>> x.grad  # d mean / dx = 1/3
        tensor([[0.3333, 0.3333, 0.3333]])
    """
    return mean.clone(), rstd.clone()


@norm_stats.register_fake
def _(x, mean, rstd, dims):
    return torch.empty_like(mean), torch.empty_like(rstd)


def _norm_stats_setup(ctx, inputs, output):
    x, _, _, dims = inputs
    ctx.save_for_backward(x, *output)
    ctx.dims = dims


def _norm_stats_backward(ctx, g_mean, g_rstd):
    x, mean, rstd = ctx.saved_tensors
    n = 1
    for d in ctx.dims:
        n *= x.shape[d]
    gx = torch.zeros_like(x)
    if g_mean is not None:
        gx = gx + g_mean / n
    if g_rstd is not None:
        gx = gx - (g_rstd * rstd * rstd * rstd / n) * (x - mean)
    return gx, None, None, None


norm_stats.register_autograd(_norm_stats_backward, setup_context=_norm_stats_setup)


# doctest does not look inside custom-op objects: their examples run from here (``--doctest-modules``)
__test__ = {name: getattr(globals()[name], "_init_fn", globals()[name]).__doc__
            for name in ("autograd_function", "forward_ad_node", "constant", "norm_stats")}
