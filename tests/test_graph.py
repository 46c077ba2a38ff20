"""The graph views and the Appendix C theorem checked literally.

* ``Graph.nx`` has the nodes and edges of the traced computation;
* ``FlippedGraph.nx`` has the fictitious node ``"v"`` with edges into the differentiated inputs, and only
  active nodes (on an input -> output path);
* the theorem: the sum over all input -> output paths of the products of explicit edge Jacobians is the full
  Jacobian; the same path sum on the flipped graph, times ``v``, is jvpgraph's ``J v``;
* ``FlippedGraph.partition()``: forward module + tangent module == joint module.
"""

from __future__ import annotations

import operator

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import jvpgraph
from jvpgraph.flip import FICTITIOUS
from jvpgraph.rules import Rule

from conftest import seeded

D = torch.float64


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).double()


class Diamond(nn.Module):
    """Several paths from x to the output, one node using x twice, a parameter-only subcomputation."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = torch.sigmoid(self.a(x))
        s = torch.exp(self.scale) * 2  # parameters only: no tangent
        return self.b(h) * s + torch.tanh(x) * x


# ------------------------------------------------------------------ Graph.nx
def test_graph_nx_of_tiny_mlp():
    net, x = tiny_mlp(), torch.randn(1, 3, dtype=D)
    G = jvpgraph.trace(net, x).graph.nx
    assert isinstance(G, nx.DiGraph)
    placeholders = {"p__0_weight", "p__0_bias", "p__2_weight", "p__2_bias", "x"}
    ops = {n for n, d in G.nodes(data=True) if d["role"] == "op"}
    assert placeholders | ops | {"output"} == set(G.nodes)
    targets = sorted(G.nodes[n]["target"] for n in ops)
    assert targets == ["aten.addmm.default", "aten.addmm.default", "aten.sigmoid.default", "aten.t.default",
                       "aten.t.default"], targets
    roles = nx.get_node_attributes(G, "role")
    assert {n for n, r in roles.items() if r == "param"} == placeholders - {"x"}
    assert roles["x"] == "input" and roles["output"] == "output"
    # shapes, dtypes
    assert G.nodes["x"]["shape"] == (1, 3) and G.nodes["sigmoid"]["shape"] == (1, 4)
    assert G.nodes["addmm_1"]["shape"] == (1, 2) and G.nodes["sigmoid"]["dtype"] == D
    # data-flow edges, with the kind of local Jacobian they carry
    expected = {("p__0_weight", "t"), ("p__0_bias", "addmm"), ("x", "addmm"), ("t", "addmm"),
                ("addmm", "sigmoid"), ("p__2_weight", "t_1"), ("p__2_bias", "addmm_1"), ("sigmoid", "addmm_1"),
                ("t_1", "addmm_1"), ("addmm_1", "output")}
    assert set(G.edges) == expected
    kinds = nx.get_edge_attributes(G, "jacobian")
    assert kinds[("addmm", "sigmoid")] == "elementwise"
    assert kinds[("x", "addmm")] == "bilinear" and kinds[("p__0_weight", "t")] == "linear"
    assert kinds[("addmm_1", "output")] == "structural"
    assert G.edges["x", "addmm"]["arg"] == 1 and G.edges["t", "addmm"]["arg"] == 2
    assert isinstance(G.edges["addmm", "sigmoid"]["rule"], Rule)
    # active: exactly the x -> output path
    active = {n for n, a in G.nodes(data="active") if a}
    assert active == {"x", "addmm", "sigmoid", "addmm_1", "output"}


def test_graph_nx_module_attribute():
    net, x = tiny_mlp(), torch.randn(1, 3, dtype=D)
    G = jvpgraph.trace(net, x).graph.nx
    assert "1" in G.nodes["sigmoid"]["module"], G.nodes["sigmoid"]


# ------------------------------------------------------------------ FlippedGraph.nx: fictitious node, pruning
def test_flipped_nx_has_fictitious_node_and_only_active_nodes():
    net, x = Diamond().double(), torch.randn(2, 3, dtype=D)
    traced = jvpgraph.trace(net, x)
    G, Fg = traced.graph.nx, traced.flipped.nx
    assert FICTITIOUS in Fg and Fg.nodes[FICTITIOUS]["role"] == "fictitious"
    assert list(Fg.successors(FICTITIOUS)) == ["x"]
    assert Fg.in_degree(FICTITIOUS) == 0 and Fg.edges[FICTITIOUS, "x"]["jacobian"] == "fictitious"
    active = {n for n, a in G.nodes(data="active") if a}
    assert set(Fg.nodes) == active | {FICTITIOUS}
    # the parameter-only subcomputation exp(scale) * 2 and every parameter are pruned
    exp_nodes = {n for n, t in G.nodes(data="target") if t == "aten.exp.default"}
    assert exp_nodes and not exp_nodes & set(Fg.nodes)
    assert not any(G.nodes[n]["role"] == "param" for n in Fg.nodes if n in G)
    # every flipped edge is an edge of the forward graph between active nodes, with its element kept
    for a, b, data in Fg.edges(data=True):
        if a == FICTITIOUS:
            continue
        assert G.has_edge(a, b) and G.edges[a, b]["jacobian"] == data["jacobian"]
    # every node is reachable from v, and reaches the output
    for n in Fg.nodes:
        assert n == FICTITIOUS or nx.has_path(Fg, FICTITIOUS, n)
        assert n == "output" or nx.has_path(Fg, n, "output")
    assert nx.is_directed_acyclic_graph(Fg)


def test_running_statistics_branch_is_pruned():
    """BatchNorm in train mode computes new running statistics from x: in the graph, but off every
    x -> output path, so inactive and absent from the flipped graph."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).double().train()
    traced = jvpgraph.trace(net, torch.randn(5, 3, dtype=D))
    prog = traced.graph.program
    assert set(prog.buffer_updates) >= {"1.running_mean", "1.running_var"}
    update_nodes = {n.name for n in prog.buffer_updates.values()}
    G, Fg = traced.graph.nx, traced.flipped.nx
    for n in update_nodes:
        assert n in G and not G.nodes[n]["active"], n
        assert n not in Fg, n
    # ... and those nodes do depend on x (so it is the output side that prunes them)
    assert any(nx.has_path(G, "x", n) for n in update_nodes)


