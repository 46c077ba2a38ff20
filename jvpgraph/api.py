"""The public API: trace once, apply many; and ``jvp`` / ``linearize`` / ``vjp`` mirroring ``torch.func``."""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
import time
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from .flip import FlippedGraph
from .graph import Graph
from .guards import global_state
from .rules import RuleError
from . import sharded
from .batchnorm import check_mode, holds_frozen_statistics
from .trace import TraceError, TracedProgram, _eager_error, trace_and_build

__all__ = ["Traced", "Linearized", "trace", "cached_trace", "jvp", "linearize", "vjp", "explain"]

log = logging.getLogger("jvpgraph")


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class _FasterOrder:
    """Jv on a new batch in one pass, in the op order that runs faster here: interleaved (each op's tangent
    right after it: least memory) or primal-first (see :func:`jvpgraph.flip._primal_first`). The first
    ``2 * trials`` calls on the CPU run ``trials`` of each, in two blocks (alternating single calls leaves
    the allocator in neither order's steady state), each returning its Jv (the values are the same); the
    faster order by its best call after the block's first is kept — primal-first only when it is ``margin``
    times faster, since it holds more memory. Off the CPU, interleaved."""

    def __init__(self, flipped: FlippedGraph, trials: int = 3, margin: float = 1.15):
        self.flipped, self.trials, self.margin = flipped, trials, margin
        self.times: dict[str, list[float]] = {"interleaved": [], "primal_first": []}
        self.chosen: Callable | None = None

    def _module(self, order: str) -> Callable:
        return self.flipped.module if order == "interleaved" else self.flipped.primal_first_module

    def __call__(self, *args):
        if self.chosen is not None:
            return self.chosen(*args)
        if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
            self.chosen = self.flipped.module
            return self.chosen(*args)
        order = "interleaved" if len(self.times["interleaved"]) < self.trials else "primal_first"
        fn = self._module(order)
        t0 = time.perf_counter()
        out = fn(*args)
        self.times[order].append(time.perf_counter() - t0)
        if len(self.times["primal_first"]) >= self.trials:
            best = {k: min(ts[1:] or ts) for k, ts in self.times.items()}
            faster = best["primal_first"] * self.margin < best["interleaved"]
            self.chosen = self._module("primal_first" if faster else "interleaved")
        return out


class _Compiled:
    """One trace at one set of shapes: the graph, its flip, and the recorded-forward split — as fx modules,
    or under ``torch.compile`` when the :class:`Traced` asked for it (compiled on first use)."""

    def __init__(self, graph: Graph, compile: bool | dict = False):
        self.graph = graph
        self.flipped: FlippedGraph = graph.flip()
        self.n_out = self.flipped.n_outputs
        self.n_buf = len(self.flipped.buffer_update_names)
        # with bn="frozen", Jv holds the batch statistics constant; the forward's own backward does not
        self.frozen_statistics = holds_frozen_statistics(graph.program.gm)
        self._compile = compile
        self._fns: dict[str, Callable] = {}

    def _fn(self, which: str) -> Callable:
        fn = self._fns.get(which)
        if fn is None:
            if which == "joint":
                fn = self.flipped.module if self._compile else _FasterOrder(self.flipped)
            elif which == "jv":
                fn = self.flipped.tangent_module
            else:
                fn = dict(zip(("forward", "tangent"), self.flipped.partition()))[which]
            if self._compile:
                options = self._compile if isinstance(self._compile, dict) else {}
                fn = torch.compile(fn, **{"dynamic": False, **options})
            self._fns[which] = fn
        return fn

    @property
    def joint(self) -> Callable:
        """``(*params, *buffers, *inputs, *tangents) -> (*outputs, *tangent_outputs, *new_buffers)``."""
        return self._fn("joint")

    @property
    def jv(self) -> Callable:
        """``(*params, *buffers, *inputs, *tangents) -> tangent_outputs`` (pruned to what they need)."""
        return self._fn("jv")

    @property
    def forward(self) -> Callable:
        """The recorded forward: ``(*params, *buffers, *inputs) -> (*outputs, *new_buffers, *saved)``."""
        return self._fn("forward")

    @property
    def tangent(self) -> Callable:
        """The tangent pass: ``(*saved, *tangents) -> tangent_outputs``."""
        return self._fn("tangent")


