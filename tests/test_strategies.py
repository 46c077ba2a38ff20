"""The public hypothesis strategies of :mod:`jvpgraph.strategies` draw valid, varied architectures and inputs."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings

from jvpgraph.strategies import (ACTIVATIONS, JOINS, KINDS, NORMS, Block, RandomNet, architectures, build,
                                 input_shape, inputs_and_tangents, models)

QUICK = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


def _draws(strategy, n):
    out = []

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(strategy)
    def collect(value):
        out.append(value)

    collect()
    return out


_NORM_TYPES = {"mlp": {"none": nn.Identity, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "group": nn.GroupNorm},
               "cnn": {"none": nn.Identity, "batch": nn.BatchNorm2d, "layer": nn.GroupNorm, "group": nn.GroupNorm}}


@QUICK
@given(spec=architectures())
def test_built_model_matches_spec_and_runs_forward(spec):
    net, x, v = build(spec)
    assert isinstance(net, RandomNet)
    assert net.training == spec["train"]
    assert x.shape == v.shape == torch.Size(input_shape(spec))
    assert x.dtype == v.dtype == torch.float64 and not torch.equal(x, v)
    blocks = list(net.layers)
    assert len(blocks) == len(spec["layers"]) >= 1
    for block, layer in zip(blocks, spec["layers"]):
        assert isinstance(block, Block)
        assert type(block.act) is type(ACTIVATIONS[layer["act"]]())
        assert type(block.norm) is _NORM_TYPES[spec["kind"]][layer["norm"]]
        assert isinstance(block.drop, nn.Dropout) == (layer["dropout"] > 0)
        assert (block.proj is not None) == (layer["join"] == "concat")
    assert all(p.dtype == torch.float64 for p in net.parameters())
    torch.manual_seed(0)  # dropout
    out = net(x)
    assert out.shape == (x.shape[0], 3)
    assert bool(torch.isfinite(out).all())


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    spec = {"kind": "cnn", "width": 6, "train": False, "seed": 123,
            "layers": [dict(act="elu", norm="batch", join="concat", dropout=0.0, pool="max"),
                       dict(act="silu", norm="layer", join="residual", dropout=0.3, pool="none")]}
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    (n1, x1, v1), (n2, x2, v2) = build(spec), build(spec)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(x1, x2) and torch.equal(v1, v2)
    s1, s2 = n1.state_dict(), n2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    # eval mode: BatchNorm uses the non-trivial running statistics that build sets
    bn = n1.layers[0].norm
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    other = build({**spec, "seed": 124})
    assert not torch.equal(other[1], x1) and not torch.equal(other[0].head.weight, n1.head.weight)


def test_architectures_cover_the_options():
    specs = _draws(architectures(), 40)
    blocks = [layer for s in specs for layer in s["layers"]]
    acts = Counter(b["act"] for b in blocks)
    assert len(acts) >= 6, acts
    assert set(acts) <= set(ACTIVATIONS)
    assert {s["kind"] for s in specs} == set(KINDS)
    assert {s["train"] for s in specs} == {True, False}
    assert {b["norm"] for b in blocks} == set(NORMS)
    assert {b["join"] for b in blocks} == set(JOINS)
    assert {b["dropout"] for b in blocks} == {0.0, 0.3}
    assert max(len(s["layers"]) for s in specs) >= 3
    assert all(1 <= len(s["layers"]) <= 6 for s in specs)


def test_architectures_respect_restrictions():
    specs = _draws(architectures(kinds=["mlp"], widths=[8], max_depth=2, train=True, activations=["tanh", "gelu"],
                                 norms=["layer"], dropouts=[0.0]), 20)
    assert {s["kind"] for s in specs} == {"mlp"} and {s["width"] for s in specs} == {8}
    assert all(s["train"] for s in specs) and all(1 <= len(s["layers"]) <= 2 for s in specs)
    blocks = [layer for s in specs for layer in s["layers"]]
    assert {b["act"] for b in blocks} <= {"tanh", "gelu"} and {b["norm"] for b in blocks} == {"layer"}
    assert {b["dropout"] for b in blocks} == {0.0}


@pytest.mark.parametrize("kwargs", [dict(widths=[5]), dict(activations=["swish"]), dict(kinds=["rnn"]),
                                    dict(min_depth=3, max_depth=2), dict(dropouts=[1.0]), dict(norms=[])])
def test_architectures_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        architectures(**kwargs)


def test_models_and_inputs_and_tangents():
    for net, x, v in _draws(models(dtype=torch.float32, kinds=["cnn"], max_depth=2), 5):
        assert net.kind == "cnn" and x.shape == v.shape == (3, 2, 6, 6)
        assert x.dtype == torch.float32 and all(p.dtype == torch.float32 for p in net.parameters())
        torch.manual_seed(0)
        assert net(x).shape == (3, 3)
    pairs = _draws(inputs_and_tangents([2, 7], torch.float32), 10)
    assert all(x.shape == v.shape == (2, 7) and x.dtype == v.dtype == torch.float32 for x, v in pairs)
    assert all(not torch.equal(x, v) for x, v in pairs)
    assert len({tuple(x.flatten().tolist()) for x, _ in pairs}) == len(pairs)  # distinct draws


def test_import_jvpgraph_needs_no_hypothesis():
    code = ("import sys, jvpgraph; print(sorted(m for m in sys.modules "
            "if m.startswith('hypothesis') or m == 'jvpgraph.strategies'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
