"""BatchNorm in train mode, in one place: the three ways jvpgraph differentiates it, what tracing does for
each, and the mode stamped on the graph's nodes, where the rules read it.

A BatchNorm layer in train mode normalizes with its batch's statistics, so each sample's output depends on
the whole batch. ``bn=`` chooses what ``Jv`` means there:

* ``"batch"`` (:attr:`BN.BATCH`): the statistics move with the input — the Jacobian of what ``model(x)``
  computes; the batch has no per-sample Jacobian then;
* ``"frozen"`` (:attr:`BN.FROZEN`): the batch's statistics held constant in ``Jv`` (the paper's
  pseudo-inference mode): per sample, and the forward still normalizes with the batch's statistics;
* ``"eval"`` (:attr:`BN.EVAL`): the layers traced in eval mode (running statistics).

The mode travels with the graph: :func:`stamp` writes it in the ``meta`` of each batch-norm node of a trace
(``node.meta["jvpgraph_params"]["bn"]``), the walk that flips the graph hands a node's parameters to the rules
that declare them (``defrule(..., params=("bn",))``), and :func:`holds_frozen_statistics` reads them back. A
node nobody stamped (a batch norm inside a decomposition) is differentiated as ``"batch"``.

Example:
    >>> import torch, torch.nn as nn, jvpgraph
    >>> from jvpgraph.batchnorm import BN, check_mode
    >>> check_mode("frozen") is BN.FROZEN, BN.FROZEN == "frozen"
    (True, True)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    >>> g = jvpgraph.trace(net, torch.randn(5, 3), bn="frozen")
    >>> [n.meta["jvpgraph_params"]["bn"] for n in g.graph.gm.graph.nodes if "jvpgraph_params" in n.meta]
    ['frozen']
"""

from __future__ import annotations

import contextlib
import enum
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["BN", "BN_MODES", "check_mode", "check_per_sample", "tracing_state", "stamp", "mode_of",
           "holds_frozen_statistics"]

aten = torch.ops.aten


class BN(str, enum.Enum):
    """How ``Jv`` treats BatchNorm's batch statistics (a ``str``: ``BN.FROZEN == "frozen"``)."""

    BATCH = "batch"
    FROZEN = "frozen"
    EVAL = "eval"


#: The values ``bn=`` takes, in the order error messages list them.
BN_MODES = tuple(m.value for m in BN)

#: The aten ops a BatchNorm layer in train mode traces to (the functional one after functionalization).
BATCH_NORM_OPS = (aten._native_batch_norm_legit_functional.default, aten.native_batch_norm.default)

_KEY = "jvpgraph_params"


def check_mode(bn, allowed: Iterable[str] = BN_MODES, why: str = "") -> BN:
    """``bn`` as a :class:`BN`; a ``ValueError`` listing what is accepted (and ``why`` the rest is not).

    Example:
        >>> check_mode("eval")
        <BN.EVAL: 'eval'>
        >>> check_mode("frozen", allowed=("batch", "eval"), why="frozen is no loss's Hessian")
        Traceback (most recent call last):
        ...
        ValueError: bn='frozen': expected 'batch' or 'eval' (frozen is no loss's Hessian)
    """
    allowed = tuple(allowed)
    if isinstance(bn, str) and bn in allowed:
        return BN(bn)
    listed = " or ".join(map(repr, allowed)) if len(allowed) <= 2 else "one of " + ", ".join(map(repr, allowed))
    raise ValueError(f"bn={bn!r}: expected {listed}" + (f" ({why})" if why and bn in BN_MODES else ""))