def test_unused_and_unconnected_outputs():
    def f(x, y):
        unused = torch.exp(x) * 3  # noqa: F841  (dead: never in the graph)
        return torch.sin(x), torch.ones(2, dtype=D) * 2

    x, y = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    traced = jvpgraph.trace(f, x, y)
    G = traced.graph.nx
    assert "aten.exp.default" not in set(nx.get_node_attributes(G, "target").values())
    # y is differentiated but reaches nothing: it has an edge from v and no other
    Fg = traced.flipped.nx
    assert set(Fg.successors(FICTITIOUS)) == {"x0", "x1"}
    assert "x1" not in Fg or Fg.out_degree("x1") == 0
    (s, c), (js, jc) = traced.jvp((x, y), (torch.ones(3, dtype=D), torch.ones(3, dtype=D)))
    torch.testing.assert_close(js, torch.cos(x))
    assert torch.equal(jc, torch.zeros(2, dtype=D))


# ------------------------------------------------------------------ the theorem, literally
def _node_values(gm: fx.GraphModule, args) -> dict[str, torch.Tensor]:
    env: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            env[n.name] = out
            return out

    Recorder(gm).run(*args)
    return env


def _local_jacobian(node: fx.Node, src: fx.Node, values) -> torch.Tensor:
    """∂ node / ∂ src as a (numel(node), numel(src)) matrix, by autograd on the node's own function (every
    occurrence of src replaced: the DiGraph edge carries the sum of parallel edges)."""
    if node.op == "output":
        return torch.eye(values[src.name].numel(), dtype=D)

    def fn(z):
        def sub(a):
            return z if a is src else values[a.name]

        args = fx.node.map_arg(node.args, sub)
        kwargs = fx.node.map_arg(node.kwargs, sub)
        out = node.target(*args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) and node.target is not operator.getitem else out

    x0 = values[src.name]
    J = torch.autograd.functional.jacobian(fn, x0)
    return J.reshape(-1, x0.numel())


def _path_sum(graph: nx.DiGraph, start: str, end: str, edge_matrix) -> torch.Tensor:
    total = None
    n_paths = 0
    for path in nx.all_simple_paths(graph, start, end):
        prod = None
        for a, b in zip(path, path[1:]):
            M = edge_matrix(a, b)
            prod = M if prod is None else M @ prod
        total = prod if total is None else total + prod
        n_paths += 1
    return total, n_paths


