"""Pictures of the theorem: a traced model's reverse-mode graph beside its flipped graph.

The left panel is the computation as reverse mode sees it: arrows run from the output back to the inputs,
and the sum over paths from ``u`` of the products of the edge elements (the transposed local Jacobians) is
``Jᵀu``. The right panel is the same graph with every edge flipped and the fictitious node ``v`` (an empty
circle) in front of the inputs; the sum over paths from ``v`` is ``Jv`` (Appendix C). Nodes at the same
place are the same op in both panels; nodes off every input -> output path are pruned from the flip (drawn
faded). Edge colours and labels give the kind of the local Jacobian:

==================  ==================================================================================
linear (bias-free)  linear in its input with everything else held: conv/matmul by a weight, pooling by
                    averages, views, sums (the affine layer without its bias, as in the paper's Figure 1)
diagonal mask       selects entries: ReLU, max-pooling, dropout (the paper's Boolean matrices Z)
elementwise         a diagonal Jacobian of derivatives: sigmoid, GELU, tanh, exp
coupled             nonlinear and dense within one sample: softmax, LayerNorm, GroupNorm, norms, variances
bilinear            a product of two inputs that both carry a tangent (attention's Q Kᵀ)
batch-coupled       entries depend on the whole batch: BatchNorm in train mode
fallback            no written rule: the local Jacobian is taken from the op's own backward (the theorem)
==================  ==================================================================================

Large models collapse to one box per ``nn.Module`` (``depth``), with chosen modules expanded (``expand``).
Rendering uses matplotlib only (no graphviz binary).
"""

from __future__ import annotations

import collections
import os
from typing import Iterable

import networkx as nx

from .flip import FICTITIOUS
from .graph import Graph

__all__ = ["draw", "collapse", "KIND_STYLE"]

#: Edge kinds as drawn: (label, colour). Keys are :data:`jvpgraph.rules.EDGE_KINDS` (``bilinear`` edges whose
#: other factor is a constant for Jv are drawn as ``linear``).
KIND_STYLE = {
    "linear": ("linear (bias-free)", "#1f77b4"),
    "mask": ("diagonal mask", "#2ca02c"),
    "elementwise": ("elementwise", "#ff7f0e"),
    "coupled": ("coupled within a sample", "#e377c2"),
    "bilinear": ("bilinear", "#9467bd"),
    "batch": ("batch-coupled", "#d62728"),
    "fallback": ("fallback (op's backward)", "#7f7f7f"),
    "opaque": ("fallback (op's backward)", "#7f7f7f"),
    "fictitious": ("v (fictitious node)", "#000000"),
    "mixed": ("several kinds", "#8c564b"),
}


def _short(target: str) -> str:
    """``aten.convolution.default`` -> ``convolution``; ``aten._native_batch_norm_legit_functional.default``
    -> ``batch_norm``; ``aten.max_pool2d_with_indices.default`` -> ``max_pool2d``."""
    if target.startswith(("aten.", "prims.")):
        parts = target.split(".")
        target = parts[1] if len(parts) > 1 else target
        for noise in ("_legit", "_functional", "_with_indices", "_no_training"):
            target = target.replace(noise, "")
        target = target.lstrip("_") or target
        return target[len("native_"):] if target.startswith("native_") else target
    return target.split(".")[-1] if "::" not in target else target


def _edge_kinds(G: nx.DiGraph) -> dict[tuple[str, str], str]:
    """The kind drawn on each data edge: a bilinear op is linear in an input when its other inputs carry no
    tangent (weights, masks, ``new_ones`` made from an input's shape)."""
    carries: set[str] = set()
    for n in nx.topological_sort(G):
        d = G.nodes[n]
        if not d["active"]:
            continue
        if d["role"] == "input" or any(p in carries and (G.edges[p, n]["jacobian"] != "structural"
                                                         or d["target"] == "getitem") for p in G.pred[n]):
            carries.add(n)
    kinds = {}
    for b in G.nodes:
        preds = list(G.pred[b])
        n_carrying = sum(1 for a in preds if a in carries)
        for a in preds:
            kind = G.edges[a, b]["jacobian"]
            if kind == "bilinear" and n_carrying <= 1:
                kind = "linear"
            kinds[a, b] = kind
    return kinds


