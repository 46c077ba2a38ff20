"""One trace for every batch size: symbolic sizes, their guards, and the answers at every size.

Each test compares jvpgraph at many sizes with an independent reference computed at that size
(``torch.func.jvp`` on the math attention kernel, or double-backward where torch.func cannot run), and
counts the traces."""

import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import jvpgraph
from jvpgraph.experiments.models import build_model


def _ref(m, x, v):
    with sdpa_kernel(SDPBackend.MATH):
        try:
            return torch.func.jvp(m, (x,), (v,))
        except RuntimeError:  # BatchNorm's running-statistic update in train mode: double-backward instead
            return torch.autograd.functional.jvp(m, x, v)


def _close(got, ref, tol=2e-5):
    (out, jv), (rout, rjv) = got, ref
    assert rjv.abs().max() > 1e-3  # not a comparison of zeros
    torch.testing.assert_close(out, rout, rtol=tol, atol=tol * rout.abs().max().item())
    torch.testing.assert_close(jv, rjv, rtol=tol, atol=tol * rjv.abs().max().item())


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, activation="gelu")

    def forward(self, x):
        return self.layer(torch.sigmoid(self.inp(x)))


class BiGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0].tanh()


def _bn_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sigmoid(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3)).train()


CASES = {
    "gelu_mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)), (6,)),
    "bn_cnn_train": (_bn_cnn, (3, 9, 9)),
    "encoder": (Encoder, (7, 5)),
    "bigru": (BiGRU, (5, 4)),
}


@pytest.mark.parametrize("name", CASES)
def test_every_batch_size_from_two_traces(name):
    make, shape = CASES[name]
    torch.manual_seed(0)
    m = make()
    g = None
    sizes = (3, 2, 5, 16, 33, 7, 4) + ((1,) if not m.training else ())  # train-mode BN refuses batch 1
    for b in sizes:
        x, v = torch.randn(b, *shape), torch.randn(b, *shape)
        g = g or jvpgraph.trace(m, x)
        _close(g.jvp(x, v), _ref(m, x, v))
    # batch 3 at fixed sizes, then one symbolic trace for every batch >= 2 (and batch 1 on its own)
    assert len(g.history) == (3 if 1 in sizes else 2), g.explain()
    assert "symbolic sizes: input 0 dim 0" in g.history[1][0]
    assert "(*, " in g.explain() and "sizes: 2 <= input0.size(0)" in g.explain()


def test_sixty_batch_sizes_trace_twice():
    """The issue's loop: LeNet (the paper's model) at batch 1..60 through jvpgraph.jvp's module cache."""
    torch.manual_seed(0)
    m = build_model("lenet", size=28, in_channels=1)
    for b in range(1, 61):
        x, v = torch.randn(b, 1, 28, 28), torch.randn(b, 1, 28, 28)
        got = jvpgraph.jvp(m, (x,), (v,))
        if b in (1, 2, 17, 60):
            _close(got, _ref(m, x, v))
    (t,) = jvpgraph.api._MODULE_CACHE[m].values()
    assert len(t.history) == 2 and t._n_cached() == 2, t.explain()


def test_sequence_length_becomes_a_symbol_too():
    torch.manual_seed(0)
    m = Encoder().eval()
    g = jvpgraph.trace(m, torch.randn(2, 7, 5))
    for L in (7, 9, 3, 12):
        x, v = torch.randn(2, L, 5), torch.randn(2, L, 5)
        _close(g.jvp(x, v), _ref(m, x, v))
    assert len(g.history) == 2 and "input 0 dim 1" in g.history[1][0], g.explain()


