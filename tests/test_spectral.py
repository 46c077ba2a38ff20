"""Per-sample spectral norm and the regularizers, against independent references (torch.func Jacobians,
explicit masked products, the exact σ's gradient)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import jvpgraph
from jvpgraph.experiments.models import LeNet, SigmoidBNCNN

D = torch.float64


def _vit():
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision starts the head at zero: J would be 0
    return vit


MODELS = {
    "lenet": (lambda: LeNet(), (4, 1, 28, 28), "eval"),
    "sigmoid_bn_cnn_train": (lambda: SigmoidBNCNN(), (6, 1, 16, 16), "train"),
    "vit": (_vit, (3, 3, 16, 16), "eval"),
}


def _build(name, dtype=D):
    make, shape, mode = MODELS[name]
    torch.manual_seed(0)
    model = make().to(dtype).train(mode == "train")
    x = torch.randn(shape, dtype=dtype)
    return model, x


def _func_sigma(model, x):
    """σ per sample from torch.func: jacrev of the model on one sample at a time (eval mode: samples are
    independent), then the matrix 2-norm. Independent of jvpgraph."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def one(xb):
        return torch.func.functional_call(model, (params, buffers), (xb[None],))[0]

    J = torch.stack([torch.func.jacrev(one)(xb).reshape(-1, xb.numel()) for xb in x])
    return torch.linalg.matrix_norm(J, 2)


@pytest.mark.parametrize("name", list(MODELS))
def test_power_iteration_matches_exact_sigma(name):
    model, x = _build(name)
    state = jvpgraph.testing.ModelState(model)
    power = jvpgraph.spectral_norm(model, x, n_iter=500, tol=1e-12)
    exact = jvpgraph.spectral_norm(model, x, method="exact")
    rel = ((power.sigma - exact.sigma).abs() / exact.sigma).max().item()
    assert rel <= 1e-4, rel
    assert (power.residual <= 1e-3 * exact.sigma ** 2).all(), (power.residual, exact.sigma)
    # the singular vectors agree up to sign
    cos = (power.v.flatten(1) * exact.v.flatten(1)).sum(1).abs()
    assert (cos > 1 - 1e-3).all(), cos
    assert not state.changes(model), state.changes(model)


@pytest.mark.parametrize("name", ["lenet", "vit"])
def test_exact_sigma_matches_torch_func_jacobian(name):
    model, x = _build(name)
    exact = jvpgraph.spectral_norm(model, x, method="exact")
    torch.testing.assert_close(exact.sigma, _func_sigma(model, x), rtol=1e-10, atol=0)


def test_frozen_batchnorm_sigma_is_the_stats_held_jacobian():
    """In train mode with bn='frozen', σ is that of the Jacobian with the batch statistics as constants: the
    same as the eval-mode model whose running statistics are set to this batch's statistics."""
    model, x = _build("sigmoid_bn_cnn_train")
    sigma = jvpgraph.spectral_norm(model, x, method="exact").sigma
    frozen = copy.deepcopy(model)
    h = x
    with torch.no_grad():
        for m in frozen:  # set each BatchNorm's running statistics to the batch statistics it sees
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(h.mean((0, 2, 3)))
                m.running_var.copy_(h.var((0, 2, 3), unbiased=False))
                m.eval()
            h = m(h)
    frozen.eval()
    torch.testing.assert_close(sigma, _func_sigma(frozen, x), rtol=1e-9, atol=0)


def test_bn_batch_mode_has_no_per_sample_sigma():
    model, x = _build("sigmoid_bn_cnn_train")
    with pytest.raises(ValueError, match="couples the samples"):
        jvpgraph.spectral_norm(model, x, bn="batch")


def test_spectral_norm_leaves_the_callers_rng_alone():
    model, x = _build("lenet")
    before = torch.get_rng_state()
    jvpgraph.spectral_norm(model, x, n_iter=3)
    assert torch.equal(before, torch.get_rng_state())


# ------------------------------------------------------------------ the penalty's gradient
def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 12), nn.GELU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4)).to(D)


def _exact_sigma_grad(net, x):
    params = dict(net.named_parameters())

    def total_sigma(p):
        def one(xb):
            return torch.func.functional_call(net, p, (xb[None],))[0]

        J = torch.stack([torch.func.jacrev(one)(xb) for xb in x])
        return torch.linalg.matrix_norm(J, 2).sum()

    return torch.func.grad(total_sigma)(params)


