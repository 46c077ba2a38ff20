"""Second order: Hessian-vector products by flipping the gradient's graph, Gauss-Newton products and spectra.

References are independent of jvpgraph: PyTorch's double backward (``∂θ ⟨∇L, v⟩``), dense Hessians and
Jacobians (``torch.func.hessian``/``jacrev``), ``numpy.linalg.eigvalsh``, finite differences of the gradient.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel

import jvpgraph
from jvpgraph import spectra
from jvpgraph.hessian import _hvp_works

# torch 2.11: jvpgraph refuses Hessian-vector products (its gradient graph gives wrong Hv there); the refusal is
# tested in tests/test_errors.py on every version
pytestmark = pytest.mark.skipif(not _hvp_works(), reason="torch < 2.14: jvpgraph refuses Hv (wrong there)")

D = torch.float64


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 2),
                         nn.Sigmoid(), nn.Flatten(), nn.Linear(3 * 2 * 2, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)


def _mlp(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, out)).to(D)


def _double_backward_hvp(model, loss_fn, x, y, v, names=None):
    m = copy.deepcopy(model)
    named = dict(m.named_parameters())
    ps = [named[n] for n in (names or named)]
    g = torch.autograd.grad(loss_fn(m(x), y), ps, create_graph=True)
    return torch.autograd.grad(g, ps, v)


def _dense(mv, n, dtype=D):
    return torch.stack([mv(e) for e in torch.eye(n, dtype=dtype)], 1)


def _rel(a, b):
    a = torch.cat([t.reshape(-1) for t in a])
    b = torch.cat([t.reshape(-1) for t in b])
    assert b.norm() > 0  # a zero reference would make the comparison vacuous
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ hvp
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_parameter_hvp_with_batchnorm_equals_double_backward(mode):
    net = _cnn().train(mode == "train")
    state = copy.deepcopy(net.state_dict())
    x, y = torch.randn(6, 2, 9, 9, dtype=D), torch.randint(0, 3, (6,))
    curv = jvpgraph.Curvature(net, F.cross_entropy)
    v = tuple(torch.randn_like(p) for p in net.parameters())
    assert _rel(curv.hvp(v, x, y), _double_backward_hvp(net, F.cross_entropy, x, y, v)) < 1e-10
    # a new batch and new parameter values: the same trace answers, still exact
    x2 = torch.randn(6, 2, 9, 9, dtype=D)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = copy.deepcopy(net.state_dict())
    assert _rel(curv.hvp(v, x2, y), _double_backward_hvp(net, F.cross_entropy, x2, y, v)) < 1e-10
    for k, t in net.state_dict().items():
        assert torch.equal(t, state[k]), k  # running statistics not written
    assert net.training == (mode == "train")
    assert len(curv._hessian.forward.history) == 1


def test_torch_func_forward_over_reverse_refuses_train_batchnorm_where_hvp_runs():
    net = _cnn().train()
    x, y = torch.randn(6, 2, 9, 9, dtype=D), torch.randint(0, 3, (6,))
    params = {k: p.detach() for k, p in net.named_parameters()}
    buffers = {k: b.clone() for k, b in net.named_buffers()}

    def loss(p):
        return F.cross_entropy(torch.func.functional_call(net, (p, buffers), (x,)), y)

    v = {k: torch.randn_like(p) for k, p in params.items()}
    with pytest.raises(RuntimeError):
        torch.func.jvp(torch.func.grad(loss), (params,), (v,))
    hv = jvpgraph.Curvature(net, F.cross_entropy).hvp(v, x, y)
    ref = _double_backward_hvp(net, F.cross_entropy, x, y, tuple(v.values()))
    assert _rel(list(hv.values()), ref) < 1e-10


def test_hvp_of_a_function_in_its_inputs():
    net = _cnn().train()
    before = copy.deepcopy(net.state_dict())
    f = lambda x: net(x).pow(2).sum()  # noqa: E731 - closes over a train-mode BatchNorm
    x, v = torch.randn(5, 2, 9, 9, dtype=D), torch.randn(5, 2, 9, 9, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the closed-over running statistics are not written: it says so
        grad, hv = jvpgraph.hvp(f, x, v)
    xr = x.clone().requires_grad_()
    g = torch.autograd.grad(copy.deepcopy(net)(xr).pow(2).sum(), xr, create_graph=True)[0]
    ref = torch.autograd.grad(g, xr, v)[0]
    torch.testing.assert_close(grad, g.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hv, ref, rtol=1e-9, atol=1e-11)
    assert ref.abs().max() > 0
    for k, t in net.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_hvp_of_a_module_with_two_inputs_returns_tuples():
    class Energy(nn.Module):
        def forward(self, a, b):
            return (torch.sin(a) * b.exp()).sum() + (a * a * b).sum()

    a, b = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    ta, tb = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    grad, hv = jvpgraph.hvp(Energy(), (a, b), (ta, tb))
    ref = torch.func.jvp(torch.func.grad(lambda a, b: Energy()(a, b), argnums=(0, 1)), (a, b), (ta, tb))
    for got, want in zip((*grad, *hv), (*ref[0], *ref[1])):
        torch.testing.assert_close(got, want)


class _Cube(torch.autograd.Function):
    """x³ with its own backward (3x² g): the Hessian goes through that backward."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


