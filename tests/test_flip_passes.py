"""Rewrites of the emitted flipped graph that make it cheaper: each must leave Jv exactly as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import jvpgraph
from jvpgraph import flip
from jvpgraph.flip import _fuse_relu_max_pool
from jvpgraph.hessian import _hvp_works

aten = torch.ops.aten


def _cnn(dim):
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if dim == 2 else (nn.Conv3d, nn.MaxPool3d)
    return nn.Sequential(conv(2, 3, 3, padding=1), nn.ReLU(), pool(2), conv(3, 2, 3, padding=1), nn.ReLU(),
                         pool(2, stride=1, padding=1), nn.Flatten()).double()


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("data", ["random", "ties", "nan"])
def test_relu_max_pool_fused_equals_torch_func_jvp(dim, data, monkeypatch):
    """ReLU's mask moved after the pool's gather: the same Jv as torch.func.jvp, on inputs with many ties
    (integers: equal maxima and windows of zeros after the ReLU); with a NaN input, the same Jv as without the
    rewrite."""
    torch.manual_seed(0)
    model = _cnn(dim)
    shape = (3, 2) + (6,) * dim
    x = torch.randn(shape, dtype=torch.double)
    if data == "ties":
        x = x.round()
        with torch.no_grad():
            for m in model:
                if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                    m.weight.copy_(m.weight.sign())
                    m.bias.zero_()
    if data == "nan":
        x[0, 0, 1, 1] = float("nan")
    v = torch.randn_like(x)
    g = jvpgraph.trace(model, x)
    code = g.flipped.code
    # the pass fired: ReLU's output is no longer read by the tangent's masks, the pooled output is
    assert code.count("aten.threshold_backward") == 2
    _, tan = g.flipped.partition()
    saved = [n.name for n in tan.graph.nodes if n.op == "placeholder"]
    assert not any(name.startswith("saved_relu") for name in saved), saved
    out, jv = g.jvp(x, v)
    if data == "nan":  # NaN: the reference is the same graph without the rewrite (bit for bit what it was)
        with monkeypatch.context() as mp:
            mp.setattr(flip, "_fuse_relu_max_pool", lambda graph: 0)
            ref_out, ref = jvpgraph.trace(model, x).jvp(x, v)
        assert jv.isnan().any() or ref.isnan().sum() == 0
    else:
        ref_out, ref = torch.func.jvp(model, (x,), (v,))
    torch.testing.assert_close(out, ref_out, equal_nan=True)
    torch.testing.assert_close(jv, ref, equal_nan=True, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(g.linearize(x).jvp(v), ref, equal_nan=True, rtol=1e-12, atol=1e-12)


def test_relu_max_pool_not_fused_when_relu_output_is_used_elsewhere():
    """A ReLU whose output also feeds another op keeps its own mask (the rewrite needs the pool to be the
    path the tangent takes)."""

    class Branch(nn.Module):
        def forward(self, x):
            r = torch.relu(x)
            return nn.functional.max_pool2d(r, 2).flatten(1).sum(1) + r.flatten(1).sum(1)

    x = torch.randn(2, 1, 4, 4, dtype=torch.double)
    v = torch.randn_like(x)
    g = jvpgraph.trace(Branch(), x)
    torch.testing.assert_close(g.jvp(x, v)[1], torch.func.jvp(Branch(), (x,), (v,))[1])


def test_fuse_pass_counts_rewrites():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, t):
        r = aten.relu(x)
        pooled, idx = aten.max_pool2d_with_indices(r, [2, 2], [2, 2])
        tb = aten.threshold_backward(t, r, 0)
        return pooled, tb.view(1, 1, 16).gather(-1, idx.view(1, 1, 4)).view(1, 1, 2, 2)

    x, t = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    gm = make_fx(f)(x, t)
    want = gm(x, t)
    assert _fuse_relu_max_pool(gm.graph) == 1
    gm.recompile()
    for a, b in zip(gm(x, t), want):
        torch.testing.assert_close(a, b)


def test_both_op_orders_give_the_same_values():
    """The emitted graph interleaves each op's tangent after it; the primal-first variant runs every primal
    op first. Same ops on the same values: bit for bit the same outputs, Jv and new running statistics."""
    from jvpgraph.experiments.models import SigmoidBNCNN

    torch.manual_seed(0)
    model = SigmoidBNCNN(width=4).train()
    x, v = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)
    fg = jvpgraph.trace(model, x).flipped
    args = [*model.parameters(), *model.buffers(), x, v]
    for a, b in zip(fg.module(*args), fg.primal_first_module(*args)):
        assert torch.equal(a, b)
    n_primal = len(args) - 1
    for gm, want in ((fg.primal_first_module, True), (fg.module, False)):
        ops = [n for n in gm.graph.nodes if n.op == "call_function"]
        tangent = flip._tangent_nodes(gm.graph, n_primal)
        first_tangent = next(i for i, n in enumerate(ops) if n in tangent)
        last_primal = max(i for i, n in enumerate(ops) if n not in tangent)
        assert (last_primal < first_tangent) is want


@pytest.mark.parametrize("interleaved_s,primal_first_s,want", [(0.02, 0.001, "primal_first"),
                                                               (0.001, 0.02, "interleaved"),
                                                               (0.005, 0.005, "interleaved")])
def test_faster_order_is_kept(interleaved_s, primal_first_s, want):
    """Jv on a new batch runs three calls in each order and keeps the faster; primal-first (more memory) only
    when clearly faster."""
    import time
    from types import SimpleNamespace

    from jvpgraph.api import _FasterOrder

    calls = []

    def make(name, seconds):
        def run(*args):
            calls.append(name)
            time.sleep(seconds)
            return name
        return run

    flipped = SimpleNamespace(module=make("interleaved", interleaved_s),
                              primal_first_module=make("primal_first", primal_first_s))
    chooser = _FasterOrder(flipped)
    x = torch.zeros(1)
    outs = [chooser(x) for _ in range(8)]
    assert calls[:6] == ["interleaved"] * 3 + ["primal_first"] * 3
    assert outs[6:] == [want, want]


class _ChannelsLastGroupNorm(nn.Module):
    """timm's cpubone: GroupNorm on a channels_last input, then a reshape. PyTorch's meta function for
    native_group_norm says the output is contiguous; the CPU kernel returns it channels_last."""

    def __init__(self):
        super().__init__()
        self.gn = nn.GroupNorm(2, 8)

    def forward(self, x):
        return torch.tanh(self.gn(x.contiguous(memory_format=torch.channels_last))).reshape(x.shape[0], -1)


def test_views_chosen_from_fake_strides_still_run_on_real_ones():
    """The trace turned the reshape into a view from the fake tensor's (contiguous) strides: emitted as a view,
    it raised 'view size is not compatible' on the real, channels_last tensor. Emitted as reshapes: the same
    output and Jv as double-backward, for new batches too."""
    torch.manual_seed(0)
    m = _ChannelsLastGroupNorm().double()
    for b in (2, 3, 5):
        x, v = torch.randn(b, 8, 4, 4, dtype=torch.float64), torch.randn(b, 8, 4, 4, dtype=torch.float64)
        out, jv = jvpgraph.jvp(m, (x,), (v,))
        ref_out, ref = torch.autograd.functional.jvp(m, x, v)  # double-backward (torch.func.jvp: the same on
        # 2.14/2.15; on 2.11 its group_norm raises 'view size is not compatible' on channels_last itself)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(jv, ref, rtol=1e-12, atol=1e-12)
    code = jvpgraph.trace(m, x).graph.flip().code
    assert "aten.view.default" not in code and "aten.reshape.default" in code


@pytest.mark.skipif(not _hvp_works(), reason="torch < 2.14: jvpgraph refuses Hv (wrong there)")
def test_tangent_module_switches_off_the_gradients_hv_does_not_need():
    """Curvature.hvp runs the gradient's flipped graph pruned to its tangents: the primal weight gradients'
    kernels are switched off in their ``output_mask`` (fewer outputs computed), and Hv is the joint graph's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Conv2d(3, 2, 3), nn.Flatten(),
                        nn.Linear(2 * 3 * 3, 4)).double().train()
    x, y = torch.randn(5, 2, 7, 7, dtype=torch.double), torch.randint(0, 4, (5,))
    curv = jvpgraph.Curvature(net, nn.functional.cross_entropy)
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    _, _, joint_hv = curv.grad_and_hvp(v, x, y)
    hv = curv.hvp(v, x, y)
    for name in v:
        assert joint_hv[name].norm() > 0, name
        torch.testing.assert_close(hv[name], joint_hv[name], rtol=1e-12, atol=0)
    traced, values, _, _ = curv._hessian((x, y))
    flipped = traced._compiled_for(tuple(values)).flipped

    def computed(gm, op):  # outputs the kernels of `op` compute, over the graph
        return sum(sum(n.args[-1]) for n in gm.graph.nodes if n.target is op)

    for op in (aten.convolution_backward.default, aten.native_batch_norm_backward.default):
        assert computed(flipped.tangent_module, op) < computed(flipped.module, op), op


def test_output_masks_follow_what_is_read():
    """A kernel whose gradient outputs are partly unread computes only the read ones, with the same values."""
    x, w = torch.randn(2, 3, 6, 6, dtype=torch.double), torch.randn(4, 3, 3, 3, dtype=torch.double)
    g = torch.randn(2, 4, 4, 4, dtype=torch.double)

    def f(g, x, w):
        gi, gw, gb = aten.convolution_backward(g, x, w, [4], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                               [True, True, True])
        return gi * 2

    gm = torch.fx.experimental.proxy_tensor.make_fx(f)(g, x, w)
    assert flip._prune_output_masks(gm.graph) == 1
    (node,) = [n for n in gm.graph.nodes if n.target is aten.convolution_backward.default]
    assert list(node.args[-1]) == [True, False, False]
    gm.recompile()
    torch.testing.assert_close(gm(g, x, w), f(g, x, w), rtol=0, atol=0)
    assert flip._prune_output_masks(gm.graph) == 0  # nothing left to switch off