class Linearized:
    """A recorded forward: ``.out``, ``.jvp(v)`` reusing its activations, ``.vjp(u)`` by autograd.

    ``.new_buffers`` holds the running statistics a training forward would have written (never written
    into the model by jvpgraph; ``model.load_state_dict(..., strict=False)`` or ``copy_`` them if wanted).

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
        >>> x, v, u = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 2)
        >>> lin = jvpgraph.trace(net, x).linearize(x)
        >>> torch.testing.assert_close(lin.jvp(v), torch.func.jvp(net, (x,), (v,))[1])
        >>> torch.testing.assert_close((u * lin.jvp(v)).sum(), (lin.vjp(u) * v).sum())
    """

    def __init__(self, traced: "Traced", compiled: _Compiled, flat_out, new_buffers, saved, inputs, out_spec):
        self._traced = traced
        self._compiled = compiled
        self._flat_out = flat_out
        self._saved = saved
        self._inputs = inputs
        self._out_spec = out_spec
        self.out = pytree.tree_unflatten(list(flat_out), out_spec)
        self.new_buffers: dict[str, torch.Tensor] = new_buffers

    def jvp(self, *tangents):
        """``J v`` from the recorded activations (no primal recomputation)."""
        ts = self._traced._check_tangents(self._inputs, tangents, self._compiled.graph.wrt)
        touts = self._compiled.tangent(*self._saved, *ts)
        return pytree.tree_unflatten(list(touts), self._out_spec)

    def vjp(self, *cotangents, create_graph: bool = False):
        """``Jᵀ u`` for the differentiated inputs: the exact transpose of :meth:`jvp`.

        By the ordinary backward pass of the recorded forward; or, with ``bn="frozen"`` (batch statistics
        held constant, which the forward's own backward does not do) or a forward recorded without autograd,
        by the backward pass of the tangent pass itself (linear in ``v``: its gradient is ``Jᵀu``).
        ``create_graph=True`` keeps the result differentiable in the parameters.
        """
        us = pytree.tree_leaves(cotangents[0] if len(cotangents) == 1 else cotangents)
        wrt = [self._inputs[i] for i in self._compiled.graph.wrt]
        recorded = all(w.requires_grad for w in wrt) and any(o.requires_grad for o in self._flat_out)
        if self._compiled.frozen_statistics or not recorded:
            return self._transposed_tangent_pass(us, create_graph)
        pairs = [(o, u) for o, u in zip(self._flat_out, us) if o.requires_grad]
        grads = torch.autograd.grad([p[0] for p in pairs], wrt, [p[1] for p in pairs], retain_graph=True,
                                    create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
        return grads[0] if len(grads) == 1 else tuple(grads)


    def _transposed_tangent_pass(self, us, create_graph):
        wrt = self._compiled.graph.wrt
        tan = self._compiled.tangent
        with torch.enable_grad():
            vs = [torch.zeros_like(self._inputs[i]).requires_grad_(True) for i in wrt]
            touts = tan(*self._saved, *vs)
            pairs = [(o, u) for o, u in zip(touts, us) if u is not None and o.requires_grad]
            if pairs:
                grads = torch.autograd.grad([p[0] for p in pairs], vs, [p[1] for p in pairs],
                                            create_graph=create_graph, allow_unused=True)
            else:
                grads = [None] * len(vs)
        grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, vs)]
        return grads[0] if len(grads) == 1 else tuple(grads)

    def detach(self) -> "Linearized":
        """The same recorded forward cut from autograd: :meth:`jvp`/:meth:`vjp` then build no graph back to
        the parameters (what power iteration wants before the final, differentiated step)."""
        out = Linearized(self._traced, self._compiled, [o.detach() for o in self._flat_out], self.new_buffers,
                         [t.detach() if isinstance(t, torch.Tensor) else t for t in self._saved],
                         [x.detach() for x in self._inputs], self._out_spec)
        return out