class PinsBatch(nn.Module):
    """Reads the batch size as a Python number: the symbolic trace pins it, so every size is its own trace."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(12, 3)

    def forward(self, x):
        return torch.tanh(self.l(x.reshape(int(x.shape[0]), -1)))


def test_a_size_read_as_a_number_pins_the_trace_and_stays_right():
    torch.manual_seed(0)
    m = PinsBatch()
    g = jvpgraph.trace(m, torch.randn(3, 3, 4))
    for b in (3, 2, 5, 2, 6):
        x, v = torch.randn(b, 3, 4), torch.randn(b, 3, 4)
        _close(g.jvp(x, v), _ref(m, x, v))
    assert len(g.history) == 4  # 3, 2 (symbolic, but pinned: kept as fixed), 5, 6
    assert "pins its sizes (input0.size(0) == 2)" in str(g._static_only)


class Pairs(nn.Module):
    """Folds the batch in pairs: the symbolic trace assumes an even batch (a guard), an odd one re-traces."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 3)

    def forward(self, x):
        return torch.sigmoid(self.l(x.reshape(-1, 2 * x.shape[1])))


def test_divisibility_is_a_guard():
    torch.manual_seed(0)
    m = Pairs()
    g = jvpgraph.trace(m, torch.randn(4, 4))
    for b in (4, 6, 10, 8):
        x, v = torch.randn(b, 4), torch.randn(b, 4)
        _close(g.jvp(x, v), _ref(m, x, v))
    assert len(g.history) == 2
    prog = next(c for b in g._cache.values() for c in b if c.graph.program.dynamic).graph.program
    assert prog.sizes_hold([torch.randn(12, 4)]) and not prog.sizes_hold([torch.randn(5, 4)])
    x, v = torch.randn(5, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError):  # eager refuses an odd batch: so does the trace made for it
        m(x)
    with pytest.raises(Exception, match="shape"):  # the symbolic trace does not answer it: a new trace raises
        g.jvp(x, v)


def test_dynamic_flag():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    fixed = jvpgraph.trace(m, torch.randn(4, 3), dynamic=False)
    sym = jvpgraph.trace(m, torch.randn(4, 3), dynamic=True)
    for b in (4, 5, 6):
        x, v = torch.randn(b, 3), torch.randn(b, 3)
        ref = _ref(m, x, v)
        _close(fixed.jvp(x, v), ref)
        _close(sym.jvp(x, v), ref)
    assert len(fixed.history) == 3 and len(sym.history) == 1
    assert "symbolic sizes" in sym.history[0][0]
    with pytest.raises(ValueError, match="dynamic="):
        jvpgraph.trace(m, torch.randn(4, 3), dynamic="batch")


def test_linearize_vjp_and_regularizer_at_new_batch_sizes():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.SiLU(), nn.Linear(7, 2)).train()
    g = jvpgraph.trace(m, torch.randn(4, 5))
    for b in (4, 6, 9):
        x, v, u = torch.randn(b, 5), torch.randn(b, 5), torch.randn(b, 2)
        lin = g.linearize(x)
        ref_out, ref_vjp = torch.func.vjp(lambda z: torch.func.functional_call(
            m, {**dict(m.named_parameters()), **{k: t.clone() for k, t in m.named_buffers()}}, (z,)), x)
        torch.testing.assert_close(lin.out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lin.vjp(u), ref_vjp(u)[0], rtol=1e-5, atol=1e-6)
        _close((lin.out, lin.jvp(v)), _ref(m, x, v))
    assert len(g.history) == 2


def test_spectral_norm_at_new_batch_sizes_matches_svd():
    """Per-sample sigma at several batch sizes (one symbolic trace) against each sample's jacrev + SVD."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    for b in (3, 4, 6):
        x = torch.randn(b, 3, dtype=torch.double)
        sigma = jvpgraph.spectral_norm(m, x, n_iter=500, tol=1e-12).sigma
        ref = torch.stack([torch.linalg.svdvals(torch.func.jacrev(m)(x[i])).max() for i in range(b)])
        torch.testing.assert_close(sigma, ref, rtol=1e-6, atol=1e-9)
    assert any("symbolic sizes" in t.explain() for t in jvpgraph.api._MODULE_CACHE[m].values())


def test_non_contiguous_inputs():
    torch.manual_seed(0)
    m = Encoder().eval()
    g = jvpgraph.trace(m, torch.randn(3, 7, 5))
    for b in (3, 4):
        x, v = torch.randn(7, b, 5).transpose(0, 1), torch.randn(7, b, 5).transpose(0, 1)
        _close(g.jvp(x, v), _ref(m, x, v))
