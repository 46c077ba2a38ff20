"""One model of each zoo users bring, built from a tiny config with random weights and called the way its
library calls it: timm, Hugging Face transformers, diffusers (Jv with respect to the latent and the timestep),
torchvision beyond classification (segmentation, video, optical flow, detection), the ``timm:``/``hf:``/
``diffusers:`` names of the command line, and a SpectralRegularizer step on a decoder and on a timm ViT.

Every Jv is compared, in float64, with double-backward (``torch.autograd.functional.jvp`` on the math attention
kernel) on a copy of the model under the same seed, or, where the model's ops have no double backward
(torchvision's roi_align), with the adjoint identity <u, Jv> = <Jᵀu, v> from autograd's backward. A test is
skipped when its library is not installed (``pip install 'jvpgraph[zoo]'``; ``./run test`` installs it).
The whole sweeps are ``benchmarks/zoo_timm.py``, ``benchmarks/zoo_transformers.py`` and ``benchmarks/ecosystem.py``.
"""

from __future__ import annotations

import copy
import os
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel

import jvpgraph
from jvpgraph import testing
from jvpgraph.cli import main as cli_main
from jvpgraph.experiments import ecosystem

from conftest import gradient_along, seeded

os.environ.setdefault("HF_HUB_OFFLINE", "1")
D = torch.float64
TOL = 1e-8  # float64, relative to max|reference|


def _jvp_and_reference(model, xs, vs, seed=1):
    """jvpgraph's Jv and double-backward's, each on the model as it is (a copy for the reference: train-mode
    BatchNorm writes running statistics), under the same seed (the same dropout masks)."""
    before = testing.ModelState(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="jvpgraph: no written rule")
        with seeded(seed):
            out, jv = jvpgraph.jvp(model, tuple(xs), tuple(vs))
    assert not before.changes(model), before.changes(model)
    twin = copy.deepcopy(model)
    with seeded(seed), sdpa_kernel(SDPBackend.MATH):
        ref_out, ref = torch.autograd.functional.jvp(lambda *a: twin(*a), tuple(xs), tuple(vs))
    return out, jv, ref_out, ref


def _assert_jv(model, xs, vs, seed=1, out_tol=1e-10):
    out, jv, ref_out, ref = _jvp_and_reference(model, xs, vs, seed)
    assert ref.abs().max() > 1e-6, "the reference Jv is zero: the comparison would check nothing"
    assert testing.max_rel_err(out, ref_out) <= out_tol
    assert testing.max_rel_err(jv, ref) <= TOL, testing.max_rel_err(jv, ref)


def _reinit_zeros(model):
    """timm and torchvision zero-initialize some last layers: Jv would be zero and pass vacuously."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                nn.init.normal_(p, std=0.02)
    return model


# ------------------------------------------------------------------ timm
@pytest.mark.parametrize("name,mode,checkpointing", [
    ("test_vit", "train", False), ("test_vit", "train", True), ("test_efficientnet", "train", False),
    ("test_convnext", "eval", False), ("resnet10t", "train", True)],
    ids=lambda p: str(p))
def test_timm(name, mode, checkpointing):
    """timm's models as timm builds them (drop path and dropout in train mode, BatchNorm with batch statistics,
    ``set_grad_checkpointing()``), against the same model without checkpointing."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    built = ecosystem.build(f"timm:{name}")
    model = _reinit_zeros(built.model).to(D).train(mode == "train")
    x = torch.randn(built.shapes[0], dtype=D)
    v = torch.randn_like(x)
    if not checkpointing:
        _assert_jv(model, [x], [v])
        return
    plain = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    with seeded(1):
        _, jv = jvpgraph.jvp(model, (x,), (v,))
    with seeded(1), sdpa_kernel(SDPBackend.MATH):
        ref = torch.autograd.functional.jvp(copy.deepcopy(plain), x, v)[1]
    assert ref.abs().max() > 1e-6
    assert testing.max_rel_err(jv, ref) <= TOL


# ------------------------------------------------------------------ Hugging Face transformers
@pytest.mark.parametrize("model_type", ["bert", "t5", "vit", "wav2vec2"])
def test_transformers(model_type):
    """An encoder (inputs_embeds), an encoder-decoder (inputs_embeds and decoder_inputs_embeds, one tangent),
    a vision model (pixel_values) and a speech model (input_values), with their default (sdpa) attention."""
    pytest.importorskip("transformers")
    built = ecosystem.build(f"hf:{model_type}")
    model = built.model.to(D).eval()
    torch.manual_seed(0)
    x = torch.randn(built.shapes[0], dtype=D)
    _assert_jv(model, [x], [torch.randn_like(x)])