def test_hvp_through_a_custom_autograd_function():
    w = nn.Linear(3, 3).to(D)
    f = lambda x: _Cube.apply(w(x)).sum()  # noqa: E731
    x, v = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    _, hv = jvpgraph.hvp(f, x, v)
    torch.testing.assert_close(hv, torch.autograd.functional.hvp(f, x, v)[1])


def test_hvp_with_dropout_uses_one_mask_for_gradient_and_hv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2)).to(D).train()
    x, y = torch.randn(8, 4, dtype=D), torch.randn(8, 2, dtype=D)
    curv = jvpgraph.Curvature(net, F.mse_loss)
    v = tuple(torch.randn_like(p) for p in net.parameters())
    with torch.random.fork_rng():
        torch.manual_seed(3)
        loss, grad, hv = curv.grad_and_hvp(v, x, y)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        ref = _double_backward_hvp(net, F.mse_loss, x, y, v)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        m = copy.deepcopy(net)
        ref_g = torch.autograd.grad(F.mse_loss(m(x), y), list(m.parameters()))
    assert _rel(hv, ref) < 1e-10 and _rel(grad, ref_g) < 1e-12


def test_vit_hvp_through_fused_attention_equals_the_math_kernel():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8,
                                               mlp_dim=8, num_classes=3).to(D).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initializes the head: the Hessian would be sparse
    x, y = torch.randn(2, 3, 8, 8, dtype=D), torch.randint(0, 3, (2,))
    v = tuple(torch.randn_like(p) for p in vit.parameters())
    hv = jvpgraph.Curvature(vit, F.cross_entropy).hvp(v, x, y)
    with sdpa_kernel(SDPBackend.MATH):
        ref = _double_backward_hvp(vit, F.cross_entropy, x, y, v)
    assert _rel(hv, ref) < 1e-10


