"""Hypothesis strategies that draw random architectures and inputs, for your own property tests (and ours).

This module needs `hypothesis <https://hypothesis.readthedocs.io>`_ (the ``test`` extra:
``pip install jvpgraph[test]``); nothing else in jvpgraph imports it, so ``import jvpgraph`` works
without it.

* :func:`architectures` draws a *spec*: a plain dict describing an MLP or a CNN of depth 1-6, each block
  linear/conv -> optional BatchNorm / LayerNorm / GroupNorm -> one of :data:`ACTIVATIONS` -> optional
  dropout, joined to its input by nothing, a residual add or a concatenation, CNN blocks optionally
  pooled; in train or eval mode. Specs print readably in hypothesis' falsifying examples.
* :func:`build` turns a spec into ``(net, x, v)``: a float64 :class:`RandomNet`, an input and a tangent,
  all determined by the spec (its ``seed``), without touching the global RNG.
* :func:`models` draws ``(net, x, v)`` directly (``architectures(...).map(build)``).
* :func:`inputs_and_tangents` draws ``(x, v)`` of a given shape, for your own models.

A property test pairs them with an independent reference from :mod:`jvpgraph.testing`: here jvpgraph's
``J v`` against forward-mode AD, ``torch.func.jvp`` (in eval mode, so that dropout is off; in train mode,
reseed the global RNG before each evaluation so that every one draws the same dropout mask). Keep
``deadline=None``: the first trace of a model takes a while.

    >>> import jvpgraph
    >>> from hypothesis import given, settings
    >>> from jvpgraph import testing
    >>> from jvpgraph.strategies import architectures, build
    >>> @settings(max_examples=3, deadline=None, database=None)
    ... @given(architectures(max_depth=2, train=False))
    ... def test_jv_matches_forward_mode(spec):
    ...     net, x, v = build(spec)
    ...     jv = jvpgraph.jvp(net, (x,), (v,))[1]
    ...     assert testing.max_rel_err(jv, testing.func_jvp(net, x, v)) < 1e-9
    >>> test_jv_matches_forward_mode()  # pytest calls it for you when it is a test function

and your own model against its Jacobian by reverse mode, on random inputs:

    >>> import torch, torch.nn as nn
    >>> from jvpgraph.strategies import inputs_and_tangents
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2)).double()
    >>> @settings(max_examples=3, deadline=None, database=None)
    ... @given(inputs_and_tangents((4, 3)))
    ... def test_my_net(xv):
    ...     x, v = xv
    ...     jv = jvpgraph.jvp(net, (x,), (v,))[1]
    ...     assert testing.max_rel_err(jv, testing.jacobian_times(net, x, v)) < 1e-10
    >>> test_my_net()
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

__all__ = ["ACTIVATIONS", "NORMS", "JOINS", "POOLS", "KINDS", "Block", "RandomNet", "block_specs", "architectures",
           "input_shape", "build", "models", "inputs_and_tangents"]

#: Nonlinearities drawn by :func:`architectures`: name -> module factory.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU,
    "softplus": nn.Softplus, "leaky_relu": lambda: nn.LeakyReLU(0.1), "hardswish": nn.Hardswish, "mish": nn.Mish,
}
#: Normalizations: ``"layer"`` is ``GroupNorm(1, width)`` in a CNN, ``"group"`` is ``GroupNorm(2, width)``.
NORMS = ("none", "batch", "layer", "group")
#: How a block's output meets its input: not at all, ``h + x``, or ``proj(cat([h, x]))``.
JOINS = ("none", "residual", "concat")
#: Pooling after a CNN block (halves the spatial size while it is at least 2); ignored in an MLP.
POOLS = ("none", "max", "avg")
#: Architecture families: ``"mlp"`` on inputs ``(4, 5)``, ``"cnn"`` on inputs ``(3, 2, 6, 6)``.
KINDS = ("mlp", "cnn")

_IN_FEATURES, _IN_CHANNELS, _OUT_FEATURES = 5, 2, 3
_SHAPES = {"mlp": (4, _IN_FEATURES), "cnn": (3, _IN_CHANNELS, 6, 6)}


class Block(nn.Module):
    """One block: linear/conv -> optional norm -> activation -> optional dropout; then a residual add or a
    concatenation (projected back to ``width``) and, in a CNN, optional pooling. The keyword arguments are
    the entries of a :func:`block_specs` dict.

    Example:
        >>> import torch
        >>> b = Block("cnn", 4, act="tanh", norm="group", join="concat", dropout=0.0, pool="max")
        >>> b(torch.randn(2, 4, 6, 6)).shape
        torch.Size([2, 4, 3, 3])
    """

    def __init__(self, kind: str, width: int, act: str, norm: str, join: str, dropout: float, pool: str):
        super().__init__()
        self.kind, self.join, self.pool = kind, join, pool
        if kind == "mlp":
            self.lin = nn.Linear(width, width)
            self.norm = {"none": nn.Identity(), "batch": nn.BatchNorm1d(width), "layer": nn.LayerNorm(width),
                         "group": nn.GroupNorm(2, width)}[norm]
        else:
            self.lin = nn.Conv2d(width, width, 3, padding=1)
            self.norm = {"none": nn.Identity(), "batch": nn.BatchNorm2d(width),
                         "layer": nn.GroupNorm(1, width), "group": nn.GroupNorm(2, width)}[norm]
        self.act = ACTIVATIONS[act]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # concatenation doubles the width: project back
        self.proj = (nn.Linear(2 * width, width) if kind == "mlp" else nn.Conv2d(2 * width, width, 1)) \
            if join == "concat" else None

    def forward(self, x):
        h = self.drop(self.act(self.norm(self.lin(x))))
        if self.join == "residual":
            h = h + x
        elif self.join == "concat":
            h = self.proj(torch.cat([h, x], dim=1))
        if self.kind == "cnn" and self.pool != "none" and h.shape[-1] >= 2:
            h = F.max_pool2d(h, 2) if self.pool == "max" else F.avg_pool2d(h, 2)
        return h


class RandomNet(nn.Module):
    """The network a spec from :func:`architectures` describes: a stem (``Linear(5, width)`` or
    ``Conv2d(2, width, 3)``), the blocks, global average pooling (CNN) and a ``Linear(width, 3)`` head.
    Parameters come from the global RNG, as for any module; :func:`build` seeds them from the spec.

    Example:
        >>> import torch
        >>> spec = {"kind": "mlp", "width": 4, "train": False, "seed": 0,
        ...         "layers": [dict(act="relu", norm="layer", join="residual", dropout=0.0, pool="none")]}
        >>> RandomNet(spec)(torch.randn(7, 5)).shape
        torch.Size([7, 3])
    """

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        kind, width = spec["kind"], spec["width"]
        self.stem = nn.Linear(_IN_FEATURES, width) if kind == "mlp" else nn.Conv2d(_IN_CHANNELS, width, 3, padding=1)
        self.layers = nn.Sequential(*[Block(kind, width, **layer) for layer in spec["layers"]])
        self.head = nn.Linear(width, _OUT_FEATURES)
        self.kind = kind

    def forward(self, x):
        h = self.layers(self.stem(x))
        if self.kind == "cnn":
            h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.head(h)


def _choices(name: str, values: Sequence, allowed: Sequence | None = None) -> list:
    values = list(values)
    if not values:
        raise ValueError(f"{name}: empty")
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name}: unknown {bad}; choose from {sorted(allowed)}")
    return values


def block_specs(activations: Sequence[str] | None = None, norms: Sequence[str] = NORMS,
                joins: Sequence[str] = JOINS, dropouts: Sequence[float] = (0.0, 0.0, 0.3),
                pools: Sequence[str] = ("none", "none", "max", "avg")) -> st.SearchStrategy[dict[str, Any]]:
    """Strategy for one block's spec: a dict with keys ``act``, ``norm``, ``join``, ``dropout``, ``pool``,
    each drawn from the given choices (all of :data:`ACTIVATIONS` by default). Entries may repeat to weight
    them: by default a third of the blocks have dropout 0.3 and half of the CNN blocks pool.

    Example:
        >>> from hypothesis import Phase, find, settings
        >>> quick = settings(database=None, phases=[Phase.generate])  # first match, unshrunk
        >>> spec = find(block_specs(activations=["tanh", "gelu"], dropouts=[0.0]),
        ...             lambda b: b["join"] == "residual", settings=quick)
        >>> spec["act"] in ("tanh", "gelu"), spec["join"], spec["dropout"]
        (True, 'residual', 0.0)
    """
    acts = _choices("activations", sorted(ACTIVATIONS) if activations is None else activations, ACTIVATIONS)
    for d in dropouts:
        if not 0.0 <= d < 1.0:
            raise ValueError(f"dropouts: {d} is not in [0, 1)")
    return st.fixed_dictionaries({
        "act": st.sampled_from(acts),
        "norm": st.sampled_from(_choices("norms", norms, NORMS)),
        "join": st.sampled_from(_choices("joins", joins, JOINS)),
        "dropout": st.sampled_from(_choices("dropouts", dropouts)),
        "pool": st.sampled_from(_choices("pools", pools, POOLS)),
    })


def architectures(kinds: Sequence[str] = KINDS, widths: Sequence[int] = (4, 6), min_depth: int = 1,
                  max_depth: int = 6, train: bool | None = None, **block_kwargs) -> st.SearchStrategy[dict[str, Any]]:
    """Strategy for a network spec: a dict with keys ``kind`` (from ``kinds``), ``width`` (from ``widths``;
    even, for ``GroupNorm(2, width)``), ``layers`` (``min_depth`` to ``max_depth`` :func:`block_specs`
    dicts, drawn with ``block_kwargs``), ``train`` (drawn when ``None``) and ``seed``. Pass it to
    :func:`build`.

    Example:
        >>> from hypothesis import Phase, find, settings
        >>> quick = settings(database=None, phases=[Phase.generate])  # first match, unshrunk
        >>> spec = find(architectures(kinds=["cnn"], max_depth=3), lambda s: len(s["layers"]) == 3, settings=quick)
        >>> spec["kind"], len(spec["layers"]), sorted(spec["layers"][0])
        ('cnn', 3, ['act', 'dropout', 'join', 'norm', 'pool'])
        >>> net, x, v = build(spec)
        >>> net(x).shape
        torch.Size([3, 3])
    """
    for w in widths:
        if w <= 0 or w % 2:
            raise ValueError(f"widths: {w} is not a positive even number")
    if not 0 <= min_depth <= max_depth:
        raise ValueError(f"need 0 <= min_depth <= max_depth, got {min_depth}, {max_depth}")
    return st.fixed_dictionaries({
        "kind": st.sampled_from(_choices("kinds", kinds, KINDS)),
        "width": st.sampled_from(_choices("widths", widths)),
        "layers": st.lists(block_specs(**block_kwargs), min_size=min_depth, max_size=max_depth),
        "train": st.booleans() if train is None else st.just(bool(train)),
        "seed": st.integers(0, 2 ** 16),
    })


def input_shape(spec: dict[str, Any]) -> tuple[int, ...]:
    """The input shape of the network ``spec`` describes: ``(4, 5)`` for an MLP, ``(3, 2, 6, 6)`` for a CNN.

    Example:
        >>> input_shape({"kind": "cnn"})
        (3, 2, 6, 6)
    """
    return _SHAPES[spec["kind"]]


def _randn_pair(shape, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def build(spec: dict[str, Any], dtype: torch.dtype = torch.float64
          ) -> tuple[RandomNet, torch.Tensor, torch.Tensor]:
    """``(net, x, v)`` for a spec from :func:`architectures`: the :class:`RandomNet` with parameters seeded
    by ``spec["seed"]`` (BatchNorm running statistics set to non-trivial values, for eval mode), in train
    mode if ``spec["train"]``, and an input ``x`` and tangent ``v`` of :func:`input_shape` seeded by
    ``spec["seed"] + 1``. The global RNG is left as it was; the same spec gives the same triple.

    Example:
        >>> spec = {"kind": "cnn", "width": 4, "train": True, "seed": 3,
        ...         "layers": [dict(act="mish", norm="batch", join="none", dropout=0.0, pool="avg")]}
        >>> net, x, v = build(spec)
        >>> net.training, x.shape == v.shape == (3, 2, 6, 6), x.dtype
        (True, True, torch.float64)
        >>> torch.equal(build(spec)[0].head.weight, net.head.weight)
        True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        net = RandomNet(spec).to(dtype)
        with torch.no_grad():  # non-trivial running statistics for eval mode
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    net.train(bool(spec["train"]))
    x, v = _randn_pair(input_shape(spec), spec["seed"] + 1, dtype)
    return net, x, v


