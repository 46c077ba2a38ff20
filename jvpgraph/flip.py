"""The Appendix C construction: flip the reverse-mode graph, add a fictitious node ``v``, emit Jv as code.

Reverse mode computes ``Jᵀu`` by summing, over every path from the output to an input, the product of
the transposed local Jacobians along it. Flip every edge of that graph (its elements, the local
Jacobians, stay), put a fictitious node carrying ``v`` in front of the differentiated inputs, and the same
path sums give ``Jv``: at each node, the tangent is the sum over incoming edges of edge element times the
tangent of the edge's source. That is one walk of the nodes in order — so the flipped graph *is*
runnable code, and we emit it as a ``torch.fx.GraphModule``:

    node b:   t_b = Σ_{a -> b}  J^{a->b} t_a          (rule of b's op; None = symbolic zero)
    input x:  t_x = v                                  (the fictitious node's edge)

Nodes off every input -> output path are pruned (their tangent is zero). The emitted module computes the
primal and the tangent together (``jvp`` on a new batch); :meth:`FlippedGraph.partition` splits it into a
forward that records what the tangent pass needs and a tangent pass that reuses it (``linearize``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch._decomp.decompositions import nop_decomposition
from torch.fx.experimental.proxy_tensor import make_fx

from .graph import Graph
from .owned import collecting, own
from .trace import (_conv_backend_unguarded, _has_leftover_mutations, _refunctionalize, draws_random, forked_rng,
                    grad_enabled, name_placeholders, observers_hidden)
from .rules import node_jvp
from .rules.propagate import propagate

__all__ = ["FlippedGraph", "FICTITIOUS", "flip"]

#: Name of the fictitious node carrying ``v`` in :attr:`FlippedGraph.nx`.
FICTITIOUS = "v"


def _is_impure(node: fx.Node) -> bool:
    """Dead-code elimination keeps the signature, any op with an effect and every random draw (an unused one
    still moves the generator: the draws after it must be those of an eager call)."""
    if node.op in ("placeholder", "output"):
        return True
    return (isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable) or draws_random(node)


def _tangent_nodes(graph: fx.Graph, n_primal: int) -> set[fx.Node]:
    """Nodes that depend on a tangent placeholder (the placeholders after the first ``n_primal``)."""
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    on_tangent: set[fx.Node] = set(phs[n_primal:])
    for n in graph.nodes:
        if n.op == "call_function" and any(a in on_tangent for a in n.all_input_nodes):
            on_tangent.add(n)
    return on_tangent


def _primal_first(graph: fx.Graph, n_primal: int) -> None:
    """Move every tangent op after every primal op (relative orders kept; still topological, since no
    primal op reads a tangent). The emitted order interleaves them (each op's tangent right after it), which
    frees what only the tangent reads at once: 40% of the peak memory on VGG16-BN, ResNet-18 and a ViT, and as
    fast or faster. On LeNet (few large activations) interleaving ran 2x slower with glibc's allocator
    (buffers of a megabyte freed and mapped again on every call; not with larger mmap/trim thresholds):
    :class:`jvpgraph.api` times both orders on the first calls and keeps primal-first only where it is
    clearly faster."""
    out = next(n for n in graph.nodes if n.op == "output")
    tangent = _tangent_nodes(graph, n_primal)
    for n in [n for n in graph.nodes if n.op == "call_function" and n in tangent]:
        out.prepend(n)


def _fuse_relu_max_pool(graph: fx.Graph) -> int:
    """ReLU then max-pool: apply ReLU's mask after the pool's gather, on the pooled output.

    The tangent of ``pool(relu(x))`` is ``gather(mask(relu) * t, idx)``; since the pool picks the largest ReLU
    output of its window, the mask at the picked index is ``pooled > 0``, so it equals
    ``threshold_backward(gather(t, idx), pooled, 0)`` exactly (ties and NaN included). The ReLU output, the
    size of the layer, no longer has to be kept for the tangent pass (the pooled output is 1/4 of it) and
    the mask runs on the pooled size. Returns how many were rewritten.
    """
    aten = torch.ops.aten
    pools = (aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default)

    def only_user(n, target):
        users = list(n.users)
        return users[0] if len(users) == 1 and users[0].target in target else None

    done = 0
    for tb in list(graph.nodes):
        if tb.target is not aten.threshold_backward.default or tb.args[2] != 0:
            continue
        t, relu = tb.args[0], tb.args[1]
        if not isinstance(relu, fx.Node) or relu.target is not aten.relu.default:
            continue
        view = only_user(tb, (aten.view.default,))
        gather = view and only_user(view, (aten.gather.default,))
        back = gather and only_user(gather, (aten.view.default,))
        if back is None or gather.args[0] is not view or gather.args[1] != -1:
            continue
        idx = gather.args[2]
        pool_idx = idx.args[0] if isinstance(idx, fx.Node) and idx.target is aten.view.default else None
        if pool_idx is None or pool_idx.target is not operator.getitem or pool_idx.args[1] != 1:
            continue
        pool = pool_idx.args[0]
        if pool.target not in pools or pool.args[0] is not relu:
            continue
        pooled = next((u for u in pool.users if u.target is operator.getitem and u.args[1] == 0), None)
        if pooled is None:
            continue
        with graph.inserting_before(back):
            t_view = graph.call_function(aten.view.default, (t, *view.args[1:]))
            picked = graph.call_function(aten.gather.default, (t_view, -1, idx))
            shaped = graph.call_function(aten.view.default, (picked, *back.args[1:]))
            masked = graph.call_function(aten.threshold_backward.default, (shaped, pooled, 0))
        for new, old in ((t_view, view), (picked, gather), (shaped, back), (masked, back)):
            new.meta = dict(old.meta)
        back.replace_all_uses_with(masked)
        for n in (back, gather, view, tb):
            graph.erase_node(n)
        done += 1
    return done


def _differentiable_copies(graph: fx.Graph) -> int:
    """Replace functional ``aten.copy(self, src)`` (left by functionalizing a fallback's backward formula, e.g.
    ``as_strided``'s) with ``where(True, src, self)``: the same values, dtype and layout, but differentiable —
    PyTorch has no derivative for ``aten.copy``, and the transposed tangent pass (``Jᵀu`` with the statistics
    held, ``spectral_norm``) differentiates the tangent graph. Returns how many were replaced."""
    aten = torch.ops.aten
    done = 0
    for node in list(graph.nodes):
        if node.target is not aten.copy.default:
            continue
        self_, src = node.args[0], node.args[1]
        dtype = node.meta["val"].dtype if "val" in node.meta else None
        src_dtype = src.meta["val"].dtype if isinstance(src, fx.Node) and "val" in src.meta else None
        with graph.inserting_before(node):
            keep = graph.call_function(aten.ones_like.default, (self_,), {"dtype": torch.bool})
            picked = graph.call_function(aten.where.self, (keep, src, self_))
            if dtype is not None and src_dtype != dtype:  # where promotes; copy casts to self's dtype
                picked = graph.call_function(aten._to_copy.default, (picked,), {"dtype": dtype})
        picked.meta = dict(node.meta)
        node.replace_all_uses_with(picked)
        graph.erase_node(node)
        done += 1
    return done


_DETACH_AS_ALIAS = {torch.ops.aten.detach.default: nop_decomposition}


def _prune_output_masks(graph: fx.Graph) -> int:
    """Backward kernels computing several gradients take an ``output_mask`` (``convolution_backward``,
    ``native_batch_norm_backward``, ``native_layer_norm_backward``, ...): switch off the outputs nothing reads,
    so that the kernel does not compute them (in a gradient's graph pruned to its tangents, the primal weight
    gradients: a convolution's costs as much as its forward). Returns how many nodes changed."""
    changed = 0
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        names = [a.name for a in node.target._schema.arguments]
        if "output_mask" not in names:
            continue
        i = names.index("output_mask")
        positional = i < len(node.args)
        mask = node.args[i] if positional else node.kwargs.get("output_mask")
        if not isinstance(mask, (list, tuple)) or not all(isinstance(m, bool) for m in mask):
            continue
        if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
            continue  # the tuple itself is used: every output may be read
        used = {u.args[1] for u in node.users if u.users}  # a getitem nothing reads is dead
        new = [m and j in used for j, m in enumerate(mask)]
        if new == list(mask) or not any(new):
            continue
        if positional:
            node.args = (*node.args[:i], new, *node.args[i + 1:])
        else:
            node.kwargs = {**node.kwargs, "output_mask": new}
        changed += 1
    return changed


def _views_as_reshapes(graph: fx.Graph) -> int:
    """``aten.view`` -> ``aten.reshape`` (how many). The trace chose views from fake tensors' strides; where an
    op's meta function gives other strides than its kernel (``native_group_norm`` on a channels_last CPU input:
    contiguous on meta, channels_last for real; timm's cpubone), such a view fails on the real tensor. A reshape
    is that same view wherever the strides allow one, and a copy with the same values where they do not."""
    n = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
            n += 1
    return n


def _constant_boundary(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose values must reach the emitted graph as constants: ``aten.detach`` in the user's code,
    and values computed under ``torch.no_grad()`` that an op run with gradients (or the output) reads."""
    cut = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.detach.default:
            cut.add(node)
        elif not grad_enabled(node) and any(u.op == "output" or grad_enabled(u) for u in node.users):
            cut.add(node)
    return cut


def _placeholder_examples(gm: fx.GraphModule):
    """Fake tensors shaped as ``gm``'s placeholders, and their fake mode (``make_fx`` traces in it): no
    storage, where real examples would hold a copy of every parameter (and the tangents another) during the
    first call's flip."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake = FakeTensorMode(allow_fallback_kernels=True, allow_non_fake_inputs=True, shape_env=ShapeEnv(),
                          static_shapes=True)
    with fake:
        out = [torch.empty_strided(tuple(n.meta["val"].shape), tuple(n.meta["val"].stride()),
                                   dtype=n.meta["val"].dtype, device=n.meta["val"].device)
               for n in gm.graph.nodes if n.op == "placeholder"]
    return out, fake


class FlippedGraph:
    """The flipped graph of a :class:`~jvpgraph.graph.Graph`, emitted as runnable fx code.

    * ``.module`` — ``GraphModule`` taking ``(*params, *buffers, *inputs, *tangents)`` and returning
      ``(*outputs, *tangent_outputs, *new_buffers)``; ``.code`` is its Python source.
    * ``.nx`` — the networkx flipped graph: the fictitious node ``"v"`` plus the nodes on input -> output
      paths, each edge carrying its local Jacobian's kind.
    * ``.how`` — for each node, how its local Jacobian was obtained (a rule kind or a fallback step).
    * ``.partition()`` — ``(forward, tangent)`` modules for a recorded forward.

    Example:
        >>> import torch, torch.nn as nn
        >>> from jvpgraph.trace import trace_program
        >>> from jvpgraph.graph import Graph
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
        >>> x, v = torch.randn(5, 3), torch.randn(5, 3)
        >>> fg = Graph(trace_program(net, (x,))).flip()
        >>> out, jv = fg.module(*net.parameters(), x, v)
        >>> ref = torch.func.jvp(net, (x,), (v,))[1]
        >>> torch.testing.assert_close(jv, ref)
    """

    def __init__(self, graph: Graph):
        self.graph = graph
        prog = graph.program
        self.n_outputs = len(prog.output_nodes)
        self.buffer_update_names = list(prog.buffer_updates)
        self.how: dict[str, str] = {}
        self.module = self._emit()

    # ------------------------------------------------------------------ emission
    def _joint(self, *flat):
        """Walk the forward graph once: primal values and, for active nodes, tangents by their rules."""
        g = self.graph
        prog = g.program
        gm = prog.gm
        active = g.active_nodes
        placeholders = prog.placeholders
        env: dict[fx.Node, Any] = dict(zip(placeholders, flat[: len(placeholders)]))
        tenv: dict[fx.Node, Any] = dict(zip(g.diff_nodes, flat[len(placeholders):]))
        # values the user computed under torch.no_grad() or detached are constants for autograd: in the
        # emitted graph too, so that differentiating Jv in the parameters (the regularizer's backward) does not
        # go through them (it did before, silently: the penalty's gradient was wrong). make_fx records
        # detach as alias (torch 2.14; autograd's own saved-tensor detaches must stay differentiable there,
        # or the flipped VJP's gradient breaks), so the cut is the op `jvpgraph::constant`, at the boundary.
        cut = _constant_boundary(gm.graph)
        propagate(gm.graph, env, tenv, node_jvp=node_jvp, owner=gm, active=active.__contains__, how=self.how,
                  constant=cut.__contains__)
        out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outs = list(out_node.args[0])
        values = [env[o] if isinstance(o, fx.Node) else o for o in outs]
        touts = []
        for o, val in zip(outs, values):
            t = tenv.get(o) if isinstance(o, fx.Node) else None
            if t is None and isinstance(val, torch.Tensor):
                t = torch.zeros_like(val)  # output off every path from the inputs: Jv is exactly zero there
            touts.append(t)
        news = [env[n] for n in prog.buffer_updates.values()]
        return (*values, *touts, *news)

    def _emit(self) -> fx.GraphModule:
        prog = self.graph.program
        # a trace specialized to values (data-dependent shapes) is walked on those values, for real; one with
        # symbolic sizes on its own fake tensors, so that the flipped graph keeps the symbols (and what it
        # assumes about them joins the trace's size guards)
        inputs = prog.input_nodes
        n_front = len(prog.placeholders)
        fake = contextlib.nullcontext()
        if prog.dynamic is not None:
            mode, examples = "symbolic", [n.meta["val"] for n in prog.placeholders]
            fake = examples[-1].fake_mode
        elif prog.values is None:
            mode = "fake"
            examples, fake = _placeholder_examples(prog.gm)
        else:
            mode, examples = "real", [t.clone() for t in prog.values]
        # fresh tensors: make_fx would give one placeholder to a tensor passed twice
        with fake:
            tangent_examples = [torch.zeros_like(examples[n_front - len(inputs) + i]) for i in self.graph.wrt]
        # detach recorded as alias, as torch 2.14's make_fx does by default (older ones keep detach, which
        # cut the flipped VJP's dependence on the parameters through autograd's saved tensors); the user's
        # detaches are cut by `jvpgraph::constant` instead (_joint)
        # on real values make_fx runs the graph, random ops too: on a fork of the caller's generator, so
        # that the emitted graph's first call draws what an eager call would
        with _conv_backend_unguarded(examples), forked_rng(mode == "real"), observers_hidden(mode), \
                collecting():
            gm = make_fx(lambda *flat: self._joint(*flat), decomposition_table=_DETACH_AS_ALIAS,
                         tracing_mode=mode, _allow_non_fake_inputs=True)(*examples, *tangent_examples)
            if _has_leftover_mutations(gm.graph):
                # a fallback traced a backward formula that writes in place (as_strided's copy_ into a view
                # of a fresh buffer): make the emitted graph functional, so pruning and partitioning see values
                gm = _refunctionalize(gm, [*examples, *tangent_examples], mode)
            own(gm.graph)  # the custom ops' state (forward-AD nodes made here, the Functions traced)
        names = [n.name for n in prog.placeholders]
        names += ["v" if len(self.graph.wrt) == 1 else f"v{i}" for i in self.graph.wrt]
        name_placeholders(gm.graph, names)
        gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
        _prune_output_masks(gm.graph)
        _differentiable_copies(gm.graph)
        _fuse_relu_max_pool(gm.graph)
        _views_as_reshapes(gm.graph)
        gm.graph.lint()
        gm.recompile()
        return gm

    @functools.cached_property
    def primal_first_module(self) -> fx.GraphModule:
        """:attr:`module` with every primal op before the first tangent op (same values; more memory, and
        on some models faster: see :func:`_primal_first`)."""
        gm = fx.GraphModule(self.module, copy.deepcopy(self.module.graph))
        _primal_first(gm.graph, n_primal=len(self.graph.program.placeholders))
        gm.graph.lint()
        gm.recompile()
        return gm

    @functools.cached_property
    def tangent_module(self) -> fx.GraphModule:
        """:attr:`module` returning the tangent outputs alone, ``(*params, *buffers, *inputs, *tangents) ->
        tangent_outputs``, pruned to what they need. For a gradient's graph (:func:`jvpgraph.hvp`) this drops
        the primal gradients' last kernels: ``H v`` without ``∇f``.

        Example:
            >>> import torch, torch.nn as nn
            >>> from jvpgraph.graph import Graph
            >>> from jvpgraph.trace import trace_program
            >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
            >>> x, v = torch.randn(5, 3), torch.randn(5, 3)
            >>> fg = Graph(trace_program(net, (x,))).flip()
            >>> (jv,) = fg.tangent_module(*net.parameters(), x, v)
            >>> torch.testing.assert_close(jv, fg.module(*net.parameters(), x, v)[1])
        """
        gm = fx.GraphModule(self.module, copy.deepcopy(self.module.graph))
        out = next(n for n in gm.graph.nodes if n.op == "output")
        n = self.n_outputs
        out.args = (tuple(out.args[0][n:2 * n]),)
        gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
        _prune_output_masks(gm.graph)
        gm.graph.lint()
        gm.recompile()
        return gm

    # ------------------------------------------------------------------ views
    @property
    def code(self) -> str:
        """Python source of the emitted flipped graph (each op's tangent right after it)."""
        return self.module.code

    @functools.cached_property
    def nx(self) -> nx.DiGraph:
        """The flipped graph: reverse-mode edges flipped (so they run input -> output again), the
        fictitious node ``"v"`` in front of the differentiated inputs, pruned to active nodes."""
        G = self.graph.nx
        keep = {n.name for n in self.graph.active_nodes} | {"output"}
        F = nx.DiGraph()
        F.add_node(FICTITIOUS, role="fictitious", target="v", shape=None, dtype=None, module="", active=True)
        for name in keep:
            if name in G:
                F.add_node(name, **{**G.nodes[name], "how": self.how.get(name, G.nodes[name]["role"])})
        # reverse-mode graph: edges b -> a with element J^{a->b}ᵀ; flipping gives a -> b with J^{a->b}
        reverse = G.reverse(copy=False)
        for b, a, data in reverse.edges(data=True):
            if a in keep and b in keep:
                F.add_edge(a, b, **data)
        for node in self.graph.diff_nodes:
            F.add_edge(FICTITIOUS, node.name, jacobian="fictitious", arg=0)
        return F

    # ------------------------------------------------------------------ recorded forward
    @functools.cached_property
    def _partition(self) -> tuple[fx.GraphModule, fx.GraphModule, int]:
        gm = self.module
        graph = gm.graph
        prog = self.graph.program
        n_primal = len(prog.placeholders)
        out_node = next(n for n in graph.nodes if n.op == "output")
        outs = list(out_node.args[0])
        n_out = self.n_outputs
        primal_outs, tangent_outs, new_bufs = outs[:n_out], outs[n_out:2 * n_out], outs[2 * n_out:]

        on_tangent = _tangent_nodes(graph, n_primal)
        saved: list[fx.Node] = []
        seen = set()
        for n in graph.nodes:
            if n in on_tangent and n.op != "placeholder":
                for a in n.all_input_nodes:
                    if a not in on_tangent and a not in seen:
                        seen.add(a)
                        saved.append(a)
        for t in tangent_outs:
            if isinstance(t, fx.Node) and t not in on_tangent and t not in seen:
                seen.add(t)
                saved.append(t)

        fwd = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in graph.nodes:
            if n.op == "output" or n in on_tangent:
                continue
            env[n] = fwd.node_copy(n, lambda a: env[a])
        fwd.output(tuple(env[o] if isinstance(o, fx.Node) else o
                         for o in [*primal_outs, *new_bufs, *saved]))
        fwd.eliminate_dead_code(is_impure_node=_is_impure)

        tan = fx.Graph()
        tenv: dict[fx.Node, fx.Node] = {}
        for s in saved:
            tenv[s] = tan.placeholder(f"saved_{s.name}")
            tenv[s].meta = dict(s.meta)
        for n in graph.nodes:
            if n in on_tangent:
                tenv[n] = tan.node_copy(n, lambda a: tenv[a])
        tan.output(tuple(tenv[t] if isinstance(t, fx.Node) else t for t in tangent_outs))
        tan.eliminate_dead_code(is_impure_node=_is_impure)
        _prune_output_masks(fwd)
        _prune_output_masks(tan)
        fwd_gm = fx.GraphModule(gm, fwd)
        tan_gm = fx.GraphModule(gm, tan)
        return fwd_gm, tan_gm, len(saved)

    def partition(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        """``(forward, tangent)``: ``forward(*params, *buffers, *inputs)`` returns
        ``(*outputs, *new_buffers, *saved)``; ``tangent(*saved, *v)`` returns the tangent outputs."""
        fwd, tan, _ = self._partition
        return fwd, tan

    @property
    def n_saved(self) -> int:
        return self._partition[2]

    def __repr__(self):
        n = sum(1 for n in self.module.graph.nodes if n.op == "call_function")
        fallbacks = sorted({k for k, h in self.how.items() if h in ("decomposition", "forward-ad", "flipped-vjp")})
        return f"FlippedGraph({n} aten calls, fallback nodes: {fallbacks or 'none'})"


def flip(graph: Graph) -> FlippedGraph:
    """The flipped graph of Appendix C for ``graph``; also the method ``graph.flip()``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from jvpgraph.graph import Graph
        >>> from jvpgraph.trace import trace_program
        >>> fg = flip(Graph(trace_program(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), (torch.randn(4, 3),))))
        >>> fg.nx.has_node(FICTITIOUS)
        True
    """
    return FlippedGraph(graph)


Graph.flip = flip  # the method form; graph.py does not import this module