def _group_of(G: nx.DiGraph, depth: int | None, expand: Iterable[str], split: frozenset = frozenset()
              ) -> dict[str, str]:
    """Map each drawn node to its box: itself (op level) or the module prefix at ``depth``; a box named in
    ``split`` is replaced by the boxes one level deeper (ops when there is none)."""
    expand = tuple(expand)
    # what a user input reaches; the rest (weight transposes, num_batches_tracked + 1) is a constant for Jv,
    # drawn no more than the parameters themselves
    reached: set[str] = set()
    for n in nx.topological_sort(G):
        if G.nodes[n]["role"] == "input" or any(p in reached for p in G.pred[n]):
            reached.add(n)
    group: dict[str, str] = {}
    for n in nx.topological_sort(G):
        d = G.nodes[n]
        if n not in reached and d["role"] != "output":
            continue
        if d["target"] == "getitem":  # a tuple element belongs to the op that made it
            src = next(iter(G.pred[n]))
            if src in group:
                group[n] = group[src]
                continue
        module = d.get("module") or ""
        if d["role"] != "op" or depth is None or not module:
            group[n] = n
            continue
        if any(module == e or module.startswith(e + ".") for e in expand):
            group[n] = n
            continue
        parts = module.split(".")
        key = "mod:" + ".".join(parts[:depth]) if depth > 0 else "mod:model"
        level = depth
        while key in split:
            level += 1
            key = "mod:" + ".".join(parts[:level]) if level <= len(parts) else n
        group[n] = key
    return group


def collapse(graph: Graph, depth: int | None = None, expand: Iterable[str] = ()) -> nx.DiGraph:
    """The graph to draw: ops (or module boxes) and inputs/outputs, parameters and buffers left out.

    Each node has ``label``, ``active`` (on an input -> output path, i.e. kept by the flip), ``role``, ``n_ops``
    and ``kinds``; each edge has ``kind`` (a key of :data:`KIND_STYLE`). ``depth=None`` keeps every op;
    ``depth=k`` makes one box per module at nesting depth ``k`` (``expand`` names modules kept op by op).

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
        >>> H = collapse(jvpgraph.trace(net, torch.randn(5, 3)).graph)
        >>> [H.nodes[n]["label"] for n in H]
        ['x', 'addmm', 'sigmoid', 'addmm', 'output']
        >>> [H.edges[e]["kind"] for e in H.edges]
        ['linear', 'elementwise', 'linear', 'structural']
    """
    G = graph.nx
    kinds = _edge_kinds(G)
    split: frozenset = frozenset()
    while True:
        H = _collapse_once(G, kinds, _group_of(G, depth, expand, split))
        if nx.is_directed_acyclic_graph(H):
            return H
        # a box that is both upstream and downstream of another (ops of a parent module around an expanded
        # child, a module called twice) opens one level: repeat until the picture is a DAG again
        cyclic = {n for c in nx.strongly_connected_components(H) if len(c) > 1 for n in c if n.startswith("mod:")}
        if not cyclic:  # cannot happen: a cycle needs a box (the op graph itself is acyclic)
            raise AssertionError("jvpgraph.draw: collapsed graph has a cycle without a module box")
        split = split | cyclic


