"""The gradient of Jv with respect to the parameters — what every Jacobian penalty trains with.

A rule can give the right Jv as a value and still the wrong gradient: normalization kernels return their
statistics as outputs autograd does not differentiate, so a tangent built on them missed how the statistics
move with the parameters (BatchNorm in train mode, LayerNorm; the spectral penalty's gradient was off by
80-180% for the weights before a BatchNorm). Reference: PyTorch's double backward,
∂θ vᵀ ∂x(uᵀ f(x)) = ∂θ uᵀ J v, with attention on its math kernel (the flash kernel's backward has no
derivative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel

import jvpgraph
from jvpgraph.experiments.models import SigmoidBNCNN

from conftest import gradient_along

D = torch.float64


def _vit():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8,
                                               mlp_dim=8, num_classes=3)
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initializes the head: every gradient would be 0
    return vit


class _Detached(nn.Module):
    """Uses its weight twice: once detached (a constant for autograd), once not."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.lin.weight.detach().T) * torch.sigmoid(self.lin(x)))


class _NoGradScale(nn.Module):
    """Weight divided by its norm taken under torch.no_grad() (a constant for autograd)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        with torch.no_grad():
            n = self.w.norm()
        return torch.tanh(x @ (self.w / n).T)


def _spectral_normed():
    # PyTorch's spectral-norm parametrization: in train mode its power iteration runs under no_grad
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(5, 6)), nn.GELU(),
                         nn.Linear(6, 3)).train()


CASES = {
    # models that detach or compute under no_grad: their Jv was right, but the gradient of Jv in the parameters
    # went through the detached values (the emitted graph replayed them with gradients): 96%, 20% and 6e-8 off
    "detached_weight": (_Detached, (4, 5)),
    "no_grad_norm": (_NoGradScale, (4, 5)),
    "spectral_norm_parametrization": (_spectral_normed, (4, 5)),
    "sigmoid_bn_cnn_train": (lambda: SigmoidBNCNN(width=2, num_classes=4).train(), (4, 1, 8, 8)),
    "layernorm_mlp": (lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)), (4, 5)),
    "groupnorm_cnn": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                                            nn.Linear(4 * 36, 3)), (3, 1, 8, 8)),
    "instancenorm_cnn": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.GELU(),
                                               nn.Flatten(), nn.Linear(4 * 36, 3)), (3, 1, 8, 8)),
    "vit_train": (lambda: _vit().train(), (2, 3, 8, 8)),
}


def _case(name):
    factory, shape = CASES[name]
    torch.manual_seed(1)
    net = factory().to(D)
    x = torch.randn(*shape, dtype=D)
    return net, x, torch.randn_like(x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_of_uJv_wrt_parameters_matches_double_backward(name):
    net, x, v = _case(name)
    params = list(net.parameters())
    state = {k: b.clone() for k, b in net.named_buffers()}

    lin = jvpgraph.trace(net, x).linearize(x)
    jv = lin.jvp(v)
    u = torch.randn_like(jv)
    got = torch.autograd.grad((u * jv).sum(), params, allow_unused=True)

    net.load_state_dict({**net.state_dict(), **state})  # the reference's forward sees the same statistics
    xx = x.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        g, = torch.autograd.grad(net(xx), xx, u, create_graph=True)
        want = torch.autograd.grad((g * v).sum(), params, allow_unused=True)
    flat = lambda gs: torch.cat([(torch.zeros_like(p) if t is None else t).flatten()  # noqa: E731
                                 for t, p in zip(gs, params)])
    a, b = flat(got), flat(want)
    assert b.abs().max() > 0
    err = float((a - b).abs().max() / b.abs().max())
    assert err < 1e-9, f"{name}: max |Δ| / max |∂θ uᵀJv| = {err:.2e}"


# detach and no_grad make autograd's gradient differ from the derivative by design (the detached value moves
# with the parameters, autograd holds it): finite differences judge only the models without them
CONSTANTS = ("detached_weight", "no_grad_norm", "spectral_norm_parametrization")


@pytest.mark.parametrize("name,bn", [(n, "batch") for n in sorted(CASES) if n not in CONSTANTS]
                         + [("sigmoid_bn_cnn_train", "frozen")])
def test_gradient_of_uJv_wrt_parameters_matches_finite_differences(name, bn):
    """The same gradient against a reference that shares no formula with PyTorch's kernels: the central
    difference of uᵀJv along a random direction of all parameters (float64). The rules use
    native_batch_norm_backward for BatchNorm's tangent, so the test above compares two uses of PyTorch's
    second-order BatchNorm formula; this one does not (and covers bn="frozen", whose statistics are held
    in Jv but still move with the parameters)."""
    net, x, v = _case(name)
    params = list(net.parameters())
    g = jvpgraph.trace(net, x, bn=bn)
    u = torch.randn_like(g.jvp(x, v)[1])

    def uJv():
        return (u * g.jvp(x, v)[1]).sum()

    got = torch.autograd.grad(uJv(), params, allow_unused=True)
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    slope = sum(float((a * d).sum()) for a, d in zip(got, direction) if a is not None)

    fd = gradient_along(uJv, params, direction)
    assert abs(slope - fd) <= 1e-6 * max(abs(fd), 1.0), (name, slope, fd)
