"""jvpgraph.verify, `jvpgraph verify` and `jvpgraph demo`: right answers pass, a broken rule fails by name."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
import torch.nn as nn

import jvpgraph
from jvpgraph.cli import main
from jvpgraph.rules import RULES, defjvp
from jvpgraph.verify import verify

aten = torch.ops.aten


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_verify_passes_on_a_correct_model(dtype, mode):
    net = _net().to(dtype).train(mode == "train")
    report = verify(net, torch.randn(3, 2, 6, 6, dtype=dtype))
    assert report.ok, str(report)
    refs = {c.reference: c for c in report.checks}
    assert refs["double-backward"].status == "pass"
    assert refs["adjoint <u,Jv> = <J^T u,v>"].status == "pass"
    # torch.func.jvp refuses train-mode BatchNorm (in-place running statistics) and says why
    if mode == "train":
        assert refs["torch.func.jvp"].status == "n/a" and refs["torch.func.jvp"].reason
    else:
        assert refs["torch.func.jvp"].status == "pass"
    assert "verdict: OK" in str(report)


def _break_silu(monkeypatch):
    monkeypatch.setitem(RULES, aten.silu, RULES[aten.silu])  # restored after the test
    defjvp(aten.silu, lambda t, out, x: 1.25 * torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))) * t, override=True)


def test_verify_fails_on_a_broken_rule_and_names_the_op(monkeypatch):
    _break_silu(monkeypatch)
    net = _net().double()
    report = verify(net, torch.randn(3, 2, 6, 6, dtype=torch.double))
    assert not report.ok
    assert {c.reference for c in report.failures} >= {"double-backward", "full Jacobian (jacrev) @ v"}
    assert any("aten.silu" in s for s in report.suspects), report.suspects
    assert "suspect op: aten.silu" in str(report)


def test_cli_verify_exit_codes(monkeypatch, capsys):
    spec = "jvpgraph.experiments.models:SigmoidBNCNN"
    args = ["verify", spec, "--channels", "1", "--size", "16", "--dtype", "float64"]
    assert main(args) == 0
    assert "verdict: OK" in capsys.readouterr().out
    _break_silu(monkeypatch)  # SigmoidBNCNN has no SiLU: break the GELU rule instead
    monkeypatch.setitem(RULES, aten.gelu, RULES[aten.gelu])
    defjvp(aten.gelu, lambda t, out, x, approximate="none": 0 * t, override=True)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "aten.gelu" in err


def test_demo_runs_and_passes():
    buf = io.StringIO()
    assert jvpgraph.cli.demo(batch=4, out=buf, out_dir=None) == 0
    text = buf.getvalue()
    assert "all Jv checks passed" in text and "double-backward trick" in text


def test_a_reference_outvoted_by_finite_differences_is_marked_wrong():
    """torch.func.jvp silently returns zeros through a custom op with no autograd formula; jvpgraph (given a
    rule) agrees with finite differences, so the verdict is OK and the table says which reference is wrong."""
    from jvpgraph.rules import RULES, defjvp

    @torch.library.custom_op("jvpgraph_tests::softclip", mutates_args=())
    def softclip(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 2

    @softclip.register_fake
    def _(x):
        return torch.empty_like(x)

    op = torch.ops.jvpgraph_tests.softclip.default
    defjvp(op, lambda t, out, x: (2 - out * out / 2) * t)
    try:
        report = verify(lambda x: softclip(3 * x), torch.randn(4, 5, dtype=torch.double))
    finally:
        RULES.pop(op)
    status = {c.reference: c.status for c in report.checks}
    assert status["central finite differences"] == "pass" and status["torch.func.jvp"] == "wrong"
    assert report.ok and "this reference is wrong here" in str(report)


def test_finite_differences_that_cannot_judge_say_so():
    """sin(1e6 x): steps of 1e-7 are a tenth of a period, so even extrapolated differences are off by more
    than their tolerance; verify reports them n/a (with the reason) instead of failing a right Jv."""
    report = verify(lambda x: torch.sin(1e6 * x), torch.rand(6, dtype=torch.double))
    fd = next(c for c in report.checks if c.reference == "central finite differences")
    assert fd.status == "n/a" and "not converged" in fd.reason
    assert report.ok  # double-backward, jacrev and the adjoint agree


def test_extrapolated_differences_judge_a_train_mode_resnet():
    """ResNet-18 in train mode, batch 2, 32x32: BatchNorm normalizes two values per channel in layer4, where
    plain central differences are off by ~1e-5 (measured, seeds 0-5); the extrapolated ones pass at 1e-6."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10).train().double()
    report = verify(model, torch.randn(2, 3, 32, 32, dtype=torch.double))
    fd = next(c for c in report.checks if c.reference == "central finite differences")
    assert fd.status == "pass", str(report)


# ------------------------------------------------------------------ verdicts that cannot pass on nothing
def _zero_head_net():
    torch.manual_seed(0)
    head = nn.Linear(8, 3)
    nn.init.zeros_(head.weight)  # the bias stays: the output is not zero, its Jacobian is
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), head)


def test_a_zero_jacobian_is_inconclusive_not_ok():
    """Every reference agrees with a Jv of exactly 0: nothing was compared, so the verdict is INCONCLUSIVE (exit
    code 2), the report says why and names the all-zero weight, and verify warns."""
    with pytest.warns(UserWarning, match=r"jvpgraph\.verify: Sequential: INCONCLUSIVE: Jv is zero here"):
        report = verify(_zero_head_net(), torch.randn(5, 4))
    assert all(c.status == "pass" for c in report.checks)  # they all agree ...
    assert report.jv_max == 0 and report.scale > 0
    assert (report.verdict, report.exit_code, report.ok) == ("INCONCLUSIVE", 2, False)
    assert report.zero_params == ["2.weight"] and "2.weight" in report.inconclusive
    text = str(report)
    assert "verdict: INCONCLUSIVE" in text and "verdict: OK" not in text


