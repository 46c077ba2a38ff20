"""``jvpgraph.verify``: jvpgraph's Jv against every independent reference that applies, as a report."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from . import testing
from .api import Traced

__all__ = ["verify", "VerifyReport", "Check", "tolerance", "suspect_ops", "EXIT_CODES"]

#: What ``jvpgraph verify`` exits with for each verdict (3: it could not run: bad arguments, a model that does
#: not load or does not run on the input).
EXIT_CODES = {"OK": 0, "FAILED": 1, "INCONCLUSIVE": 2}

#: Jv counts as zero below this many machine epsilons of ``max|f(x)| · max|v| / max|x|`` (the size Jv has when
#: the output moves with the input at all: 1 to d for a function homogeneous of degree d).
ZERO_EPS = 10


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
    """One row of a :class:`VerifyReport`: a reference, its status and how far jvpgraph's Jv is from it.

    ``status`` is ``"pass"``, ``"FAIL"``, ``"n/a"`` (the reference cannot run here; ``reason`` says why) or
    ``"wrong"`` (the reference, outvoted by finite differences). ``max_rel_err`` is taken output leaf by output
    leaf (the largest); ``ref_max`` is ``max |reference|``, the size of what was compared.

    Example:
        >>> c = Check("double-backward", "pass", max_rel_err=3e-8, tol=1e-4, seconds=0.01, ref_max=2.5)
        >>> c.status, c.max_rel_err <= c.tol
        ('pass', True)
    """

    reference: str
    status: str  # "pass" | "FAIL" | "n/a" | "wrong" (the reference, outvoted by finite differences)
    max_rel_err: float | None = None
    tol: float | None = None
    seconds: float | None = None
    reason: str = ""
    ref_max: float | None = None


@dataclasses.dataclass
class VerifyReport:
    """Rows of :class:`Check` and a verdict: ``"OK"``, ``"FAILED"`` or ``"INCONCLUSIVE"``.

    - **FAILED**: a reference disagrees (``n/a`` rows do not count), or the model's state changed.
    - **INCONCLUSIVE**: nothing disagrees, but nothing was really compared: no reference could run here, or Jv
      and every reference are zero (below ``ZERO_EPS`` epsilons of ``max|f(x)| · max|v| / max|x|``): all
      references agree trivially on a Jacobian that vanishes, as with torchvision's zero-initialized ViT head.
      :attr:`inconclusive` says which, and :func:`verify` warns.
    - **OK**: at least one reference ran and agrees, none disagrees, and Jv is not zero.

    ``ok`` is ``verdict == "OK"``; ``exit_code`` is what ``jvpgraph verify`` exits with (:data:`EXIT_CODES`:
    0, 1, 2).

    A reference that disagrees grossly (more than 100x the finite-difference tolerance) while central
    finite differences agree with jvpgraph is marked ``wrong``, with the reason, and does not fail the
    verdict: finite differences evaluate only the function, so they cannot share a differentiation bug.
    (``torch.func.jvp`` returns silent zeros for a custom op without an autograd formula, for instance.)

    ``str(report)`` is a table.

    Example:
        >>> import warnings, torch, torch.nn as nn
        >>> head = nn.Linear(8, 3)
        >>> _ = nn.init.zeros_(head.weight)  # the output no longer moves with the input: Jv = 0
        >>> with warnings.catch_warnings(record=True) as said:
        ...     warnings.simplefilter("always")
        ...     report = verify(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), head), torch.randn(2, 4))
        >>> report.verdict, report.exit_code, report.ok
        ('INCONCLUSIVE', 2, False)
        >>> "Jv is zero here" in report.inconclusive and any("INCONCLUSIVE" in str(w.message) for w in said)
        True
    """

    name: str
    dtype: torch.dtype
    checks: list[Check]
    jvp_seconds: float
    trace_seconds: float
    fallback_ops: list[str]
    state_unchanged: bool
    suspects: list[str] = dataclasses.field(default_factory=list)
    jv_max: float | None = None  # max |Jv| over the output
    scale: float | None = None  # max|f(x)| · max|v| / max|x|: the size Jv has where the output moves
    n_inputs: int = 1
    n_outputs: int = 1  # floating-point leaves of the output compared
    zero_params: list[str] = dataclasses.field(default_factory=list)  # all-zero weights (for the hint)
    suspects_checked: bool = False  # suspect_ops ran (it does when the verdict is not OK)

    @property
    def verdict(self) -> str:
        """``"FAILED"``, ``"INCONCLUSIVE"`` or ``"OK"`` (see the class)."""
        if not self.state_unchanged or any(c.status == "FAIL" for c in self.checks):
            return "FAILED"
        return "INCONCLUSIVE" if self.inconclusive else "OK"

    @property
    def inconclusive(self) -> str:
        """Why nothing was really compared (empty when something was)."""
        if not any(c.status == "pass" for c in self.checks):
            return ("no reference could run here (every row is n/a, and says why): nothing was compared with "
                    "jvpgraph's Jv")
        if self.jv_max is None or self.scale is None:
            return ""
        zero = ZERO_EPS * torch.finfo(self.dtype).eps * self.scale
        refs = [c.ref_max for c in self.checks if c.status == "pass" and c.ref_max is not None]
        if self.jv_max > zero or any(r > zero for r in refs):
            return ""
        seen = ("the output itself is 0" if self.scale == 0 else
                f"max|f(x)|·max|v|/max|x|, the size Jv has where the output moves, is {self.scale:.1e}")
        why = ("Jv is zero here and every reference agrees: they agree trivially and check nothing (max |Jv| = "
               f"{self.jv_max:.1e}, the references at most {max(refs, default=0.0):.1e}, and {seen}). The output "
               "does not move with the input at this point (a zero-initialized last layer, as torchvision's ViT "
               "heads are, dead ReLUs, or an output that does not depend on x)")
        if self.zero_params:
            shown = ", ".join(self.zero_params[:4]) + (", ..." if len(self.zero_params) > 4 else "")
            why += f". All-zero weights: {shown}: re-initialize them (e.g. the layer's reset_parameters())"
        return why + "; verify at a point where the output moves (a trained or re-initialized model)"

    @property
    def ok(self) -> bool:
        """``verdict == "OK"``."""
        return self.verdict == "OK"

    @property
    def exit_code(self) -> int:
        """What ``jvpgraph verify`` exits with: 0 OK, 1 FAILED, 2 INCONCLUSIVE."""
        return EXIT_CODES[self.verdict]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "FAIL"]

    def __str__(self) -> str:
        w = max(len(c.reference) for c in self.checks)
        lines = [f"jvpgraph verify: {self.name} ({str(self.dtype).replace('torch.', '')}); trace "
                 f"{self.trace_seconds:.2f} s, Jv {self.jvp_seconds * 1e3:.1f} ms; fallback ops: "
                 f"{', '.join(self.fallback_ops) or 'none'}"]
        if self.n_inputs > 1 or self.n_outputs > 1:
            lines.append(f"  {self.n_inputs} input(s), {self.n_outputs} output tensor(s): errors are taken output "
                         "by output (the largest is shown)")
        lines.append(f"  {'reference'.ljust(w)}  {'status':6}  {'max rel err':>11}  {'tolerance':>9}  {'time':>9}")
        for c in self.checks:
            if c.status == "n/a":
                lines.append(f"  {c.reference.ljust(w)}  {'n/a':6}  {c.reason}")
            elif c.status == "wrong":
                lines.append(f"  {c.reference.ljust(w)}  {'wrong':6}  {c.reason}")
            else:
                lines.append(f"  {c.reference.ljust(w)}  {c.status:6}  {c.max_rel_err:>11.2e}  {c.tol:>9.0e}  "
                             f"{c.seconds * 1e3:>7.1f}ms")
        if self.jv_max is not None and self.scale is not None:
            lines.append(f"  max |Jv|: {self.jv_max:.2e} (max|f(x)|·max|v|/max|x| = {self.scale:.2e})")
        lines.append(f"  model state unchanged: {'yes' if self.state_unchanged else 'NO'}")
        for s in self.suspects:
            lines.append(f"  suspect op: {s}")
        if self.suspects_checked and not self.suspects:
            lines.append("  each written rule vs its own node's backward: none differs")
        if self.verdict == "INCONCLUSIVE":
            lines.append(f"  inconclusive: {self.inconclusive}")
        lines.append("  verdict: " + self.verdict)
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


def suspect_ops(traced: Traced, x: torch.Tensor | tuple[torch.Tensor, ...], *, seed: int = 0,
                tol: float | None = None) -> list[str]:
    """Check every written rule of the trace against the theorem applied to its node alone.

    Runs the forward graph on ``x`` (a tensor, or a tuple of them for several inputs); at each node on an
    input -> output path that has a written rule, pushes random tangents through the rule and through the
    node's flipped VJP (its own backward, transposed) and reports the nodes where they differ:
    ``"aten.sigmoid.default at node sigmoid: rel err 3.1e-01"``.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid())
        >>> suspect_ops(jvpgraph.trace(net, torch.randn(2, 3)), torch.randn(2, 3))
        []
    """
    from .rules import lookup
    from .rules.propagate import walk

    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    graph, values = traced.graph_for(*xs)
    gm = graph.gm
    active = graph.active_nodes
    gen = torch.Generator(device="cpu").manual_seed(seed)
    found: list[str] = []
    tol = tol if tol is not None else tolerance(xs[0].dtype, "exact")
    env = dict(zip(graph.program.placeholders, (v.detach() for v in values)))
    with torch.no_grad():  # the forward's values; the node's flipped VJP enables grad where it needs it
        for node, args, kwargs, out in walk(gm.graph, env, owner=gm):
            rule = lookup(node.target)
            if node not in active or rule is None or rule.kind in ("structural", "opaque"):
                continue
            found += _judge(node, rule, args, kwargs, out, env, active, gen, tol)
    return found


def _judge(node, rule, args, kwargs, out, env, active, gen, tol) -> list[str]:
    """Random tangents through ``rule`` and through ``node``'s flipped VJP: the difference, if above ``tol``."""
    import torch.fx as fx

    from .rules.fallback import _via_flipped_vjp

    def rand(a):
        if isinstance(a, fx.Node) and a in active and isinstance(env[a], torch.Tensor) \
                and env[a].is_floating_point():
            return torch.randn(env[a].shape, generator=gen, dtype=env[a].dtype).to(env[a].device)
        if isinstance(a, (list, tuple)):
            return type(a)(rand(b) for b in a)
        return None

    tangents = tuple(rand(a) for a in node.args)
    if all(t is None for t in pytree.tree_leaves(tangents, is_leaf=lambda z: z is None)):
        return []
    try:
        with torch.no_grad():
            # without the node's stamped mode (bn="frozen"): the op's own derivative, as its backward's
            mine = rule.fn(tangents, out, *args, **kwargs)
        theirs = _via_flipped_vjp(node.target, tangents, {}, out, args, kwargs)
    except Exception:  # noqa: BLE001 - a node whose backward cannot be differentiated is not judged
        return []
    for a, b in zip(pytree.tree_leaves(mine, is_leaf=lambda z: z is None),
                    pytree.tree_leaves(theirs, is_leaf=lambda z: z is None)):
        if a is None or b is None:
            continue
        err = testing.max_rel_err(a, b)
        if err > tol:
            return [f"{node.target} at node {node.name}: rule vs its own backward differ, rel err {err:.1e}"]
    return []