class _TimmStyleAttention(nn.Module):
    """Attention written as timm and Hugging Face write it: F.scaled_dot_product_attention (the CPU flash kernel in
    the trace), then ``transpose(1, 2).reshape(B, N, C)``, a view of the kernel's output layout only."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.head(self.proj(o.transpose(1, 2).reshape(B, N, C)).mean(1))


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_hvp_through_attention_reshaped_as_timm_does(dtype):
    """timm's ViTs, DeiT and MobileViT failed here ('Cannot view a tensor with shape [2, 197, 192] and strides
    (192, 384, 1)'): the gradient's graph runs fused attention as its math, whose output is laid out otherwise."""
    torch.manual_seed(0)
    net = _TimmStyleAttention().to(dtype)
    x, y = torch.randn(2, 5, 8, dtype=dtype), torch.randint(0, 3, (2,))
    v = tuple(torch.randn_like(p) for p in net.parameters())
    hv = jvpgraph.Curvature(net, F.cross_entropy).hvp(v, x, y)
    with sdpa_kernel(SDPBackend.MATH):
        ref = _double_backward_hvp(net, F.cross_entropy, x, y, v)
    assert _rel(hv, ref) < (1e-10 if dtype == D else 1e-5)


class _AttentionBlock(nn.Module):
    """A pre-norm attention block with a residual, as language models write it (timm's reshape of the kernel's
    output included)."""

    def __init__(self, dim=32, heads=4, causal=True, mask=None):
        super().__init__()
        self.heads, self.causal, self.mask = heads, causal, mask
        self.norm, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, attn_mask=self.mask)
        return x + self.proj(o.transpose(1, 2).reshape(B, N, C))


def _sequence_loss(out, y):
    return (out - y).pow(2).mean() + 1e-3 * out.tanh().sum()


@pytest.mark.parametrize("mask", ["causal", "none", "padding", "float"])
def test_long_attention_hvp_equals_double_backward_of_the_math_kernel(mask, monkeypatch):
    """Above attention.HESSIAN_MIN_SCORES scores per head the gradient's graph keeps the flash kernel, its backward
    recorded as ``jvpgraph::attention_backward``, and flipping it takes that op's blockwise tangent (lowered here
    to take L = 200: 25 blocks of 8 query rows): Hv against double backward through the math kernel in float64."""
    from jvpgraph import hessian
    from jvpgraph.rules import attention

    monkeypatch.setattr(attention, "HESSIAN_MIN_SCORES", 0)
    routed = []
    apply = hessian._LongAttention.apply
    monkeypatch.setattr(hessian._LongAttention, "apply", lambda *a: routed.append(1) or apply(*a))
    torch.manual_seed(0)
    L = 200
    attn_mask = None
    if mask == "padding":
        attn_mask = torch.ones(2, 1, L, L, dtype=torch.bool)
        attn_mask[0, ..., 150:] = False  # the first sequence's last 50 keys are padding
    elif mask == "float":
        attn_mask = torch.randn(1, 4, L, L, dtype=D)  # a fixed additive bias
    net = _AttentionBlock(causal=mask == "causal", mask=attn_mask).to(D)
    x, y = torch.randn(2, L, 32, dtype=D), torch.randn(2, L, 32, dtype=D)
    v = tuple(torch.randn_like(p) for p in net.parameters())
    hv = jvpgraph.Curvature(net, _sequence_loss).hvp(v, x, y)
    assert routed  # the blockwise route, not the math's
    with sdpa_kernel(SDPBackend.MATH):
        ref = _double_backward_hvp(net, _sequence_loss, x, y, v)
    assert _rel(hv, ref) < 1e-10


def test_long_attention_hvp_holds_no_attention_matrix():
    """The gradient's graph of a long attention held the L x S weights several times (math's), and so did its
    flip: Hv at L = 1024 peaked at 114 MiB for one 4-head layer. Now less than one 4 x L x L matrix (16 MiB),
    where double backward (the math kernel: flash has no double backward) holds several."""
    from jvpgraph.measure import peak_memory

    torch.manual_seed(0)
    L = 1024
    net = _AttentionBlock(dim=64, heads=4)
    x, y = torch.randn(1, L, 64), torch.randn(1, L, 64)
    v = tuple(torch.randn_like(p) for p in net.parameters())
    curv = jvpgraph.Curvature(net, _sequence_loss)
    hv = curv.hvp(v, x, y)
    one_matrix = 4 * L * L * 4  # heads x L x L float32

    def double_backward():
        with sdpa_kernel(SDPBackend.MATH):
            return _double_backward_hvp(net, _sequence_loss, x, y, v)

    assert peak_memory(lambda: curv.hvp(v, x, y)) < one_matrix / 2
    assert peak_memory(double_backward) > 2 * one_matrix
    assert _rel(hv, double_backward()) < 1e-4


class _KeywordModel(nn.Module):
    """Called as Hugging Face models are, with keyword tensors and optional ones left out."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 6), nn.Linear(6, 3)

    def forward(self, input_ids=None, attention_mask=None, scale=None):
        h = torch.tanh(self.emb(input_ids))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        if scale is not None:
            h = h * scale
        return self.out(h.sum(1))


def test_keyword_inputs_as_a_dict():
    """``inputs`` may be a dict of keyword tensors (``model(**inputs)``): Hv and Gv against double backward and
    the dense Gauss-Newton product; a None among positional inputs is refused with the dict's spelling."""
    torch.manual_seed(0)
    net = _KeywordModel().to(D)
    ids, mask = torch.randint(0, 10, (4, 5)), torch.rand(4, 5, dtype=D)
    y = torch.randint(0, 3, (4,))
    v = tuple(torch.randn_like(p) for p in net.parameters())
    curv = jvpgraph.Curvature(net, F.cross_entropy)
    hv = curv.hvp(v, dict(input_ids=ids, attention_mask=mask), y)
    m = copy.deepcopy(net)
    ps = list(m.parameters())
    g = torch.autograd.grad(F.cross_entropy(m(input_ids=ids, attention_mask=mask), y), ps, create_graph=True)
    ref = torch.autograd.grad(g, ps, v)
    assert _rel(hv, ref) < 1e-10
    # G v = Jᵀ H_L J v, J by torch.func over the keyword call
    names = [n for n, _ in net.named_parameters()]
    logits = lambda *p: torch.func.functional_call(net, dict(zip(names, p)), (), dict(  # noqa: E731
        input_ids=ids, attention_mask=mask))
    out, jv = torch.func.jvp(logits, tuple(net.parameters()), v)
    hl = torch.func.jvp(lambda o: torch.func.grad(lambda o: F.cross_entropy(o, y))(o), (out,), (jv,))[1]
    gv_ref = torch.func.vjp(logits, *net.parameters())[1](hl)
    assert _rel(curv.ggnvp(v, dict(input_ids=ids, attention_mask=mask), y), gv_ref) < 1e-10
    with pytest.raises(TypeError, match=r"inputs\[1\] is a NoneType.*dict of keyword tensors.*model\(\*\*inputs\)"):
        curv.hvp(v, (ids, None, torch.tensor(2.0, dtype=D)), y)


