"""``jvpgraph.verify``: jvpgraph's Jv against every independent reference that applies, as a report."""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn

from . import testing
from .api import Traced

__all__ = ["verify", "VerifyReport", "Check", "tolerance", "suspect_ops"]


def tolerance(dtype: torch.dtype, reference: str) -> float:
    """Max relative error accepted against ``reference`` for Jv computed in ``dtype``.

    Exact references (forward AD, double-backward, the full Jacobian, the adjoint identity) differ from
    jvpgraph only by rounding: about ``sqrt(eps)``-free accumulations over the depth of the network, so we
    accept ``1e-4`` in float32 (eps 1.2e-7) and ``1e-9`` in float64 (eps 2.2e-16). Central differences
    in float64 with step ``1e-7`` carry a truncation error of order ``1e-14`` times the third derivative
    and a rounding error of order ``1e-9 |f| / |Jv|``: we accept ``1e-6``. They always run in float64: a
    float32 model is checked through its float64 twin (jvpgraph's Jv of the twin against differences of
    the twin), because near a kink (a ReLU mask, a max-pool argmax) the float32 model and its twin are
    different functions.

    Example:
        >>> import torch
        >>> tolerance(torch.float32, "double-backward"), tolerance(torch.float64, "finite differences")
        (0.0001, 1e-06)
    """
    if reference == "finite differences":
        return 1e-6
    return 1e-9 if dtype == torch.float64 else 1e-4


@dataclasses.dataclass
class Check:
    reference: str
    status: str  # "pass" | "FAIL" | "n/a" | "wrong" (the reference, outvoted by finite differences)
    max_rel_err: float | None = None
    tol: float | None = None
    seconds: float | None = None
    reason: str = ""


