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
    defjvp(aten.silu, lambda t, out, x: 1.25 * torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))) * t)


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
    defjvp(aten.gelu, lambda t, out, x, approximate="none": 0 * t)
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
