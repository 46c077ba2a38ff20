"""The computation as a graph: the fx graph of a trace plus its networkx view.

Nodes are ops (and the inputs and the output); an edge ``a -> b`` is data flow and carries the *kind* of
the local Jacobian ``∂b/∂a`` (its edge element in Appendix C). Reverse mode sums, over every path from the
output back to an input, the product of the transposed edge elements; :meth:`Graph.flip` builds the
flipped graph whose path sums give ``Jv``.
"""

from __future__ import annotations

import functools
import operator

import networkx as nx
import torch
import torch.fx as fx

from .rules import lookup
from .rules.registry import op_name
from .trace import TracedProgram, grad_enabled, module_of

__all__ = ["Graph"]


def node_rule(node: fx.Node):
    """The registered rule of ``node``'s op (``None`` for inputs, ``getitem`` and ops left to the fallback)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return None
    return lookup(node.target)


def edge_kind(node: fx.Node, rule=None) -> str:
    """Kind of the local Jacobian on the edges entering ``node`` (see :data:`jvpgraph.rules.EDGE_KINDS`)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return "structural"
    rule = rule or node_rule(node)
    return rule.kind if rule is not None else "fallback"


class Graph:
    """A traced computation: ``.program`` (fx, aten level), ``.nx`` (networkx).

    A plain view that depends on nothing above it: :func:`jvpgraph.flip.flip` and :func:`jvpgraph.draw.draw`
    build on it, and each adds its method form (``g.flip()``, ``g.draw()``) when its module is imported (the
    package imports both).

    ``wrt`` lists the user inputs that carry a tangent (default: every floating-point input).

    Example:
        >>> import torch, torch.nn as nn
        >>> from jvpgraph.trace import trace_program
        >>> g = Graph(trace_program(nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)),
        ...                         (torch.randn(5, 3),)))
        >>> sorted({k for _, _, k in g.nx.edges(data="jacobian")})
        ['bilinear', 'elementwise', 'linear', 'structural']
        >>> g.nx.nodes["sigmoid"]["shape"]
        (5, 4)
    """

    def __init__(self, program: TracedProgram, wrt: list[int] | None = None):
        self.program = program
        self.wrt = list(program.diff_inputs if wrt is None else wrt)
        inputs = program.input_nodes
        self.diff_nodes: list[fx.Node] = [inputs[i] for i in self.wrt]

    @property
    def gm(self) -> fx.GraphModule:
        return self.program.gm

    @functools.cached_property
    def nx(self) -> nx.DiGraph:
        """networkx view: nodes keyed by fx name, with ``target``, ``shape``, ``dtype``, ``role``, ``module``,
        ``active``; edges with ``jacobian`` (the local Jacobian's kind), ``rule`` (the registered
        :class:`~jvpgraph.rules.Rule` whose action is the edge element, ``None`` for the fallback) and
        ``arg`` (the position of the edge among the node's inputs)."""
        prog = self.program
        roles = {}
        P, B = len(prog.param_names), len(prog.buffer_names)
        for i, n in enumerate(prog.placeholders):
            roles[n] = "param" if i < P else "buffer" if i < P + B else "input"
        active = self.active_nodes
        G = nx.DiGraph()
        for node in self.gm.graph.nodes:
            val = node.meta.get("val")
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
            dtype = val.dtype if isinstance(val, torch.Tensor) else None
            module = module_of(node)
            G.add_node(node.name, target=op_name(node.target), op=node.op, shape=shape, dtype=dtype,
                       role=roles.get(node, "output" if node.op == "output" else "op"), module=module,
                       active=node in active or (node.op == "output"))
            rule = node_rule(node)
            kind = edge_kind(node, rule)
            for pos, inp in enumerate(node.all_input_nodes):
                G.add_edge(inp.name, node.name, jacobian=kind, rule=rule, arg=pos)
        return G

    @functools.cached_property
    def active_nodes(self) -> set[fx.Node]:
        """Nodes on some differentiated-input -> output path; all others have a zero tangent.

        Nodes computed under ``torch.no_grad()`` are constants (as for autograd) and cut every path.
        """
        forward: set[fx.Node] = set(self.diff_nodes)
        for node in self.gm.graph.nodes:
            if not grad_enabled(node):
                continue  # computed under torch.no_grad(): a constant for autograd, so for Jv too
            if isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool)):
                continue  # a size read in a trace with symbolic sizes (aten.sym_size): a number, no tangent
            if node.op == "call_function" and any(a in forward for a in node.all_input_nodes):
                forward.add(node)
        backward: set[fx.Node] = set()
        todo = [o for o in self.program.output_nodes if isinstance(o, fx.Node)]
        while todo:
            n = todo.pop()
            if n in backward:
                continue
            backward.add(n)
            todo.extend(n.all_input_nodes)
        return forward & backward

    def __repr__(self):
        n_ops = sum(1 for n in self.gm.graph.nodes if n.op == "call_function")
        return (f"Graph({n_ops} aten ops, {len(self.active_nodes)} on input->output paths, "
                f"wrt inputs {self.wrt}, bn={self.program.bn!r})")
