"""MeanFlow (jvpgraph.experiments.meanflow): Jv of a DiT along several inputs at once inside a training loss,
against torch.func.jvp on the math attention kernel; training on the digits; the command."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import jvpgraph
from jvpgraph import cli
from jvpgraph.experiments import meanflow

D = torch.float64


def _dit(size=4, patch=1):
    torch.manual_seed(0)
    return meanflow.TinyDiT(image_size=size, patch=patch, width=16, depth=2, heads=2).to(D)


def test_total_time_derivative_along_three_inputs():
    """``(u, du/dt)`` along ``(v, 0, 1)`` in ``(z, r, t)`` — a tangent for the sample and per-sample times —
    equals torch.func.jvp's (math kernel), and the time tangent matters (it changes du/dt)."""
    net = _dit()
    z, v = torch.randn(5, 1, 4, 4, dtype=D), torch.randn(5, 1, 4, 4, dtype=D)
    r, t = torch.rand(5, dtype=D) * 0.5, torch.rand(5, dtype=D) * 0.5 + 0.5
    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    u, dudt = jvpgraph.jvp(net, (z, r, t), tangents)
    with sdpa_kernel(SDPBackend.MATH):
        ref_u, ref = torch.func.jvp(net, (z, r, t), tangents)
        _, along_z = torch.func.jvp(net, (z, r, t), (v, torch.zeros_like(r), torch.zeros_like(t)))
    torch.testing.assert_close(u, ref_u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dudt, ref, rtol=1e-10, atol=1e-12)
    assert (ref - along_z).norm() > 0.01 * ref.norm()


@pytest.mark.parametrize("size", [4, 16], ids=["16-tokens", "256-tokens-blockwise"])
def test_loss_and_its_gradient_equal_torch_func(size):
    """The MeanFlow loss (target held constant) and its parameter gradient, with jvpgraph's Jv and with
    torch.func.jvp's; at 256 tokens jvpgraph's attention tangent is the blockwise op."""
    net = _dit(size)
    x = torch.rand(4, 1, size, size, dtype=D) * 2 - 1
    params = list(net.parameters())
    grads = {}
    for jvp in ("jvpgraph", "torch.func"):
        loss = meanflow.meanflow_loss(net, x, torch.Generator().manual_seed(3), jvp=jvp, adaptive=1.0)
        grads[jvp] = (loss.detach(), torch.autograd.grad(loss, params))
    (traced,) = jvpgraph.api._MODULE_CACHE[net].values()
    assert ("jvpgraph.attention_tangent" in traced.flipped.code) == (size == 16)
    (l1, g1), (l2, g2) = grads["jvpgraph"], grads["torch.func"]
    torch.testing.assert_close(l1, l2, rtol=1e-11, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_the_command_trains_and_plots(tmp_path, capsys):
    """``jvpgraph meanflow``: 40 steps on the digits lower the loss by a fifth or more, and write the
    samples' picture and the log; the caller's random generator is left alone."""
    state = torch.random.get_rng_state()
    assert cli.main(["meanflow", "--steps", "40", "--batch", "32", "--width", "32", "--depth", "1", "--out", str(tmp_path),
                     "--no-progress"]) == 0
    assert torch.equal(torch.random.get_rng_state(), state)
    log = json.loads((tmp_path / "log.json").read_text())
    losses = log["losses"]
    assert len(losses) == 40
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    assert (tmp_path / "samples.png").stat().st_size > 10_000
    assert "40 steps in" in capsys.readouterr().out