def _collapse_once(G: nx.DiGraph, kinds: dict, group: dict[str, str]) -> nx.DiGraph:
    members: dict[str, list[str]] = collections.defaultdict(list)
    for n, gname in group.items():
        members[gname].append(n)
    H = nx.DiGraph()
    for gname, ns in members.items():
        ops = [n for n in ns if G.nodes[n]["role"] == "op" and G.nodes[n]["target"] != "getitem"]
        inner = {kinds[a, b] for b in ns for a in G.pred[b] if group.get(a) == gname}
        first = G.nodes[ns[0]]
        if gname.startswith("mod:"):
            name, op = gname[4:], _short(G.nodes[ops[0]]["target"]) if ops else ""
            label = name if len(ops) == 1 and name.split(".")[-1] == op else (
                f"{name}\n{op}" if len(ops) == 1 else f"{name}\n{len(ops)} ops")
        elif first["role"] == "op":
            label = _short(first["target"])
        else:
            label = gname
        H.add_node(gname, label=label, role="module" if gname.startswith("mod:") else first["role"],
                   active=any(G.nodes[n]["active"] for n in ns), n_ops=len(ops), kinds=sorted(inner),
                   module=first.get("module") or "", shape=first.get("shape"))
    for (a, b), kind in kinds.items():
        ga, gb = group.get(a), group.get(b)
        if ga is None or gb is None or ga == gb:
            continue
        if kind == "structural":
            continue
        if H.has_edge(ga, gb):
            ks = H.edges[ga, gb]["kinds"] | {kind}
            H.edges[ga, gb].update(kinds=ks, kind=next(iter(ks)) if len(ks) == 1 else "mixed")
        else:
            H.add_edge(ga, gb, kind=kind, kinds={kind})
    # structural edges (the output node reading its values) are kept without a kind label
    for (a, b), kind in kinds.items():
        ga, gb = group.get(a), group.get(b)
        if ga is not None and gb is not None and ga != gb and not H.has_edge(ga, gb):
            H.add_edge(ga, gb, kind="structural", kinds={"structural"})
    return H


def _auto_depth(graph: Graph, max_nodes: int, expand: Iterable[str] = ()) -> int | None:
    G = graph.nx
    depths = [len(m.split(".")) for m in (G.nodes[n].get("module") for n in G) if m]
    for depth in [None, *range(max(depths, default=0), 0, -1), 0]:
        if collapse(graph, depth, expand).number_of_nodes() <= max_nodes:
            return depth
    return 0