class _LossInside(nn.Module):
    """Computes its own loss when given labels, as a Hugging Face model does (``model(**batch).loss``)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.GELU(), nn.Linear(6, 3))

    def forward(self, x, labels):
        logits = self.body(x)
        return dict(logits=logits, loss=F.cross_entropy(logits, labels))


def test_a_loss_the_model_computes_itself_needs_no_targets():
    """``targets=None`` calls ``loss_fn(output)`` alone: Hv of the loss a model computes from its ``labels``
    against double backward in train mode, and Gv of a loss of the output alone against ``Jᵀ H_L J v`` by
    torch.func; a ``loss_fn`` that needs targets is told to take them before anything is traced."""
    torch.manual_seed(0)
    net = _LossInside().to(D).train()
    batch = dict(x=torch.randn(8, 4, dtype=D), labels=torch.randint(0, 3, (8,)))
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    m = copy.deepcopy(net)
    hv = jvpgraph.Curvature(net, lambda out: out["loss"]).hvp(v, batch)
    ps = dict(m.named_parameters())
    g = torch.autograd.grad(m(**batch)["loss"], list(ps.values()), create_graph=True)
    ref = torch.autograd.grad(g, list(ps.values()), [v[n] for n in ps])
    assert _rel([hv[n] for n in ps], ref) < 1e-10
    torch.testing.assert_close(dict(net.named_buffers()), dict(_LossInside().to(D).named_buffers()))  # untouched

    mlp = _mlp().train()
    x = torch.randn(6, 4, dtype=D)
    entropy = lambda out: -(out.softmax(-1) * out.log_softmax(-1)).sum(-1).mean()  # noqa: E731 - no targets
    vt = tuple(torch.randn_like(p) for p in mlp.parameters())
    names = [n for n, _ in mlp.named_parameters()]
    logits = lambda *p: torch.func.functional_call(mlp, dict(zip(names, p)), (x,))  # noqa: E731
    out, jv = torch.func.jvp(logits, tuple(mlp.parameters()), vt)
    hl = torch.func.jvp(torch.func.grad(entropy), (out,), (jv,))[1]
    gv_ref = torch.func.vjp(logits, *mlp.parameters())[1](hl)
    assert _rel(jvpgraph.Curvature(mlp, entropy).ggnvp(vt, x), gv_ref) < 1e-10

    with pytest.raises(TypeError, match=r"targets is None, so loss_fn is called on the model's output alone, but "
                                        r"cross_entropy needs \(input, target\): pass the targets"):
        jvpgraph.Curvature(mlp, F.cross_entropy).hvp(vt, x)


def test_a_compiled_model_is_traced_through_its_original_module():
    """``torch.compile(model)``: make_fx cannot trace Dynamo's frame, so Curvature traces ``_orig_mod``; Hv and
    Gv keep the compiled model's parameter names and equal double backward on the original."""
    net = _mlp().train()
    compiled = torch.compile(net)
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    v = {n: torch.randn_like(p) for n, p in compiled.named_parameters()}
    curv = jvpgraph.Curvature(compiled, F.cross_entropy)
    hv = curv.hvp(v, x, y)
    assert sorted(hv) == sorted(v) and all(n.startswith("_orig_mod.") for n in hv)
    plain = [n for n, _ in net.named_parameters()]
    ref = _double_backward_hvp(net, F.cross_entropy, x, y, [v["_orig_mod." + n] for n in plain])
    assert _rel([hv["_orig_mod." + n] for n in plain], ref) < 1e-10
    gv = curv.ggnvp(v, x, y)
    gv_plain = jvpgraph.Curvature(net, F.cross_entropy).ggnvp({n: v["_orig_mod." + n] for n in plain}, x, y)
    assert _rel([gv["_orig_mod." + n] for n in plain], [gv_plain[n] for n in plain]) < 1e-12


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hvp_through_strided_dilated_convolutions_equals_double_backward(mode):
    """The convolution_backward rule's tangents where stride, padding and dilation leave a remainder (a strided
    3x3, a padded dilated 3x3, a 1x1 strided unevenly), with BatchNorm between."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.GELU(),
                        nn.Conv2d(24, 32, 3, padding=2, dilation=2), nn.BatchNorm2d(32), nn.Tanh(),
                        nn.Conv2d(32, 16, 1, stride=(2, 1)), nn.Flatten(), nn.LazyLinear(3)).to(D)
    x, y = torch.randn(2, 3, 7, 7, dtype=D), torch.randint(0, 3, (2,))
    net(x)
    net.train(mode == "train")
    v = tuple(torch.randn_like(p) for p in net.parameters())
    hv = jvpgraph.Curvature(net, F.cross_entropy).hvp(v, x, y)
    ref = _double_backward_hvp(net, F.cross_entropy, x, y, v)
    assert all(ref[i].abs().max() > 1e-3 for i in (0, 4, 8))  # each convolution's weight has curvature
    assert _rel(hv, ref) < 1e-10


def test_finite_differences_of_the_gradient_agree():
    net = _mlp().train()
    x, y = torch.randn(7, 4, dtype=D), torch.randint(0, 3, (7,))
    curv = jvpgraph.Curvature(net, F.cross_entropy)
    v = torch.randn(curv.dim, dtype=D)
    hv = curv.hvp(v, x, y)
    p0 = torch.nn.utils.parameters_to_vector(net.parameters()).detach()

    def grad_at(p):
        m = copy.deepcopy(net)
        torch.nn.utils.vector_to_parameters(p, m.parameters())
        return torch.nn.utils.parameters_to_vector(torch.autograd.grad(F.cross_entropy(m(x), y), m.parameters()))

    h = 1e-3
    d1 = (grad_at(p0 + h * v) - grad_at(p0 - h * v)) / (2 * h)
    d2 = (grad_at(p0 + h / 2 * v) - grad_at(p0 - h / 2 * v)) / h
    fd = (4 * d2 - d1) / 3  # Richardson: O(h⁴)
    torch.testing.assert_close(hv, fd, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------ the parameter-space form
def test_vector_forms_and_parameter_subsets():
    net = _mlp()
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    curv = jvpgraph.Curvature(net, F.cross_entropy)
    names = [n for n, _ in net.named_parameters()]
    flat = torch.randn(curv.dim, dtype=D)
    parts = [c.view(p.shape) for c, p in zip(flat.split([p.numel() for p in net.parameters()]), net.parameters())]
    as_flat = curv.hvp(flat, x, y)
    as_tuple = curv.hvp(tuple(parts), x, y)
    as_dict = curv.hvp(dict(zip(names, parts)), x, y)
    assert isinstance(as_tuple, tuple) and isinstance(as_dict, dict) and as_flat.shape == (curv.dim,)
    torch.testing.assert_close(as_flat, torch.cat([t.reshape(-1) for t in as_tuple]))
    for n, t in zip(names, as_tuple):
        torch.testing.assert_close(as_dict[n], t)
    # a subset: the block of H on those parameters
    sub = jvpgraph.Curvature(net, F.cross_entropy, params=["4.weight", "0.bias"])
    assert sub.names == ["0.bias", "4.weight"]
    vs = {"0.bias": torch.randn(6, dtype=D), "4.weight": torch.randn(3, 5, dtype=D)}
    full = curv.hvp({n: vs.get(n, torch.zeros_like(p)) for n, p in net.named_parameters()}, x, y)
    got = sub.hvp(vs, x, y)
    for n in vs:
        torch.testing.assert_close(got[n], full[n])


def test_bad_input_says_what_is_true():
    net = _mlp()
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="'nope' is not a parameter of Sequential"):
        jvpgraph.Curvature(net, F.cross_entropy, params=["nope"])
    with pytest.raises(ValueError, match="bn='frozen'"):
        jvpgraph.Curvature(net, F.cross_entropy, bn="frozen")
    curv = jvpgraph.Curvature(net, F.cross_entropy)
    with pytest.raises(ValueError, match=r"v\['0.weight'\] has shape \(2, 2\), but the parameter has \(6, 4\)"):
        curv.hvp({"0.weight": torch.zeros(2, 2, dtype=D)}, x, y)
    with pytest.raises(ValueError, match="flat vector of 3 numbers; the parameters have"):
        curv.hvp(torch.zeros(3, dtype=D), x, y)
    with pytest.raises(ValueError, match=r"shape \(6, 3\).*one floating-point scalar"):
        jvpgraph.hvp(net, x, x)


# ------------------------------------------------------------------ Gauss-Newton
def _dense_ggn(net, loss_fn, x, y):
    names = [n for n, _ in net.named_parameters()]
    params = tuple(p.detach() for p in net.parameters())
    f = lambda *ps: torch.func.functional_call(net, dict(zip(names, ps)), (x,))  # noqa: E731
    out = f(*params)
    J = torch.cat([j.reshape(out.numel(), -1) for j in torch.func.jacrev(f, argnums=tuple(range(len(params))))(
        *params)], 1)
    H = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    return J.T @ H @ J


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, F.mse_loss], ids=["cross_entropy", "mse"])
def test_ggn_equals_the_dense_gauss_newton_matrix(loss_fn):
    net = _mlp()
    x = torch.randn(5, 4, dtype=D)
    y = torch.randint(0, 3, (5,)) if loss_fn is F.cross_entropy else torch.randn(5, 3, dtype=D)
    curv = jvpgraph.Curvature(net, loss_fn)
    G = _dense_ggn(net, loss_fn, x, y)
    dense = _dense(curv.matvec(x, y, "ggn"), curv.dim)
    torch.testing.assert_close(dense, G, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(dense).min() > -1e-10  # positive semi-definite: both losses are convex


def test_ggn_of_cross_entropy_is_the_fisher():
    net = _mlp()
    x = torch.randn(4, 4, dtype=D)
    names = [n for n, _ in net.named_parameters()]
    params = tuple(p.detach() for p in net.parameters())
    # the Fisher of the categorical likelihood, exactly: E_{y ~ p(x)} ∇log p(y|x) ∇log p(y|x)ᵀ, averaged over x
    fisher = 0
    probs = torch.softmax(net(x), -1).detach()
    for i in range(4):
        for c in range(3):
            g = torch.func.grad(lambda *ps: torch.log_softmax(torch.func.functional_call(
                net, dict(zip(names, ps)), (x[i:i + 1],)), -1)[0, c], argnums=tuple(range(len(params))))(*params)
            g = torch.cat([t.reshape(-1) for t in g])
            fisher = fisher + probs[i, c] * torch.outer(g, g) / 4
    curv = jvpgraph.Curvature(net, F.cross_entropy)
    y = torch.zeros(4, dtype=torch.long)  # the GGN of cross-entropy does not depend on the labels
    torch.testing.assert_close(_dense(curv.matvec(x, y, "ggn"), curv.dim), fisher, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ spectra
def test_top_eigenvalues_equal_a_dense_eigendecomposition():
    net = _cnn().train()
    x, y = torch.randn(4, 2, 9, 9, dtype=D), torch.randint(0, 3, (4,))
    curv = jvpgraph.Curvature(net, F.cross_entropy)
    Hd = _dense(curv.matvec(x, y), curv.dim)
    torch.testing.assert_close(Hd, Hd.T, rtol=1e-9, atol=1e-12)
    exact = np.linalg.eigvalsh(Hd.numpy())[::-1]
    res = curv.eigenvalues(x, y, k=3, tol=1e-10)
    assert bool(res.converged.all()), res.residuals
    np.testing.assert_allclose(res.eigenvalues.numpy(), exact[:3], rtol=1e-6)
    # the Ritz vectors are eigenvectors: ‖H y − θ y‖ small, as the residuals say
    for theta, vec, r in zip(res.eigenvalues, res.eigenvectors, res.residuals):
        assert float((Hd @ vec - theta * vec).norm()) < 1e-6 * abs(float(exact[0]))
    from scipy.sparse.linalg import eigsh

    top = eigsh(curv.operator(x, y), k=1, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(top, exact[:1], rtol=1e-6)


def test_hutchinson_trace_and_density_are_consistent_with_the_dense_hessian():
    net = _mlp()
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    curv = jvpgraph.Curvature(net, F.cross_entropy)
    Hd = _dense(curv.matvec(x, y), curv.dim)
    est = curv.trace(x, y, samples=300)
    exact_trace = float(Hd.trace())
    assert abs(float(est.estimate) - exact_trace) < 4 * float(est.stderr)
    # the estimator's variance per sample is 2 Σ_{i≠j} H_ij²: the stated error matches it
    off = float(2 * (Hd.pow(2).sum() - Hd.diag().pow(2).sum()))
    assert 0.5 < float(est.stderr) ** 2 * 300 / off < 2
    dens = curv.density(x, y, iters=30, probes=6)
    ev = torch.linalg.eigvalsh(Hd)
    assert float(dens.nodes.min()) >= float(ev[0]) - 1e-8 and float(dens.nodes.max()) <= float(ev[-1]) + 1e-8
    torch.testing.assert_close(dens.weights.sum(), torch.tensor(1.0, dtype=D))
    assert abs(float(dens.trace.mean()) - exact_trace) < 4 * float(dens.trace.std()) / 6 ** 0.5 + 1e-9
    grid, rho = dens.curve(400)
    assert abs(float(torch.trapezoid(rho, grid)) - 1) < 1e-3


def test_lanczos_diagnostics_say_when_it_has_not_converged():
    A = torch.diag(torch.linspace(1.0, 1.001, 200, dtype=D))  # a cluster: 5 products cannot separate it
    res = spectra.lanczos(lambda v: A @ v, 200, k=2, iters=5, tol=1e-12)
    assert not bool(res.converged.all()) and res.iterations == 5
    with pytest.raises(ValueError, match="k=0"):
        spectra.lanczos(lambda v: A @ v, 200, k=0)


def test_spectra_leave_the_global_random_state_alone():
    state = torch.random.get_rng_state()
    spectra.hutchinson(lambda v: 2 * v, 10, samples=5)
    spectra.slq(lambda v: 2 * v, 10, iters=4, probes=2)
    spectra.lanczos(lambda v: 2 * v, 10)
    assert torch.equal(state, torch.random.get_rng_state())


# ------------------------------------------------------------------ first order, found on the way
def test_jvp_of_a_function_closing_over_a_train_batchnorm():
    net = _cnn().train()
    before = copy.deepcopy(net.state_dict())
    x, v = torch.randn(5, 2, 9, 9, dtype=D), torch.randn(5, 2, 9, 9, dtype=D)
    with pytest.warns(UserWarning, match="writes in place into a tensor it closes over"):
        _, jv = jvpgraph.jvp(lambda z: net(z), (x,), (v,))
    ref = torch.autograd.functional.jvp(copy.deepcopy(net), x, v)[1]
    torch.testing.assert_close(jv, ref)
    for k, t in net.state_dict().items():
        assert torch.equal(t, before[k]), k


# ------------------------------------------------------------------ the command line
def test_curvature_command_prints_the_dense_hessian_top_eigenvalues(tmp_path, capsys):
    """`jvpgraph curvature` on a sigmoid MLP (float64): the eigenvalues it writes equal the dense Hessian's
    (torch.autograd.functional.hessian of the same loss, model and batch, rebuilt here from the same seed),
    its trace is within 4 standard errors, and the density plot is a PNG."""
    from jvpgraph.cli import _build_for, main

    out, plot = tmp_path / "c.json", tmp_path / "d.png"
    rc = main(["curvature", "sigmoid_mlp", "--dtype", "float64", "--batch", "6", "-k", "2", "--iters", "80",
               "--tol", "1e-8", "--trace-samples", "30", "--json", str(out), "--plot", str(plot), "--no-progress"])
    assert rc == 0
    import json

    res = json.loads(out.read_text())
    torch.manual_seed(0)  # the command's seed, then its draws in its order: model, input, targets
    model = _build_for("sigmoid_mlp", [(6, 4)]).double().train()
    x = torch.randn(6, 4, dtype=D)
    with torch.no_grad():
        logits = model(x)
    y = torch.randint(0, logits.shape[1], (6,))
    names, ps = zip(*model.named_parameters())

    def loss(*flat_ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, flat_ps)), (x,)), y)

    H = torch.autograd.functional.hessian(loss, tuple(p.detach() for p in ps))
    sizes = [p.numel() for p in ps]
    dense = torch.cat([torch.cat([H[i][j].reshape(sizes[i], sizes[j]) for j in range(len(ps))], 1)
                       for i in range(len(ps))], 0)
    top = torch.linalg.eigvalsh(dense).flip(0)[:2]
    assert res["dim"] == dense.shape[0] and res["loss"] == "cross_entropy"
    torch.testing.assert_close(torch.tensor(res["eigenvalues"], dtype=D), top, rtol=1e-6, atol=1e-9)
    assert abs(res["trace"] - float(dense.trace())) <= 4 * res["trace_stderr"] + 1e-9
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "top 2 eigenvalues" in capsys.readouterr().out


def test_curvature_command_refuses_what_it_cannot_run(capsys):
    from jvpgraph.cli import main

    assert main(["curvature", "sigmoid_mlp", "--input-shape", "2,7", "--plot", ""]) == 3
    assert "does not run on an input of shape" in capsys.readouterr().err


def test_hvp_refuses_an_input_pytorch_cannot_differentiate_by_its_name():
    """batch_norm's running statistics as primals: autograd refuses to differentiate in them; hvp says which
    inputs, and what to do (close over them), instead of PyTorch's message about an argument of an aten op."""
    x, rm, rv = torch.randn(4, 3, dtype=D), torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    f = lambda x, rm, rv: F.batch_norm(x, rm, rv, training=True).pow(2).sum()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"x1, x2 in its trace .*running_mean.*Pass None as the tangent"):
            jvpgraph.hvp(f, (x, rm, rv), (x, rm, rv))
        _, hv = jvpgraph.hvp(lambda x: f(x, rm, rv), x, x)  # closed over: fine
        grads, hvs = jvpgraph.hvp(f, (x, rm, rv), (x, None, None))  # or not differentiated in: fine
    ref = torch.autograd.functional.hvp(lambda x: f(x, rm.clone(), rv.clone()), x, x)[1]
    torch.testing.assert_close(hv, ref)
    torch.testing.assert_close(hvs[0], ref)
    assert grads[1] is None and hvs[1] is None and hvs[2] is None


