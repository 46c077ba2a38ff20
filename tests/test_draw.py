"""`jvpgraph draw` / Graph.draw: the picture says what the flipped graph is.

Checked on the drawn objects themselves: arrows in the flipped panel run input -> output and those in the
reverse-mode panel the other way, the fictitious v feeds exactly the differentiated inputs, pruned nodes are
faded, edge colours are the local Jacobians' kinds, module collapsing keeps the model's data flow.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

import jvpgraph  # noqa: E402
from jvpgraph.cli import main  # noqa: E402
from jvpgraph.draw import KIND_STYLE, _layout, collapse  # noqa: E402
from jvpgraph.experiments.models import SigmoidBNCNN  # noqa: E402
from jvpgraph.strategies import architectures, build  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _arrows(ax):
    """(source text, target text, colour) of every arrow in a panel, via the texts the arrow is clipped to."""
    by_patch = {t.get_bbox_patch(): t.get_text() for t in ax.texts if t.get_bbox_patch() is not None}
    out = []
    for p in ax.patches:
        if isinstance(p, FancyArrowPatch):
            out.append((by_patch[p.patchA], by_patch[p.patchB], matplotlib.colors.to_hex(p.get_edgecolor())))
    return out


def test_panels_are_each_others_flip_and_v_feeds_the_inputs():
    torch.manual_seed(0)
    model = SigmoidBNCNN().train()
    g = jvpgraph.trace(model, torch.randn(4, 1, 16, 16)).graph
    fig = g.draw()
    left, right = fig.axes
    H = collapse(g)
    labels = nx.get_node_attributes(H, "label")
    expected = {(labels[a], labels[b]) for a, b in H.edges}
    flipped = {(a, b) for a, b, _ in _arrows(right) if a != "v"}
    reverse = {(b, a) for a, b, _ in _arrows(left) if a != "u"}
    assert flipped == expected and reverse == expected
    assert [(a, b) for a, b, _ in _arrows(right) if a == "v"] == [("v", "x")]
    assert [(a, b) for a, b, _ in _arrows(left) if a == "u"] == [("u", "output")]
    # the edge entering each batch norm in train mode is batch-coupled; sigmoid's is elementwise
    colours = {(a, b): c for a, b, c in _arrows(right)}
    bn = KIND_STYLE["batch"][1]
    assert colours[("convolution", "batch_norm")] == bn
    assert colours[("batch_norm", "sigmoid")] == KIND_STYLE["elementwise"][1]
    assert colours[("sigmoid", "max_pool2d")] == KIND_STYLE["mask"][1]


def test_bilinear_edge_is_linear_when_the_other_factor_is_a_weight():
    """A conv's local Jacobian in its input is the conv by the same weight, bias-free (the paper's Table 2);
    a product of two active inputs stays bilinear."""
    g = jvpgraph.trace(lambda a, b: torch.relu(a @ b) @ b.new_ones(3, 2), torch.randn(2, 3), torch.randn(3, 3)).graph
    H = collapse(g)
    kinds = {(H.nodes[a]["label"], H.nodes[b]["label"]): d["kind"] for a, b, d in H.edges(data=True)}
    assert kinds[("x0", "mm")] == "bilinear" and kinds[("x1", "mm")] == "bilinear"
    assert kinds[("relu", "mm")] == "linear"  # times a matrix of ones made from x1's shape: no tangent


def test_pruned_nodes_are_faded():
    """Nodes reached only from an input that is not differentiated sit off every v -> output path."""
    def f(x, m):
        return torch.sigmoid(x) * torch.exp(m)

    g = jvpgraph.trace(f, torch.randn(3), torch.randn(3), wrt=[0]).graph
    H = collapse(g)
    active = {H.nodes[n]["label"]: H.nodes[n]["active"] for n in H}
    assert active == {"x0": True, "x1": False, "sigmoid": True, "exp": False, "mul": True, "output": True}
    fig = g.draw()
    right = fig.axes[1]
    colour = {t.get_text(): matplotlib.colors.to_hex(t.get_color()) for t in right.texts if t.get_bbox_patch()}
    assert colour["exp"] == colour["x1"] != colour["sigmoid"]
    assert [(a, b) for a, b, _ in _arrows(right) if a == "v"] == [("v", "x0")]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("pruned" in t for t in legend)


def test_module_collapse_keeps_data_flow():
    model = torchvision.models.resnet18(num_classes=10).train()
    g = jvpgraph.trace(model, torch.randn(2, 3, 32, 32)).graph
    H1 = collapse(g, depth=1)
    names = [H1.nodes[n]["label"].split("\n")[0] for n in nx.topological_sort(H1)]
    assert names == ["x", "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool",
                     "view", "fc", "output"]
    assert H1.nodes["mod:layer1"]["n_ops"] > 10
    # expanding one block shows its residual: two paths from the block's input into its add
    He = collapse(g, depth=1, expand=["layer1.0"])
    add = next(n for n in nx.topological_sort(He) if He.nodes[n]["label"] == "add")
    assert He.in_degree(add) == 2
    paths = list(nx.all_simple_paths(He, "mod:maxpool", add))
    assert len(paths) == 2 and min(len(p) for p in paths) == 2  # the identity shortcut is one edge
    # auto depth fits the limit
    fig = g.draw(max_nodes=25)
    assert "modules at depth" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="layer9"):
        g.draw(expand=["layer9"])
    with pytest.raises(ValueError, match="depth"):
        g.draw(depth="deep")


@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=architectures())
def test_layout_is_layered(spec):
    """Every edge points one or more layers down, in both the op-level and the module-level picture; no two
    boxes share a place."""
    net, x, _ = build(spec)
    g = jvpgraph.trace(net, x).graph
    for depth in (None, 1):
        H = collapse(g, depth)
        pos = _layout(H)
        assert all(pos[a][1] > pos[b][1] for a, b in H.edges)
        assert len(set(pos.values())) == len(pos)


@pytest.mark.parametrize("suffix", ["svg", "png"])
def test_cli_draw_writes_the_file(tmp_path, capsys, suffix):
    out = tmp_path / f"mlp.{suffix}"
    assert main(["draw", "sigmoid_mlp", "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in data[:2000]
    assert str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit, match="foo"):
        main(["draw", "resnet18", "--size", "32", "--expand", "foo", "-o", str(out)])


def test_expanding_a_child_opens_its_parent_instead_of_drawing_a_cycle():
    """Expanding an attention module inside a ViT block: the block's own ops (LayerNorm, residual add) sit
    before and after the expanded ops, so one box for the block would be a cycle; the block opens a level."""
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=8, mlp_dim=8, num_classes=3).train()
    g = jvpgraph.trace(vit, torch.randn(2, 3, 16, 16)).graph
    name = "encoder.layers.encoder_layer_0"
    H = collapse(g, depth=3, expand=[name + ".self_attention"])
    assert nx.is_directed_acyclic_graph(H)
    assert f"mod:{name}" not in H and f"mod:{name}.ln_1" in H  # the block opened into its children
    assert "mod:encoder.layers.encoder_layer_1" in H  # the other block stays one box
    assert any(H.nodes[n]["label"].startswith("scaled_dot_product") for n in H)
