"""Push tangents through an fx graph, node by node: the walk that evaluates the flipped graph's path sums.

Used for the model's whole graph (:mod:`jvpgraph.flip`) and for the small graph of one op's decomposition
(:mod:`jvpgraph.rules.fallback`), so both follow exactly the same rules.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..batchnorm import params_of
from ..ops import constant as as_constant
from .registry import RuleError, WithPrimal, collapse_zeros, op_name

__all__ = ["propagate", "tangents_of", "check_tangent"]


def tangents_of(a, tenv):
    """The tangent structure of an argument: a node's tangent, ``None`` for every constant."""
    if isinstance(a, fx.Node):
        return tenv.get(a)
    if isinstance(a, (list, tuple)):
        return type(a)(tangents_of(x, tenv) for x in a)
    if isinstance(a, dict):
        return {k: tangents_of(x, tenv) for k, x in a.items()}
    return None


def _same_shape(a, b) -> bool:
    """Equal shapes, where sizes that depend on values (masked_select's, under fake tensors) count as equal
    unless they are known to differ."""
    from torch.fx.experimental.symbolic_shapes import guard_or_true

    return len(a) == len(b) and all(guard_or_true(x == y) for x, y in zip(a, b))


_MIXED = (torch.float32, torch.bfloat16, torch.float16)  # the precisions mixed-precision training mixes


def check_tangent(node: fx.Node, out, t):
    """A rule's tangent must have its primal's shape and dtype: catch rule bugs at emission, by name.

    Returns the tangent, with a floating-point tangent of another floating-point precision cast to its
    output's (mixed precision: a bfloat16 BatchNorm input with float32 weights under autocast gives float32
    products, and the output -- so its tangent -- is bfloat16, as PyTorch's forward AD requires too)."""
    outs = pytree.tree_leaves(out)
    touts, spec = pytree.tree_flatten(t, is_leaf=lambda z: z is None)
    if t is not None and len(outs) != len(touts):
        raise RuleError(f"rule for {op_name(node.target)} returned {len(touts)} tangents for {len(outs)} outputs "
                        f"at node {node.format_node()}")
    cast = False
    for i, (o, to) in enumerate(zip(outs, touts)):
        if to is None or not isinstance(o, torch.Tensor):
            continue
        if to.dtype != o.dtype and to.dtype in _MIXED and o.dtype in _MIXED:
            touts[i] = to = to.to(o.dtype)  # (never from or to float64: that is a rule's bug)
            cast = True
        if not _same_shape(to.shape, o.shape) or to.dtype != o.dtype:
            raise RuleError(
                f"rule for {op_name(node.target)} gave a tangent of shape {tuple(to.shape)} {to.dtype} for an output "
                f"of shape {tuple(o.shape)} {o.dtype} at node {node.format_node()}")
    return pytree.tree_unflatten(touts, spec) if cast else t


def _check_same_primal(node, out, new):
    def differ(x, y):
        if not isinstance(x, torch.Tensor):
            return False
        if not isinstance(y, torch.Tensor) or not _same_shape(x.shape, y.shape) or x.dtype != y.dtype:
            return True
        # the layout matters: a view after the op may rely on it (strides of size-1 dimensions do not)
        return any(n > 1 and sx != sy for n, sx, sy in zip(x.shape, x.stride(), y.stride()))

    a, b = pytree.tree_leaves(out), pytree.tree_leaves(new)
    if len(a) != len(b) or any(differ(x, y) for x, y in zip(a, b)):
        raise RuleError(f"rule for {op_name(node.target)} replaced the primal output by one of another structure, "
                        f"shape, dtype or layout at node {node.format_node()}")


_WARNED_DECLARED: set = set()


def _warn_declared_zero(node: fx.Node, active) -> None:
    """Warn (once per op and output) that output ``i`` of a node served by PyTorch's formulas gets a zero
    tangent only because PyTorch declares it non-differentiable, when the model goes on to use it."""
    users = [u for u in node.users if active is None or active(u)]
    parent, i = node.args[0], node.args[1]
    key = (op_name(parent.target), i)
    if not users or key in _WARNED_DECLARED:
        return
    _WARNED_DECLARED.add(key)
    warnings.warn(
        f"jvpgraph: output {i} of {key[0]} (used by {users[0].format_node()}) gets a zero tangent because "
        "PyTorch's derivative formula declares it non-differentiable; if the result depends on it smoothly, "
        "this Jv is wrong there. Register a rule for the op with jvpgraph.rules.defrule (or report the op).",
        stacklevel=3)


