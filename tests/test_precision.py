"""Low precision: float16 and bfloat16 models, and mixed precision under ``torch.autocast``.

There is no exact low-precision answer to compare with, so the reference is the float64 ``J v`` of the same
model at the same point (parameters, input and tangent rounded to the low dtype, then widened), and the
measure of what rounding alone costs on that network is PyTorch's own error: double-backward computed in the
low dtype against the same float64 answer. jvpgraph may round more often (an activation's derivative is
rounded before it multiplies the tangent; PyTorch's fused backward kernels round once), but a wrong rule is
off by O(1), not by a few roundings.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import jvpgraph
from jvpgraph.strategies import architectures, build

from conftest import double_backward_jvp, jac_times_v, seeded

SEED = 3
LOW = (torch.bfloat16, torch.float16)


def _widened(net: nn.Module, spec) -> nn.Module:
    wide, _, _ = build(spec, torch.float64)
    wide.load_state_dict({k: t.double() if t.is_floating_point() else t for k, t in net.state_dict().items()})
    return wide


@settings(max_examples=20, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=architectures(dropouts=[0.0]), dtype=st.sampled_from(LOW))  # dropout: masks differ across dtypes
def test_random_architecture_in_half_precision_rounds_like_autograd(spec, dtype):
    """jvpgraph's Jv keeps the model's dtype, its output is the model's, and its error against the float64
    Jv is at most 8x PyTorch's own double-backward error in the same dtype plus 4 units of rounding (the
    largest ratio seen over 120 architectures was 5: two roundings where a fused kernel has one)."""
    net, x, v = build(spec, dtype)
    with seeded(SEED):
        out, jv = jvpgraph.jvp(net, (x,), (v,))
    with seeded(SEED), torch.no_grad():
        eager = net(x)
    assert jv.dtype == dtype and out.dtype == dtype
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    autograd = double_backward_jvp(net, (x,), (v,), seed=SEED)[0].double()
    exact = jac_times_v(_widened(net, spec), (x.double(),), (v.double(),), seed=SEED)[0].detach()
    jv = jv.detach().double()
    # non-finite only where autograd's is too (fp16 GroupNorm of a constant group: autograd NaN, jvpgraph 0)
    assert bool((torch.isfinite(jv) | ~torch.isfinite(autograd)).all())
    both = torch.isfinite(jv) & torch.isfinite(autograd)
    info = torch.finfo(dtype)
    scale = max(float(exact.abs().max()), info.tiny)
    ours = float((jv - exact)[both].abs().amax()) / scale if both.any() else 0.0
    theirs = float((autograd - exact)[both].abs().amax()) / scale if both.any() else 0.0
    # below the smallest normal number the dtype has no relative precision left: an absolute floor of one
    assert ours <= 8 * theirs + 4 * info.eps + info.tiny / scale, (ours, theirs, info.eps)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=architectures(dropouts=[0.0]), dtype=st.sampled_from(LOW))
def test_half_precision_long_sweep(spec, dtype):
    test_random_architecture_in_half_precision_rounds_like_autograd.hypothesis.inner_test(spec, dtype)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 8, 3), nn.LayerNorm([4, 4]),
                         nn.SiLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.Softmax(-1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_jv_matches_double_backward_under_the_same_autocast(mode):
    """Under torch.autocast (CPU, bfloat16) jvpgraph differentiates the mixed-precision forward that runs:
    the same output bits and dtype as eager, and a Jv within a few bfloat16 roundings of double-backward's
    under the same autocast (both far from the float32 Jv's bits)."""
    net = _bn_net().train(mode == "train")
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            eager = copy.deepcopy(net)(x)
        out, jv = jvpgraph.jvp(net, (x,), (v,))
        want = double_backward_jvp(copy.deepcopy(net), (x,), (v,))[0]
    assert out.dtype == eager.dtype == jv.dtype == want.dtype
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    scale = float(want.abs().max())
    assert float((jv.detach().float() - want.float()).abs().max()) <= 4 * torch.finfo(torch.bfloat16).eps * scale


def test_a_trace_made_under_autocast_is_not_reused_outside_it():
    """The trace holds autocast's casts: a call outside autocast traces again and gives the float32 answer
    (before the fix it silently returned the bfloat16 one)."""
    net = _bn_net().eval()
    x, v = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    traced = jvpgraph.trace(net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, low = traced.jvp(x, v)
    _, full = traced.jvp(x, v)
    _, fresh = jvpgraph.trace(net, x).jvp(x, v)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(full, fresh, rtol=0, atol=0)
    assert not torch.equal(full, low.float())


def test_regularizer_step_under_autocast():
    """A SpectralRegularizer training step under autocast (bfloat16 BatchNorm input, float32 weights: the
    mixed-dtype case that used to fail with a RuleError): the penalty and its gradient agree with the float32
    step's to bfloat16 accuracy, and the model's parameters and running statistics stay float32."""
    base = _bn_net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for autocast in (False, True):
        net = copy.deepcopy(base)
        reg = jvpgraph.SpectralRegularizer(net, n_iter=3, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, pen = reg(x, index=torch.arange(8))
            loss = out.float().sum() * 0 + pen.float().mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters()])
        results.append((pen.float().detach(), grads))
        assert all(t.dtype == torch.float32 for t in net.state_dict().values() if t.is_floating_point())
    (p32, g32), (p16, g16) = results
    torch.testing.assert_close(p16, p32, rtol=0.05, atol=0)
    cosine = float(g16 @ g32 / (g16.norm() * g32.norm()))
    assert cosine > 0.98, cosine


@pytest.mark.parametrize("dtype", LOW)
def test_spectral_norm_in_half_precision_converges_to_the_float64_value(dtype):
    """σ by power iteration in float16/bfloat16 stops (σ settles to within 4 roundings) and is the float64
    σ of the rounded model to the dtype's accuracy."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    x = torch.randn(5, 6).to(dtype)
    res = jvpgraph.spectral_norm(net, x, n_iter=200)
    wide = copy.deepcopy(net).double()
    exact = jvpgraph.spectral_norm(wide, x.double(), method="exact").sigma
    assert res.sigma.dtype == dtype and bool(res.converged.all()) and res.iterations < 200
    torch.testing.assert_close(res.sigma.double(), exact, rtol=8 * torch.finfo(dtype).eps, atol=0)