def _autocast_state() -> tuple:
    """The autocast regions the call runs in, ``((device type, dtype), ...)``: a trace made under
    ``torch.autocast`` holds its casts, so it serves calls under the same autocast only."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))


class Traced:
    """A model or function traced once for Jv: apply it to new batches and new parameter values.

    The trace is specialized to input dtypes and devices, to input shapes (until a call changes a size: then
    that dimension becomes a symbol, and one trace serves every size its guards admit; see ``dynamic``), to
    the model's structure and ``training`` flags, and to every Python-level value its forward read (attributes such as ``self.temperature`` or
    ``Dropout.p``, flags, hooks; see :mod:`jvpgraph.guards`), to autocast, the default dtype and device; a call
    that differs in any of them is traced again, never answered from a stale trace. Traces are cached (the
    ``cache_size`` most recently used, at most); :meth:`explain` says what is cached and why each trace was made.

    Args:
        f: an ``nn.Module`` or a function of tensors.
        example_inputs: tensors of the shapes to trace at.
        bn: BatchNorm in train mode: ``"batch"`` (exact, with the coupling through batch statistics),
            ``"frozen"`` (batch statistics held constant: the paper's pseudo-inference, per-sample Jacobian)
            or ``"eval"`` (running statistics, as in ``model.eval()``; the rest of the model keeps its mode).
        wrt: indices of the inputs that carry a tangent (default: all floating-point inputs).
        compile: run the emitted graphs (Jv on a new batch, recorded forward, tangent pass) under
            ``torch.compile`` (``True``, or a dict of its keyword arguments, e.g. ``{"mode": "max-autotune"}``);
            each is compiled on its first call. Measured on the CPU here: see ``jvpgraph bench --compile``.
        cache_size: how many traces to keep (least recently used evicted first).
        dynamic: symbolic sizes, as ``torch.compile``'s: ``None`` (default) traces the first call at its sizes
            and, when a later call changes some sizes (a new batch size, a new sequence length), traces those
            dimensions as symbols (``make_fx`` with a shape environment; what the trace assumes about a
            size, e.g. that it is at least 2 or divisible by the heads, is checked on every call). ``True``:
            the first dimension of every input symbolic from the first call; ``False``: fixed sizes only
            (a trace per size). A size 1 is always traced on its own, and a model whose symbolic trace fails
            (a size it reads as a number, an op without symbolic support) is traced per size, as with
            ``False``; :meth:`explain` says which.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Sigmoid(), nn.Flatten(),
        ...                     nn.Linear(4 * 6 * 6, 3)).train()
        >>> x = torch.randn(8, 1, 8, 8)
        >>> g = jvpgraph.trace(net, x)
        >>> x2, v = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
        >>> out, jv = g.jvp(x2, v)
        >>> ref = torch.autograd.functional.jvp(lambda z: net(z), x2, v)[1]  # double-backward reference
        >>> torch.testing.assert_close(jv, ref, rtol=1e-4, atol=1e-5)
        >>> for batch in (5, 16, 3):  # the second batch size makes a trace with a symbolic batch size
        ...     x, v = torch.randn(batch, 1, 8, 8), torch.randn(batch, 1, 8, 8)
        ...     ref = torch.autograd.functional.jvp(lambda z: net(z), x, v)[1]
        ...     torch.testing.assert_close(g.jvp(x, v)[1], ref, rtol=1e-4, atol=1e-5)
        >>> len(g.history)  # batch 8, then one trace for every batch size >= 2
        2
    """

    def __init__(self, f: Callable, example_inputs: Sequence[Any], *, bn: str = "batch",
                 wrt: Sequence[int] | None = None, compile: bool | dict = False, cache_size: int = 8,
                 dynamic: bool | None = None, _weak: bool = False):
        bn = check_mode(bn).value
        if not callable(f):
            raise TypeError(f"jvpgraph.trace expects an nn.Module or a function, got {type(f).__name__}")
        f = _uncompiled(f)
        # FSDP2: every call gathers the whole parameters (sharded.gathered), traces see a plain model
        self._sharded = sharded.check(f)
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size={cache_size!r}: expected a positive integer")
        if dynamic not in (None, True, False):
            raise ValueError(f"dynamic={dynamic!r}: expected None (symbolic sizes once a call changes them), True "
                             "(the first dimension of every input symbolic from the first call) or False (never)")
        self.dynamic = dynamic
        self._patterns: list[tuple] = []  # the dimensions traced as symbols, per input (one entry per pattern)
        self._static_only: dict[tuple, str] = {}  # patterns whose symbolic trace failed, and why
        self._dynamic_traces = collections.Counter()  # symbolic traces made per pattern
        # the module cache behind jvpgraph.jvp & co. holds its Traced weakly to the model (a model the user
        # drops is freed with its traces); a Traced the user holds keeps its model, like any object would
        self._f = weakref.ref(f) if _weak else (lambda f=f: f)
        self._is_module = isinstance(f, nn.Module)
        self._name = type(f).__name__ if self._is_module else getattr(f, "__qualname__", "function")
        self.bn = bn
        self.wrt = None if wrt is None else list(wrt)
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile={compile!r}: expected True/False or a dict of torch.compile options")
        self.compile = compile
        self.cache_size = cache_size
        self._cache: "collections.OrderedDict[tuple, list[_Compiled]]" = collections.OrderedDict()
        #: why each trace was made, oldest first (at most 64 kept): ``(reason, seconds it took)``
        self.history: "collections.deque[tuple[str, float]]" = collections.deque(maxlen=64)
        self._counts = collections.Counter()  # traces made because of: "first", "shape", "guard", ...
        self._warned: set[str] = set()
        self._example = tuple(example_inputs)
        self._compiled_for(self._example)
        if _weak:  # nothing the user passed is kept by the cache (the example batch included)
            self._example = None

    @property
    def f(self) -> Callable:
        """The traced model or function."""
        f = self._f()
        if f is None:
            raise ReferenceError(f"the {self._name} this trace was made of has been freed")
        return f

    @property
    def module(self) -> nn.Module | None:
        """The traced model (``None`` for a function)."""
        return self.f if self._is_module else None

    # ------------------------------------------------------------------ cache
    def _walk(self) -> tuple[list, list, list, dict]:
        """One traversal of the module tree: the modules' ``(id, training)``, the parameters, and the buffers
        as ``(name, tensor)`` — in ``named_parameters``/``named_buffers``' order and de-duplication (what
        the trace takes; all empty for a function); last, for a model sharded with FSDP2, its gathered
        parameters by the id of what their slots hold (:func:`sharded.gathered`; else empty). One walk per call instead of four: 0.15 ms of a 3 ms LeNet
        step at batch 1."""
        flags: list = []
        params: list = []
        buffers: list = []
        seen_p: set = set()
        seen_b: set = set()
        module = self.module
        for prefix, m in module.named_modules() if module is not None else ():
            flags.append((id(m), m.training))
            for p in m._parameters.values():
                if p is not None and id(p) not in seen_p:
                    seen_p.add(id(p))
                    params.append(p)
            for name, b in m._buffers.items():
                if b is not None and id(b) not in seen_b:
                    seen_b.add(id(b))
                    buffers.append((f"{prefix}.{name}" if prefix else name, b))
        full = {}
        if self._sharded:  # the whole parameters, gathered once per call (a collective: every rank walks)
            full = sharded.gathered(module)
            params = [full.get(id(p), p) for p in params]
        return flags, params, buffers, full

    def _key(self, flat_in, walk) -> tuple:
        # contiguity too: a trace at contiguous inputs turns reshape into view, which a transposed input refuses
        key = tuple((tuple(t.shape), t.dtype, t.device, t.is_contiguous()) if isinstance(t, torch.Tensor)
                    else ("const", repr(t)) for t in flat_in)
        flags, params = walk[0], walk[1]
        key += (tuple(flags),)
        key += (tuple((tuple(p.shape), p.dtype, p.device) for p in params),)
        return key + (_autocast_state(), global_state())

    def _valid(self, comp: _Compiled, flat_in, walk) -> str | None:
        """``None`` if ``comp`` may answer this call, else why not."""
        prog = comp.graph.program
        if not prog.sizes_hold(flat_in):
            return f"sizes outside those its symbolic sizes hold for ({prog.size_guards()})"
        why = prog.guards.check()
        if why is None and prog.reads_random:
            why = ("it branches on random numbers it drew (a Python if on torch.rand, or on values after dropout):"
                   " it answers only the call it was traced in")
        if why is None and comp.graph.program.values is not None:
            # traced at particular values (data-dependent shapes or branches): valid for those values only
            now = [*self._state(walk=walk), *flat_in]
            if any(not torch.equal(a.detach(), b) for a, b in zip(now, comp.graph.program.values)):
                why = "the values it was specialized to changed (it branches on tensor values)"
        return why

    def _why_new(self, key: tuple) -> tuple[str, str]:
        """Why a call with ``key`` has no trace yet: ``(kind, reason)``, comparing with the newest cached key."""
        if not self._cache:
            return "first", "first call"
        old = next(reversed(self._cache))
        n = len(key) - 4
        parts = [("input", "input shapes, dtypes or devices", 0, n), ("flags", "training flags or module structure",
                 n, n + 1), ("params", "parameter shapes, dtypes or devices", n + 1, n + 2),
                 ("autocast", "autocast", n + 2, n + 3), ("global", "default dtype/device, deterministic algorithms "
                 "or global module hooks", n + 3, n + 4)]
        if len(old) != len(key):
            return "input", f"number of inputs {len(old) - 4} -> {len(key) - 4}"
        for kind, what, a, b in parts:
            if old[a:b] != key[a:b]:
                if kind == "input":
                    diffs = [f"input {i}: {_show_key(o)} -> {_show_key(k)}" for i, (o, k) in
                             enumerate(zip(old[a:b], key[a:b])) if o != k]
                    return "shape", "new " + "; ".join(diffs[:3])
                return kind, f"{what} changed"
        return "other", "not cached (evicted)"

    def _compiled_for(self, inputs: tuple, walk=None) -> _Compiled:
        flat_in = pytree.tree_leaves(inputs)
        walk = walk or self._walk()
        key = self._key(flat_in, walk)
        why = None
        # the trace at these exact sizes, then those with symbolic sizes whose pattern fits (their size
        # guards say whether they hold for these sizes)
        for k in (key, *(_generalize(key, dims) for dims in self._patterns if len(dims) == len(flat_in))):
            bucket = self._cache.get(k)
            for comp in reversed(bucket or ()):  # newest first: its reason is the one reported
                now = self._valid(comp, flat_in, walk)
                if now is None:
                    self._cache.move_to_end(k)
                    return comp
                why = why or now
        # a sharded model traces as the plain model it computes (FSDP's hooks aside, whole parameters in)
        with sharded.plain_view(self.module, walk[3]) if walk[3] else contextlib.nullcontext():
            if why is None:
                kind, reason = self._why_new(key)
            else:
                kind, reason = ("shape" if why.startswith("sizes outside") else "guard"), why
            dims = self._dynamic_dims(key, flat_in)
            t0 = time.perf_counter()
            hit = None
            if dims is not None:
                try:
                    hit = self._trace(inputs, flat_in, dynamic=dims)
                    if not hit.graph.program.sizes_hold(flat_in):
                        raise RuntimeError("the trace does not hold for the sizes it was made at")
                except Exception as e:  # noqa: BLE001 - any failure: a trace at these sizes answers instead
                    self._static_only[dims] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
                    log.info("jvpgraph: %s: no trace with symbolic sizes (%s); tracing at fixed sizes", self._name,
                             self._static_only[dims])
                    hit = None
            if hit is not None and hit.graph.program.pinned:
                # the forward read every symbolic size as a number (int(x.shape[0]), a C++ kernel that pins it):
                # the trace holds for these sizes only; kept as a trace at fixed sizes, and no more symbolic ones
                self._static_only[dims] = f"the trace pins its sizes ({hit.graph.program.size_guards()})"
                log.info("jvpgraph: %s: %s; tracing at fixed sizes", self._name, self._static_only[dims])
                self._remember(key, hit, kind, reason, time.perf_counter() - t0)
                return hit
            if hit is not None:
                if dims not in self._patterns:
                    self._patterns.append(dims)
                self._dynamic_traces[dims] += 1
                where = "; ".join(f"input {i} dim {', '.join(map(str, d))}" for i, d in enumerate(dims) if d)
                self._remember(_generalize(key, dims), hit, kind, f"{reason}; symbolic sizes: {where}",
                               time.perf_counter() - t0)
                return hit
            hit = self._trace(inputs, flat_in)
            self._remember(key, hit, kind, reason, time.perf_counter() - t0)
            return hit

    def _dynamic_dims(self, key: tuple, flat_in) -> tuple[tuple[int, ...], ...] | None:
        """The dimensions to trace as symbols for a call that no cached trace answers, or ``None`` (a trace at
        fixed sizes). ``dynamic=True``: every input's first dimension from the first call. Otherwise
        (``None``) a dimension becomes a symbol once a call changes it (``torch.compile``'s automatic dynamic
        shapes): the dimensions in which these sizes differ from those of a cached trace that matches in
        everything else. A size 0 or 1 stays fixed (PyTorch's shape environment specializes them), a
        pattern whose symbolic trace failed is never tried again, and one pattern gets at most two
        symbolic traces (a model whose guards split the sizes into ranges); beyond that, fixed sizes."""
        if self.dynamic is False:
            return None
        n = len(flat_in)
        if self.dynamic is True:
            dims = tuple((0,) if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] >= 2 else ()
                         for t in flat_in)
        else:
            dims = None
            for old in reversed(self._cache):  # the most recently used first
                if len(old) != len(key) or old[n:] != key[n:]:
                    continue
                cand = []
                for o, k in zip(old[:n], key[:n]):
                    if o == k:
                        cand.append(())
                    elif o[0] != "const" and k[0] != "const" and o[1:] == k[1:] and len(o[0]) == len(k[0]):
                        cand.append(tuple(d for d, (a, b) in enumerate(zip(o[0], k[0])) if a != b))
                    else:
                        break
                else:
                    dims = tuple(cand)
                    break
        if dims is None or not any(dims):
            return None
        if any(flat_in[i].shape[d] < 2 for i, ds in enumerate(dims) for d in ds):
            return None
        if dims in self._static_only or self._dynamic_traces[dims] >= 2:
            return None
        return dims

    def _remember(self, key, comp, kind, reason, seconds):
        bucket = self._cache.setdefault(key, [])
        if kind == "guard" and bucket and bucket[-1].graph.program.values is not None:
            bucket.pop()  # a value-specialized trace is replaced, not kept beside the new one
        bucket.append(comp)
        self._cache.move_to_end(key)
        while self._n_cached() > self.cache_size:
            oldest = next(iter(self._cache))
            self._cache[oldest].pop(0)
            if not self._cache[oldest]:
                del self._cache[oldest]
        self.history.append((reason, seconds))
        self._counts[kind] += 1
        if kind != "first":
            log.info("jvpgraph: traced %s again (%.2f s): %s", self._name, seconds, reason)
        repeated = {"guard": "a Python value its forward reads keeps changing",
                    "shape": "its input shapes keep changing"}
        if kind in repeated and self._counts[kind] == 8 and kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"jvpgraph: {self._name} has been traced 8 times because {repeated[kind]} (last: {reason}; "
                f"{seconds:.2f} s per trace). Every answer is still from a trace made for the call, but each costs "
                + ("a trace: keep the value fixed between calls" if kind == "guard" else
                   "a trace: use a fixed batch size (e.g. drop_last=True) or pad the inputs")
                + ". jvpgraph.explain(...) lists the traces and why each was made.", stacklevel=4)

    def _trace(self, inputs, flat_in, dynamic=None) -> _Compiled:
        """A new trace at ``inputs`` (its program, graph, flip); ``dynamic``: the dimensions to keep
        symbolic (any failure raises: the caller traces at fixed sizes instead)."""
        wrt = self.wrt
        if wrt is not None:
            for i in wrt:
                if i >= len(flat_in) or not flat_in[i].is_floating_point():
                    raise ValueError(f"wrt={wrt}: input {i} is not a floating-point tensor input")
        try:
            return trace_and_build(self.f, inputs, lambda prog: _Compiled(Graph(prog, wrt), self.compile),
                                   bn=self.bn, dynamic=dynamic, final=(RuleError,))
        except RuleError:
            if dynamic is None:
                _raise_if_eager_fails(self.f, self._name, inputs)
            raise

    def _state(self, updated: Sequence[str] = (), walk=None) -> list[torch.Tensor]:
        """Parameters and buffers as the trace takes them; the buffers named in ``updated`` as copies."""
        _, params, buffers, _ = walk or self._walk()
        if not updated:
            return [*params, *(b for _, b in buffers)]
        updated = set(updated)
        # autograd saves BatchNorm's running statistics for its backward: whoever writes the forward's new
        # statistics into the model (SpectralRegularizer, like model(x) does) must not bump the versions of
        # the tensors this graph saved, so the forward reads copies (a few numbers per channel)
        return [*params, *(b.detach().clone() if name in updated else b for name, b in buffers)]

    @staticmethod
    def _check_tangents(flat_in, tangents, wrt) -> list[torch.Tensor]:
        ts = pytree.tree_leaves(tangents[0] if len(tangents) == 1 and isinstance(tangents[0], (tuple, list))
                                else tangents, is_leaf=lambda z: z is None)
        if len(ts) == len(wrt) and len(wrt) != len(flat_in):
            ts_by_input = dict(zip(wrt, ts))
        elif len(ts) == len(flat_in):
            ts_by_input = dict(enumerate(ts))
        else:
            raise ValueError(f"got {len(ts)} tangents for {len(flat_in)} inputs ({len(wrt)} differentiable): "
                             "pass one tangent per input (None for an integer input)")
        out = []
        for i, x in enumerate(flat_in):
            t = ts_by_input.get(i)
            if i not in wrt:
                if t is not None:
                    raise ValueError(
                        f"input {i} has dtype {x.dtype} and carries no tangent"
                        + (" (integer inputs are not differentiable)" if not x.is_floating_point() else
                           " (not in wrt)") + "; pass None for it")
                continue
            if t is None:
                t = torch.zeros_like(x)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tangent for input {i} is a {type(t).__name__}, expected a tensor")
            if t.shape != x.shape:
                raise ValueError(f"tangent for input {i} has shape {tuple(t.shape)}, but input {i} has shape "
                                 f"{tuple(x.shape)}: a tangent must have its primal's shape")
            if t.dtype != x.dtype:
                raise ValueError(f"tangent for input {i} has dtype {t.dtype}, but input {i} has dtype {x.dtype}")
            if t.device != x.device:
                raise ValueError(f"tangent for input {i} is on {t.device}, but input {i} is on {x.device}")
            out.append(t)
        return out

    # ------------------------------------------------------------------ public
    @property
    def graph(self) -> Graph:
        """The :class:`Graph` traced at the example inputs (for the model as it is now: traced again if a
        guarded value changed)."""
        return self._current().graph

    @property
    def flipped(self) -> FlippedGraph:
        """The :class:`FlippedGraph` at the example inputs (``.code``, ``.nx``, ``.module``)."""
        return self._current().flipped

    def _current(self) -> _Compiled:
        if self._example is None:  # the module cache keeps no example batch: the most recently used trace
            return self._cache[next(reversed(self._cache))][-1]
        return self._compiled_for(self._example)

    def _run(self, which: str, primals, tangents) -> tuple[_Compiled, Sequence[torch.Tensor]]:
        """The trace for ``primals``' shapes, and its ``joint`` or ``jv`` module run on them."""
        inputs = _as_tuple(primals)
        flat_in = pytree.tree_leaves(inputs)
        walk = self._walk()
        comp = self._compiled_for(inputs, walk)
        ts = self._check_tangents(flat_in, _as_tuple(tangents), comp.graph.wrt)
        return comp, getattr(comp, which)(*self._state(walk=walk), *flat_in, *ts)

    def jvp(self, primals, tangents):
        """``(f(x), J v)`` on a new batch: one pass computing the primal and the tangent together.

        ``primals`` and ``tangents`` are a tensor each, or tuples (one per input, like ``torch.func.jvp``).
        """
        comp, res = self._run("joint", primals, tangents)
        n = comp.n_out
        spec = comp.graph.program.out_spec
        return pytree.tree_unflatten(list(res[:n]), spec), pytree.tree_unflatten(list(res[n:2 * n]), spec)

    def jv(self, primals, tangents):
        """``J v`` alone on a new batch: ``jvp(primals, tangents)[1]``, from a graph pruned to what ``J v``
        needs. The outputs' values are then computed only where the tangent needs them; in the graph of a
        gradient (:class:`jvpgraph.Curvature`'s ``hvp``) that leaves out the primal gradients of the weights.

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
            >>> x, v = torch.randn(5, 3), torch.randn(5, 3)
            >>> t = jvpgraph.trace(net, x)
            >>> torch.testing.assert_close(t.jv(x, v), torch.func.jvp(net, (x,), (v,))[1])
        """
        comp, res = self._run("jv", primals, tangents)
        return pytree.tree_unflatten(list(res), comp.graph.program.out_spec)

    def linearize(self, *inputs, vjp: bool = True) -> Linearized:
        """Run the forward once and record what the tangent pass needs (see :class:`Linearized`).

        With ``vjp=True`` (and gradients enabled) the forward is recorded by autograd with respect to the
        differentiated inputs too, so :meth:`Linearized.vjp` works.
        """
        walk = self._walk()
        comp = self._compiled_for(inputs, walk)
        flat_in = list(pytree.tree_leaves(inputs))
        if vjp and torch.is_grad_enabled():
            for i in comp.graph.wrt:
                if not flat_in[i].requires_grad:
                    flat_in[i] = flat_in[i].detach().requires_grad_(True)
        res = comp.forward(*self._state(comp.flipped.buffer_update_names, walk), *flat_in)
        n, nb = comp.n_out, comp.n_buf
        new_buffers = dict(zip(comp.flipped.buffer_update_names, res[n:n + nb]))
        return Linearized(self, comp, res[:n], new_buffers, res[n + nb:], flat_in, comp.graph.program.out_spec)

    def program(self, *inputs) -> tuple[TracedProgram, list[torch.Tensor]]:
        """The trace that answers a call on ``inputs`` (made now if none is cached, checked by the guards),
        and the values of its placeholders for that call: parameters, buffers, the flattened inputs.

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
            >>> prog, values = jvpgraph.trace(net, torch.randn(4, 3)).program(torch.randn(4, 3))
            >>> prog.param_names, [tuple(v.shape) for v in values]
            (['0.weight', '0.bias'], [(2, 3), (2,), (4, 3)])
            >>> torch.testing.assert_close(prog.gm(*values)[0], net(values[-1]))
        """
        graph, values = self.graph_for(*inputs)
        return graph.program, values

    def graph_for(self, *inputs) -> tuple[Graph, list[torch.Tensor]]:
        """:meth:`program`, as the :class:`Graph` built on it: the graph that answers a call on ``inputs``,
        and its placeholders' values for that call (parameters, buffers, the flattened inputs).

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
            >>> graph, values = jvpgraph.trace(net, torch.randn(4, 3)).graph_for(torch.randn(5, 3))
            >>> [n.name for n in graph.program.placeholders], len(values)
            (['p__0_weight', 'p__0_bias', 'x'], 3)
        """
        walk = self._walk()
        comp = self._compiled_for(inputs, walk)
        return comp.graph, [*self._state(walk=walk), *pytree.tree_leaves(inputs)]

    def __call__(self, *inputs):
        """The primal output only (through the recorded-forward module)."""
        return self.linearize(*inputs, vjp=False).out

    def explain(self) -> str:
        """What is cached and why each trace was made (newest last), as text.

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))
            >>> g = jvpgraph.trace(net, torch.randn(4, 3))
            >>> net[1].p = 0.1
            >>> _ = g.jvp(torch.randn(4, 3), torch.randn(4, 3))
            >>> print(g.explain())  # doctest: +ELLIPSIS
            Traced(Sequential, bn='batch'): 2 trace(s) cached (at most 8), 2 made
              cached: inputs (4, 3) float32 cpu; ... guarded reads
              cached: inputs (4, 3) float32 cpu; ... guarded reads
              trace 1 (... s): first call
              trace 2 (... s): model.1.p changed: 0.5 -> 0.1
        """
        lines = [f"Traced({self._name}, bn={self.bn!r}): {self._n_cached()} trace(s) cached (at most {self.cache_size}), "
                 f"{sum(self._counts.values())} made"]
        for key, bucket in self._cache.items():
            shapes = ", ".join(_show_key(k) for k in key[:-4])
            for comp in bucket:
                prog = comp.graph.program
                extra = "; specialized to values" if prog.values is not None else ""
                extra += f"; sizes: {prog.size_guards() or 'any'}" if prog.dynamic is not None else ""
                lines.append(f"  cached: inputs {shapes}; {len(comp.graph.program.guards)} guarded reads{extra}")
        first = sum(self._counts.values()) - len(self.history) + 1
        lines += [f"  trace {first + i} ({sec:.2f} s): {reason}" for i, (reason, sec) in enumerate(self.history)]
        return "\n".join(lines)

    def _n_cached(self) -> int:
        return sum(len(b) for b in self._cache.values())

    def __repr__(self):
        return f"Traced({self._name}, bn={self.bn!r}, {self._n_cached()} trace(s))"


def _raise_if_eager_fails(f, name: str, inputs) -> None:
    """A rule that meets values eager PyTorch would refuse (a float32 input to a float64 model: fake tensors
    let the trace through) reports it as a rule bug; say what is true instead, when eager raises too."""
    eager = _eager_error(f, inputs)
    if eager is None:
        return
    hint = ""
    if isinstance(f, nn.Module):
        floats = {p.dtype for p in f.parameters() if p.is_floating_point()}
        ins = [(i, x.dtype) for i, x in enumerate(pytree.tree_leaves(inputs))
               if isinstance(x, torch.Tensor) and x.is_floating_point()]
        odd = [(i, d) for i, d in ins if len(floats) == 1 and d not in floats]
        if odd:
            (want,) = floats
            hint = (f"\n  input {odd[0][0]} is {odd[0][1]} but {name}'s parameters are {want}: pass "
                    f"x.to({want}) (or convert the model with .to({odd[0][1]}))")
    raise TraceError(f"{name} raises on these inputs in eager mode too (jvpgraph ran it to check): "
                     f"{type(eager).__name__}: {str(eager).splitlines()[0][:300]}{hint}") from eager


def _generalize(key: tuple, dims) -> tuple:
    """``key`` with the input sizes in ``dims`` (per input, the dimensions) replaced by ``None``: the key of
    a trace with those sizes symbolic."""
    n = len(dims)
    return tuple((tuple(None if d in ds else s for d, s in enumerate(k[0])), *k[1:]) if ds else k
                 for k, ds in zip(key[:n], dims)) + key[n:]


def _show_key(k) -> str:
    if isinstance(k, tuple) and len(k) == 4 and isinstance(k[1], torch.dtype):
        sizes = ["*" if d is None else str(d) for d in k[0]]
        return (f"({', '.join(sizes)}{',' if len(k[0]) == 1 else ''}) {str(k[1]).replace('torch.', '')} {k[2]}"
                + ("" if k[3] else " non-contiguous"))
    return repr(k[1]) if isinstance(k, tuple) and k and k[0] == "const" else repr(k)


def trace(f: Callable, *example_inputs, bn: str = "batch", wrt: Sequence[int] | None = None,
          compile: bool | dict = False, cache_size: int = 8, dynamic: bool | None = None) -> Traced:
    """Trace ``f`` (an ``nn.Module`` or function) once at ``example_inputs``; returns a :class:`Traced`
    (``bn``, ``wrt``, ``compile``, ``cache_size``, ``dynamic``: see there).

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> g = jvpgraph.trace(net, torch.randn(4, 3))
        >>> x, v = torch.randn(4, 3), torch.randn(4, 3)
        >>> out, jv = g.jvp(x, v)
        >>> torch.testing.assert_close(jv, torch.func.jvp(net, (x,), (v,))[1])
        >>> print(g.flipped.code.strip().splitlines()[0])
        def forward(self, p__0_weight, p__0_bias, p__2_weight, p__2_bias, x, v):
    """
    return Traced(f, example_inputs, bn=bn, wrt=wrt, compile=compile, cache_size=cache_size, dynamic=dynamic)


_MODULE_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Traced]]" = weakref.WeakKeyDictionary()


