"""Property tests over random architectures (hypothesis).

MLPs and CNNs of depth 1-6 with nonlinearities drawn from a fixed set, optional BatchNorm / LayerNorm /
GroupNorm, residual adds, concatenation, pooling and dropout, in train or eval mode, float64. Properties:
jvpgraph's ``J v`` equals the explicit Jacobian times ``v``, and ``<u, J v> = <Jᵀ u, v>``.
Dropout draws its mask from the global RNG, which is reseeded before every evaluation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jvpgraph

from conftest import assert_adjoint, jac_times_v, seeded

D = torch.float64
SEED = 77

ACTS = {
    "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU,
    "softplus": nn.Softplus, "leaky_relu": lambda: nn.LeakyReLU(0.1), "hardswish": nn.Hardswish, "mish": nn.Mish,
}


class Layer(nn.Module):
    """One block: linear/conv -> optional norm -> activation -> optional dropout; residual add or concat."""

    def __init__(self, kind, width, act, norm, join, dropout, pool):
        super().__init__()
        self.kind, self.join, self.pool = kind, join, pool
        if kind == "mlp":
            self.lin = nn.Linear(width, width)
            self.norm = {"none": nn.Identity(), "batch": nn.BatchNorm1d(width), "layer": nn.LayerNorm(width),
                         "group": nn.GroupNorm(2, width)}[norm]
        else:
            self.lin = nn.Conv2d(width, width, 3, padding=1)
            self.norm = {"none": nn.Identity(), "batch": nn.BatchNorm2d(width),
                         "layer": nn.GroupNorm(1, width), "group": nn.GroupNorm(2, width)}[norm]
        self.act = ACTS[act]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # concatenation doubles the width: project back
        self.proj = (nn.Linear(2 * width, width) if kind == "mlp" else nn.Conv2d(2 * width, width, 1)) \
            if join == "concat" else None

    def forward(self, x):
        h = self.drop(self.act(self.norm(self.lin(x))))
        if self.join == "residual":
            h = h + x
        elif self.join == "concat":
            h = self.proj(torch.cat([h, x], dim=1))
        if self.kind == "cnn" and self.pool != "none" and h.shape[-1] >= 2:
            h = F.max_pool2d(h, 2) if self.pool == "max" else F.avg_pool2d(h, 2)
        return h


class RandomNet(nn.Module):
    def __init__(self, spec):
        super().__init__()
        kind, width = spec["kind"], spec["width"]
        self.stem = nn.Linear(5, width) if kind == "mlp" else nn.Conv2d(2, width, 3, padding=1)
        self.layers = nn.Sequential(*[Layer(kind, width, **layer) for layer in spec["layers"]])
        self.head = nn.Linear(width, 3)
        self.kind = kind

    def forward(self, x):
        h = self.layers(self.stem(x))
        if self.kind == "cnn":
            h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.head(h)


layer_spec = st.fixed_dictionaries({
    "act": st.sampled_from(sorted(ACTS)),
    "norm": st.sampled_from(["none", "batch", "layer", "group"]),
    "join": st.sampled_from(["none", "residual", "concat"]),
    "dropout": st.sampled_from([0.0, 0.0, 0.3]),
    "pool": st.sampled_from(["none", "none", "max", "avg"]),
})
net_spec = st.fixed_dictionaries({
    "kind": st.sampled_from(["mlp", "cnn"]),
    "width": st.sampled_from([4, 6]),
    "layers": st.lists(layer_spec, min_size=1, max_size=6),
    "train": st.booleans(),
    "seed": st.integers(0, 2 ** 16),
})

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _build(spec):
    torch.manual_seed(spec["seed"])
    net = RandomNet(spec).double()
    with torch.no_grad():  # non-trivial running statistics for eval mode
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net.train(spec["train"])
    shape = (4, 5) if spec["kind"] == "mlp" else (3, 2, 6, 6)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    return net, torch.randn(shape, generator=g, dtype=D), torch.randn(shape, generator=g, dtype=D)


@SETTINGS
@given(spec=net_spec)
def test_random_architecture_jv_matches_jacobian(spec):
    net, x, v = _build(spec)
    with seeded(SEED):
        out, jv = jvpgraph.jvp(net, (x,), (v,))
    with seeded(SEED):
        torch.testing.assert_close(out, net(x), rtol=1e-10, atol=1e-12)
    want = jac_times_v(net, (x,), (v,), seed=SEED)[0]
    torch.testing.assert_close(jv, want, rtol=1e-8, atol=1e-10)
    assert_adjoint(net, (x,), (v,), [jv], seed=SEED, generator=torch.Generator().manual_seed(spec["seed"]))


@SETTINGS
@given(spec=net_spec, data=st.data())
def test_random_architecture_linearize_adjoint(spec, data):
    """The recorded forward's jvp and vjp are adjoint, and jvp is linear in v."""
    net, x, v = _build(spec)
    traced = jvpgraph.trace(net, x)
    with seeded(SEED):
        lin = traced.linearize(x)
    a = data.draw(st.floats(-3, 3, allow_nan=False), label="a")
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(spec["seed"] + 2), dtype=D)
    jv, jw = lin.jvp(v), lin.jvp(w)
    torch.testing.assert_close(lin.jvp(a * v + w), a * jv + jw, rtol=1e-9, atol=1e-10)
    u = torch.randn(lin.out.shape, generator=torch.Generator().manual_seed(spec["seed"] + 3), dtype=D)
    jtu, jv = lin.vjp(u).detach(), jv.detach()
    lhs, rhs = float((u * jv).sum()), float((jtu * v).sum())
    assert abs(lhs - rhs) <= 1e-10 * (float(u.norm() * jv.norm() + jtu.norm() * v.norm()) + 1.0), (lhs, rhs)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=net_spec)
def test_random_architecture_long_sweep(spec):
    test_random_architecture_jv_matches_jacobian.hypothesis.inner_test(spec)