def test_instance_norm_tracking_statistics_inside_a_function():
    """InstanceNorm(track_running_stats=True) called from a lambda writes its running statistics through a
    repeat and an alias of them (PyTorch's composite): jvpgraph drops those writes (it hit PyTorch's internal
    functionalization assert before); Jv and Hv equal the references, the buffers stay as they were."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 3, 3), nn.InstanceNorm2d(3, track_running_stats=True, affine=True),
                      nn.Tanh()).double().train()
    x, v = torch.randn(2, 3, 6, 6, dtype=D), torch.randn(2, 3, 6, 6, dtype=D)
    before = [b.clone() for b in m.buffers()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jv = jvpgraph.jvp(lambda x: m(x), (x,), (v,))[1]
        hv = jvpgraph.hvp(lambda x: m(x).pow(2).sum(), x, v)[1]
    torch.testing.assert_close(jv, torch.func.jvp(copy.deepcopy(m), (x,), (v,))[1])
    ref = copy.deepcopy(m)
    torch.testing.assert_close(hv, torch.autograd.functional.hvp(lambda x: ref(x).pow(2).sum(), x, v)[1])
    assert all(torch.equal(a, b) for a, b in zip(before, m.buffers()))


def test_hvp_through_an_embedding_with_max_norm():
    """F.embedding(max_norm=...) renormalizes the looked-up rows in place under no_grad: eager double-backward
    holds that renorm outside autograd (the weight's derivative passes unchanged), and so must Hv (it refused
    before: PyTorch has no derivative for embedding_renorm). Rows 0 and 2 exceed max_norm, so the renorm acts;
    the module's weight is not changed."""
    torch.manual_seed(0)
    idx = torch.tensor([[0, 2, 2], [1, 3, 0]])
    w = torch.randn(5, 3, dtype=D)
    w[0] *= 4
    w[2] *= 3
    v = torch.randn_like(w)
    f = lambda weight: (F.embedding(idx, weight, max_norm=1.5).tanh() ** 2).sum()  # noqa: E731
    before = w.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jvpgraph says it does not write the renormalized rows back
        grad, hv = jvpgraph.hvp(f, w, v)
    assert torch.equal(w, before)
    eager = w.clone().requires_grad_()
    g = torch.autograd.grad(f(eager), eager, create_graph=True)[0]
    ref = torch.autograd.grad(g, eager, v)[0]
    assert not torch.equal(eager.detach(), before)  # eager renormalized in place: the case is live
    assert ref.norm() > 0
    torch.testing.assert_close(grad, g.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hv, ref, rtol=1e-10, atol=1e-12)


def test_first_hvp_holds_no_copy_of_the_parameters_while_it_flips():
    """The first call traces the loss, builds its gradient's graph and flips it: the flip traces on fake
    examples, so its peak tensor memory is the later calls' (it held a real copy of every parameter and one of
    every tangent: 2.0x the parameters' size on ViT-B/16 against 1.04x for later calls)."""
    from jvpgraph.measure import peak_memory

    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(256, 256), nn.Tanh())], nn.Linear(256, 3))
    size = sum(p.numel() * p.element_size() for p in net.parameters())
    x, y = torch.randn(2, 256), torch.tensor([0, 2])
    curv = jvpgraph.Curvature(net, F.cross_entropy)
    v = [torch.randn_like(p) for p in net.parameters()]
    first = peak_memory(lambda: curv.hvp(v, x, y))
    again = peak_memory(lambda: curv.hvp(v, x, y))
    assert again >= 0.9 * size  # Hv itself is one parameter-sized result: the meter sees the real work
    assert first <= again + 0.2 * size, (first / size, again / size)