@pytest.mark.parametrize("grad", ["uJv", "JTu", "iterations"])
def test_penalty_gradient_is_the_exact_sigma_gradient(grad):
    """At converged singular vectors the gradient of the penalty with respect to the parameters equals the
    gradient of exact σ (torch.func.grad of the SVD of each sample's Jacobian)."""
    net = _mlp()
    x = torch.randn(3, 5, dtype=D)
    want = _exact_sigma_grad(net, x)
    reg = jvpgraph.SpectralRegularizer(net, n_iter=300, grad=grad)
    _, penalty = reg(x)
    got = torch.autograd.grad(penalty.sum(), list(net.parameters()), allow_unused=True)
    got = [torch.zeros_like(p) if g is None else g for g, p in zip(got, net.parameters())]  # the last bias
    for (name, w), g in zip(want.items(), got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def _double_backward_penalty(net, x, v, grad):
    """The penalty the regularizer's ``grad`` mode defines, from its definition by plain autograd: ``Jv`` by
    torch.func.jvp, ``Jᵀu`` by a recorded backward and ``σ = ‖Jᵀu‖`` differentiated
    by double backward (``u`` held constant for ``"JTu"``, differentiated for ``"iterations"``)."""
    x = x.detach().requires_grad_(True)
    params = dict(net.named_parameters())
    jv = torch.func.jvp(lambda xx: torch.func.functional_call(net, params, (xx,)), (x,), (v,))[1]
    u = jv / jv.flatten(1).norm(dim=1).reshape(-1, 1)
    if grad == "JTu":
        u = u.detach()
    w = torch.autograd.grad(net(x), x, u, create_graph=True)[0]
    return w.flatten(1).norm(dim=1)


def _start_vector(x, seed):
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return v / v.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("grad", ["JTu", "iterations"])
@pytest.mark.parametrize("depth", [1, 3])
def test_penalty_gradient_through_tangent_passes_equals_the_double_backward(grad, depth):
    """Away from convergence too (a cold start, one or three iterations), the value and the parameters'
    gradient of the ``"JTu"`` and ``"iterations"`` penalties equal ``‖Jᵀu‖`` built from its definition with
    plain autograd (torch.func's Jv and Jᵀu, a recorded backward differentiated again), samples weighted."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 12),
                        nn.Softplus(), nn.Linear(12, 4)).to(D)
    x = torch.randn(6, 5, dtype=D)
    reg = jvpgraph.SpectralRegularizer(net, n_iter=depth, grad=grad, generator=torch.Generator().manual_seed(7))
    _, sigma = reg(x)
    v = _start_vector(x, 7)
    with torch.no_grad():
        for _ in range(depth - 1):
            params = dict(net.named_parameters())
            f = lambda xx: torch.func.functional_call(net, params, (xx,))  # noqa: E731
            u = torch.func.jvp(f, (x,), (v,))[1]
            v = torch.func.vjp(f, x)[1](u / u.norm(dim=1, keepdim=True))[0]
            v = v / v.norm(dim=1, keepdim=True)
    want = _double_backward_penalty(net, x, v, grad)
    torch.testing.assert_close(sigma, want.detach(), rtol=1e-12, atol=0)
    weights = torch.linspace(0.5, 2.0, x.shape[0], dtype=D)  # samples weighted unequally
    kw = dict(allow_unused=True, materialize_grads=True)  # the last bias does not enter J
    got = torch.autograd.grad((weights * sigma).sum(), list(net.parameters()), **kw)
    ref = torch.autograd.grad((weights * want).sum(), list(net.parameters()), **kw)
    assert min(r.abs().max() for r in ref[:-1]) > 1e-3  # the gradients compared are not vanishing
    for (name, _), g, r in zip(net.named_parameters(), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("grad", ["uJv", "JTu", "iterations"])
def test_penalty_gradient_through_layer_norm_matches_finite_differences(grad):
    """Through LayerNorm, the penalty's gradient along a random direction of all parameters equals float64
    Richardson finite differences of the penalty (``"uJv"``: ``‖Jv‖``; ``"JTu"``: ``‖Jᵀu‖`` with ``u`` held;
    ``"iterations"``: ``‖Jᵀu‖`` with ``u = Jv/‖Jv‖``). Not a reference built from torch's higher-order
    derivatives of ``layer_norm``: on torch 2.14 the ``"iterations"`` gradient built by reverse-over-forward
    (torch.func.jvp, then backward) misses one entry by 1e-3 relative and by triple backward by 2e-2
    (pytorch#175754: the fused double backward treats mean and invstd as constants; #196700)."""
    from jvpgraph.testing import _richardson

    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 12), nn.Softplus(),
                        nn.Linear(12, 4)).to(D)
    with torch.no_grad():  # LayerNorm's affine parameters away from (1, 0): their gradients are general
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(6, 5, dtype=D)
    weights = torch.linspace(0.5, 2.0, x.shape[0], dtype=D)

    reg = jvpgraph.SpectralRegularizer(net, n_iter=1, grad=grad, warm_start=False,
                                       generator=torch.Generator().manual_seed(7))

    def penalty():  # one iteration from the same v: what the gradient differentiates (for "JTu", u held)
        if reg.last and grad == "JTu":
            xg = x.detach().requires_grad_(True)
            with torch.enable_grad():
                w = torch.autograd.grad(net(xg), xg, reg.last["u"])[0]
            return (weights * w.norm(dim=1)).sum()
        reg.generator = torch.Generator().manual_seed(7)
        return (weights * reg(x)[1]).sum()

    params = list(net.parameters())
    grads = torch.autograd.grad(penalty(), params, allow_unused=True, materialize_grads=True)
    gen = torch.Generator().manual_seed(11)
    direction = [torch.randn(p.shape, generator=gen, dtype=D) for p in params]
    base = [p.detach().clone() for p in params]

    def along(eps):
        with torch.no_grad():
            for p, b, d in zip(params, base, direction):
                p.copy_(b + eps * d)
            value = penalty()
            for p, b in zip(params, base):
                p.copy_(b)
        return [value]

    (fd,), (err,) = _richardson(along, h=1e-4)
    got = sum((g * d).sum() for g, d in zip(grads, direction))
    assert float(err) < 1e-8 * abs(float(fd))  # the finite differences settled
    torch.testing.assert_close(got, fd, rtol=1e-7, atol=0)