# ------------------------------------------------------------------ diffusers
@pytest.mark.parametrize("name", ecosystem.DIFFUSERS)
def test_diffusers(name):
    """The denoisers with tangents on the latent and on the (float) timestep at once; the autoencoder on its
    input (its posterior's mode)."""
    pytest.importorskip("diffusers")
    built = ecosystem.build(f"diffusers:{name}")
    model = built.model.to(D).eval()
    torch.manual_seed(0)
    xs = [torch.randn(s, dtype=D) for s in built.shapes]
    if len(xs) == 2:
        xs[1] = torch.tensor([10.0, 700.0], dtype=D)[: xs[1].shape[0]]  # timesteps
    vs = [torch.randn_like(x) for x in xs]
    _assert_jv(model, xs, vs)
    if len(xs) == 2:  # the timestep's own part of Jv is not zero: the tangent on it is really followed
        _, jv_t, _, ref_t = _jvp_and_reference(model, xs, [torch.zeros_like(vs[0]), vs[1]])
        assert ref_t.abs().max() > 1e-6 and testing.max_rel_err(jv_t, ref_t) <= TOL


# ------------------------------------------------------------------ torchvision beyond classification
class _Out(nn.Module):
    """A torchvision model returning a dict or a list: the tensor that matters."""

    def __init__(self, model, key, **kwargs):
        super().__init__()
        self.model, self.key, self.kwargs = model, key, kwargs

    def forward(self, *x):
        out = self.model(*x, **self.kwargs)
        return out[self.key]


def test_torchvision_segmentation_train_mode():
    torch.manual_seed(0)
    m = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3)
    model = _Out(m, "out").to(D).train()  # BatchNorm with batch statistics, dropout in the head
    x = torch.randn(2, 3, 32, 32, dtype=D)
    _assert_jv(model, [x], [torch.randn_like(x)])


def test_torchvision_video():
    torch.manual_seed(0)
    model = torchvision.models.video.r2plus1d_18(num_classes=5).to(D).eval()
    x = torch.randn(1, 3, 4, 32, 32, dtype=D)
    _assert_jv(model, [x], [torch.randn_like(x)])


def test_torchvision_optical_flow():
    """RAFT's last flow estimate, with tangents on both frames; in float32 (RAFT makes float32 tensors of its
    own), to verify's float32 tolerance."""
    torch.manual_seed(0)
    model = _Out(torchvision.models.optical_flow.raft_small(weights=None), -1, num_flow_updates=3).eval()
    xs = [torch.rand(1, 3, 128, 128) * 2 - 1 for _ in range(2)]  # RAFT takes 128x128 at least
    vs = [torch.randn_like(x) for x in xs]
    if torch.__version__ < "2.14":  # torch 2.11: grid_sampler_2d_backward has no derivative (double-backward
        # raises): the adjoint identity <u, Jv> = <J^T u, v> with autograd's backward, for two u
        out, jv = jvpgraph.jvp(model, tuple(xs), tuple(vs))
        xr = [x.clone().requires_grad_() for x in xs]
        ref_out = copy.deepcopy(model)(*xr)
        for k in range(2):
            u = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(k))
            jtu = torch.autograd.grad(ref_out, xr, u, retain_graph=True)
            lhs, rhs = (u * jv).sum().double(), sum((g * v).sum() for g, v in zip(jtu, vs)).double()
            assert abs(lhs - rhs) <= 1e-4 * (u.abs() * jv.abs()).sum(), (lhs, rhs)
        assert testing.max_rel_err(out, ref_out) <= 1e-5 and jv.abs().max() > 1e-4
        return
    out, jv, ref_out, ref = _jvp_and_reference(model, xs, vs)
    assert ref.abs().max() > 1e-4
    assert testing.max_rel_err(out, ref_out) <= 1e-5 and testing.max_rel_err(jv, ref) <= 1e-4


def test_torchvision_detection_eval():
    """Faster R-CNN in eval mode: the boxes and scores after NMS. NMS's selection depends on values, so the
    trace is specialized to them (and says so); roi_align is linear in the features and, as in torchvision's
    own backward, gives the boxes no tangent. roi_align has no double backward: the reference is the adjoint
    identity with autograd's backward."""
    torch.manual_seed(0)
    m = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64).to(D).eval()

    def detect(x):
        out = m(list(x))[0]
        return out["boxes"], out["scores"]

    x = torch.rand(1, 3, 64, 64, dtype=D)
    v = torch.randn_like(x)
    with pytest.warns(UserWarning, match="branches on tensor values"):
        (boxes, scores), jv = jvpgraph.jvp(detect, (x,), (v,))
    eager = detect(x)
    assert boxes.shape[0] > 0 and torch.equal(boxes, eager[0]) and torch.equal(scores, eager[1])
    xr = x.clone().requires_grad_()
    us = [torch.randn_like(o) for o in eager]
    (g,) = torch.autograd.grad(sum((o * u).sum() for o, u in zip(detect(xr), us)), xr)
    lhs, rhs = sum((j * u).sum() for j, u in zip(jv, us)), (g * v).sum()
    assert rhs.abs() > 1e-12 and abs(lhs - rhs) <= 1e-9 * max(abs(rhs), g.abs().sum() * v.abs().max())


# ------------------------------------------------------------------ the command line's names
@pytest.mark.parametrize("spec,lib", [("timm:test_vit", "timm"), ("hf:bert", "transformers"),
                                      ("diffusers:UNet2DModel", "diffusers")])
