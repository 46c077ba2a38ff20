"""No jvpgraph call changes the model: parameters, buffers and ``training`` flags are bit-identical after
trace / jvp / linearize / vjp in every BatchNorm mode, and ``Linearized.new_buffers`` holds exactly what one
real train-mode forward writes into the running statistics.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import jvpgraph
from jvpgraph.testing import ModelState

from conftest import gradient_along, seeded

D = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                                      nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.Sigmoid())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 2 * 2, 6), nn.BatchNorm1d(6), nn.Tanh(),
                                  nn.Dropout(0.2), nn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.features(x))


def make(mixed_modes=False):
    torch.manual_seed(0)
    net = Net().double().train()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    if mixed_modes:  # some submodules in eval: flags must come back exactly, per module
        net.features[1].eval()
        net.head[4].eval()
    x = torch.randn(5, 2, 6, 6, dtype=D)
    return net, x


def snapshot(net):
    return ModelState(net)


def assert_unchanged(net, snap, what):
    changed = snap.changes(net)
    assert not changed, f"{what}: changed {changed}"


@pytest.mark.parametrize("bn", ["batch", "frozen", "eval"])
@pytest.mark.parametrize("mixed_modes", [False, True], ids=["train", "mixed"])
def test_no_call_changes_the_model(bn, mixed_modes):
    net, x = make(mixed_modes)
    v = torch.randn_like(x)
    snap = snapshot(net)

    traced = jvpgraph.trace(net, x, bn=bn)
    assert_unchanged(net, snap, "trace")
    _ = traced.graph.nx, traced.flipped.nx, traced.flipped.code, traced.flipped.partition()
    assert_unchanged(net, snap, "graph views")

    traced.jvp(x, v)
    assert_unchanged(net, snap, "Traced.jvp")
    traced.jvp(torch.randn(3, 2, 6, 6, dtype=D), torch.randn(3, 2, 6, 6, dtype=D))  # re-trace at a new shape
    assert_unchanged(net, snap, "Traced.jvp (new shape)")

    lin = traced.linearize(x)
    assert_unchanged(net, snap, "Traced.linearize")
    lin.jvp(v)
    assert_unchanged(net, snap, "Linearized.jvp")
    lin.vjp(torch.randn_like(lin.out))
    assert_unchanged(net, snap, "Linearized.vjp")
    traced(x)
    assert_unchanged(net, snap, "Traced.__call__")

    jvpgraph.jvp(net, (x,), (v,), bn=bn)
    assert_unchanged(net, snap, "jvpgraph.jvp")
    out, jvp_fn = jvpgraph.linearize(net, x, bn=bn)
    jvp_fn(v)
    assert_unchanged(net, snap, "jvpgraph.linearize")
    out, vjp_fn = jvpgraph.vjp(net, x, bn=bn)
    vjp_fn(torch.randn_like(out))
    assert_unchanged(net, snap, "jvpgraph.vjp")


def test_state_unchanged_when_a_call_fails():
    net, x = make()
    snap = snapshot(net)
    traced = jvpgraph.trace(net, x, bn="eval")
    with pytest.raises(ValueError):
        traced.jvp(x, torch.randn(1, 2, 3, dtype=D))
    assert_unchanged(net, snap, "failed jvp")


def test_existing_grads_untouched():
    net, x = make()
    net(x).sum().backward()
    snap = snapshot(net)
    assert all(grad is not None for _, _, grad in snap.params.values())
    lin = jvpgraph.trace(net, x).linearize(x)
    lin.jvp(torch.randn_like(x))
    lin.vjp(torch.randn_like(lin.out))
    assert_unchanged(net, snap, "linearize/vjp with existing .grad")


def _bn_buffers(net):
    return {k: t for k, t in net.named_buffers()
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("bn", ["batch", "frozen"])
@pytest.mark.parametrize("mixed_modes", [False, True], ids=["train", "mixed"])
def test_new_buffers_equal_one_real_forward(bn, mixed_modes):
    net, x = make(mixed_modes)
    before = {k: t.clone() for k, t in _bn_buffers(net).items()}
    ref = copy.deepcopy(net)
    with seeded(3), torch.no_grad():
        ref(x)
    written = {k: t for k, t in _bn_buffers(ref).items() if not torch.equal(t, before[k])}
    assert written, "the reference forward should update running statistics"

    with seeded(3):
        lin = jvpgraph.trace(net, x, bn=bn).linearize(x)
    new = lin.new_buffers
    assert set(new) == set(written), f"new_buffers keys {sorted(new)} vs written {sorted(written)}"
    for k, t in written.items():
        assert new[k].dtype == t.dtype and new[k].shape == t.shape, k
        torch.testing.assert_close(new[k], t, rtol=1e-12, atol=1e-14, msg=lambda m: f"{k}: {m}")
    # and they load back into the model to give the reference's state
    net2 = copy.deepcopy(net)
    net2.load_state_dict({**net2.state_dict(), **new})
    for k, t in _bn_buffers(ref).items():
        torch.testing.assert_close(dict(net2.named_buffers())[k], t, rtol=1e-12, atol=1e-14)


def test_new_buffers_empty_in_bn_eval_and_eval_mode():
    net, x = make()
    assert jvpgraph.trace(net, x, bn="eval").linearize(x).new_buffers == {}
    net.eval()
    assert jvpgraph.trace(net, x).linearize(x).new_buffers == {}


def test_bn_eval_uses_running_statistics_without_touching_flags():
    """``bn="eval"`` equals the model with BatchNorm layers (only) in eval mode; the flags come back."""
    net, x = make()
    v = torch.randn_like(x)
    flags = {n: m.training for n, m in net.named_modules()}
    with seeded(4):
        out, jv = jvpgraph.jvp(net, (x,), (v,), bn="eval")
    assert {n: m.training for n, m in net.named_modules()} == flags
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    with seeded(4):
        ref_out, ref_jv = torch.func.jvp(ref, (x,), (v,))  # no BN in train mode: forward AD runs
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jv, ref_jv, rtol=1e-9, atol=1e-10)


def test_batchnorm_cumulative_momentum_traces():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.Sigmoid()).double().train()
    x, v = torch.randn(6, 3, dtype=D), torch.randn(6, 3, dtype=D)
    snap = snapshot(net)
    out, jv = jvpgraph.jvp(net, (x,), (v,))
    assert_unchanged(net, snap, "jvp")
    torch.testing.assert_close(jv, torch.autograd.functional.jvp(copy.deepcopy(net), x, v)[1])


def _tensor_attributes(net):
    return {(name, k): t for name, m in net.named_modules() for k, t in vars(m).items()
            if isinstance(t, torch.Tensor)}


def test_spectral_norm_parametrization_state_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3).double()), nn.Tanh()).train()
    x = torch.randn(5, 4, dtype=D)
    snap, attrs = snapshot(net), _tensor_attributes(net)
    jvpgraph.jvp(net, (x,), (torch.randn_like(x),))
    assert_unchanged(net, snap, "jvp")
    assert _tensor_attributes(net).keys() == attrs.keys()
    copy.deepcopy(net)


def test_legacy_spectral_norm_hook_state_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 3).double()), nn.Tanh()).train()
    x = torch.randn(5, 4, dtype=D)
    attrs = _tensor_attributes(net)
    jvpgraph.trace(net, x)
    after = _tensor_attributes(net)
    assert after.keys() == attrs.keys()
    for k, t in after.items():
        assert type(t) is torch.Tensor and not isinstance(t, torch._subclasses.FakeTensor), (k, type(t))
        assert torch.equal(t, attrs[k]), k
    copy.deepcopy(net)


def test_function_that_reseeds_leaves_the_callers_rng_and_warns():
    """A forward that calls torch.manual_seed would change the caller's RNG while being traced; tracing
    restores it and says that the graph does not replay the reseeding."""
    import torch.nn.functional as F

    def f(x):
        torch.manual_seed(42)
        return F.dropout(x, 0.5)

    x = torch.randn(5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="reseeds the global random number generator"):
        jvpgraph.trace(f, x)
    assert torch.equal(before, torch.get_rng_state())


def test_tracing_under_no_grad_still_differentiates():
    """The caller's grad mode around jvpgraph does not make the model a constant (a re-trace on a new shape
    inside ``torch.no_grad()`` used to give Jv = 0); no_grad blocks inside the model still do."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    x, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad():
        g = jvpgraph.trace(net, x)
        _, jv = g.jvp(x, v)
        x5, v5 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        _, jv5 = g.jvp(x5, v5)  # a new shape: traced again, still inside no_grad
    torch.testing.assert_close(jv, torch.func.jvp(net, (x,), (v,))[1])
    torch.testing.assert_close(jv5, torch.func.jvp(net, (x5,), (v5,))[1])