def _in_train_mode(model) -> list[str]:
    if not isinstance(model, nn.Module):
        return []
    return [name or type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def check_per_sample(model, bn) -> None:
    """A per-sample quantity (spectral norms, the regularizers) needs a per-sample Jacobian: with
    ``bn="batch"``, a BatchNorm layer in train mode couples the samples, so that is a ``ValueError`` naming it.

    Example:
        >>> import torch.nn as nn
        >>> check_per_sample(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), "frozen")  # fine
        >>> check_per_sample(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), "batch")
        Traceback (most recent call last):
        ...
        ValueError: bn='batch': BatchNorm in train mode (1) couples the samples of a batch through its statistics, so there is no per-sample Jacobian; use bn='frozen' (statistics held constant, the paper's choice) or bn='eval' (running statistics)
    """
    coupled = _in_train_mode(model) if check_mode(bn) is BN.BATCH else []
    if coupled:
        raise ValueError(
            f"bn='batch': BatchNorm in train mode ({', '.join(coupled[:3])}{', ...' if len(coupled) > 3 else ''}) "
            "couples the samples of a batch through its statistics, so there is no per-sample Jacobian; use "
            "bn='frozen' (statistics held constant, the paper's choice) or bn='eval' (running statistics)")


@contextlib.contextmanager
def tracing_state(module: nn.Module | None, bn, momentum_none: list[str]) -> Iterator[dict]:
    """What tracing changes on the model's BatchNorm layers, put back afterwards, whatever happens:

    * ``bn="eval"``: the layers in eval mode for the trace (their ``training`` flags restored);
    * ``momentum=None`` reads ``num_batches_tracked`` as a Python number, which a trace cannot do; the
      momentum only weighs the running-statistic update (never the output or Jv), so it is set to 0.1 while
      tracing and those layers' updates are dropped (their names go to ``momentum_none``).

    (Tensors that hooks store as plain module attributes are put back by :func:`jvpgraph.guards.watch`,
    around each traced call.) Yields ``{(id(module), attribute): the caller's value}`` for what it changed,
    so guards compare with the caller's values, not the ones tracing set.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.BatchNorm1d(2, momentum=None)).train()
        >>> dropped = []
        >>> with tracing_state(net, "eval", dropped):
        ...     print(net[0].training)
        False
        >>> with tracing_state(net, "batch", dropped):
        ...     print(net[0].momentum)
        0.1
        >>> net[0].training, net[0].momentum, dropped
        (True, None, ['0'])
    """
    bn = check_mode(bn)
    if module is None:
        yield {}
        return
    bns = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    flags = [m.training for _, m in bns]
    momenta = [m.momentum for _, m in bns]
    originals: dict[tuple[int, str], Any] = {}  # what the caller's model holds where tracing set another value
    try:
        for name, m in bns:
            if bn is BN.EVAL:
                m.training = False
            if m.momentum is None and m.training and m.track_running_stats:
                momentum_none.append(name)
                originals[(id(m), "momentum")] = None
                m.momentum = 0.1
        yield originals
    finally:
        for (_, m), f, mom in zip(bns, flags, momenta):
            m.training, m.momentum = f, mom


def stamp(graph: fx.Graph, bn) -> None:
    """Write the mode into every batch-norm node of a traced graph (``node.meta["jvpgraph_params"]``)."""
    bn = check_mode(bn)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in BATCH_NORM_OPS:
            node.meta.setdefault(_KEY, {})["bn"] = bn.value


def mode_of(node: fx.Node) -> BN:
    """The mode stamped on ``node`` (``BN.BATCH`` if none was)."""
    return BN(node.meta.get(_KEY, {}).get("bn", BN.BATCH.value))


def params_of(node: fx.Node) -> dict:
    """The parameters stamped on ``node`` for its rule (empty if none)."""
    return node.meta.get(_KEY, {})


def holds_frozen_statistics(gm: fx.GraphModule) -> bool:
    """Does the graph normalize with a BatchNorm's batch statistics (train mode, running statistics) that
    ``Jv`` holds constant (``bn="frozen"``)? Then the recorded forward's own backward is not ``Jᵀ``."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in BATCH_NORM_OPS and mode_of(n) is BN.FROZEN:
            training = n.args[5] if len(n.args) > 5 else n.kwargs.get("training", False)
            if training and n.args[3] is not None:
                return True
    return False