def models(dtype: torch.dtype = torch.float64, **architecture_kwargs
           ) -> st.SearchStrategy[tuple[RandomNet, torch.Tensor, torch.Tensor]]:
    """Strategy for ``(net, x, v)``: :func:`build` applied to a draw of
    ``architectures(**architecture_kwargs)``. (Drawing specs and building them in the test prints a
    readable spec, rather than the module, when an example fails.)

    Example:
        >>> from hypothesis import Phase, find, settings
        >>> quick = settings(database=None, phases=[Phase.generate])  # first match, unshrunk
        >>> net, x, v = find(models(kinds=["mlp"], train=False), lambda m: len(m[0].layers) >= 2, settings=quick)
        >>> net.training, net(x).shape, v.shape
        (False, torch.Size([4, 3]), torch.Size([4, 5]))
    """
    return architectures(**architecture_kwargs).map(lambda spec: build(spec, dtype))


def inputs_and_tangents(shape: Sequence[int], dtype: torch.dtype = torch.float64
                        ) -> st.SearchStrategy[tuple[torch.Tensor, torch.Tensor]]:
    """Strategy for ``(x, v)``: two standard normal tensors of ``shape`` and ``dtype``, generated from a
    drawn seed (cheap for any size; the seed is what hypothesis shrinks and reports).

    Example:
        >>> from hypothesis import Phase, find, settings
        >>> quick = settings(database=None, phases=[Phase.generate])  # first match, unshrunk
        >>> x, v = find(inputs_and_tangents((2, 3), torch.float32), lambda xv: bool(xv[0].sum() > 0), settings=quick)
        >>> x.shape, v.dtype, bool(x.sum() > 0)
        (torch.Size([2, 3]), torch.float32, True)
    """
    shape = tuple(int(n) for n in shape)
    return st.integers(0, 2 ** 32 - 1).map(lambda seed: _randn_pair(shape, seed, dtype))