def _reason(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {msg}"[:160]


def _is_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _flatten(tree, like=None) -> torch.Tensor:
    """The floating-point leaves of an output pytree (those where ``like``, the primal output, has them) as one
    tensor: the tensor itself when the output is one tensor, else their flattened concatenation."""
    like = tree if like is None else like
    leaves = [t for t, p in zip(pytree.tree_leaves(tree), pytree.tree_leaves(like)) if _is_float(p)]
    if isinstance(like, torch.Tensor) and len(leaves) == 1:
        return leaves[0]
    return torch.cat([t.reshape(-1) for t in leaves])


class _Packed(nn.Module):
    """``f`` as a map from one tensor to one tensor, for the references of :mod:`jvpgraph.testing`: several inputs
    come packed in one flat vector (split and reshaped on entry), and the floating-point leaves of a tuple, dict
    or nested output leave flattened and concatenated. ``f`` is a submodule: the references' deep copies and the
    float64 twin reach its parameters and buffers."""

    def __init__(self, f: Callable, shapes: list[torch.Size] | None):
        super().__init__()
        self.f = f  # an nn.Module is registered as a child; a function is a plain attribute
        self.shapes = shapes  # None: one input, passed as it is

    def forward(self, x):
        if self.shapes is None:
            xs = (x,)
        else:
            parts = torch.split(x, [math.prod(s) for s in self.shapes])
            xs = tuple(p.reshape(s) for p, s in zip(parts, self.shapes))
        return _flatten(self.f(*xs))


def _inputs(x, v, gen) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``x`` and ``v`` as tuples, checked; ``v`` drawn from ``gen`` where not given."""
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    for i, t in enumerate(xs):
        what = "x" if len(xs) == 1 and not isinstance(x, (tuple, list)) else f"x[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"verify: {what} is a {type(t).__name__}; give a tensor, or a tuple of tensors (one per "
                            "input of f). Bind non-tensor arguments with functools.partial or a lambda.")
        if not t.is_floating_point():
            raise TypeError(f"verify: {what} has dtype {t.dtype}; every input given must be floating point (it "
                            "carries a tangent). Bind integer inputs (token ids, indices) with functools.partial "
                            "or a lambda.")
        if (t.dtype, t.device) != (xs[0].dtype, xs[0].device):
            raise ValueError(f"verify: {what} is {t.dtype} on {t.device} but x[0] is {xs[0].dtype} on "
                             f"{xs[0].device}; give every input the same dtype and device")
    if not xs:
        raise ValueError("verify: x is empty; give a tensor, or a tuple of tensors (one per input of f)")
    if v is None:
        vs = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in xs)
    else:
        vs = tuple(v) if isinstance(v, (tuple, list)) else (v,)
        if len(vs) != len(xs):
            raise ValueError(f"verify: v has {len(vs)} tensor(s) for {len(xs)} input(s); give one tangent per input")
    return xs, vs


def _abs_max(ts) -> float:
    ts = [t for t in ts if _is_float(t) and t.numel()]
    return max((t.detach().abs().max().item() for t in ts), default=0.0)


def verify(f: Callable, x: torch.Tensor | tuple[torch.Tensor, ...], *,
           v: torch.Tensor | tuple[torch.Tensor, ...] | None = None, bn: str = "batch",
           max_jacobian_entries: int = 2_000_000, seed: int = 0, name: str | None = None) -> VerifyReport:
    """Compare jvpgraph's Jv of ``f`` at ``x`` with every reference that applies.

    References: ``torch.func.jvp`` (or why it cannot run), double-backward, the full Jacobian when it has
    at most ``max_jacobian_entries`` entries, central finite differences on a float64 copy, and the
    adjoint identity ``<u, Jv> = <Jᵀu, v>`` against autograd. With ``bn="frozen"`` the exact references are
    replaced by the Jacobian with batch statistics held constant. Train-mode randomness (dropout) is
    seeded identically for jvpgraph and every reference.

    ``x`` is a tensor, or a tuple of tensors for a model of several inputs (floating point, one dtype; ``v``
    then a tuple too). ``f`` may return a tensor or a tuple, dict or nested pytree of them: the floating-point
    outputs are compared one by one. The verdict (see :class:`VerifyReport`) is ``OK``, ``FAILED`` or
    ``INCONCLUSIVE``; an inconclusive one (no reference could run, or Jv is zero so every reference agrees
    trivially) also warns.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3)).train()
        >>> report = verify(net, torch.randn(6, 4))
        >>> report.ok, report.verdict
        (True, 'OK')
        >>> print(report)  # doctest: +ELLIPSIS
        jvpgraph verify: Sequential (float32); ...
        >>> two = verify(lambda a, b: (a * b.sin(), {"sum": a + b}), (torch.randn(3, 2), torch.randn(3, 2)))
        >>> two.verdict, two.n_inputs, two.n_outputs
        ('OK', 2, 2)
    """
    device = (x[0] if isinstance(x, (tuple, list)) and x else x)
    devices = [device.device] if isinstance(device, torch.Tensor) and device.device.type == "cuda" else []
    # every evaluation is seeded from ``seed``; none may draw from (and move) the caller's generator
    with torch.random.fork_rng(devices=devices):
        report = _verify(f, x, v, bn, max_jacobian_entries, seed, name)
    if report.verdict == "INCONCLUSIVE":
        warnings.warn(f"jvpgraph.verify: {report.name}: INCONCLUSIVE: {report.inconclusive}", UserWarning,
                      stacklevel=2)
    return report


def _verify(f, x, v, bn, max_jacobian_entries, seed, name) -> VerifyReport:
    name = name or (type(f).__name__ if isinstance(f, nn.Module) else getattr(f, "__qualname__", "function"))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    xs, vs = _inputs(x, v, gen)
    devices = [xs[0].device] if xs[0].device.type == "cuda" else []
    state = testing.ModelState(f) if isinstance(f, nn.Module) else None

    def seeded(fn):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return fn()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback ops are listed in the report instead
        t0 = time.perf_counter()
        traced = Traced(f, xs, bn=bn)
        t_trace = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        out, jv_tree = seeded(lambda: traced.jvp(xs, vs))
    t_jvp = time.perf_counter() - t0
    n_outputs = sum(map(_is_float, pytree.tree_leaves(out)))
    if not n_outputs:
        raise ValueError(f"verify: {name} returns no floating-point tensor (its output is "
                         f"{type(out).__name__}): there is no Jv to check")
    # One tensor in, one out: the references see f itself. Otherwise they see f packed (one flat input, the
    # floating-point outputs concatenated), and errors are taken output by output.
    packed = len(xs) > 1 or not isinstance(out, torch.Tensor)
    g = _Packed(f, [t.shape for t in xs] if len(xs) > 1 else None) if packed else f
    X = torch.cat([t.reshape(-1) for t in xs]) if len(xs) > 1 else xs[0]
    V = torch.cat([t.reshape(-1) for t in vs]) if len(xs) > 1 else vs[0]
    jv = _flatten(jv_tree, like=out)
    sizes = None if isinstance(out, torch.Tensor) else [t.numel() for t in pytree.tree_leaves(out) if _is_float(t)]

    def rel_err(a, b):
        if sizes is None:
            return testing.max_rel_err(a, b)
        return max(testing.max_rel_err(p, q) for p, q in zip(torch.split(a, sizes), torch.split(b, sizes)))

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
        err = rel_err(jv, ref)
        checks.append(Check(ref_name, "pass" if err <= tol else "FAIL", err, tol, dt, ref_max=_abs_max([ref])))

    def fd_check(ref_name, make_g, jv_of):
        """Central differences at ε and ε/2, Richardson-extrapolated, ``(4 D(ε/2) − D(ε)) / 3``: the ε² terms
        cancel (error O(ε⁴)), which matters where the function bends hard (BatchNorm over two values per
        channel: plain differences are off by 1e-5 there). ``|R − D(ε/2)|`` bounds the differences' own
        error; a disagreement no larger than 10x that cannot be judged at this tolerance and says so."""
        tol = tolerance(torch.float64, "finite differences")
        try:
            t0 = time.perf_counter()
            g2 = make_g()  # inside the try: a model that cannot be copied to float64 makes the row n/a
            jv_, fd, fd_half = seeded(lambda: (jv_of(g2), testing.finite_differences(g2, X, V, eps=1e-7),
                                               testing.finite_differences(g2, X, V, eps=5e-8)))
            extrapolated = (4 * fd_half - fd) / 3
            err, noise = rel_err(jv_, extrapolated), rel_err(fd_half, extrapolated)
        except Exception as e:  # noqa: BLE001
            checks.append(Check(ref_name, "n/a", reason=_reason(e)))
            return
        ref_max = _abs_max([extrapolated])
        if err > tol and err <= 10 * noise:
            checks.append(Check(ref_name, "n/a", err, tol, time.perf_counter() - t0, ref_max=ref_max,
                                reason=f"not converged here: differences at ε = 1e-7 and 5e-8 differ by "
                                       f"{noise:.1e}, jvpgraph by {err:.1e}; they cannot judge at {tol:.0e}"))
            return
        checks.append(Check(ref_name, "pass" if err <= tol else "FAIL", err, tol, time.perf_counter() - t0,
                            ref_max=ref_max))

    def twin_jv(twin):
        """jvpgraph's Jv of the float64 twin, in the layout of ``g``'s output."""
        xd, vd = tuple(t.double() for t in xs), tuple(t.double() for t in vs)
        o, t = Traced(twin.f if packed else twin, xd, bn=bn).jvp(xd, vd)
        return _flatten(t, like=o)

    dt = X.dtype
    if bn == "frozen":
        run("Jacobian with batch statistics held", lambda: testing.frozen_batchnorm_jvp(g, X, V),
            tolerance(dt, "exact"))
    else:
        run("torch.func.jvp", lambda: testing.func_jvp(g, X, V), tolerance(dt, "exact"))
        run("double-backward", lambda: testing.double_backward(g, X, V), tolerance(dt, "exact"))
        n_out = jv.numel()
        if n_out * X.numel() <= max_jacobian_entries:
            run("full Jacobian (jacrev) @ v", lambda: testing.jacobian_times(g, X, V), tolerance(dt, "exact"))
        else:
            checks.append(Check("full Jacobian (jacrev) @ v", "n/a",
                                reason=f"{n_out} x {X.numel()} entries > max_jacobian_entries"))
        if random:
            checks.append(Check("central finite differences", "n/a",
                                reason=f"random ops in the graph ({', '.join(random)}): two forwards differ"))
        elif dt == torch.float64:
            fd_check("central finite differences", lambda: g, lambda g2: jv)
        else:
            # A float32 model and its float64 twin are different piecewise functions near kinks (ReLU masks,
            # max-pool argmaxes flip at rounding level): compare the twin's Jv with differences on the twin.
            fd_check("finite differences (float64 twin)",
                     lambda: copy.deepcopy(g).double() if isinstance(g, nn.Module) else g, twin_jv)
        try:
            t0 = time.perf_counter()
            gap = seeded(lambda: testing.adjoint_gap(jv, g, X, V))
            checks.append(Check("adjoint <u,Jv> = <J^T u,v>", "pass" if gap <= tolerance(dt, "exact") else "FAIL",
                                gap, tolerance(dt, "exact"), time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001
            checks.append(Check("adjoint <u,Jv> = <J^T u,v>", "n/a", reason=_reason(e)))
    _arbitrate(checks)
    unchanged = state is None or not state.changes(f)
    x_max, v_max, out_max = _abs_max(xs), _abs_max(vs), _abs_max(pytree.tree_leaves(out))
    scale = out_max * v_max / x_max if x_max > 0 else out_max * v_max
    zero_params = [k for k, p in f.named_parameters() if k.endswith("weight") and p.dim() >= 2 and not p.any()] \
        if isinstance(f, nn.Module) else []
    report = VerifyReport(name, dt, checks, t_jvp, t_trace, fallback_ops, unchanged, jv_max=_abs_max([jv]),
                          scale=scale, n_inputs=len(xs), n_outputs=n_outputs, zero_params=zero_params)
    if not report.ok:  # say which op: check each written rule against its own node's backward
        report.suspects, report.suspects_checked = suspect_ops(traced, xs, seed=seed), True
    return report
