"""Models users bring, as they come: autograd.Functions under functorch transforms (transformers' masks built
under vmap with torch's ModIndex, the reentrant torch.utils.checkpoint), PackedSequence through RNNs, Hugging
Face decoders with their own masking, and errors that say whether eager mode raises too.

The torch-only tests run everywhere; the transformers ones skip when transformers is not installed (the
``zoo`` extra). Models are tiny (2 layers, hidden 32, vocab 100, random weights, no download)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import jvpgraph
from jvpgraph import testing
from jvpgraph.trace import TraceError

D = torch.float64


def _seeded(fn, seed=3):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def _double_backward(f, x, v, seed=3):
    with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel's backward has no derivative
        return _seeded(lambda: torch.autograd.functional.jvp(f, x, v)[1], seed)


# ------------------------------------------------------------------ torch.utils.checkpoint, both forms
class Checkpointed(nn.Module):
    """``body`` (dropout included) under ``torch.utils.checkpoint``; ``reentrant=None``: no checkpoint."""

    def __init__(self, reentrant: bool | None, sequential: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 8), nn.GELU(),
                                  nn.Linear(8, 3))
        self.reentrant, self.sequential = reentrant, sequential

    def forward(self, x):
        if self.reentrant is None:
            y = self.body(x)
        elif self.sequential:
            y = checkpoint_sequential(self.body, 2, x, use_reentrant=self.reentrant)
        else:
            y = checkpoint(self.body, x, use_reentrant=self.reentrant)
        return y.sin()


@pytest.mark.parametrize("sequential", [False, True], ids=["checkpoint", "checkpoint_sequential"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpoint_equals_double_backward(reentrant, train, sequential):
    """Jv and its parameter gradient through a checkpointed model equal double-backward's on the same model
    without the checkpoint (double-backward cannot run through a reentrant checkpoint: "incompatible with
    .grad()"); in train mode with the same dropout masks."""
    torch.manual_seed(0)
    plain = Checkpointed(None).to(D).train(train)
    model = Checkpointed(reentrant, sequential).to(D).train(train)
    model.load_state_dict(plain.state_dict())
    x, v = torch.randn(5, 4, dtype=D), torch.randn(5, 4, dtype=D)
    _, jv = _seeded(lambda: jvpgraph.jvp(model, (x,), (v,)))
    want = _seeded(lambda: torch.autograd.functional.jvp(plain, x, v, create_graph=True)[1])
    torch.testing.assert_close(jv, want, rtol=1e-10, atol=1e-12)
    # the regularizers' path: d|Jv|^2 / d parameters, through the checkpointed region's own parameters
    got = torch.autograd.grad(jv.pow(2).sum(), list(model.parameters()))
    ref = torch.autograd.grad(want.pow(2).sum(), list(plain.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ PackedSequence through RNN / LSTM / GRU
class PackedRNN(nn.Module):
    def __init__(self, cls, bidirectional, enforce_sorted):
        super().__init__()
        self.rnn = cls(4, 6, num_layers=2, bidirectional=bidirectional, batch_first=True)
        self.enforce_sorted = enforce_sorted

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=self.enforce_sorted)
        out, h = self.rnn(packed)
        h = h[0] if isinstance(h, tuple) else h
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0], h


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni-sorted", "bi-unsorted"])
@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_packed_sequence_equals_double_backward(cls, bidirectional):
    """``pack_padded_sequence`` -> a 2-layer RNN -> ``pad_packed_sequence``: Jv equals double-backward (the
    bidirectional cases with unsorted lengths, ``enforce_sorted=False``)."""
    torch.manual_seed(0)
    model = PackedRNN(cls, bidirectional, enforce_sorted=not bidirectional).to(D)
    x, v = torch.randn(3, 5, 4, dtype=D), torch.randn(3, 5, 4, dtype=D)
    lengths = torch.tensor([3, 5, 2] if bidirectional else [5, 3, 2])
    out, jv = jvpgraph.jvp(model, (x, lengths), (v, None))
    want = torch.autograd.functional.jvp(lambda x: model(x, lengths), x, v)[1]
    for a, b in zip(jv, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(out, model(x, lengths)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_packed_sequence_traced_again_for_new_lengths():
    """The packed batch sizes are values of the lengths: the trace is specialized to them (a warning says so),
    and a traced model called with other lengths traces again instead of reusing the graph."""
    torch.manual_seed(0)
    model = PackedRNN(nn.GRU, True, False).to(D)
    x, v = torch.randn(3, 5, 4, dtype=D), torch.randn(3, 5, 4, dtype=D)
    with pytest.warns(UserWarning, match="traced at these values"):
        traced = jvpgraph.trace(model, x, torch.tensor([3, 5, 2]))
    lengths = torch.tensor([1, 2, 5])
    with pytest.warns(UserWarning, match="traced at these values"):
        out, jv = traced.jvp((x, lengths), (v, None))
    want = torch.autograd.functional.jvp(lambda x: model(x, lengths), x, v)[1]
    for a, b in zip(jv, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_packed_sequence_with_lengths_closed_over():
    """``lambda x: model(x, lengths)``: the lengths are a constant of the trace; pack_padded_sequence's
    ``invert_permutation`` writes a traced ``arange`` into a tensor made from them (functionalization refuses
    that unless those tensors are lifted into the trace), and no uninitialized-read warning for that scatter."""
    torch.manual_seed(0)
    model = PackedRNN(nn.GRU, True, False).to(D)
    x, v, lengths = torch.randn(3, 5, 4, dtype=D), torch.randn(3, 5, 4, dtype=D), torch.tensor([3, 5, 2])
    f = lambda x: model(x, lengths)[0]  # noqa: E731
    with pytest.warns(UserWarning, match="traced at these values") as record:
        _, jv = jvpgraph.jvp(f, (x,), (v,))
    assert not [w for w in record if "never filled" in str(w.message)]
    torch.testing.assert_close(jv, torch.autograd.functional.jvp(f, x, v)[1], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ autograd.Function under functorch transforms
def test_torch_internal_function_under_vmap():
    """Transformers' mechanism without transformers: indexing with tensors under ``vmap`` inside
    ``TransformGetItemToIndex`` goes through torch's ``ModIndex`` autograd.Function, which functionalization
    refused ("NYI: Functionalize rule for custom_function_call"); jvpgraph traces through it."""
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

    B, S = 3, 5

    def f(x):
        def pick(b, k):
            return x[b, k] * x[b, (k + 1) % S]

        with TransformGetItemToIndex():
            return torch.vmap(torch.vmap(pick, in_dims=(None, 0)), in_dims=(0, None))(torch.arange(B),
                                                                                       torch.arange(S))

    x, v = torch.randn(B, S, dtype=D), torch.randn(B, S, dtype=D)
    torch.testing.assert_close(f(x), x * x.roll(-1, 1))
    out, jv = jvpgraph.jvp(f, (x,), (v,))
    torch.testing.assert_close(out, x * x.roll(-1, 1))
    torch.testing.assert_close(jv, v * x.roll(-1, 1) + x * v.roll(-1, 1), rtol=1e-12, atol=1e-14)


class Cube(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale=1.0):
        return scale * x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * ctx.scale * x * x * g, None


def test_user_function_under_vmap_and_with_keywords():
    """A user Function under ``vmap`` inside the model stays opaque (its backward decides Jv), one call per
    slice; keyword arguments to ``apply`` are bound to ``forward``'s positions."""
    x, v = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    f = lambda x: torch.vmap(lambda r: Cube.apply(r, scale=2.0))(x)  # noqa: E731
    traced = jvpgraph.trace(f, x)
    out, jv = traced.jvp(x, v)
    torch.testing.assert_close(out, 2 * x ** 3)
    torch.testing.assert_close(jv, 6 * x * x * v)
    assert "opaque" in set(traced.flipped.how.values())


def test_torch_internal_function_whose_backward_autograd_cannot_differentiate():
    """Other torch-internal Functions stay opaque, as user ones do (their own backward decides Jv). The legacy
    ``nn.CrossMapLRN2d``'s backward writes with ``out=``, which autograd cannot differentiate, so it cannot be
    flipped: a RuleError names the Function and what to do (PyTorch's double-backward fails on it too)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.CrossMapLRN2d(3)).to(D)
    x, v = torch.randn(2, 3, 8, 8, dtype=D), torch.randn(2, 3, 8, 8, dtype=D)
    with pytest.raises(jvpgraph.RuleError, match=r"CrossMapLRN2d: jvpgraph flips a Function's backward.*jvp "
                                                 r"staticmethod"):
        jvpgraph.jvp(model, (x,), (v,))
    with pytest.raises(RuntimeError, match="out="):
        torch.autograd.functional.jvp(model, x, v)
    model(x)  # eager runs


# ------------------------------------------------------------------ attention rules that HF decoders need
def test_sdpa_grouped_query_and_fully_masked_rows():
    """``enable_gqa`` (fewer key/value heads: LLaMA-style decoders without a mask) and a boolean mask with a
    row masked everywhere (a left-padded query under a causal mask: both kernels give it 0, softmax NaN)."""
    q, k, val = torch.randn(2, 4, 5, 8, dtype=D), torch.randn(2, 2, 5, 8, dtype=D), torch.randn(2, 2, 5, 8, dtype=D)
    ts = tuple(torch.randn_like(t) for t in (q, k, val))
    gqa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    _, jv = jvpgraph.jvp(gqa, (q, k, val), ts)
    torch.testing.assert_close(jv, _double_backward(gqa, (q, k, val), ts), rtol=1e-10, atol=1e-12)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    mask[:2] = False
    masked = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    k, val = k.repeat_interleave(2, 1), val.repeat_interleave(2, 1)
    ts = tuple(torch.randn_like(t) for t in (q, k, val))
    out, jv = jvpgraph.jvp(masked, (q, k, val), ts)
    assert torch.isfinite(jv).all() and (jv[:, :, :2] == 0).all()
    torch.testing.assert_close(jv, _double_backward(masked, (q, k, val), ts), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ errors that tell the truth
class WritesScratch(nn.Module):
    """Runs eagerly; writes a traced value into a plain tensor attribute (not a buffer), which the trace
    cannot do. Train mode, BatchNorm and dropout: running the model eagerly to check would move them."""

    def __init__(self):
        super().__init__()
        self.bn, self.drop = nn.BatchNorm1d(4), nn.Dropout(0.5)
        self.scratch = torch.zeros(4)

    def forward(self, x):
        y = self.drop(self.bn(x))
        self.scratch.copy_(y[0])
        return y * self.scratch


def test_refusal_when_eager_runs_names_the_line_and_leaves_the_model_alone():
    model = WritesScratch().train()
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(TraceError) as err:
        jvpgraph.jvp(model, (x,), (v,))
    msg = str(err.value)
    assert "It runs in eager mode on these inputs (jvpgraph checked)" in msg and "eager mode too" not in msg
    assert "self.scratch.copy_(y[0])" in msg and "Pass that tensor as an input" in msg
    # the check left the model as it was: running statistics, the batch count, the attribute, flags, RNG
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k
    assert torch.equal(model.scratch, torch.zeros(4)) and not model.scratch.requires_grad
    assert model.training and model.bn.training
    assert torch.equal(torch.get_rng_state(), rng)
    model(x)  # and eager does run it


def test_refusal_when_eager_raises_says_so():
    weight = torch.ones(5, 2)
    f = lambda x: x @ weight  # noqa: E731
    x = torch.randn(3, 4)
    with pytest.raises(TraceError, match="raises in eager mode too") as err:
        jvpgraph.jvp(f, (x,), (x,))
    assert "mat1 and mat2 shapes cannot be multiplied" in str(err.value)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        f(x)


# ------------------------------------------------------------------ Hugging Face decoders, out of the box
def _ecosystem():
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ecosystem

    return ecosystem


HF_CASES = [dict(name=name, attn="sdpa", mask="left") for name in ("gpt2", "llama", "mistral", "qwen2", "gemma",
                                                                   "gpt_neox")]
HF_CASES += [dict(name=name, attn="eager", mask="right", use_cache=True) for name in ("gpt2", "llama", "mistral",
                                                                                        "qwen2", "gemma", "gpt_neox")]
HF_CASES += [dict(name="gpt2", attn="sdpa", mask="none", train=True), dict(name="llama", attn="sdpa", mask="left",
                                                                           train=True)]


def _hf_id(c):
    return "-".join([c["name"], c["attn"], f"mask={c['mask']}"] + ["cache"] * c.get("use_cache", False)
                    + ["train-checkpointed"] * c.get("train", False))


@pytest.mark.parametrize("c", HF_CASES, ids=_hf_id)
def test_hf_decoder_equals_double_backward(c):
    """``model(inputs_embeds=e, attention_mask=m, use_cache=...).logits`` with transformers' own masking (built
    under vmap with ModIndex), grouped-query attention, Mistral's sliding window; train mode with
    ``gradient_checkpointing_enable()`` (reentrant checkpoint, dropout) against the same model without it."""
    eco = _ecosystem()
    f, ref, e, v = eco.case(c["name"], c["attn"], c["mask"], c.get("use_cache", False), c.get("train", False))
    before = testing.ModelState(f)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out, jv = _seeded(lambda: jvpgraph.jvp(f, (e,), (v,)))
    # transformers' value-dependent mask shortcuts are skipped under torch.compiler.is_compiling(), as
    # torch.export traces: one trace serves every mask (no trace at the mask's values)
    assert not [w for w in said if "branches on tensor values" in str(w.message)]
    assert not before.changes(f)
    want = _double_backward(ref, e, v)
    assert testing.max_rel_err(jv, want) <= eco.TOL
    assert testing.max_rel_err(out, _seeded(lambda: ref(e))) <= 1e-5


class _Cond(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda z: torch.tanh(self.lin(z)), lambda z: torch.sigmoid(self.lin(z)),
                          (x,))


@pytest.mark.xfail(torch.__version__ < "2.14", strict=True, reason="torch 2.11: after the failed trace, eager "
                   "torch.cond on a copy meets a fake Parameter in Dynamo's compile of its branches (AssertionError: "
                   "Please convert all Tensors to FakeTensors) and the refusal says eager fails, which is untrue")
def test_torch_cond_refusal_does_not_claim_eager_fails():
    """jvpgraph cannot trace torch.cond yet. Its eager check ran the model inside the attribute recorder,
    which Dynamo (compiling cond's branches) cannot follow, and said "it raises in eager mode too": untrue.
    The check now asks again on an unwatched copy; the refusal says eager runs, and eager does."""
    m, x = _Cond(), torch.randn(3, 4)
    with pytest.raises(TraceError) as err:
        jvpgraph.jvp(m, (x,), (x,))
    assert "It runs in eager mode on these inputs" in str(err.value) and "eager mode too" not in str(err.value)
    assert m(x.clone().requires_grad_()).shape == (3, 4)  # eager, with gradients, runs
