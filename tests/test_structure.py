"""The package's shape: no import circle between its files, lazy (function-level) imports included."""

from __future__ import annotations

import ast
import pathlib

import networkx as nx
import torch
import torch.nn as nn

import jvpgraph

ROOT = pathlib.Path(jvpgraph.__file__).resolve().parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> nx.DiGraph:
    """File -> the jvpgraph files it imports, anywhere in it (``from . import api`` imports ``api``; a
    ``from .x import y`` whose ``y`` is a module counts as importing that module too)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    g = nx.DiGraph()
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        g.add_node(name)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                subs = [f"{mod}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in files] if all(t in files for t in subs) else [mod, *subs]
            for t in targets:
                if t in files and t != name:
                    g.add_edge(name, t)
    return g


def test_no_import_circle_between_the_packages_files():
    g = _imports()
    assert g.number_of_edges() > 30  # the walk found the package's imports
    assert g.has_edge("jvpgraph.api", "jvpgraph.sharded") and g.has_edge("jvpgraph.rules.propagate",
                                                                       "jvpgraph.batchnorm")
    cycles = list(nx.simple_cycles(g))
    # a package's __init__ importing its own files, which import each other's siblings, is no circle; any
    # cycle through two files that are not a package and its own __init__ is
    real = [c for c in cycles if not (len(c) == 2 and any(n + "." in m or m + "." in n for n in c for m in c))]
    assert not real, "import circles: " + "; ".join(" -> ".join(c + [c[0]]) for c in real[:5])


def test_batchnorm_mode_travels_on_the_nodes_the_rules_read():
    """bn= is stamped on each batch-norm node of a trace and the rule reads it there (no ambient setting):
    a program traced with bn="frozen" flips to the frozen Jv by itself; the same program with its nodes
    re-stamped "batch" flips to the batch Jv (double-backward's)."""
    from jvpgraph.batchnorm import BN, mode_of
    from jvpgraph.testing import frozen_batchnorm_jvp
    from jvpgraph.trace import trace_program

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4), nn.BatchNorm1d(4)).double()
    x, v = torch.randn(7, 3, dtype=torch.double), torch.randn(7, 3, dtype=torch.double)
    values = [*net.parameters(), *net.buffers(), x]

    def jv(prog):
        return jvpgraph.Graph(prog).flip().module(*values, v)[1]  # (out, Jv, new buffers...)

    prog = trace_program(net, (x,), bn="frozen")
    nodes = [n for n in prog.gm.graph.nodes if n.meta.get("jvpgraph_params")]
    assert [mode_of(n) for n in nodes] == [BN.FROZEN, BN.FROZEN]
    frozen = frozen_batchnorm_jvp(net, x, v)
    batch = torch.autograd.functional.jvp(net, x, v)[1]
    assert (frozen - batch).abs().max() > 1e-2  # the two modes differ here
    torch.testing.assert_close(jv(prog), frozen, rtol=1e-10, atol=1e-12)
    for n in nodes:
        n.meta["jvpgraph_params"]["bn"] = "batch"
    torch.testing.assert_close(jv(prog), batch, rtol=1e-10, atol=1e-12)