def _layout(H: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Layered layout: layer = longest path from a source, order within a layer by barycentre sweeps."""
    layer: dict[str, int] = {}
    for n in nx.topological_sort(H):
        layer[n] = max((layer[p] + 1 for p in H.pred[n]), default=0)
    layers: dict[int, list[str]] = collections.defaultdict(list)
    for n in H:  # graph order is program order: a sensible start
        layers[layer[n]].append(n)
    order = {n: i for ns in layers.values() for i, n in enumerate(ns)}
    for sweep in range(8):
        rng = sorted(layers) if sweep % 2 == 0 else sorted(layers, reverse=True)
        for L in rng:
            nbrs = H.pred if sweep % 2 == 0 else H.succ
            def bary(n):
                ps = [order[p] for p in nbrs[n]]
                return sum(ps) / len(ps) if ps else order[n]
            layers[L].sort(key=bary)
            for i, n in enumerate(layers[L]):
                order[n] = i
    pos = {}
    for L, ns in layers.items():
        w = len(ns)
        for i, n in enumerate(ns):
            pos[n] = (i - (w - 1) / 2.0, -float(L))
    return pos


def _panel(ax, H, pos, *, flipped: bool, labels: bool, title: str, pending: list):
    """Draw one panel; edge labels go to ``pending`` (placed once the layout is final, see
    :func:`_place_labels`)."""
    from matplotlib.patches import FancyArrowPatch

    ax.set_title(title, fontsize=11)
    ax.axis("off")
    texts = {}
    for n, d in H.nodes(data=True):
        x, y = pos[n]
        faded = flipped and not d["active"]
        if d["role"] in ("fictitious", "cotangent"):
            style = dict(boxstyle="circle,pad=0.3", fc="white" if d["role"] == "fictitious" else "#dddddd",
                         ec="black", lw=1.5)
        elif d["role"] == "input":
            style = dict(boxstyle="round,pad=0.3", fc="#e8f0fe", ec="#1f3d7a", lw=1.2)
        elif d["role"] == "output":
            style = dict(boxstyle="round,pad=0.3", fc="#fde8e8", ec="#7a1f1f", lw=1.2)
        elif d["role"] == "module":
            style = dict(boxstyle="round4,pad=0.35", fc="#f4f4f4", ec="#333333", lw=1.0)
        else:
            style = dict(boxstyle="round,pad=0.25", fc="#ffffff", ec="#333333", lw=0.9)
        if faded:
            style.update(ec="#cccccc", fc="#fafafa", ls="--")
        t = ax.text(x, y, d["label"], ha="center", va="center", fontsize=8 if d["role"] != "module" else 7.5,
                    color="#bbbbbb" if faded else "black", bbox=style, zorder=3)
        texts[n] = t
    for a, b, d in H.edges(data=True):
        src, dst = (a, b) if flipped else (b, a)
        kind = d["kind"]
        faded = flipped and not (H.nodes[a]["active"] and H.nodes[b]["active"])
        color = KIND_STYLE.get(kind, ("", "#999999"))[1]
        if faded:
            color = "#dddddd"
        # edges that skip layers bend (the same way in both panels), so they do not run under the boxes
        (xa, ya), (xb, yb) = pos[a], pos[b]
        rad = 0.0 if abs(ya - yb) < 1.5 else (0.35 if xb <= xa else -0.35)
        arrow = FancyArrowPatch(pos[src], pos[dst], arrowstyle="-|>", mutation_scale=10, color=color,
                                lw=1.4 if kind not in ("structural",) else 0.8,
                                patchA=texts[src].get_bbox_patch(), patchB=texts[dst].get_bbox_patch(),
                                connectionstyle=f"arc3,rad={rad if flipped else -rad}",
                                zorder=2, ls="--" if faded else "-")
        ax.add_patch(arrow)
        if labels and kind not in ("structural", "fictitious", "cotangent") and not faded:
            name = KIND_STYLE.get(kind, (kind,))[0].split(" (")[0]
            pending.append((ax, pos[src], pos[dst], rad if flipped else -rad, name if flipped else name + "ᵀ",
                            color))
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 1.0, max(xs) + 1.0)
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.7)


def _place_labels(pending):
    """Write each edge's kind at the middle of its drawn curve. matplotlib bends ``arc3`` edges in display
    coordinates (control point = chord midpoint + rad * (dy, -dx)), so the midpoint is computed there."""
    for ax, a, b, rad, text, color in pending:
        (x1, y1), (x2, y2) = ax.transData.transform([a, b])
        cx, cy = (x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1)
        mx, my = 0.25 * x1 + 0.5 * cx + 0.25 * x2, 0.25 * y1 + 0.5 * cy + 0.25 * y2
        x, y = ax.transData.inverted().transform((mx + 4, my))
        ax.text(x, y, text, fontsize=6.5, color=color, ha="left", va="center", zorder=4,
                bbox=dict(fc="white", ec="none", alpha=0.7, pad=0.5))


def draw(graph: Graph, path: str | os.PathLike | None = None, *, depth: int | None | str = "auto",
         expand: Iterable[str] = (), max_nodes: int = 40, labels: bool | None = None, title: str | None = None):
    """Draw ``graph``'s reverse-mode graph beside its flipped graph; return the matplotlib ``Figure``.

    Args:
        graph: a :class:`~jvpgraph.graph.Graph` (``jvpgraph.trace(model, x).graph``).
        path: where to save (``.svg``, ``.png``, ``.pdf``: any matplotlib format); ``None`` only returns.
        depth: ``None`` draws every op; ``k`` one box per module at nesting depth ``k`` (``0``: the whole model);
            ``"auto"`` (default) the deepest level with at most ``max_nodes`` boxes.
        expand: module names (``"layer1.0"``) drawn op by op inside a collapsed picture.
        labels: write each edge's kind on it (default: when there are at most 60 edges); colours always say it.
        title: figure title (default: a summary of the graph).

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
        >>> fig = jvpgraph.trace(net, torch.randn(5, 3)).graph.draw()
        >>> [ax.get_title() for ax in fig.axes]
        ['reverse mode: paths from u give Jᵀu', 'flipped (Appendix C): paths from v give Jv']
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # an optional dependency
        raise ImportError("jvpgraph.draw needs matplotlib: pip install 'jvpgraph[experiments]' "
                          "(or pip install matplotlib)") from e
    from matplotlib.lines import Line2D

    expand = tuple(expand)
    modules = {m for m in (d.get("module") for _, d in graph.nx.nodes(data=True)) if m}
    for e in expand:
        if not any(m == e or m.startswith(e + ".") for m in modules):
            raise ValueError(f"jvpgraph.draw: expand={e!r} names no module of the traced model; modules are "
                             f"e.g. {sorted(modules)[:8]}")
    if depth == "auto":
        depth = _auto_depth(graph, max_nodes, expand)
    elif depth is not None and not isinstance(depth, int):
        raise ValueError(f"jvpgraph.draw: depth must be None, an int or 'auto', not {depth!r}")
    H = collapse(graph, depth, expand)
    # the cotangent u after the outputs (left panel) and the fictitious v before the inputs (right panel)
    outs = [n for n, d in H.nodes(data=True) if d["role"] == "output"]
    ins = [n for n, d in H.nodes(data=True) if d["role"] == "input" and d["active"]]
    R, F = H.copy(), H.copy()
    R.add_node("u", label="u", role="cotangent", active=True, n_ops=0, kinds=[], module="", shape=None)
    for o in outs:
        R.add_edge(o, "u", kind="cotangent", kinds={"cotangent"})
    F.add_node(FICTITIOUS, label="v", role="fictitious", active=True, n_ops=0, kinds=[], module="", shape=None)
    for i in ins:
        F.add_edge(FICTITIOUS, i, kind="fictitious", kinds={"fictitious"})
    # one layout for both panels (u and v get their own rows): the same op sits at the same place
    both = H.copy()
    both.add_node("__v", role="fictitious")
    both.add_node("__u", role="cotangent")
    for i in ins:
        both.add_edge("__v", i)
    for o in outs:
        both.add_edge(o, "__u")
    pos = _layout(both)
    pos["u"], pos[FICTITIOUS] = pos.pop("__u"), pos.pop("__v")
    n_layers = len({p[1] for p in pos.values()})
    width = max(len([p for p in pos.values() if p[1] == y]) for y in {p[1] for p in pos.values()})
    if labels is None:
        labels = H.number_of_edges() <= 60
    fig, axes = plt.subplots(1, 2, figsize=(min(2 * max(4.5, 1.6 * width + 1.5), 40),
                                            min(max(4.0, 0.62 * n_layers + 1.2), 60)))
    pending: list = []
    _panel(axes[0], R, pos, flipped=False, labels=labels, title="reverse mode: paths from u give Jᵀu",
           pending=pending)
    _panel(axes[1], F, pos, flipped=True, labels=labels, title="flipped (Appendix C): paths from v give Jv",
           pending=pending)
    used = sorted({"fallback" if d["kind"] == "opaque" else d["kind"] for _, _, d in H.edges(data=True)}
                  - {"structural"}, key=list(KIND_STYLE).index)
    handles = [Line2D([], [], color=KIND_STYLE[k][1], lw=2, label=KIND_STYLE[k][0]) for k in used]
    if not all(d["active"] for _, d in H.nodes(data=True)):
        handles.append(Line2D([], [], color="#cccccc", lw=1.5, ls="--", label="pruned: off every v -> output path"))
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    n_ops = sum(1 for _, d in graph.nx.nodes(data=True) if d["role"] == "op" and d["target"] != "getitem")
    level = "every op" if depth is None else f"modules at depth {depth}" if depth else "the whole model"
    if expand and depth is not None:
        level += f" ({', '.join(expand)} op by op, the modules around it opened)"
    fig.suptitle(title or f"{n_ops} aten ops, {len(graph.active_nodes)} nodes on input -> output paths "
                 f"(bn={graph.program.bn!r}); drawn: {level}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    _place_labels(pending)
    if path is not None:
        fig.savefig(path, dpi=150 if str(path).endswith(".png") else None)
    return fig


Graph.draw = draw  # the method form, ``graph.draw(path, ...)``; graph.py does not import this module