def test_torchvision_vit_head_is_zero_and_reinitializing_it_gives_ok():
    """torchvision zero-initializes a ViT's head (weight and bias): out = 0 and Jv = 0. A small ViT of the same
    class shows the case; after reinit_zero_layers the same model verifies OK."""
    from jvpgraph.cli import reinit_zero_layers

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=8, mlp_dim=16, num_classes=3).eval().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.double)
    with pytest.warns(UserWarning, match="INCONCLUSIVE"):
        report = verify(vit, x, max_jacobian_entries=0)
    assert report.verdict == "INCONCLUSIVE" and report.scale == 0 and "heads.head.weight" in report.zero_params
    assert reinit_zero_layers(vit) == ["heads.head"]
    report = verify(vit, x, max_jacobian_entries=0)
    assert report.verdict == "OK" and report.jv_max > 0, str(report)


def test_a_reference_that_is_not_zero_fails_a_zero_jv(monkeypatch):
    """Vacuous means Jv and every reference are zero: a reference that is not fails the verdict instead."""
    from jvpgraph import testing

    monkeypatch.setattr(testing, "double_backward", lambda f, x, v: torch.ones(x.shape[0], 3))
    report = verify(_zero_head_net(), torch.randn(5, 4))
    assert report.verdict == "FAILED" and [c.reference for c in report.failures] == ["double-backward"]
    assert report.exit_code == 1


def test_a_small_but_real_jacobian_is_not_called_zero():
    """f = 1e3 + 1e-5 x in float64: Jv is 1e-8 of max|f|·|v|/|x|, far above rounding: the comparison is real."""
    x = torch.randn(4, 3, dtype=torch.double)
    report = verify(lambda z: 1e3 + 1e-5 * torch.sin(z), x)
    assert report.verdict == "OK", str(report)


def test_no_reference_that_can_run_is_inconclusive_not_failed(monkeypatch):
    from jvpgraph import testing

    def cannot(*args, **kwargs):
        raise RuntimeError("this reference cannot run here")

    for ref in ("func_jvp", "double_backward", "jacobian_times", "finite_differences", "adjoint_gap"):
        monkeypatch.setattr(testing, ref, cannot)
    with pytest.warns(UserWarning, match="no reference could run"):
        report = verify(nn.Linear(3, 2), torch.randn(4, 3))
    assert all(c.status == "n/a" for c in report.checks)
    assert (report.verdict, report.exit_code) == ("INCONCLUSIVE", 2)
    assert "verdict: INCONCLUSIVE" in str(report)


# ------------------------------------------------------------------ several inputs, pytree outputs
class _TwoHeads(nn.Module):
    """A tuple output, a dict inside, an integer leaf (argmax: no tangent) and SiLU only in one leaf."""

    def __init__(self, aux_scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 2)
        self.aux_scale = aux_scale

    def forward(self, x):
        h = torch.tanh(self.body(x))
        logits = self.a(h)
        return logits, {"aux": self.aux_scale * nn.functional.silu(self.b(h)), "label": logits.argmax(-1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_verify_takes_tuple_and_dict_outputs(dtype):
    report = verify(_TwoHeads().to(dtype), torch.randn(5, 4, dtype=dtype))
    assert report.verdict == "OK", str(report)
    assert report.n_outputs == 2  # the integer leaf carries no tangent and is not compared
    assert {c.status for c in report.checks} == {"pass"}
    assert "2 output tensor(s)" in str(report)


def test_a_broken_rule_in_one_output_leaf_fails(monkeypatch):
    """Errors are taken leaf by leaf: a 25% error in the `aux` leaf, 1e-6 the size of `logits`, fails (over the
    concatenation it would be 1e-7 of the largest entry, below float32's tolerance)."""
    _break_silu(monkeypatch)
    report = verify(_TwoHeads(aux_scale=1e-6), torch.randn(5, 4))
    assert report.verdict == "FAILED" and report.exit_code == 1
    assert {c.reference for c in report.failures} >= {"double-backward", "full Jacobian (jacrev) @ v"}
    assert all(c.max_rel_err > 0.1 for c in report.failures)
    assert any("aten.silu" in s for s in report.suspects), report.suspects


def test_verify_takes_several_inputs():
    a, b = torch.randn(3, 2, dtype=torch.double), torch.randn(3, 2, dtype=torch.double)
    report = verify(lambda p, q: {"prod": p * q.sin(), "sum": (p + q).exp()}, (a, b))
    assert (report.verdict, report.n_inputs, report.n_outputs) == ("OK", 2, 2), str(report)
    va, vb = torch.zeros_like(a), torch.randn_like(b)  # v given per input
    assert verify(lambda p, q: p * q.sin(), (a, b), v=(va, vb)).ok


def test_verify_names_bad_inputs():
    with pytest.raises(TypeError, match=r"x\[1\] has dtype torch.int64.*functools.partial"):
        verify(lambda p, n: p * n, (torch.randn(3), torch.tensor([1, 2, 3])))
    with pytest.raises(ValueError, match=r"v has 1 tensor\(s\) for 2 input\(s\)"):
        verify(lambda p, q: p * q, (torch.randn(3), torch.randn(3)), v=torch.randn(3))
    with pytest.raises(ValueError, match="returns no floating-point tensor"):
        verify(lambda p: p.argmax(), torch.randn(3))