def test_verify_accepts_zoo_names(spec, lib, capsys):
    pytest.importorskip(lib)
    code = cli_main(["verify", spec, "--mode", "eval", "--dtype", "float64"])
    text = capsys.readouterr().out
    assert code == 0 and "verdict: OK" in text, text
    assert re.search(r"double-backward\s+pass", text), text


def test_draw_and_bench_accept_zoo_names(tmp_path):
    pytest.importorskip("transformers")
    assert cli_main(["draw", "hf:gpt2", "-o", str(tmp_path / "g.svg")]) == 0
    assert (tmp_path / "g.svg").stat().st_size > 1000
    from jvpgraph.experiments.bench import bench_model

    row = bench_model("hf:gpt2", "eval", batch=2, repeats=1, methods=["new", "double_backward"])
    assert row["methods"]["new"]["ok"], row["methods"]["new"]


def test_unknown_zoo_names_say_what_is_true(capsys):
    assert cli_main(["verify", "keras:resnet"]) == 3  # not a zoo prefix: a package.module:factory
    assert "cannot import module 'keras'" in capsys.readouterr().err
    if ecosystem.has("timm"):
        assert cli_main(["verify", "timm:no_such_model"]) == 3
        assert "unknown timm model 'no_such_model'" in capsys.readouterr().err


# ------------------------------------------------------------------ a SpectralRegularizer step
@pytest.mark.parametrize("spec,lib,grad_reference", [("hf:llama", "transformers", "autograd"),
                                                      ("timm:test_vit", "timm", "differences")])
def test_spectral_regularizer_step(spec, lib, grad_reference):
    """One training step with the penalty on a decoder (LLaMA: RoPE, grouped-query attention, RMSNorm; tangent
    on the embeddings) and on a timm ViT (LayerNorm). The penalty is ``‖J_b v_b‖`` at the regularizer's last
    ``v``, as double-backward computes it, and at most the exact σ of each sample's Jacobian (jacrev + SVD); an
    SGD step on it lowers it. Its gradient in the parameters, against a reference that shares nothing with
    jvpgraph, chosen per model:

    * LLaMA: autograd through double-backward's ``‖J_b v_b‖`` (``torch.autograd.functional.jvp(create_graph=
      True)``). Finite differences cannot judge it: transformers' RMSNorm computes in float32 even in a float64
      model, and its rounding over h = 1e-5 is a 2% error.
    * The ViT: the central difference along a random direction of all parameters. Autograd through
      double-backward cannot judge it: LayerNorm's third derivative is wrong in torch 2.14 (10x off along a
      random direction on this ViT; 15x on Linear-LayerNorm-Linear), while jvpgraph's agrees with the
      differences to 1e-8."""
    pytest.importorskip(lib)
    torch.manual_seed(0)
    built = ecosystem.build(spec, batch=2)
    model = _reinit_zeros(built.model).to(D).eval()
    x = torch.randn(built.shapes[0], dtype=D)
    params = [p for p in model.parameters() if p.requires_grad]
    reg = jvpgraph.SpectralRegularizer(model, n_iter=5, warm_start=False)
    _, penalty = reg(x)
    got = torch.autograd.grad(penalty.sum(), params, allow_unused=True)
    v = reg.last["v"]

    def reference():
        with sdpa_kernel(SDPBackend.MATH):
            jv = torch.autograd.functional.jvp(model, x, v)[1]
        return jv.flatten(1).norm(dim=1)

    torch.testing.assert_close(penalty.detach(), reference(), rtol=1e-10, atol=0)
    if grad_reference == "autograd":
        with sdpa_kernel(SDPBackend.MATH):
            jv = torch.autograd.functional.jvp(model, x, v, create_graph=True)[1]
        want = torch.autograd.grad(jv.flatten(1).norm(dim=1).sum(), params, allow_unused=True)
        flat = lambda gs: torch.cat([(torch.zeros_like(p) if t is None else t).flatten()  # noqa: E731
                                     for t, p in zip(gs, params)])
        assert flat(want).abs().max() > 1e-3
        assert testing.max_rel_err(flat(got), flat(want)) <= TOL
    else:
        gen = torch.Generator().manual_seed(0)
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        slope = sum(float((g * d).sum()) for g, d in zip(got, direction) if g is not None)
        fd = gradient_along(lambda: reference().sum(), params, direction)
        assert abs(fd) > 1e-3 and abs(slope - fd) <= 1e-6 * abs(fd), (slope, fd)

    def one(xb):
        return model(xb[None])[0].flatten()

    with sdpa_kernel(SDPBackend.MATH):
        sigma = torch.stack([torch.linalg.matrix_norm(torch.func.jacrev(one)(xb).flatten(1), 2) for xb in x])
    assert (penalty <= sigma * (1 + 1e-10)).all() and (penalty > 0.5 * sigma).all(), (penalty, sigma)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    opt.zero_grad()
    _, penalty = reg(x)
    v = reg.last["v"]
    penalty.sum().backward()
    opt.step()
    assert reference().sum() < penalty.sum()  # the same v: the step lowered ‖Jv‖