def test_sigma2_penalty_and_warm_start_converge_over_calls():
    """One power iteration per call with warm start (vectors kept per dataset index) converges to exact σ
    over repeated calls on the same samples; penalty='sigma2' is its square."""
    net = _mlp()
    x = torch.randn(4, 5, dtype=D)
    exact = jvpgraph.spectral_norm(net, x, method="exact").sigma
    reg = jvpgraph.SpectralRegularizer(net, n_iter=1, penalty="sigma2", warm_start=True)
    idx = torch.tensor([10, 11, 12, 13])
    for _ in range(200):  # as in training: the backward's gradient with respect to v is the next Jᵀu
        _, penalty = reg(x, index=idx)
        penalty.sum().backward()
    torch.testing.assert_close(penalty.detach(), exact ** 2, rtol=1e-8, atol=0)
    for grad in ("JTu", "iterations"):  # the other estimates keep their vectors themselves
        other = jvpgraph.SpectralRegularizer(net, n_iter=1, penalty="sigma2", warm_start=True, grad=grad)
        for _ in range(100):
            _, penalty = other(x, index=idx)
        torch.testing.assert_close(penalty.detach(), exact ** 2, rtol=1e-8, atol=0)
    quiet = jvpgraph.SpectralRegularizer(net, n_iter=1, warm_start=True)
    with torch.no_grad():  # no backward to come: the regularizer computes Jᵀu itself
        for _ in range(200):
            _, sigma = quiet(x, index=idx)
    torch.testing.assert_close(sigma, exact, rtol=1e-8, atol=0)
    cold = jvpgraph.SpectralRegularizer(net, n_iter=1, penalty="sigma2")
    assert ((cold(x)[1].detach() - exact ** 2).abs() / exact ** 2).max() > 1e-3  # one cold step is not enough
    # the order of the batch does not matter: vectors follow their index
    _, shuffled = reg(x.flip(0), index=idx.flip(0))
    torch.testing.assert_close(shuffled.detach(), (exact ** 2).flip(0), rtol=1e-8, atol=0)