def _uncompiled(f):
    """What ``torch.compile`` wrapped (``OptimizedModule._orig_mod``, a compiled function's original): the
    same parameters and computation; make_fx cannot trace through Dynamo's frame (pass ``compile=True`` to
    run jvpgraph's own graph under torch.compile)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # loaded if the user compiled anything
    if dynamo is not None and isinstance(f, dynamo.OptimizedModule):
        return _uncompiled(f._orig_mod)
    return getattr(f, "_torchdynamo_orig_callable", f) if not isinstance(f, nn.Module) else f


def cached_trace(f: Callable, *example_inputs, bn: str = "batch", compile: bool | dict = False) -> Traced:
    """The :class:`Traced` that :func:`jvp`, :func:`linearize`, :func:`vjp`, :func:`jvpgraph.spectral_norm` and
    the regularizers share for the model ``f`` with these ``bn`` and ``compile`` settings: made at
    ``example_inputs`` on the first call, then the same object (it traces again by itself when a call needs
    it). The cache holds it weakly to the model: dropping the model frees both; it keeps no example batch. A
    function (not a module) may close over anything and gets a new :class:`Traced` on each call.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
        >>> x, v = torch.randn(4, 3), torch.randn(4, 3)
        >>> _ = jvpgraph.jvp(net, (x,), (v,))
        >>> t = jvpgraph.cached_trace(net, x)
        >>> t is jvpgraph.cached_trace(net, torch.randn(7, 3)), len(t.history)  # the trace jvp made
        (True, 1)
        >>> torch.testing.assert_close(t.jv(x, v), jvpgraph.jvp(net, (x,), (v,))[1])
    """
    f = _uncompiled(f)
    if isinstance(f, nn.Module):
        per = _MODULE_CACHE.setdefault(f, {})
        key = (bn, repr(compile))
        t = per.get(key)
        if t is None:
            t = per[key] = Traced(f, example_inputs, bn=bn, compile=compile, _weak=True)
        return t
    return Traced(f, example_inputs, bn=bn, compile=compile)  # a function may close over anything: trace it afresh


def explain(model: nn.Module | Traced) -> str:
    """What jvpgraph has cached for ``model`` (the traces behind ``jvp``, ``linearize``, ``vjp``,
    ``spectral_norm`` and the regularizers) and why each trace was made; for a :class:`Traced`, its
    :meth:`Traced.explain`. Re-traces are also logged at INFO level on the ``"jvpgraph"`` logger.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
        >>> for batch in (4, 4, 5):
        ...     _ = jvpgraph.jvp(net, (torch.randn(batch, 3),), (torch.randn(batch, 3),))
        >>> print(jvpgraph.explain(net))  # doctest: +ELLIPSIS
        Traced(Sequential, bn='batch'): 2 trace(s) cached (at most 8), 2 made
          cached: inputs (4, 3) float32 cpu; ... guarded reads
          cached: inputs (*, 3) float32 cpu; ... guarded reads; sizes: 2 <= input0.size(0)
          trace 1 (... s): first call
          trace 2 (... s): new input 0: (4, 3) float32 cpu -> (5, 3) float32 cpu; symbolic sizes: input 0 dim 0
    """
    if isinstance(model, Traced):
        return model.explain()
    if not isinstance(model, nn.Module):
        raise TypeError(f"jvpgraph.explain expects an nn.Module or a Traced, got {type(model).__name__} "
                        "(functions are traced afresh on each call: nothing is cached for them)")
    per = _MODULE_CACHE.get(model, {})
    if not per:
        return f"{type(model).__name__}: nothing traced yet"
    return "\n".join(t.explain() for t in per.values())


def jvp(f: Callable, primals, tangents, *, bn: str = "batch"):
    """``(f(*primals), J v)`` like ``torch.func.jvp``, through the flipped graph.

    Works where ``torch.func.jvp`` raises: BatchNorm in train mode (running-statistic updates are kept out
    of the graph and never written), attention kernels without forward AD, custom ``autograd.Function``
    with only a backward. Traces of an ``nn.Module`` are cached per shape; functions are traced per call.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sigmoid()).train()
        >>> x, v = torch.randn(6, 3), torch.randn(6, 3)
        >>> out, jv = jvpgraph.jvp(net, (x,), (v,))
        >>> ref = torch.autograd.functional.jvp(net, x, v)[1]
        >>> torch.testing.assert_close(jv, ref)
    """
    primals = _as_tuple(primals)
    return cached_trace(f, *primals, bn=bn).jvp(primals, _as_tuple(tangents))


def linearize(f: Callable, *primals, bn: str = "batch"):
    """``(f(*primals), jvp_fn)`` like ``torch.func.linearize``; ``jvp_fn(*tangents)`` reuses the forward.

    Example:
        >>> import torch, jvpgraph
        >>> out, jvp_fn = jvpgraph.linearize(torch.sin, torch.tensor([0.0, 1.0]))
        >>> torch.testing.assert_close(jvp_fn(torch.ones(2)), torch.cos(torch.tensor([0.0, 1.0])))
    """
    lin = cached_trace(f, *primals, bn=bn).linearize(*primals, vjp=False)
    return lin.out, lin.jvp


def vjp(f: Callable, *primals, bn: str = "batch"):
    """``(f(*primals), vjp_fn)`` like ``torch.func.vjp``; ``vjp_fn(u)`` returns a tuple, one per input.

    Example:
        >>> import torch, jvpgraph
        >>> out, vjp_fn = jvpgraph.vjp(torch.sin, torch.tensor([0.0, 1.0]))
        >>> torch.testing.assert_close(vjp_fn(torch.ones(2))[0], torch.cos(torch.tensor([0.0, 1.0])))
    """
    with torch.enable_grad():
        lin = cached_trace(f, *primals, bn=bn).linearize(*primals, vjp=True)

    def vjp_fn(*cotangents):
        g = lin.vjp(*cotangents)
        return g if isinstance(g, tuple) else (g,)

    return lin.out, vjp_fn