def _tied():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight  # weight tying across two modules
    return nn.Sequential(a, nn.BatchNorm1d(3), nn.Tanh(), b).train()


def _shared():
    lin, bn = nn.Linear(3, 3), nn.BatchNorm1d(3)
    return nn.Sequential(lin, bn, nn.Tanh(), lin, bn).train()  # one module used twice


@pytest.mark.parametrize("make", [_tied, _shared], ids=["tied_weights", "shared_module"])
def test_tied_weights_and_shared_modules(make):
    """A parameter shared by two modules, and a module used twice: traced (both failed before: a TraceError),
    the right Jv and penalty gradient, and the model left as it was — PyTorch's reparametrization, asked to
    replace a module's attributes under both of its names, restored them to the traced (fake) tensors."""
    torch.manual_seed(0)
    model = make().double()
    twin = copy.deepcopy(model)
    x, v = torch.randn(4, 3, dtype=torch.double), torch.randn(4, 3, dtype=torch.double)
    state = ModelState(model)
    params = {id(p): p for p in model.parameters()}
    out, jv = jvpgraph.jvp(model, (x,), (v,))
    assert not state.changes(model) and {id(p) for p in model.parameters()} == set(params)
    torch.testing.assert_close(jv, torch.autograd.functional.jvp(twin, x, v)[1])
    # the gradient reaches the shared parameter through every use: against central differences of ||Jv||²
    # along a random direction of the (distinct) parameters
    ps = list(model.parameters())
    g = torch.autograd.grad(jvpgraph.jvp(model, (x,), (v,))[1].pow(2).sum(), ps, allow_unused=True)
    d = [torch.randn_like(p) for p in ps]
    slope = sum(float((a * b).sum()) for a, b in zip(g, d) if a is not None)  # a last bias: no effect on Jv

    fd = gradient_along(lambda: jvpgraph.jvp(model, (x,), (v,))[1].pow(2).sum(), ps, d)
    assert abs(slope - fd) <= 1e-6 * max(1.0, abs(fd)), (slope, fd)
