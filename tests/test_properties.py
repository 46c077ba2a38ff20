"""Property tests over random architectures (hypothesis).

MLPs and CNNs of depth 1-6 with nonlinearities drawn from a fixed set, optional BatchNorm / LayerNorm /
GroupNorm, residual adds, concatenation, pooling and dropout, in train or eval mode, float64, drawn by the
public strategies of :mod:`jvpgraph.strategies`. Properties: jvpgraph's ``J v`` equals the explicit
Jacobian times ``v``, and ``<u, J v> = <Jᵀ u, v>``; in float32, it equals double-backward's, and both op
orders of the emitted graph give the same bits.
Dropout draws its mask from the global RNG, which is reseeded before every evaluation.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jvpgraph
from jvpgraph.strategies import architectures, build

from conftest import assert_adjoint, double_backward_jvp, jac_times_v, seeded

D = torch.float64
SEED = 77

ARCHITECTURES = architectures()  # see jvpgraph.strategies

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(spec=ARCHITECTURES)
def test_random_architecture_jv_matches_jacobian(spec):
    net, x, v = build(spec)
    with seeded(SEED):
        out, jv = jvpgraph.jvp(net, (x,), (v,))
    with seeded(SEED):
        torch.testing.assert_close(out, net(x), rtol=1e-10, atol=1e-12)
    want = jac_times_v(net, (x,), (v,), seed=SEED)[0]
    torch.testing.assert_close(jv, want, rtol=1e-8, atol=1e-10)
    assert_adjoint(net, (x,), (v,), [jv], seed=SEED, generator=torch.Generator().manual_seed(spec["seed"]))


@SETTINGS
@given(spec=ARCHITECTURES, data=st.data())
def test_random_architecture_linearize_adjoint(spec, data):
    """The recorded forward's jvp and vjp are adjoint, and jvp is linear in v."""
    net, x, v = build(spec)
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


@SETTINGS
@given(spec=ARCHITECTURES)
def test_random_architecture_float32_and_both_op_orders(spec):
    """In float32 (the dtype people train in), jvpgraph's Jv equals the double-backward trick computed at the
    same float32 point (the same kernels decide the same ReLU masks and pool choices), to float32 rounding;
    and the two op orders of the one-pass Jv (interleaved, primal-first) give the same bits."""
    net, x, v = build(spec, torch.float32)
    traced = jvpgraph.trace(net, x)
    with seeded(SEED):
        out, jv = traced.jvp(x, v)
    assert jv.dtype == torch.float32
    want = double_backward_jvp(net, (x,), (v,), seed=SEED)[0]
    scale = float(want.abs().max()) + 1e-6
    assert float((jv - want).abs().max()) <= 1e-4 * scale, float((jv - want).abs().max()) / scale
    flipped = traced.flipped
    args = [*net.parameters(), *net.buffers(), x, v]
    with seeded(SEED):
        a = flipped.module(*args)
    with seeded(SEED):
        b = flipped.primal_first_module(*args)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=ARCHITECTURES)
def test_random_architecture_long_sweep(spec):
    test_random_architecture_jv_matches_jacobian.hypothesis.inner_test(spec)