def walk(graph: fx.Graph, env: dict, *, owner: Any = None,
         constant: Callable[[fx.Node], bool] | None = None) -> Iterator[tuple[fx.Node, Any, Any, Any]]:
    """Evaluate ``graph``'s nodes in order on the values in ``env`` (the placeholders' are there already),
    yielding each ``call_function`` node with its evaluated ``args``, ``kwargs`` and output (also in ``env``,
    where the caller may replace it before the walk goes on). ``get_attr`` nodes read ``owner``;
    ``constant(node)`` true passes the node's value through :func:`~jvpgraph.ops.constant`.

    The one loop over a graph's nodes: :func:`propagate` pushes tangents in it, and
    :func:`jvpgraph.verify.suspect_ops` checks each written rule in it.

    Example:
        >>> import torch, torch.fx as fx
        >>> g = fx.Graph(); x = g.placeholder("x")
        >>> y = g.call_function(torch.ops.aten.mul.Tensor, (x, x)); _ = g.output(y)
        >>> [(n.name, out) for n, args, kwargs, out in walk(g, {x: torch.tensor(3.0)})]
        [('mul_tensor', tensor(9.))]
    """
    for node in graph.nodes:
        if node.op == "get_attr":
            env[node] = getattr(owner, node.target)
            continue
        if node.op != "call_function":
            continue
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        out = node.target(*args, **kwargs)
        if constant is not None and constant(node):
            out = pytree.tree_map_only(torch.Tensor, as_constant, out)
        env[node] = out
        yield node, args, kwargs, out


def propagate(graph: fx.Graph, env: dict, tenv: dict, *, node_jvp: Callable, owner: Any = None,
              active: Callable[[fx.Node], bool] | None = None, how: dict | None = None,
              constant: Callable[[fx.Node], bool] | None = None) -> None:
    """Evaluate ``graph``'s ``call_function``/``get_attr`` nodes in order, filling ``env`` (primal values)
    and ``tenv`` (tangents, absent = zero) from the placeholders' entries already there.

    ``node_jvp(op, tangents, tkwargs, out, args, kwargs, params=) -> (tangent, how)`` gives one node's tangent
    (:func:`jvpgraph.rules.node_jvp`: the written rule, else the fallback chain, which walks a decomposition
    with this same function — passed in, so that this walk does not import the chain that uses it).

    ``active(node)`` false skips a node's tangent (pruned: off every input -> output path); ``how`` gets,
    per node name, where its local Jacobian came from; ``constant(node)`` true passes the node's value through
    :func:`~jvpgraph.ops.constant` (no gradient flows back through it: what the user detached or
    computed under ``torch.no_grad()``).

    Example:
        >>> import torch, torch.fx as fx
        >>> from jvpgraph.rules import node_jvp
        >>> from jvpgraph.rules.propagate import propagate
        >>> g = fx.Graph(); x = g.placeholder("x")
        >>> y = g.call_function(torch.ops.aten.sin.default, (x,)); _ = g.output(y)
        >>> env, tenv = {x: torch.tensor([0.0, 1.0])}, {x: torch.ones(2)}
        >>> propagate(g, env, tenv, node_jvp=node_jvp)
        >>> torch.testing.assert_close(tenv[y], torch.cos(env[x]))
    """

    declared_zero: dict[fx.Node, set[int]] = {}  # outputs PyTorch's formulas gave no tangent (see below)
    for node, args, kwargs, out in walk(graph, env, owner=owner, constant=constant):
        if active is not None and not active(node):
            continue
        if node.target is operator.getitem:
            parent = tenv.get(node.args[0])
            t = None if parent is None else parent[node.args[1]]
            if t is not None:
                tenv[node] = t
            elif node.args[1] in declared_zero.get(node.args[0], ()):
                _warn_declared_zero(node, active)
            continue
        targs = collapse_zeros(tangents_of(node.args, tenv))
        tkw = collapse_zeros(tangents_of(node.kwargs, tenv)) or {}
        if targs is None and not tkw:
            continue
        targs = targs if targs is not None else (None,) * len(node.args)
        targs = tuple(targs) + (None,) * (len(node.args) - len(targs))
        try:
            t, kind = node_jvp(node.target, targs, tkw, out, args, kwargs, params=params_of(node))
        except RuleError as e:
            trace = node.meta.get("stack_trace")
            raise RuleError(f"{e}\n  at node: {node.format_node()}" + (f"\n  from:\n{trace}" if trace else "")) \
                from e
        if isinstance(t, WithPrimal):  # the rule recomputed the primal from the tangent's intermediates
            _check_same_primal(node, out, t.primal)
            out = env[node] = t.primal
            t = t.tangent
        t = check_tangent(node, out, t)
        if kind in ("flipped-vjp", "forward-ad") and isinstance(out, (tuple, list)):
            # a floating output PyTorch's backward (or forward-AD formula) gives no tangent: declared
            # non-differentiable there, which is not a zero derivative (lstsq's singular values were)
            flat_t = list(t) if isinstance(t, (tuple, list)) else [None] * len(out)
            declared_zero[node] = {i for i, (o, ti) in enumerate(zip(out, flat_t))
                                   if ti is None and isinstance(o, torch.Tensor) and o.is_floating_point()
                                   and o.numel()}
        if how is not None:
            how[node.name] = kind
        if t is not None:
            tenv[node] = t
