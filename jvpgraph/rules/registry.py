"""One registry of local Jacobians (edge elements of the graph), JAX style.

Each aten op maps to a :class:`Rule`. A rule computes the tangent of the op's output from the tangents of
its inputs: the sum, over the op's incoming edges, of "local Jacobian times tangent" — exactly one step of
the path sums in Appendix C. ``None`` is a symbolic zero everywhere.

* :func:`deflinear` — the op is linear in the listed arguments: its tangent is the op itself applied to the
  tangents, bias and constant terms dropped (the paper's Tables 2-4).
* :func:`defjvp` — one function per argument (an *edge*): ``edge(t, out, *args, **kwargs)`` is the local
  Jacobian of that argument applied to ``t``. Elementwise ops give ``f'(x) * t``.
* :func:`defrule` — full control: ``fn(tangents, out, *args, **kwargs)`` with ``tangents`` aligned with
  ``args`` (nested the same way, ``None`` for constants and zeros).

A missing rule is never a crash: :mod:`jvpgraph.rules.fallback` applies the theorem to that node alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import torch

__all__ = ["Rule", "RuleError", "RULES", "defrule", "defjvp", "deflinear", "lookup", "EDGE_KINDS"]

#: Kinds of local Jacobian, used to label edges (``jvpgraph draw``) and in reports.
#: ``elementwise``: a diagonal Jacobian (sigmoid, GELU); ``coupled``: nonlinear and dense along some dimension
#: of one sample (softmax, LayerNorm, norms, variances); ``batch``: coupled across the batch (BatchNorm in train
#: mode).
EDGE_KINDS = ("linear", "mask", "elementwise", "coupled", "bilinear", "batch", "structural", "opaque",
              "fallback")


@dataclasses.dataclass(frozen=True)
class Rule:
    fn: Callable[..., Any]  # fn(tangents, out, *args, **kwargs) -> tangent of out
    kind: str
    name: str = "rule"
    kwarg_tangents: bool = False  # fn also takes ``tkwargs=`` (tangents of keyword tensor arguments)
    params: tuple[str, ...] = ()  # fn also takes these keywords from the node's stamped parameters (``bn``)


RULES: dict[Any, Rule] = {}


class RuleError(RuntimeError):
    """No way to get a node's local Jacobian (or a written rule misbehaved)."""


def _register(ops, rule_for, override: bool = False):
    """Put ``rule_for(op)`` in :data:`RULES` for each op; an op that has a rule already is an error unless
    ``override`` (two rules for one op would leave the one imported last, silently)."""
    ops = ops if isinstance(ops, (list, tuple)) else [ops]
    for op in ops:
        if RULES.get(op) is not None and not override:
            name = str(op) if isinstance(op, torch._ops.OpOverloadPacket) else op_name(op)  # aten.sigmoid
            raise ValueError(f"{name} has a rule already ({RULES[op].name}, kind {RULES[op].kind!r}): pass "
                             "override=True to replace it")
    for op in ops:
        RULES[op] = rule_for(op)


def op_name(target) -> str:
    """A readable name for an fx node target: ``aten.sigmoid.default``, ``getitem``, or a placeholder's name."""
    if isinstance(target, str):
        return target
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


#: Rules for the ops of a library's namespace (``torch.ops.torchvision``), registered by calling its function
#: the first time an op of that namespace is looked up: the ops exist only once the library is imported.
NAMESPACE_RULES: dict[str, Callable[[], None]] = {}


def lookup(op) -> Rule | None:
    """The rule for an ``OpOverload`` (or its packet), or ``None``."""
    rule = RULES.get(op)
    if rule is None and hasattr(op, "overloadpacket"):
        rule = RULES.get(op.overloadpacket)
    register = NAMESPACE_RULES.pop(getattr(op, "namespace", None), None) if rule is None else None
    if register is not None:
        register()
        return lookup(op)
    return rule