# ------------------------------------------------------------------ the piecewise-linear special case
def test_relu_network_flipped_graph_is_the_papers_forward_mode():
    """For a ReLU / max-pool network the flipped graph computes W^L Z^{L-1} ... Z^1 W^1 v: bias off,
    activations replaced by their masks (the paper's Section 3.1), here built by hand from the layers."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(D)
    lin1, lin2 = nn.Linear(3 * 4 * 4, 10).to(D), nn.Linear(10, 4).to(D)
    net = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), lin1, nn.ReLU(), lin2)
    x, v = torch.randn(5, 2, 8, 8, dtype=D), torch.randn(5, 2, 8, 8, dtype=D)
    _, jv = jvpgraph.jvp(net, (x,), (v,))

    # masks Z from the forward pass
    h1 = conv(x)
    z1 = (h1 > 0).to(D)
    pooled, idx = F.max_pool2d(torch.relu(h1), 2, return_indices=True)
    h2 = lin1(pooled.flatten(1))
    z2 = (h2 > 0).to(D)
    # the bias-free forward of v with the masks
    t = F.conv2d(v, conv.weight, None, padding=1) * z1
    t = t.flatten(2).gather(2, idx.flatten(2)).reshape(pooled.shape)  # max-pool: the selected entries
    t = (t.flatten(1) @ lin1.weight.T) * z2
    want = t @ lin2.weight.T
    torch.testing.assert_close(jv, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ regularizers' side effects
def test_regularizer_updates_running_statistics_once_like_a_forward():
    model, x = _build("sigmoid_bn_cnn_train")
    plain = copy.deepcopy(model)
    plain_out = plain(x)  # a train-mode forward: the running statistics move once
    for reg_cls in (jvpgraph.SpectralRegularizer, jvpgraph.FrobeniusRegularizer):
        m = copy.deepcopy(model)
        reg = reg_cls(m)
        logits, penalty = reg(x)
        for (k, a), b in zip(m.state_dict().items(), plain.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=lambda s, k=k: f"{reg_cls.__name__} {k}: {s}")
        torch.testing.assert_close(logits, plain_out, rtol=1e-12, atol=0)  # the same forward output
        assert penalty.shape == (x.shape[0],) and penalty.requires_grad


def test_frobenius_penalty_is_exact_for_one_output_and_unbiased():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(D)
    x = torch.randn(4, 5, dtype=D)
    J = torch.autograd.functional.jacobian(lambda z: net(z).sum(0), x)  # (1, 4, 5): rows are per sample
    fro2 = J[0].pow(2).sum(1)
    _, penalty = jvpgraph.FrobeniusRegularizer(net)(x)
    torch.testing.assert_close(penalty.detach(), fro2, rtol=1e-12, atol=0)  # one output: ε = ±1, exact

    net3 = _mlp()
    J3 = torch.stack([torch.autograd.functional.jacobian(net3, x[b:b + 1, :])[0, :, 0] for b in range(4)])
    fro2 = J3.pow(2).sum((1, 2))
    n_proj = 4000
    _, penalty = jvpgraph.FrobeniusRegularizer(net3, n_proj=n_proj)(x)
    # each projection has relative standard deviation <= sqrt(2) (4 outputs); the mean of 4000: < 0.03
    assert ((penalty.detach() - fro2).abs() / fro2).max() < 0.1


def test_spectral_bound_is_the_sum_of_squared_layer_norms():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(D)
    reg = jvpgraph.SpectralBoundRegularizer(net, n_iter=1)
    x = torch.randn(5, 2, 8, 8, dtype=D)
    for _ in range(300):  # one step per call, the vectors persist
        logits, penalty = reg(x)
    want = sum(torch.linalg.matrix_norm(w.flatten(1), 2) ** 2 for w in (net[0].weight, net[3].weight))
    torch.testing.assert_close(penalty.detach(), want.detach().expand(5), rtol=1e-8, atol=0)
    torch.testing.assert_close(logits, net(x))
    # the power-iteration bound is an upper bound of the exact per-sample σ (ReLU network)
    sigma = jvpgraph.spectral_norm(net, x, method="exact").sigma
    assert (sigma ** 2 <= penalty.detach() * (1 + 1e-9)).all()


def test_regularizer_training_steps_with_batchnorm_updates():
    """The regularizer writes the new running statistics into the model, as model(x) does; autograd saved
    the statistics the forward read, so the backward of each step must still run (it failed with 'modified by
    an inplace operation' when the forward read the model's own buffers), and the statistics after two steps
    equal those of two plain train-mode forwards."""
    torch.manual_seed(0)
    model = SigmoidBNCNN(width=4).train()
    twin = copy.deepcopy(model)
    reg = jvpgraph.SpectralRegularizer(model)
    xs = [torch.randn(8, 1, 16, 16) for _ in range(2)]
    for step, x in enumerate(xs):
        out, pen = reg(x, index=torch.arange(8) + 8 * step)
        (F.cross_entropy(out, torch.zeros(8, dtype=torch.long)) + 0.1 * pen.mean()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        with torch.no_grad():
            twin(x)
    for (name, b), b2 in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, b2, msg=name)


def _frozen_sigma_grad(net, x):
    """Gradient of Σ_i ‖J_i‖₂ where J_i is sample i's Jacobian with every train-mode BatchNorm's batch
    statistics held constant in x but still functions of the parameters (what bn="frozen" differentiates):
    a train-mode pass (on copies of the buffers) records each BatchNorm input's mean and biased variance with
    autograd, then a twin whose BatchNorms normalize by those statistics gives the per-sample Jacobians."""

    class HeldStatsBN(nn.Module):
        def __init__(self, bn):
            super().__init__()
            self.weight, self.bias, self.eps, self.stats = bn.weight, bn.bias, bn.eps, None

        def forward(self, z):
            mean, var = (s[None, :, None, None] for s in self.stats)
            return (z - mean) / torch.sqrt(var + self.eps) * self.weight[None, :, None, None] \
                + self.bias[None, :, None, None]

    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    params = dict(net.named_parameters())
    twin = copy.deepcopy(net)
    held = {}
    for name, m in list(twin.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            parent, _, leaf = name.rpartition(".")
            held[name] = HeldStatsBN(m)
            setattr(twin.get_submodule(parent) if parent else twin, leaf, held[name])
    names = {m: n for n, m in net.named_modules()}

    def sigma_sum(p):
        stats = {}
        hooks = [m.register_forward_hook(lambda m, inp, out: stats.__setitem__(m, (
            inp[0].mean((0, 2, 3)), inp[0].var((0, 2, 3), unbiased=False)))) for m in bns]
        try:
            torch.func.functional_call(net, {**p, **{n: b.clone() for n, b in net.named_buffers()}}, (x,))
        finally:
            for h in hooks:
                h.remove()
        for m in bns:
            held[names[m]].stats = stats[m]

        def one(xb):
            return torch.func.functional_call(twin, p, (xb[None],))[0]

        J = torch.stack([torch.func.jacrev(one)(xb).reshape(-1, xb.numel()) for xb in x])
        return torch.linalg.matrix_norm(J, 2).sum()

    return torch.func.grad(sigma_sum)(params)


def test_penalty_gradient_with_train_mode_batchnorm():
    """bn="frozen" in training: the penalty's gradient includes how the batch statistics move with the
    parameters (they are held constant in x only), equal to the reference built from an eval-mode twin."""
    torch.manual_seed(3)
    net = SigmoidBNCNN(width=2, num_classes=3).to(D).train()
    x = torch.randn(4, 1, 6, 6, dtype=D)
    want = _frozen_sigma_grad(net, x)
    reg = jvpgraph.SpectralRegularizer(net, n_iter=300, update_buffers=False)
    _, penalty = reg(x)
    got = torch.autograd.grad(penalty.sum(), list(net.parameters()), allow_unused=True)
    got = [torch.zeros_like(p) if g is None else g for g, p in zip(got, net.parameters())]
    for (name, w), g in zip(want.items(), got):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_warm_start_index_is_checked():
    net = _mlp()
    reg = jvpgraph.SpectralRegularizer(net)
    x = torch.randn(3, 5, dtype=D)
    with pytest.raises(ValueError, match="3 entries for a batch of 3|2 entries for a batch of 3"):
        reg(x, index=[0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        reg(x, index=[0, -1, 2])
    with pytest.raises(TypeError, match="integers"):
        reg(x, index=torch.tensor([0.0, 1.0, 2.0]))
    _, first = reg(x, index=[7, 8, 9])  # indices need not start at 0 or be dense
    assert first.shape == (3,)