@dataclasses.dataclass
class VerifyReport:
    """Rows of :class:`Check`; ``ok`` is True when no reference disagrees (``n/a`` rows do not count).

    A reference that disagrees grossly (more than 100x the finite-difference tolerance) while central
    finite differences agree with jvpgraph is marked ``wrong``, with the reason, and does not fail the
    verdict: finite differences evaluate only the function, so they cannot share a differentiation bug.
    (``torch.func.jvp`` returns silent zeros for a custom op without an autograd formula, for instance.)

    ``str(report)`` is a table.
    """

    name: str
    dtype: torch.dtype
    checks: list[Check]
    jvp_seconds: float
    trace_seconds: float
    fallback_ops: list[str]
    state_unchanged: bool
    suspects: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state_unchanged and all(c.status != "FAIL" for c in self.checks) and \
            any(c.status == "pass" for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]

    def __str__(self) -> str:
        w = max(len(c.reference) for c in self.checks)
        lines = [f"jvpgraph verify: {self.name} ({str(self.dtype).replace('torch.', '')}); trace "
                 f"{self.trace_seconds:.2f} s, Jv {self.jvp_seconds * 1e3:.1f} ms; fallback ops: "
                 f"{', '.join(self.fallback_ops) or 'none'}",
                 f"  {'reference'.ljust(w)}  {'status':6}  {'max rel err':>11}  {'tolerance':>9}  {'time':>9}"]
        for c in self.checks:
            if c.status == "n/a":
                lines.append(f"  {c.reference.ljust(w)}  {'n/a':6}  {c.reason}")
            elif c.status == "wrong":
                lines.append(f"  {c.reference.ljust(w)}  {'wrong':6}  {c.reason}")
            else:
                lines.append(f"  {c.reference.ljust(w)}  {c.status:6}  {c.max_rel_err:>11.2e}  {c.tol:>9.0e}  "
                             f"{c.seconds * 1e3:>7.1f}ms")
        lines.append(f"  model state unchanged: {'yes' if self.state_unchanged else 'NO'}")
        for s in self.suspects:
            lines.append(f"  suspect op: {s}")
        lines.append("  verdict: " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


def _arbitrate(checks: list[Check]) -> None:
    """Mark references outvoted by finite differences (see :class:`VerifyReport`). Only differences of the
    very Jv under test count (float64 runs): the float32 run's float64 twin could hide a float32-only error."""
    fd = [c for c in checks if c.reference == "central finite differences" and c.status == "pass"]
    if not fd:
        return
    for c in checks:
        if c.status == "FAIL" and c.max_rel_err is not None and c.max_rel_err > 100 * fd[0].tol:
            c.status = "wrong"
            c.reason = (f"disagrees by {c.max_rel_err:.1e} while {fd[0].reference} agree with jvpgraph to "
                        f"{fd[0].max_rel_err:.1e}: this reference is wrong here")


def suspect_ops(traced: Traced, x: torch.Tensor, *, seed: int = 0, tol: float | None = None) -> list[str]:
    """Check every written rule of the trace against the theorem applied to its node alone.

    Runs the forward graph on ``x``; at each node on an input -> output path that has a written rule, pushes
    random tangents through the rule and through the node's flipped VJP (its own backward, transposed) and
    reports the nodes where they differ: ``"aten.sigmoid.default at node sigmoid: rel err 3.1e-01"``.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid())
        >>> suspect_ops(jvpgraph.trace(net, torch.randn(2, 3)), torch.randn(2, 3))
        []
    """
    import torch.fx as fx
    import torch.utils._pytree as pytree

    from .rules import lookup
    from .rules.fallback import _via_flipped_vjp

    comp = traced._compiled_for((x,))
    gm = comp.graph.gm
    active = comp.graph.active_nodes
    gen = torch.Generator(device="cpu").manual_seed(seed)
    env: dict = {}
    found = []
    tol = tol if tol is not None else tolerance(x.dtype, "exact")
    placeholders = comp.graph.program.placeholders
    with torch.no_grad():
        for node, val in zip(placeholders, [*traced._state(), x]):
            env[node] = val
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            env[node] = getattr(gm, node.target)
        if node.op != "call_function":
            continue
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        with torch.no_grad():
            out = node.target(*args, **kwargs)
        env[node] = out
        rule = lookup(node.target)
        if node not in active or rule is None or rule.kind in ("structural", "opaque"):
            continue

        def rand(a):
            if isinstance(a, fx.Node) and a in active and isinstance(env[a], torch.Tensor) \
                    and env[a].is_floating_point():
                return torch.randn(env[a].shape, generator=gen, dtype=env[a].dtype).to(env[a].device)
            if isinstance(a, (list, tuple)):
                return type(a)(rand(b) for b in a)
            return None

        tangents = tuple(rand(a) for a in node.args)
        if all(t is None for t in pytree.tree_leaves(tangents, is_leaf=lambda z: z is None)):
            continue
        try:
            with torch.no_grad():
                mine = rule.fn(tangents, out, *args, **kwargs)
            theirs = _via_flipped_vjp(node.target, tangents, {}, out, args, kwargs)
        except Exception:  # noqa: BLE001 - a node whose backward cannot be differentiated is not judged
            continue
        for a, b in zip(pytree.tree_leaves(mine, is_leaf=lambda z: z is None),
                        pytree.tree_leaves(theirs, is_leaf=lambda z: z is None)):
            if a is None or b is None:
                continue
            err = testing.max_rel_err(a, b)
            if err > tol:
                found.append(f"{node.target} at node {node.name}: rule vs its own backward differ, rel err {err:.1e}")
                break
    return found


def _reason(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg}"[:160]


def verify(f: Callable, x: torch.Tensor, *, v: torch.Tensor | None = None, bn: str = "batch",
           max_jacobian_entries: int = 2_000_000, seed: int = 0, name: str | None = None) -> VerifyReport:
    """Compare jvpgraph's Jv of ``f`` at ``x`` with every reference that applies.

    References: ``torch.func.jvp`` (or why it cannot run), double-backward, the full Jacobian when it has
    at most ``max_jacobian_entries`` entries, central finite differences on a float64 copy, and the
    adjoint identity ``<u, Jv> = <Jᵀu, v>`` against autograd. With ``bn="frozen"`` the exact references are
    replaced by the Jacobian with batch statistics held constant. Train-mode randomness (dropout) is
    seeded identically for jvpgraph and every reference.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3)).train()
        >>> report = verify(net, torch.randn(6, 4))
        >>> report.ok
        True
        >>> print(report)  # doctest: +ELLIPSIS
        jvpgraph verify: Sequential (float32); ...
    """
    # every evaluation is seeded from ``seed``; none may draw from (and move) the caller's generator
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        return _verify(f, x, v, bn, max_jacobian_entries, seed, name)


def _verify(f, x, v, bn, max_jacobian_entries, seed, name) -> VerifyReport:
    name = name or (type(f).__name__ if isinstance(f, nn.Module) else getattr(f, "__qualname__", "function"))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if v is None:
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    state = testing.ModelState(f) if isinstance(f, nn.Module) else None

    def seeded(fn):
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return fn()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback ops are listed in the report instead
        t0 = time.perf_counter()
        traced = Traced(f, (x,), bn=bn)
        t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        jv = seeded(lambda: traced.jvp(x, v)[1])
    t_jvp = time.perf_counter() - t0
    nodes = traced.graph.nx.nodes
    fallback_ops = sorted({f"{nodes[n]['target']} ({how})" for n, how in traced.flipped.how.items()
                           if how in ("decomposition", "flipped-vjp", "forward-ad")})
    random = sorted({nodes[n]["target"] for n in nodes if any(
        r in nodes[n]["target"] for r in ("bernoulli", "dropout", "rand", "normal", "multinomial"))})

    checks: list[Check] = []

    def run(ref_name, fn, tol):
        try:
            t0 = time.perf_counter()
            ref = seeded(fn)
            dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a reference that cannot run is reported as such
            checks.append(Check(ref_name, "n/a", reason=_reason(e)))
            return
        err = testing.max_rel_err(jv, ref)
        checks.append(Check(ref_name, "pass" if err <= tol else "FAIL", err, tol, dt))

    def fd_check(ref_name, make_g, jv_of):
        """Central differences at ε and ε/2, Richardson-extrapolated, ``(4 D(ε/2) − D(ε)) / 3``: the ε² terms
        cancel (error O(ε⁴)), which matters where the function bends hard (BatchNorm over two values per
        channel: plain differences are off by 1e-5 there). ``|R − D(ε/2)|`` bounds the differences' own
        error; a disagreement no larger than 10x that cannot be judged at this tolerance and says so."""
        tol = tolerance(torch.float64, "finite differences")
        try:
            t0 = time.perf_counter()
            g = make_g()  # inside the try: a model that cannot be copied to float64 makes the row n/a
            jv_, fd, fd_half = seeded(lambda: (jv_of(g), testing.finite_differences(g, x, v, eps=1e-7),
                                               testing.finite_differences(g, x, v, eps=5e-8)))
            extrapolated = (4 * fd_half - fd) / 3
            err, noise = testing.max_rel_err(jv_, extrapolated), testing.max_rel_err(fd_half, extrapolated)
        except Exception as e:  # noqa: BLE001
            checks.append(Check(ref_name, "n/a", reason=_reason(e)))
            return
        if err > tol and err <= 10 * noise:
            checks.append(Check(ref_name, "n/a", err, tol, time.perf_counter() - t0,
                                reason=f"not converged here: differences at ε = 1e-7 and 5e-8 differ by "
                                       f"{noise:.1e}, jvpgraph by {err:.1e}; they cannot judge at {tol:.0e}"))
            return
        checks.append(Check(ref_name, "pass" if err <= tol else "FAIL", err, tol, time.perf_counter() - t0))

    dt = x.dtype
    if bn == "frozen":
        run("Jacobian with batch statistics held", lambda: testing.frozen_batchnorm_jvp(f, x, v),
            tolerance(dt, "exact"))
    else:
        run("torch.func.jvp", lambda: testing.func_jvp(f, x, v), tolerance(dt, "exact"))
        run("double-backward", lambda: testing.double_backward(f, x, v), tolerance(dt, "exact"))
        with torch.no_grad():
            n_out = sum(o.numel() for o in torch.utils._pytree.tree_leaves(traced.jvp(x, v)[0]))
        if n_out * x.numel() <= max_jacobian_entries:
            run("full Jacobian (jacrev) @ v", lambda: testing.jacobian_times(f, x, v), tolerance(dt, "exact"))
        else:
            checks.append(Check("full Jacobian (jacrev) @ v", "n/a",
                                reason=f"{n_out} x {x.numel()} entries > max_jacobian_entries"))
        if random:
            checks.append(Check("central finite differences", "n/a",
                                reason=f"random ops in the graph ({', '.join(random)}): two forwards differ"))
        elif dt == torch.float64:
            fd_check("central finite differences", lambda: f, lambda g: jv)
        else:
            # A float32 model and its float64 twin are different piecewise functions near kinks (ReLU masks,
            # max-pool argmaxes flip at rounding level): compare the twin's Jv with differences on the twin.
            fd_check("finite differences (float64 twin)",
                     lambda: copy.deepcopy(f).double() if isinstance(f, nn.Module) else f,
                     lambda g: Traced(g, (x.double(),), bn=bn).jvp(x.double(), v.double())[1])
        try:
            t0 = time.perf_counter()
            gap = seeded(lambda: testing.adjoint_gap(jv, f, x, v))
            checks.append(Check("adjoint <u,Jv> = <J^T u,v>", "pass" if gap <= tolerance(dt, "exact") else "FAIL",
                                gap, tolerance(dt, "exact"), time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            checks.append(Check("adjoint <u,Jv> = <J^T u,v>", "n/a", reason=_reason(e)))
    _arbitrate(checks)
    unchanged = state is None or not state.changes(f)
    report = VerifyReport(name, dt, checks, t_jvp, t_trace, fallback_ops, unchanged)
    if not report.ok:  # say which op: check each written rule against its own node's backward
        report.suspects = suspect_ops(traced, x, seed=seed)
    return report
