"""One torchvision classifier per family, in train mode (BatchNorm statistics from the batch, dropout on),
against the double-backward trick in float32, or the adjoint identity where double-backward cannot run
(MobileNetV3: hardsigmoid's backward has no derivative). The whole zoo, both modes, against the full
Jacobian: ``python benchmarks/zoo.py`` (benchmarks/results/zoo.md).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import jvpgraph
from jvpgraph import testing
from jvpgraph.cli import build_model

TOL = 1e-4  # float32 over 50-300 ops; see benchmarks/results/zoo.md for the justification

FAMILIES = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
            "mnasnet0_5", "mobilenet_v3_small", "regnet_x_400mf", "resnet18", "shufflenet_v2_x0_5",
            "squeezenet1_0", "swin_t", "vgg11_bn", "vit_b_16"]
SIZES = {"inception_v3": 80}


def _family(name):
    """The family's model in train mode (random weights, 10 classes), a batch of 2 and a tangent."""
    size = SIZES.get(name, 64)
    torch.manual_seed(0)
    model = build_model(name, size).train()
    head = getattr(model, "heads", None)
    if head is not None and hasattr(head, "head"):  # torchvision starts ViT heads at zero: Jv would be 0
        torch.nn.init.normal_(head.head.weight, std=0.02)
    return model, torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_representative_in_train_mode(name):
    model, x, v = _family(name)
    state = testing.ModelState(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.random.fork_rng():
            torch.manual_seed(1)  # the same dropout masks for jvpgraph and the reference
            _, jv = jvpgraph.jvp(model, (x,), (v,))
        assert not state.changes(model), f"{name}: {state.changes(model)} changed"
        try:
            with torch.random.fork_rng():
                torch.manual_seed(1)
                ref = testing.double_backward(model, x, v)
        except RuntimeError as e:  # double-backward cannot run: the adjoint identity with autograd's Jᵀu
            assert "derivative for" in str(e) or "not implemented" in str(e), e
            with torch.random.fork_rng():
                torch.manual_seed(1)
                gap = testing.adjoint_gap(jv, model, x, v)
            assert gap <= TOL, f"{name}: adjoint gap {gap:.1e}"
            return
    err = testing.max_rel_err(jv, ref)
    assert err <= TOL, f"{name}: max rel err {err:.1e} against double-backward"
    assert jv.abs().max() > 0


VERIFY_STATE = ("resnet18", "vgg11_bn", "mobilenet_v3_small")  # BatchNorm, dropout, SE blocks and hardswish


@pytest.mark.parametrize("name", FAMILIES)
def test_family_state_untouched_by_every_call(name):
    """Nothing lost, across the zoo: after trace, jvp, vjp, linearize, spectral_norm, a regularizer's
    penalty (``update_buffers=False``) and verify (every reference, finite differences included; on three
    families), every parameter, buffer (running statistics, ``num_batches_tracked``),
    ``.grad``, ``requires_grad`` and ``training`` flag is as before — in train mode, where BatchNorm and dropout
    would write. The caller's global RNG: trace, spectral_norm and verify leave it as it was; a call that evaluates the
    model once (jvp, vjp, linearize, the regularizer's forward) draws its dropout masks from it exactly as an
    eager ``model(x)`` does, so seeding reproduces both."""
    model, x, v = _family(name)
    twin = copy.deepcopy(model)
    state = testing.ModelState(model)
    calls = {
        "trace": (lambda: jvpgraph.trace(model, x), False),
        "jvp": (lambda: jvpgraph.jvp(model, (x,), (v,)), True),
        "vjp": (lambda: jvpgraph.vjp(model, x)[1](torch.ones(2, 10)), True),
        "linearize": (lambda: jvpgraph.linearize(model, x)[1](v), True),
        "spectral_norm": (lambda: jvpgraph.spectral_norm(model, x, n_iter=2).sigma, False),
        "regularizer": (lambda: jvpgraph.SpectralRegularizer(model, update_buffers=False)(x, index=[0, 1]), True),
    }
    if name in VERIFY_STATE:  # verify runs every reference (~10 s a family): three families in the default run
        calls["verify"] = (lambda: jvpgraph.verify(model, x, v=v, max_jacobian_entries=0), False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call, (fn, draws_like_eager) in calls.items():
            before = torch.get_rng_state()
            twin(x)  # what an eager forward draws
            eager = torch.get_rng_state()
            torch.set_rng_state(before)
            result = fn()
            assert not state.changes(model), f"{name}: {call} changed {state.changes(model)}"
            expected = eager if draws_like_eager else before
            assert torch.equal(torch.get_rng_state(), expected), f"{name}: {call} moved the global RNG"
            if call == "spectral_norm":
                assert torch.isfinite(result).all() and (result > 0).all(), f"{name}: σ = {result}"