@pytest.mark.parametrize("model", ["mlp", "diamond"])
def test_appendix_c_path_sums(model):
    torch.manual_seed(0)
    net = tiny_mlp() if model == "mlp" else Diamond().double()
    x = torch.randn(1, 3, dtype=D)
    v = torch.randn(1, 3, dtype=D)
    traced = jvpgraph.trace(net, x)
    gm = traced.graph.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    values = _node_values(gm, [*net.parameters(), x])
    G = traced.graph.nx

    cache = {}

    def edge(a, b):
        if (a, b) not in cache:
            cache[a, b] = _local_jacobian(nodes[b], nodes[a], values)
        return cache[a, b]

    # reverse-mode graph -> sum over input -> output paths of products of edge elements = full Jacobian
    J_paths, n_paths = _path_sum(G, "x", "output", edge)
    J_true = torch.autograd.functional.jacobian(net, x).reshape(-1, x.numel())
    assert n_paths == (1 if model == "mlp" else 3)
    torch.testing.assert_close(J_paths, J_true, rtol=1e-12, atol=1e-14)

    # the flipped graph: a fictitious node v -> x (element v itself), the same path sums give J v
    Fg = traced.flipped.nx

    def flipped_edge(a, b):
        return torch.eye(x.numel(), dtype=D) if a == FICTITIOUS else edge(a, b)

    Jv_paths, n_flipped = _path_sum(Fg, FICTITIOUS, "output", flipped_edge)
    assert n_flipped == n_paths
    Jv_paths = Jv_paths @ v.reshape(-1)
    _, jv = traced.jvp(x, v)
    torch.testing.assert_close(jv.reshape(-1), Jv_paths, rtol=1e-12, atol=1e-14)
    # and the reverse direction (flip back): paths from the output to x of transposed elements give Jᵀ u
    u = torch.randn(J_true.shape[0], dtype=D)
    R = G.reverse(copy=True)
    JT_paths, _ = _path_sum(R, "output", "x", lambda b, a: edge(a, b).T)
    lin = traced.linearize(x)
    torch.testing.assert_close(lin.vjp(u.reshape(lin.out.shape)).reshape(-1), JT_paths @ u, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ partition
class BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.GELU(), nn.Dropout(0.3), nn.Flatten(),
                                  nn.Linear(3 * 3 * 3, 4), nn.Softmax(-1))

    def forward(self, x):
        y = self.body(x)
        return y, y.sum(-1) * x.mean()


@pytest.mark.parametrize("bn", ["batch", "frozen", "eval"])
def test_partition_equals_joint(bn):
    torch.manual_seed(0)
    net = BNDropNet().double().train()
    x, v = torch.randn(4, 2, 5, 5, dtype=D), torch.randn(4, 2, 5, 5, dtype=D)
    traced = jvpgraph.trace(net, x, bn=bn)
    fg = traced.flipped
    state = [*net.parameters(), *net.buffers()]
    with seeded(5):
        joint = fg.module(*state, x, v)
    fwd, tan = fg.partition()
    with seeded(5):
        res = fwd(*state, x)
    n, nb = fg.n_outputs, len(fg.buffer_update_names)
    assert len(res) == n + nb + fg.n_saved
    touts = tan(*res[n + nb:], v)
    assert len(joint) == 2 * n + nb
    for got, want in zip([*res[:n], *touts, *res[n:n + nb]], joint):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    # the tangent module takes the saved values and v only, never the model's inputs or parameters
    names = [p.name for p in tan.graph.nodes if p.op == "placeholder"]
    assert names[-1] == "v" and all(nm.startswith("saved_") for nm in names[:-1]), names
    # the forward module computes no tangent
    assert not any(p.name == "v" for p in fwd.graph.nodes if p.op == "placeholder")


def test_flipped_code_is_runnable_source():
    net, x = tiny_mlp(), torch.randn(2, 3, dtype=D)
    fg = jvpgraph.trace(net, x).flipped
    code = fg.code
    assert "def forward(self, p__0_weight, p__0_bias, p__2_weight, p__2_bias, x, v)" in code
    assert "torch.ops.aten.sigmoid" in code and "return (" in code
    v = torch.randn_like(x)
    out, jv = fg.module(*net.parameters(), x, v)
    torch.testing.assert_close(jv, torch.func.jvp(net, (x,), (v,))[1])
    assert "FlippedGraph" in repr(fg) and "Graph(" in repr(jvpgraph.trace(net, x).graph)