def defrule(ops, fn: Callable, kind: str, *, kwarg_tangents: bool = False, params: tuple[str, ...] = (),
            override: bool = False):
    """Register ``fn(tangents, out, *args, **kwargs)`` for ``ops``.

    With ``kwarg_tangents=True`` it is called with ``tkwargs=`` too: the tangents of keyword tensor arguments
    (an attention mask that depends on the input); otherwise a tangent there sends the op to the fallback.
    ``params``: keywords ``fn`` takes from what the trace stamped on the node (``("bn",)``: BatchNorm's
    mode, :mod:`jvpgraph.batchnorm`); an unstamped node passes none (``fn``'s defaults).
    An op that has a rule already is a ValueError unless ``override=True`` (as for :func:`defjvp` and
    :func:`deflinear`).

    Example:
        >>> import torch
        >>> from jvpgraph.rules.registry import defrule, lookup
        >>> aten = torch.ops.aten
        >>> lookup(aten.neg.default).kind
        'linear'
    """
    assert kind in EDGE_KINDS, kind
    _register(ops, lambda op: Rule(fn, kind, "defrule", kwarg_tangents, tuple(params)), override)


class WithPrimal(NamedTuple):
    """A rule's answer that also replaces the op's primal output by one computed from what the tangent needs.

    A fused kernel keeps its intermediates to itself (flash attention never returns the attention weights);
    when the tangent must compute them anyway, the primal output can come from them too, and the kernel call,
    now unused, is pruned from the emitted graph. ``primal`` must equal the op's output (same structure,
    shapes, strides and dtypes) up to rounding.
    """

    primal: Any
    tangent: Any


def add_tangents(*ts):
    """Sum tangents where ``None`` is zero."""
    acc = None
    for t in ts:
        if t is None:
            continue
        acc = t if acc is None else acc + t
    return acc


def defjvp(ops, *edges: Callable | None, kind: str = "elementwise", override: bool = False):
    """Register one local-Jacobian function per positional argument (``None``: no tangent flows).

    ``edges[i](t_i, out, *args, **kwargs)`` returns arg ``i``'s contribution to the output tangent.
    Write it in differentiable ops of ``out`` and the arguments: autograd through the emitted graph (a Jacobian
    penalty's gradient, :func:`jvpgraph.hvp`) differentiates everything a rule computes, and a ``.detach()``
    in a rule is traced as an alias, so it holds nothing constant.

    Example:
        >>> import torch
        >>> from jvpgraph.rules.registry import lookup
        >>> rule = lookup(torch.ops.aten.sigmoid.default)
        >>> x = torch.tensor([0.0]); y = torch.sigmoid(x)
        >>> rule.fn((torch.tensor([2.0]),), y, x)
        tensor([0.5000])
    """
    assert kind in EDGE_KINDS, kind

    def fn(tangents, out, *args, **kwargs):
        parts = []
        for i, t in enumerate(tangents):
            if t is None:
                continue
            edge = edges[i] if i < len(edges) else None
            if edge is None:
                raise NotImplementedError(f"no local Jacobian for argument {i}")
            parts.append(edge(t, out, *args, **kwargs))
        return add_tangents(*parts)

    _register(ops, lambda op: Rule(fn, kind, "defjvp"), override)


def deflinear(ops, argnums=(0,), kind: str = "linear", override: bool = False):
    """The op is linear in ``argnums`` (the rest are constants): its tangent is the op on the tangents.

    Example:
        >>> import torch
        >>> from jvpgraph.rules.registry import lookup
        >>> rule = lookup(torch.ops.aten.permute.default)
        >>> t = torch.randn(2, 3)
        >>> torch.testing.assert_close(rule.fn((t, None), None, torch.randn(2, 3), [1, 0]), t.T)
    """

    def rule_for(op):
        def fn(tangents, out, *args, **kwargs):
            if any(t is not None for i, t in enumerate(tangents) if i not in argnums):
                raise NotImplementedError(f"{op} is linear only in arguments {argnums}")
            targs = list(args)
            for i in argnums:
                if i < len(args):
                    targs[i] = _zeros_if_none(tangents[i], args[i])
            return op(*targs, **kwargs)

        return Rule(fn, kind, "deflinear")

    _register(ops, rule_for, override)


def collapse_zeros(ts):
    """Tangent containers whose entries are all zero (``None``) become ``None``."""
    if isinstance(ts, dict):
        items = {k: collapse_zeros(t) for k, t in ts.items()}
        return None if all(t is None for t in items.values()) else items
    if isinstance(ts, (list, tuple)):
        items = [collapse_zeros(t) for t in ts]
        return None if all(t is None for t in items) else type(ts)(items)
    return ts


def _zeros_if_none(t, x):
    if t is not None:
        return t
    if isinstance(x, torch.Tensor):
        return torch.zeros_like(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_zeros_if_none(None, e) for e in x)
    return x


