"""A cached trace never answers for a model that changed (guards), nothing of a trace stays in the model,
and nothing jvpgraph caches keeps a dropped model alive.

Every answer is compared with an independent reference computed on the model as it is at that moment:
``torch.func.jvp`` / double-backward for Jv, eager ``model(x)`` for outputs, ``torch.func.jacrev`` + SVD for σ.
"""

from __future__ import annotations

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jvpgraph

from conftest import Twice, double_backward_jvp, seeded

D = torch.float64
TOL = dict(rtol=1e-7, atol=1e-9)


class Knobs(nn.Module):
    """A model whose forward reads Python values of every kind users change between calls."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.3)
        self.l2 = nn.Linear(6, 3)
        self.temperature = 1.0
        self.act = "tanh"
        self.use_bn = True
        self.scale = (1.0, 2.0)

    def forward(self, x):
        h = self.l1(x) / self.temperature
        if self.use_bn:
            h = self.bn(h)
        h = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}[self.act](h)
        h = self.drop(h) * self.scale[0]
        extra = getattr(self, "extra", None)
        if extra is not None:
            h = h + extra * h ** 2
        return self.l2(h) * self.scale[1]


class _Double(nn.Module):  # a parametrization
    def forward(self, w):
        return 2 * w


def _mutations():
    """(name, function(model, value)) pairs; each draws its value from ``st.integers``."""
    def set_temperature(m, k):
        m.temperature = [0.5, 1.0, 3.0, 10.0][k % 4]

    def set_act(m, k):
        m.act = ["tanh", "sigmoid", "gelu"][k % 3]

    def flip_bn(m, k):
        m.use_bn = not m.use_bn

    def set_p(m, k):
        m.drop.p = [0.0, 0.3, 0.6][k % 3]

    def train_eval(m, k):
        [m.train, m.eval, m.bn.eval, m.drop.eval][k % 4]()

    def hook(m, k):
        if m.l1._forward_hooks:
            m.l1._forward_hooks.clear()
        else:
            m.l1.register_forward_hook(lambda mod, args, out, c=1.0 + k % 3: out * c)

    def parametrize(m, k):
        if nn.utils.parametrize.is_parametrized(m.l2):
            nn.utils.parametrize.remove_parametrizations(m.l2, "weight")
        else:
            nn.utils.parametrize.register_parametrization(m.l2, "weight", _Double())

    def replace_parameter(m, k):
        with torch.no_grad():
            w = m.l1.weight
            m.l1.weight = nn.Parameter(w.detach() + 0.1 * (1 + k % 3))

    def extra(m, k):
        if k % 3 == 0 and hasattr(m, "extra"):
            del m.extra
        else:
            m.extra = 0.1 * (1 + k % 3)

    def scale(m, k):
        m.scale = (1.0, 2.0) if k % 2 else (0.5, 1.0)

    return [set_temperature, set_act, flip_bn, set_p, train_eval, hook, parametrize, replace_parameter, extra,
            scale]


MUTATIONS = _mutations()
ENTRY_POINTS = ["jvp", "traced.jvp", "linearize", "vjp", "spectral_norm", "regularizer", "verify"]


def _reference_jvp(m, x, v, seed):
    ref_model = copy.deepcopy(m)  # a train-mode forward writes running statistics: on a copy
    with seeded(seed):
        out = ref_model(x)
    return out, double_backward_jvp(copy.deepcopy(m), (x,), (v,), seed=seed)[0]


def _sigma_reference(m, x):
    """σ per sample from the whole Jacobian (eval mode: no batch coupling, no random mask)."""
    e = copy.deepcopy(m).eval()
    J = torch.func.vmap(torch.func.jacrev(lambda xi: e(xi[None])[0]))(x)
    return torch.linalg.matrix_norm(J, ord=2)


def _check(entry, m, x, v, traced, seed):
    """Run one entry point on the model as it is now and compare with a reference on the same model."""
    if entry in ("spectral_norm", "regularizer"):
        m.eval()  # per-sample quantities: BatchNorm's running statistics, no dropout mask
    ref_out, ref_jv = _reference_jvp(m, x, v, seed)
    if entry == "jvp":
        with seeded(seed):
            out, jv = jvpgraph.jvp(m, (x,), (v,))
    elif entry == "traced.jvp":
        with seeded(seed):
            out, jv = traced.jvp(x, v)
    elif entry == "linearize":
        with seeded(seed):
            out, jvp_fn = jvpgraph.linearize(m, x)
        jv = jvp_fn(v)
    elif entry == "vjp":
        u = torch.randn_like(ref_out)
        with seeded(seed):
            out, vjp_fn = jvpgraph.vjp(m, x)
        (g,) = vjp_fn(u)
        torch.testing.assert_close((u * ref_jv).sum(), (g * v).sum(), **TOL)  # <u, Jv> = <Jᵀu, v>
        torch.testing.assert_close(out, ref_out, **TOL)
        return
    elif entry == "spectral_norm":
        res = jvpgraph.spectral_norm(m, x, n_iter=200, tol=1e-12)
        torch.testing.assert_close(res.sigma, _sigma_reference(m, x), rtol=1e-6, atol=1e-9)
        return
    elif entry == "regularizer":
        out, penalty = jvpgraph.SpectralRegularizer(m, n_iter=3, warm_start=False)(x)
        torch.testing.assert_close(out, ref_out, **TOL)
        assert (penalty <= _sigma_reference(m, x) * (1 + 1e-6)).all()  # a power-iteration estimate: <= σ
        return
    else:  # verify: traces from scratch; must judge the model as it is now
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = jvpgraph.verify(m, x, seed=seed)
        assert getattr(report, "verdict", "OK" if report.ok else "FAILED") != "FAILED", str(report)
        return
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(jv, ref_jv, **TOL)


def _run(steps):
    torch.manual_seed(0)
    m = Knobs().double().train()
    x, v = torch.randn(5, 4, dtype=D), torch.randn(5, 4, dtype=D)
    traced = jvpgraph.trace(m, x)  # held across every mutation, like a user's
    for i, (mutation, k, entry) in enumerate(steps):
        MUTATIONS[mutation](m, k)
        _check(ENTRY_POINTS[entry], m, x, v, traced, seed=i)


_steps = st.lists(st.tuples(st.integers(0, len(MUTATIONS) - 1), st.integers(0, 11),
                            st.integers(0, len(ENTRY_POINTS) - 1)), min_size=1, max_size=6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_steps)
def test_mutations_between_calls_never_get_a_stale_answer(steps):
    _run(steps)


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_steps)
def test_mutations_between_calls_never_get_a_stale_answer_many(steps):
    _run(steps)


_SOME = ("set_temperature", "hook", "parametrize")
_CASES = [(m, e) for e in ENTRY_POINTS if e != "verify" for m in MUTATIONS
          if e in ("jvp", "traced.jvp") or m.__name__ in _SOME]


@pytest.mark.parametrize("mutation,entry", _CASES, ids=[f"{e}-{m.__name__}" for m, e in _CASES])
def test_each_mutation_each_entry_point(mutation, entry):
    """Every mutation, applied after a first call, against the cached entry points (all mutations for
    ``jvp`` and a held ``Traced``, three for the others: the deterministic floor under the property test,
    which draws them all; verify, which traces afresh at ~2 s a call, is in the property test only)."""
    torch.manual_seed(0)
    m = Knobs().double().train()
    x, v = torch.randn(5, 4, dtype=D), torch.randn(5, 4, dtype=D)
    traced = jvpgraph.trace(m, x)
    _check(entry, m, x, v, traced, seed=1)
    for k in (1, 2):
        mutation(m, k)
        _check(entry, m, x, v, traced, seed=1 + k)


def test_issue_cases_temperature_flag_sigma():
    """The measured stale answers: temperature, a tanh/sigmoid flag, σ after temperature 1 -> 100."""
    torch.manual_seed(0)
    m = Knobs().double().eval()
    x, v = torch.randn(5, 4, dtype=D), torch.randn(5, 4, dtype=D)
    jvpgraph.jvp(m, (x,), (v,))
    m.temperature = 10.0
    out, jv = jvpgraph.jvp(m, (x,), (v,))
    ref_out, ref_jv = torch.func.jvp(m, (x,), (v,))
    torch.testing.assert_close((out, jv), (ref_out, ref_jv), **TOL)
    m.act = "sigmoid"
    torch.testing.assert_close(jvpgraph.jvp(m, (x,), (v,)), torch.func.jvp(m, (x,), (v,)), **TOL)
    m.temperature = 1.0
    s1 = jvpgraph.spectral_norm(m, x, n_iter=300, tol=1e-13).sigma
    m.temperature = 100.0
    s100 = jvpgraph.spectral_norm(m, x, n_iter=300, tol=1e-13).sigma
    torch.testing.assert_close(s100, _sigma_reference(m, x), rtol=1e-6, atol=1e-12)
    assert (s100 < s1 / 10).all()
    text = jvpgraph.explain(m)
    assert "model.temperature changed: 1.0 -> 100.0" in text and "model.act changed: 'tanh' -> 'sigmoid'" in text


def test_no_retrace_when_nothing_changed_and_what_is_guarded():
    torch.manual_seed(0)
    m = Knobs().double().eval()
    x, v = torch.randn(5, 4, dtype=D), torch.randn(5, 4, dtype=D)
    g = jvpgraph.trace(m, x)
    for _ in range(5):
        g.jvp(x, v)
    m.unrelated = 3  # never read by the forward: not a reason to trace again
    m.l1.note = "x"
    g.jvp(x, v)
    assert len(g.history) == 1, g.explain()
    guarded = "\n".join(g.graph.program.guards.describe())
    for read in ("model.temperature == 1.0", "model.act == 'tanh'", "model.drop.p == 0.3", "model.extra == <not set>",
                 "model.l1._forward_hooks"):
        assert read in guarded, guarded
    assert "unrelated" not in guarded and "note" not in guarded


class Sliced(nn.Module):
    """``self.layers[:n]`` makes a new ModuleList in every call (as Hugging Face's LLaMA does): reads of a
    temporary object are no guard (it retraced on every call before)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
        self.n = 2

    def forward(self, x):
        for layer in self.layers[: self.n]:
            x = torch.tanh(layer(x))
        return x


def test_objects_made_during_the_call_are_not_guarded():
    m = Sliced()
    x = torch.randn(2, 3)
    g = jvpgraph.trace(m, x)
    for _ in range(3):
        torch.testing.assert_close(g.jvp(x, x), torch.func.jvp(m, (x,), (x,)))
    assert len(g.history) == 1, g.explain()
    m.n = 3  # a read of the model's own attribute is still a guard
    torch.testing.assert_close(g.jvp(x, x), torch.func.jvp(m, (x,), (x,)))
    assert len(g.history) == 2 and "model.n changed: 2 -> 3" in g.explain()


def test_closure_and_global_of_a_traced_function():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x, v = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    scale = 2.0

    def f(z):
        return torch.tanh(lin(z) * scale)

    g = jvpgraph.trace(f, x)
    torch.testing.assert_close(g.jvp(x, v), torch.func.jvp(f, (x,), (v,)), **TOL)
    scale = 5.0  # noqa: F841 - read by f through its closure
    torch.testing.assert_close(g.jvp(x, v), torch.func.jvp(f, (x,), (v,)), **TOL)
    lin.weight.data.mul_(3)  # a closed-over module's parameter, written in place: a constant of the trace
    torch.testing.assert_close(g.jvp(x, v), torch.func.jvp(f, (x,), (v,)), **TOL)
    assert "closure variable scale changed: 2.0 -> 5.0" in g.explain()


def test_global_state_in_the_key():
    m = nn.Sequential(nn.Linear(3, 2)).double()

    class Noise(nn.Module):  # makes a tensor with the default dtype inside forward
        def forward(self, x):
            return x * torch.ones(x.shape[-1]).to(x.dtype) + torch.zeros(()).double()

    net = nn.Sequential(m, Noise())
    x, v = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    g = jvpgraph.trace(net, x)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        g.jvp(x, v)
    finally:
        torch.set_default_dtype(old)
    assert "default dtype" in g.explain()


def test_cache_is_bounded_and_says_why():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    g = jvpgraph.trace(net, torch.randn(1, 3), cache_size=4, dynamic=False)  # a trace per batch size
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for b in range(1, 13):
            x = torch.randn(b, 3)
            torch.testing.assert_close(g.jvp(x, x), torch.func.jvp(net, (x,), (x,)))
    assert sum(len(b) for b in g._cache.values()) == 4
    assert len(g.history) == 12 and "new input 0: (11, 3) float32 cpu -> (12, 3) float32 cpu" in g.explain()
    assert sum("input shapes keep changing" in str(w.message) for w in said) == 1


class Caching(nn.Module):
    """A forward that caches tensors in Python attributes: a dict (timm's attention_bias_cache), a list,
    a plain attribute, a counter."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.bias_cache = {}
        self.seen = []
        self.last = None
        self.calls = 0

    def forward(self, x):
        if not self.training:
            key = str(x.device)
            if key not in self.bias_cache:
                self.bias_cache[key] = self.l.weight.sum(0) * 0.1
            b = self.bias_cache[key]
        else:
            b = 0.0
        self.seen.append(x.sum())
        self.last = x * 2
        self.calls += 1
        return torch.tanh(self.l(x) + b)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_that_caches_tensors_leaves_nothing_of_the_trace(mode):
    torch.manual_seed(0)
    m = getattr(Caching().double(), mode)()
    untouched = copy.deepcopy(m)
    x, v = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    calls = [
        lambda: jvpgraph.jvp(m, (x,), (v,)),
        lambda: jvpgraph.trace(m, x).linearize(x).jvp(v),
        lambda: jvpgraph.vjp(m, x)[1](torch.ones(3, 4, dtype=D)),
        lambda: jvpgraph.spectral_norm(m, x, bn="eval"),
        lambda: jvpgraph.SpectralRegularizer(m)(x),
        lambda: jvpgraph.verify(m, x),
    ]
    for call in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
        assert m.bias_cache == {} and m.seen == [] and m.last is None and m.calls == 0
        copy.deepcopy(m)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        torch.testing.assert_close(loaded(x), untouched(x), rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(m)(x), untouched(x), rtol=0, atol=0)
    torch.testing.assert_close(m(x), untouched(x), rtol=0, atol=0)  # the model's own eager forward


def test_eager_cache_filled_by_the_user_is_seen():
    """A cache the user's own eager call filled is part of the model: the trace after it reads it."""
    torch.manual_seed(0)
    m = Caching().double().eval()
    x, v = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    jvpgraph.jvp(m, (x,), (v,))
    m(x)  # fills bias_cache with a real tensor
    with torch.no_grad():
        m.bias_cache[str(x.device)].mul_(5)  # a stale cache the model itself would use
    ref = torch.func.jvp(m, (x,), (v,))
    torch.testing.assert_close(jvpgraph.jvp(m, (x,), (v,)), ref, **TOL)


def _alive_after(call) -> bool:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh()).train()
    x = torch.randn(3, 4)
    ref = weakref.ref(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(m, x)
    del m
    gc.collect()
    return ref() is not None


@pytest.mark.parametrize("name,call", [
    ("jvp", lambda m, x: jvpgraph.jvp(m, (x,), (x,))),
    ("linearize", lambda m, x: jvpgraph.linearize(m, x)[1](x)),
    ("vjp", lambda m, x: jvpgraph.vjp(m, x)[1](torch.ones(3, 5))),
    ("spectral_norm", lambda m, x: jvpgraph.spectral_norm(m, x)),
    ("SpectralRegularizer", lambda m, x: jvpgraph.SpectralRegularizer(m)(x)[1].sum().backward()),
    ("trace", lambda m, x: jvpgraph.trace(m, x).jvp(x, x)),
    ("verify", lambda m, x: jvpgraph.verify(m, x)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_dropped_model_is_freed(name, call):
    assert not _alive_after(call), f"{name} kept the model alive"


class _BranchesOnValues(nn.Module):
    """A Python branch on a value: traced at the values on every call (a value-specialized trace)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = Twice.apply(self.lin(x))
        if h.sum() > 0:
            h = torch.linalg.pinv(h.reshape(8, 16, 1)).reshape(8, 16)
        return h.sigmoid()


def _rss_mb() -> float:
    import os
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.slow
def test_soak_600_calls_fresh_models_and_a_value_specialized_one():
    """600 calls mixing fresh models, a model traced at its values on every call (with a custom Function) and
    a fresh function: the side tables end where they began plus the one live trace, and RSS (after a warm-up of
    50 calls) grows by less than 25 MB (measured: 13 MB; 23 MB with one table entry per trace kept forever,
    the rest is PyTorch's: fx keeps every generated module's source)."""
    from jvpgraph.ops import FORWARD_AD_NODES, OPAQUE

    torch.manual_seed(0)
    model = _BranchesOnValues()
    gc.collect()
    tables = len(OPAQUE), len(FORWARD_AD_NODES)  # other tests' live graphs own entries too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(600):
            x, v = torch.randn(8, 16), torch.randn(8, 16)
            if i % 3 == 0:
                fresh = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Linear(32, 4)).train()
                jvpgraph.jvp(fresh, (x,), (v,))
                del fresh
            elif i % 3 == 1:
                jvpgraph.jvp(model, (x,), (v,))
            else:
                jvpgraph.jvp(lambda a: torch.linalg.lstsq(a, a[:, :3]).solution.exp(), (x,), (v,))
            if i == 50:
                gc.collect()
                base = _rss_mb()
    gc.collect()
    grew = _rss_mb() - base
    now = len(OPAQUE), len(FORWARD_AD_NODES)
    assert now[0] - tables[0] <= 8 and now[1] - tables[1] <= 8, (tables, now)  # at most the cached traces
    assert grew < 25, f"RSS grew {grew:.1f} MB over 550 calls"


def test_a_global_module_hook_keys_the_trace_but_flop_counters_module_tracker_does_not():
    """A hook registered for every module may change what a forward computes: a new trace answers while it
    is there (compared with torch.func.jvp with the hook in place). FlopCounterMode's module tracker only
    records which module runs: a block of it makes no new trace (it used to, once per ``with``)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    x, v = torch.randn(2, 3, dtype=D), torch.randn(2, 3, dtype=D)
    traced = jvpgraph.cached_trace(net, x)
    before = traced.jvp((x,), (v,))[1]
    hook = nn.modules.module.register_module_forward_hook(lambda m, i, o: o * 2 if isinstance(m, nn.Tanh) else None)
    try:
        torch.testing.assert_close(traced.jvp((x,), (v,))[1], torch.func.jvp(net, (x,), (v,))[1], **TOL)
        torch.testing.assert_close(traced.jvp((x,), (v,))[1], 2 * before, **TOL)
    finally:
        hook.remove()
    torch.testing.assert_close(traced.jvp((x,), (v,))[1], before, **TOL)
    n = len(traced.history)
    for _ in range(2):
        with FlopCounterMode(display=False):
            torch.testing.assert_close(traced.jvp((x,), (v,))[1], before, **TOL)
    assert len(traced.history) == n
