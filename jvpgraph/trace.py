"""Tracing: a module or function -> a functional, aten-level ``torch.fx`` graph.

We use ``make_fx`` over ``torch.func.functionalize`` with fake tensors:

* **aten level, functional.** Every node is an ``OpOverload`` with no in-place effects, so each one has
  a well-defined local Jacobian. In-place ops (``relu_``, ``add_``) become their functional versions.
* **Parameters and buffers are graph inputs.** The model is called through ``functional_call``, so one
  trace serves new batches *and* new parameter values after optimizer steps.
* **BatchNorm's running statistics** are updated in place by ``aten.native_batch_norm``; a small
  decomposition turns that into ``_native_batch_norm_legit_functional`` whose new statistics come out as
  values. The trailing ``copy_`` into the buffers is removed from the graph and kept as
  :attr:`TracedProgram.buffer_updates`, so executing the graph never changes the model.
* **Fake tensors refuse Python control flow on tensor values** (``if x.sum() > 0``): a real-mode trace
  would silently specialize on the example batch and be wrong on the next one. We raise a clear error
  instead. Shapes are specialized: callers key traces on shapes and re-trace on new ones.
* **Custom ``autograd.Function`` stays opaque.** An aten trace would see through it to the ops of its
  forward and lose its backward (a straight-through ``round`` would get Jv = 0). While tracing, user
  Functions are routed to the custom op ``jvpgraph::autograd_function`` whose autograd formula is the
  Function's own backward.

Why not ``torch.export``: it goes through TorchDynamo (slow to trace, more models it refuses, graph breaks
are errors) and gives us nothing here that fake-tensor ``make_fx`` does not: we need a flat aten graph of
one call with shapes, and we guard shapes ourselves.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import itertools
import logging
import operator
import re
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, get_proxy_mode, make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import (TorchDispatchMode, _disable_current_modes,
                                          _get_current_dispatch_mode_stack)

from .batchnorm import BN_MODES, check_mode, stamp, tracing_state
from .guards import Guards, function_roots, watch
from .ops import OPAQUE, ORIG_APPLY, autograd_function, forward_only
from .owned import collecting, own

log = logging.getLogger("jvpgraph")

aten = torch.ops.aten

__all__ = ["TraceError", "TracedProgram", "trace_program", "BN_MODES"]



class TraceError(RuntimeError):
    """The model could not be traced; the message says where and what to do."""


# --------------------------------------------------------------------------------------------------
# BatchNorm: make the running-statistic update functional.
# --------------------------------------------------------------------------------------------------
def _functional_native_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps):
    if training and running_mean is not None and running_var is not None:
        out, mean, invstd, new_mean, new_var = aten._native_batch_norm_legit_functional(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
        return out, mean, invstd
    return NotImplemented


def _ctc_loss_tensor_lengths(log_probs, targets, input_lengths, target_lengths, *args, **kwargs):
    # With lengths as lists, the C++ composite builds a tensor from them with a raw copy that tracing does
    # not see (the graph would divide by an uninitialized tensor): pass them as tensor constants instead.
    def as_tensor(lengths):
        if isinstance(lengths, torch.Tensor):
            return lengths
        return torch.tensor(list(lengths), dtype=torch.long, device=log_probs.device)

    return torch.nn.functional.ctc_loss(log_probs, targets, as_tensor(input_lengths), as_tensor(target_lengths),
                                        *args, **kwargs)


_DECOMPOSITIONS = {aten.native_batch_norm.default: _functional_native_batch_norm}
#: torch-level functions rewritten while tracing, before their C++ composite runs (it is
#: CompositeImplicitAutograd: a decomposition table never sees it)
_F_LINEAR = torch.nn.functional.linear


def _linear_symbolic(input, weight, bias=None):
    """``F.linear`` of an input with 3 or more dimensions and symbolic sizes, as PyTorch's own kernel computes
    it (flatten, ``addmm``, unflatten), in ops that keep the sizes symbolic: traced under
    ``torch.func.functionalize``, PyTorch's C++ kernel pins the batch size to the example's (a guard
    ``Eq(s0, 2)``: correct, but a trace per batch size for every transformer)."""
    if input.dim() < 3 or not any(isinstance(s, torch.SymInt) for s in input.shape):
        return _F_LINEAR(input, weight, bias)
    flat = input.reshape(-1, input.shape[-1])
    out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
    return out.reshape(*input.shape[:-1], out.shape[-1])


_TORCH_REWRITES = {torch.nn.functional.ctc_loss: _ctc_loss_tensor_lengths, _F_LINEAR: _linear_symbolic}


def _is_user_function(cls) -> bool:
    mod = getattr(cls, "__module__", "") or ""
    return not (mod.startswith("torch.") or mod == "torch")


def _inline_forward(cls, *args):
    return forward_only(cls, args)


def _inline_checkpoint(cls, run_function, preserve_rng_state, *args):
    return run_function(*args)


#: torch-internal Functions that are traced *through* instead of kept opaque, because their backward is the
#: true derivative of what they compute, so autograd's own derivative of the inlined ops is the same map:
#: * ``ModIndex`` (``TransformGetItemToIndex`` turns ``t[i]`` into it; transformers builds its attention masks
#:   that way under ``vmap``): forward ``aten.index``, backward its scatter. Opaque, it would run once per
#:   element of the vmapped mask (B*H*L*L calls).
#: * the reentrant ``torch.utils.checkpoint`` (``use_reentrant=True``; Hugging Face's
#:   ``gradient_checkpointing_enable()``): forward runs ``run_function`` under ``no_grad``, backward re-runs
#:   it with grad and differentiates that, so its derivative is ``run_function``'s: inlined as the call
#:   ``run_function(*args)`` (an opaque node could not see the parameters ``run_function`` closes over).
#:   The one call draws random numbers once; the checkpoint's recomputation replays the same draws.
#: Other torch-internal Functions are kept opaque as user Functions are (their own backward, always right).
_INLINED = {
    "torch._dynamo._trace_wrapped_higher_order_op.ModIndex": _inline_forward,
    "torch.utils.checkpoint.CheckpointFunction": _inline_checkpoint,
}


def _positional(cls, args, kwargs) -> tuple:
    """``F.apply(x, k=1)``: keyword arguments bound to ``forward``'s positions (the opaque op takes a flat list)."""
    import inspect

    if not kwargs:
        return args
    old_style = cls.setup_context is torch.autograd.Function.setup_context
    sig = inspect.signature(cls.forward)
    bound = sig.bind(*((None,) if old_style else ()), *args, **kwargs)
    bound.apply_defaults()
    if bound.kwargs:
        raise TypeError(f"{cls.__qualname__}.apply: keyword-only arguments {sorted(bound.kwargs)} cannot be "
                        "traced; pass them positionally")
    return bound.args[1:] if old_style else bound.args


@contextlib.contextmanager
def _opaque_autograd_functions():
    """While tracing, route ``autograd.Function`` calls: user Functions (and torch-internal ones not listed in
    :data:`_INLINED`) to the opaque custom op, the listed torch-internal ones inlined.

    Under a functorch transform (our ``functionalize``, a ``vmap`` inside the model) PyTorch's
    ``Function.apply`` hands every call to ``torch.autograd.function._call_custom_function_call``, whose
    functionalize rule is not implemented ("NYI: Functionalize rule for custom_function_call"): no
    Function may reach it. Replacing that hook catches ``F.apply`` however it was bound (``ste = STE.apply``
    before tracing included). Old-style Functions (``forward(ctx, ...)``) are refused before that hook, so
    ``Function.apply`` itself is replaced too (which catches them when ``F.apply`` is looked up at call
    time). Under ``vmap`` the opaque op runs per slice (:func:`_opaque_vmap`).
    """
    import torch.autograd.function as function_mod

    # torch 2.14: apply calls _call_custom_function_call(cls, args, kwargs); older: custom_function_call(cls,
    # *args, **kwargs)
    packed = hasattr(function_mod, "_call_custom_function_call")
    hook = "_call_custom_function_call" if packed else "custom_function_call"
    orig = getattr(function_mod, hook)

    def route(cls, args, kwargs):
        inline = _INLINED.get(f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}")
        if not torch._C._are_functorch_transforms_active() and (inline is not None or not _is_user_function(cls)):
            return ORIG_APPLY.__get__(None, cls)(*args, **kwargs)
        if inline is not None:
            return inline(cls, *args, **kwargs)
        args = _positional(cls, args, kwargs)
        flat, spec = pytree.tree_flatten(args)
        tpos = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]

        tensors = [flat[i] for i in tpos]
        # the tensor slots are filled at every call: keep only the rest (a trace's tensors die with it)
        skeleton = [None if isinstance(a, torch.Tensor) else a for a in flat]

        def rebuild(tensors, skeleton=skeleton, spec=spec, tpos=tpos):
            items = list(skeleton)
            for i, t in zip(tpos, tensors):
                items[i] = t
            return pytree.tree_unflatten(items, spec)

        key = OPAQUE.add((cls, rebuild))
        with disable_proxy_modes_tracing(), torch.no_grad():  # learn the output structure, record nothing
            single = isinstance(forward_only(cls, rebuild(tensors)), torch.Tensor)
        outs = autograd_function(tensors, key)
        return outs[0] if single else tuple(outs)

    def route_unpacked(cls, *args, **kwargs):
        return route(cls, args, kwargs)

    setattr(function_mod, hook, route if packed else route_unpacked)
    # old-style Functions (forward(ctx, ...)) are refused by apply before that hook: catch F.apply too
    torch.autograd.Function.apply = classmethod(route_unpacked)
    try:
        yield
    finally:
        setattr(function_mod, hook, orig)
        torch.autograd.Function.apply = ORIG_APPLY


# --------------------------------------------------------------------------------------------------
# Grad mode: ops run under torch.no_grad() (or on detached values) are constants for autograd
# --------------------------------------------------------------------------------------------------
GRAD_META = "jvpgraph_grad_enabled"  # keys in node.meta["custom"]
MODULE_META = "jvpgraph_module"


def module_of(node: fx.Node) -> str:
    """Qualified name of the innermost ``nn.Module`` whose forward produced ``node`` ("" at top level)."""
    return node.meta.get("custom", {}).get(MODULE_META, "")


def grad_enabled(node: fx.Node) -> bool:
    """Whether ``node`` ran with gradients enabled in the user's code (``False``: a constant for Jv)."""
    return node.meta.get("custom", {}).get(GRAD_META, True)


class _SampleGradMode(TorchFunctionMode):
    """Samples ``torch.is_grad_enabled()`` at every torch-level call of the user's code, before PyTorch's
    kernels run their own internal guards."""

    def __init__(self, box):
        super().__init__()
        self.box = box

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.box[0] = torch.is_grad_enabled()
        out = _TORCH_REWRITES.get(func, func)(*args, **(kwargs or {}))
        return _lift_constants(out) if _LIFT_CONSTANTS.get() else out


#: set for a second trace after functionalization refused to write a traced value into a tensor computed from
#: constants only (see :func:`_lift_constants`)
_LIFT_CONSTANTS = contextvars.ContextVar("jvpgraph_lift_constants", default=False)
_NON_FUNCTIONAL_WRITE = "mutating a non-functional tensor with a functional tensor"


def _lift_constants(out):
    """Make fresh tensors computed from constants only (tensors the function closes over: ``lengths`` in
    ``lambda x: model(x, lengths)``) functional tensors of the trace's functionalization.

    Functionalization wraps the traced function's inputs only; an op whose inputs are all constants returns an
    ordinary tensor, and a later in-place write of a traced value into it is refused ("mutating a
    non-functional tensor with a functional tensor": ``pack_padded_sequence``'s ``invert_permutation``
    scatters ``arange`` into ``empty_like(sorted_indices)``). Lifted, the write is functionalized like any
    other. Values are unchanged; views (which share memory with the caller's tensor) and tensors that require
    grad (a closed-over model's parameters) are left alone, so this only runs for a second trace after that
    refusal.
    """
    interp = torch._C._functorch.peek_interpreter_stack()
    if interp is None or interp.key() != torch._C._functorch.TransformType.Functionalize:
        return out
    level = interp.level()

    def lift(t):
        if (isinstance(t, torch.Tensor) and not t.requires_grad and not torch._is_functional_tensor(t)
                and not t._is_view() and not isinstance(t, nn.Parameter)):
            return torch._C._functorch._wrap_functional_tensor(t, level)
        return t

    return pytree.tree_map(lift, out)


class _RecordGradMode(TorchDispatchMode):
    """Marks every node the tracer records with the grad mode of the user's call that produced it.

    An aten graph loses ``torch.no_grad()`` blocks (``nn.utils.spectral_norm``'s power iteration, weight
    standardization statistics, ...); autograd treats their results as constants, and so must Jv. Guards
    inside PyTorch's kernels must not cut paths (custom ops run their kernels without grad;
    ``cosine_similarity`` clamps in place under a guard, which autograd sees as the identity), so the
    mode is sampled at the torch-function level (:class:`_SampleGradMode`), not at dispatch.
    """

    def __init__(self, box, modules):
        super().__init__()
        self.box = box
        self.modules = modules  # stack of qualified module names, kept by forward hooks

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        mode = get_proxy_mode()
        graph = mode.tracer.graph if mode is not None else None
        last = next(iter(reversed(graph.nodes))) if graph is not None else None
        out = func(*args, **(kwargs or {}))
        if graph is not None:
            enabled = self.box[0] or func.namespace not in ("aten", "prims")
            node = next(iter(reversed(graph.nodes)))
            while node is not last and node.op != "root":
                if GRAD_META not in node.meta.get("custom", {}):
                    node.meta["custom"] = {**node.meta.get("custom", {}), GRAD_META: enabled,
                                           MODULE_META: self.modules[-1] if self.modules else ""}
                node = node.prev
        return out


# --------------------------------------------------------------------------------------------------
# The traced program
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TracedProgram:
    """A functional aten graph of one call plus how its inputs and outputs map to the user's.

    Placeholders, in order: parameters (``param_names``), buffers (``buffer_names``), then the flattened
    user inputs. ``diff_inputs`` are the indices (into the user inputs) that carry a tangent: the
    floating-point tensors. Outputs are the flattened user outputs (``out_spec`` rebuilds them).
    """

    gm: fx.GraphModule
    param_names: list[str]
    buffer_names: list[str]
    n_inputs: int
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    diff_inputs: list[int]
    buffer_updates: dict[str, fx.Node]
    bn: str
    #: For a trace specialized to values (data-dependent shapes or branches): the placeholders' values it was
    #: traced at (parameters, buffers, inputs). ``None`` for an ordinary trace, valid for any values.
    values: list[torch.Tensor] | None = None
    #: The Python-level reads the trace baked in (attributes, flags, hooks): :meth:`Guards.check` says whether
    #: they still hold before the trace answers another call.
    guards: Guards = dataclasses.field(default_factory=lambda: Guards([]))
    #: For a trace with symbolic sizes: per user input, the dimensions traced as a symbol (any size >= 2;
    #: :meth:`sizes_hold` checks the rest of what the trace assumed about them). ``None``: every size is fixed.
    dynamic: tuple[tuple[int, ...], ...] | None = None

    #: For a trace specialized to values: whether a value it read (``.item()``, a Python branch) depends on a
    #: random draw (OPT's LayerDrop: ``if torch.rand([]) < p``; MoE routing after dropout). The next call draws
    #: other numbers, so the trace answers only the call it was made in.
    reads_random: bool = False

    _size_check: Any = dataclasses.field(default=None, repr=False, compare=False)

    def sizes_hold(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Whether a trace with symbolic sizes (:attr:`dynamic`) holds for ``inputs`` (the flattened user
        inputs): what it assumed about its symbols (a size >= 2, two sizes equal, a size divisible by the
        heads) is true of their sizes. Always true for a trace at fixed sizes (the cache key has them).
        The shape environment's guards are read once, after the flipped graph was emitted on the same
        symbols (its assumptions count too), and compiled to one expression."""
        if self.dynamic is None:
            return True
        return self._sizes_check()(inputs)

    def _sizes_check(self) -> Callable:
        return self._size_guards()[0]

    def _size_guards(self) -> tuple[Callable, str]:
        """``(check, expression)``: the shape environment's guards on the inputs, compiled once."""
        if self._size_check is None:
            from torch._dynamo.source import LocalSource
            from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

            offset = len(self.param_names) + len(self.buffer_names)
            vals = [n.meta["val"] for n in self.input_nodes]
            env = next(v.fake_mode.shape_env for v in vals if hasattr(v, "fake_mode"))
            # the inputs' sizes only (the parameters' are fixed, in the cache key); ignore_static=False: a symbol
            # the trace pinned to a number (int(x.shape[0]) pins it: Eq(s0, 2)) is a static size by then, and
            # must still be checked
            guards = env.produce_guards(vals, [LocalSource(f"t{offset + i}") for i in range(len(vals))],
                                        ignore_static=False)
            expr = " and ".join(g for g in guards if not self._fixed_by_key(g, offset))
            if not expr:
                self._size_check = (lambda inputs: True), ""
            else:
                code = compile(expr, "<jvpgraph size guards>", "eval")
                used = sorted({int(i) for i in re.findall(r"L\['t(\d+)'\]", expr)})
                self._size_check = (lambda inputs: bool(eval(code, SYMPY_INTERP, {  # noqa: S307 - our own code
                    "L": {f"t{i}": inputs[i - offset] for i in used}}))), expr
        return self._size_check

    @property
    def pinned(self) -> bool:
        """Whether the trace assumes every symbolic size equal to a number (the forward read it as one:
        ``int(x.shape[0])``): a trace with symbolic sizes that holds for these sizes only."""
        if self.dynamic is None:
            return False
        vals = [n.meta["val"] for n in self.input_nodes]
        env = next(v.fake_mode.shape_env for v in vals if hasattr(v, "fake_mode"))
        sizes = [vals[i].shape[d] for i, ds in enumerate(self.dynamic) for d in ds]
        return all(not isinstance(s, torch.SymInt) or env.replace(s.node.expr).is_number for s in sizes)

    def _fixed_by_key(self, guard: str, offset: int) -> bool:
        """Whether ``guard`` says only what a trace at fixed sizes assumes too, unchecked there: a size the
        cache key holds (a dimension not traced as a symbol), or a constant stride or storage offset."""
        m = re.fullmatch(r"L\['t(\d+)'\]\.(size\(\)\[(\d+)\]|stride\(\)\[\d+\]|storage_offset\(\)) == -?\d+", guard)
        if m is None:
            return False
        return m[3] is None or int(m[3]) not in self.dynamic[int(m[1]) - offset]

    def size_guards(self) -> str:
        """What a trace with symbolic sizes assumes about them, readable: ``"2 <= input0.size(0)"``
        (``""`` for fixed sizes or no assumption)."""
        if self.dynamic is None:
            return ""
        offset = len(self.param_names) + len(self.buffer_names)
        expr = self._size_guards()[1]
        return re.sub(r"L\['t(\d+)'\]\.(size|stride)\(\)\[(\d+)\]",
                      lambda m: f"input{int(m[1]) - offset}.{m[2]}({m[3]})", expr)

    @property
    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    @property
    def input_nodes(self) -> list[fx.Node]:
        ph = self.placeholders
        return ph[len(self.param_names) + len(self.buffer_names):]

    @property
    def output_nodes(self) -> list[Any]:
        out = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")
        return list(out.args[0])


def _sanitize(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    return name if name and not name[0].isdigit() else "_" + name


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the traceback in the model's code (not torch's, not jvpgraph's)."""
    import traceback

    def model_code(f):
        if "/jvpgraph/experiments/" in f.filename:  # jvpgraph's own example models are a user's models here
            return True
        return not (f.filename.startswith("<") or "/torch/" in f.filename or "/jvpgraph/" in f.filename
                    or "/functorch/" in f.filename)

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if model_code(f)]
    if not frames:
        # no line of the model's own code (a model made of PyTorch's modules, a torch function traced as it
        # is): the innermost call above the tracing machinery says where, if there is one
        inner = _construct(exc)
        return inner if inner.startswith("<") else inner + "\n    (PyTorch's code: no line of the model's own)"
    f = frames[-1]
    return f'File "{f.filename}", line {f.lineno}, in {f.name}\n    {f.line}'


_MACHINERY = ("/torch/fx/", "/torch/_subclasses/", "/torch/_functorch/", "/torch/_ops.py", "/torch/_prims",
              "/torch/_refs/", "/torch/_decomp/", "/torch/overrides.py", "/torch/utils/_python_dispatch.py",
              "/torch/_library/", "/torch/_higher_order_ops/", "/torch/utils/_stats.py", "/torch/_guards.py",
              "/torch/_compile.py", "/torch/_dynamo/eval_frame.py", "/torch/autograd/function.py")


def _construct(exc: BaseException) -> str:
    """The innermost frame of the traceback above the tracing machinery: the torch (or model) call that the
    trace could not follow (``torch.zeros(...)`` in ``nn.GRU.forward``), where :func:`_user_frame` is the
    model's line that led there."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not (f.filename.startswith("<") or "/jvpgraph/" in f.filename
                      or any(m in f.filename for m in _MACHINERY))]
    if not frames:
        return "<unknown location>"
    f = frames[-1]
    return f'File "{f.filename}", line {f.lineno}, in {f.name}\n    {f.line}'


def _raised_by_jvpgraph(exc: BaseException) -> bool:
    """Did jvpgraph's own code refuse (a ``TypeError``/``ValueError`` raised in jvpgraph, not in the model or in
    PyTorch under it)?"""
    if not isinstance(exc, (TypeError, ValueError)):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "/jvpgraph/" in tb.tb_frame.f_code.co_filename


def _eager_error(f: Callable, inputs: tuple) -> BaseException | None:
    """Run ``f(*inputs)`` eagerly as the trace ran it (gradients on, floating-point inputs requiring grad) on
    copies of the inputs, and return what it raised (``None``: it runs). The model is left as it was: the
    values of its parameters, buffers and tensor attributes (BatchNorm's running statistics in train mode; for a
    function, the tensors it closes over), its Python attributes
    (training flags and caches: :func:`jvpgraph.guards.watch` puts them back) and the global RNG (forked)."""
    roots = [f] if isinstance(f, nn.Module) else function_roots(f)
    tensors: dict[int, torch.Tensor] = {}
    reached = [v for root in roots for m in root.modules()
               for v in itertools.chain(m._parameters.values(), m._buffers.values(), vars(m).values())]
    if not isinstance(f, nn.Module):  # tensors a function closes over or names as globals
        fn = getattr(f, "__func__", f)
        if isinstance(fn, functools.partial):
            reached += [*fn.args, *fn.keywords.values()]
            fn = fn.func
        code = getattr(fn, "__code__", None)
        if code is not None:
            for cell in fn.__closure__ or ():
                with contextlib.suppress(ValueError):
                    reached.append(cell.cell_contents)
            reached += [*(fn.__defaults__ or ()), *(fn.__globals__.get(n) for n in code.co_names)]
    for v in reached:
        if isinstance(v, torch.Tensor):
            tensors.setdefault(id(v), v)
    saved = [(t, t._version, t.requires_grad, t.detach().clone()) for t in tensors.values()]
    args = pytree.tree_map(lambda a: a.detach().clone().requires_grad_(a.is_floating_point() or a.is_complex())
                           if isinstance(a, torch.Tensor) else a, inputs)
    try:
        with forked_rng(), torch.enable_grad(), watch(roots):
            f(*args)
    except Exception as e:  # noqa: BLE001 - the answer, not a failure
        if not isinstance(f, nn.Module) or \
                not type(e).__module__.startswith(("torch._dynamo", "torch._higher_order_ops")):
            return e
        # torch.cond and other higher-order ops compile their branches with Dynamo, which cannot follow the
        # recording classes `watch` gives the modules: ask again on a copy of the model, unwatched
        try:
            twin = copy.deepcopy(f)
        except Exception:  # noqa: BLE001 - no copy: the first answer stands
            return e
        try:
            with forked_rng(), torch.enable_grad():
                twin(*args)
        except Exception as again:  # noqa: BLE001
            return again
    finally:
        with torch.no_grad():
            for t, version, requires_grad, value in saved:
                # written in place (BatchNorm's kernel writes its running statistics without bumping the version
                # counter; a tensor left alone is not written: guards compare versions)
                if t._version != version or not torch.equal(t, value):
                    t.copy_(value)
                    if t.requires_grad and not requires_grad:  # a value that required grad was copied in
                        t.detach_()
    return None


@contextlib.contextmanager
def _module_hooks(module: nn.Module | None, stack: list[str]):
    """Keep ``stack`` = the qualified names of the modules whose forward is running."""
    if module is None:
        yield
        return
    names = {id(m): n for n, m in module.named_modules()}

    def pre(mod, args):
        stack.append(names.get(id(mod), type(mod).__name__))

    def post(mod, args, out):
        if stack:
            stack.pop()

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def _is_view(n: fx.Node) -> bool:
    """Does ``n`` return a view of its first argument (alias annotation without a write: view, slice,
    unsqueeze, split's pieces...)?"""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.target is operator.getitem:
        return _is_view(n.args[0])
    if not isinstance(n.target, torch._ops.OpOverload) or not n.target._schema.arguments:
        return False
    info = n.target._schema.arguments[0].alias_info
    return info is not None and not info.is_write


def _drop_writes_into_constants(graph: fx.Graph, f) -> None:
    """Drop in-place writes (``copy_``, ``add_``) into a tensor the function closes over, or one computed from
    such tensors only, that nothing reads afterwards: the running statistics and ``num_batches_tracked`` of a
    BatchNorm in train mode that ``lambda x: loss(net(x))`` calls (otherwise written on every call of the
    emitted graph), and an InstanceNorm's, which writes into a ``repeat`` of them and then through an
    ``alias``. Like a module's own buffer updates, jvpgraph does not write them (outputs and Jv are
    unaffected); left in the graph, the write would stop functionalization ("mutating a non-functional tensor
    with a functional tensor", a PyTorch internal assert). Repeated until none is left: dropping one write
    leaves the computation of its value dead, and that may free an earlier write."""
    warned = False
    while True:
        order = {n: i for i, n in enumerate(graph.nodes)}
        constant: set = set()
        for n in graph.nodes:  # computed from tensors the function closes over only (not a fresh zeros())
            if n.op == "get_attr" or (n.op == "call_function" and n.all_input_nodes and all(
                    a in constant for a in n.all_input_nodes)):
                constant.add(n)

        def root_of(n):
            while _is_view(n):
                n = n.args[0]
            return n

        dropped = False
        for node in list(graph.nodes):
            if not (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                    and not node.users and node.args and isinstance(node.args[0], fx.Node)
                    and node.args[0] in constant):
                continue
            first = node.target._schema.arguments[0] if node.target._schema.arguments else None
            if first is None or first.alias_info is None or not first.alias_info.is_write:
                continue  # not an in-place write into that tensor
            root = root_of(node.args[0])
            # every view of the same tensor (and the same attribute read through another node): a read of any
            # of them after the write sees it
            same = (lambda r: r is root or (root.op == "get_attr" and r.op == "get_attr" and r.target == root.target))
            family = [n for n in graph.nodes if same(root_of(n))]
            readers = {u for n in family for u in n.users if not _is_view(u)}
            if any(order[u] > order[node] for u in readers if u is not node):
                continue  # read after the write: the write matters (functionalization refuses it, with its reason)
            if not warned:
                warnings.warn(f"jvpgraph: {getattr(f, '__qualname__', type(f).__name__)} writes in place into a "
                              "tensor it closes over (the running statistics of a BatchNorm in train mode it calls, "
                              "say); jvpgraph does not write it (outputs and Jv are unaffected). Pass the module "
                              "itself to have its buffers handled as a model's (their new values in "
                              "Linearized.new_buffers)", stacklevel=4)
                warned = True
            graph.erase_node(node)
            dropped = True
        if not dropped:
            return
        for n in reversed(list(graph.nodes)):  # what computed the dropped values, if nothing else reads it
            op = n.target if n.op == "call_function" else None
            if n.op == "call_function" and not n.users and not (isinstance(op, torch._ops.OpOverload) and (
                    op._schema.is_mutable or torch.Tag.nondeterministic_seeded in op.tags)):
                graph.erase_node(n)


def _has_leftover_mutations(graph: fx.Graph) -> bool:
    """In-place ops other than the trailing ``copy_`` into inputs (buffer updates)."""
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target._schema.is_mutable:
            if node.target is aten.copy_.default and node.args[0].op == "placeholder":
                continue
            return True
    return False


class _AtenViews(fx.Interpreter):
    """Runs a graph with each aliasing prim (``prims.broadcast_in_dim``, ``prims.view_of``... which a walked
    decomposition leaves behind) replaced by its aten implementation: functionalization refuses
    non-aten ops whose outputs alias their inputs."""

    def call_function(self, target, args, kwargs):
        if (isinstance(target, torch._ops.OpOverload) and target.namespace == "prims"
                and any(r.alias_info is not None for r in target._schema.returns)
                and getattr(target, "impl_aten", None) is not None):
            return target.impl_aten(*args, **kwargs)
        return super().call_function(target, args, kwargs)


_EMPTY = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
          aten.new_empty.default, aten.new_empty_strided.default}
# ops that overwrite every element of their first argument, draw into it, or only view it: not a read of garbage
_OVERWRITES = {"copy", "bernoulli", "uniform", "normal", "random", "exponential", "geometric", "cauchy",
               "log_normal", "fill", "zero", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
               "randn_like", "randint_like", "as_strided", "view", "_unsafe_view", "expand", "sym_size",
               "sym_stride", "sym_numel"}


def _renorm_keeps_autograd_history(graph: fx.Graph) -> None:
    """``F.embedding(..., max_norm=...)`` renormalizes the weight in place through ``weight.detach()``: the
    values change, autograd's view of the weight does not (its tangent reaches the lookup unchanged).
    Functionalized, the lookup reads ``embedding_renorm(detach(weight))``; reconnect the renorm to the weight
    itself, whose rule then passes the tangent through as autograd does."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding_renorm.default:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_function" and src.target is aten.detach.default:
                node.args = (src.args[0], *node.args[1:])


def _warn_on_uninitialized_reads(graph: fx.Graph, f) -> None:
    """A C++ composite that fills a tensor with a raw copy (``at::tensor(list)``) leaves only ``empty`` in
    the trace: the graph would then compute with uninitialized memory. Say so, naming the op, rather than
    return a silently wrong value."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _EMPTY:
            continue
        for user in node.users:
            name = getattr(user.target, "__name__", str(user.target)).split(".")[0]
            if user.op == "call_function" and name.rstrip("_") not in _OVERWRITES \
                    and not _scatters_a_permutation(user, node):
                warnings.warn(
                    f"jvpgraph: in {getattr(f, '__qualname__', type(f).__name__)}, {user.target} reads a "
                    f"tensor that the trace created empty and never filled (a C++ composite filled it with a raw "
                    f"copy that tracing cannot see); outputs and Jv may be wrong. Pass such values as tensors "
                    f"(e.g. lengths as a tensor, not a list).\n  at node: {user.format_node()}", stacklevel=3)
                return


def _scatters_a_permutation(user: fx.Node, empty: fx.Node) -> bool:
    """``scatter(empty, dim, sort(...).indices, src)`` along a 1-d tensor writes every element (a permutation's
    inverse: ``nn.utils.rnn.invert_permutation``, ``argsort`` of ``argsort``)."""
    if user.target not in (aten.scatter.src, aten.scatter.value) or user.args[0] is not empty:
        return False
    index = user.args[2]
    sort = index.args[0] if (isinstance(index, fx.Node) and index.target is operator.getitem
                             and index.args[1] == 1) else None
    val = empty.meta.get("val")
    return (isinstance(sort, fx.Node) and sort.target in (aten.sort.default, aten.sort.stable)
            and val is not None and val.dim() == 1 and index.meta.get("val") is not None
            and tuple(index.meta["val"].shape) == tuple(val.shape))


# --------------------------------------------------------------------------------------------------
# What PyTorch's errors say, read in one place
# --------------------------------------------------------------------------------------------------
def _size_from_tensor(e: BaseException, text: str) -> bool:
    # a 0-d tensor passed as a size (torch.zeros(n, batch_sizes[0]) in nn.GRU over a PackedSequence): eager
    # reads its value; PyTorch's argument parser turns the fake tensor's refusal into this TypeError
    return isinstance(e, TypeError) and "failed to unpack" in text and "got Tensor" in text


def _unbacked_broadcast(e: BaseException, text: str) -> bool:
    # a size only the values know (u0: masked_select's length) meeting a fixed one in a broadcast
    return "broadcast" in text and re.search(r"\bof length u\d+\b", text) is not None


def _says(*phrases: str, runtime_only: bool = False) -> Callable[[BaseException, str], bool]:
    return lambda e, text: (not runtime_only or isinstance(e, RuntimeError)) and any(p in text for p in phrases)


#: The kinds of failure a trace meets, each with how PyTorch's error shows it (tested on ``"TypeName: message"``,
#: first match wins). :func:`_next_attempt` reads the first three to choose the next attempt, the trace's
#: fake→real policy reads ``data-dependent``, and :func:`_trace_error` the rest to say what to do.
_PYTORCH_ERRORS: tuple[tuple[str, Callable[[BaseException, str], bool]], ...] = (
    # the function writes into a parameter or an input (x.mul_(2), F.embedding's max_norm renorm)
    ("writes-into-input", _says("leaf Variable that requires grad is being used in an in-place operation",
                                runtime_only=True)),
    # functionalization refused to write a traced value into a tensor computed from constants only
    ("non-functional-write", _says(_NON_FUNCTIONAL_WRITE, runtime_only=True)),
    # an op refuses to differentiate an input (a running statistic passed as an input, multi_margin_loss's weight)
    ("input-not-differentiable", _says("is not differentiable with respect to argument", runtime_only=True)),
    ("old-style-function", _says("setup_context")),
    ("dtype-not-differentiable", _says("does not support automatic differentiation")),
    ("data-dependent", lambda e, text: _size_from_tensor(e, text) or _unbacked_broadcast(e, text) or any(
        k in text for k in ("DataDependent", "data-dependent", "data dependent", "DynamicOutputShape",
                            "GuardOnDataDependentSymNode"))),
    ("fake-only", lambda e, text: any(k in type(e).__name__ for k in ("Fake", "Unsupported", "DynamicOutputShape",
                                                                      "DataDependent", "GuardOn"))),
)


def _classify(e: BaseException) -> str | None:
    """The kind of ``e`` in :data:`_PYTORCH_ERRORS` (``None``: none of them)."""
    text = type(e).__name__ + ": " + str(e)
    return next((kind for kind, test in _PYTORCH_ERRORS if test(e, text)), None)


def _data_dependent(e: BaseException) -> bool:
    """Did fake tracing fail because a shape or a branch depends on tensor values? (Whatever else the message
    says: this is the kind the fake→real policy acts on.)"""
    return dict(_PYTORCH_ERRORS)["data-dependent"](e, type(e).__name__ + ": " + str(e))


def _refunctionalize(gm: fx.GraphModule, example: list, mode: str = "fake") -> fx.GraphModule:
    """Functionalize the aten graph itself: in-place ops that C++ composite kernels emit below the first
    functionalization (``squeeze_`` in ``F.linear`` on a vector, ``copy_`` into slices of a ``new_empty``
    in circular padding, ``clamp_min_``...) become functional. Node metadata ("custom", where the grad
    mode lives) is carried over."""
    from torch.fx import traceback as fx_traceback

    def run(*args):
        with fx_traceback.preserve_node_meta():
            return _AtenViews(gm).run(*args)

    with forked_rng(mode == "real"), observers_hidden(mode):
        return make_fx(torch.func.functionalize(run, remove="mutations"), tracing_mode=mode,
                       _allow_non_fake_inputs=True, record_stack_traces=True,
                       _error_on_data_dependent_ops=mode != "real")(*example)


def observers_hidden(mode: str):
    """The caller's dispatch modes set aside while ``make_fx`` traces in ``mode`` ("fake" or "symbolic"):
    a ``FlopCounterMode`` or a memory meter around a jvpgraph call would count the trace's ops, which run on
    no data (one Hv of ResNet-18 read 62 GFLOP under ``FlopCounterMode``, its replay doing 18). They see the
    call's real work: the emitted graph's ops, and every op of a trace on real values ("real": kept seen;
    the few real ops a fake trace runs, on a function's closed-over tensors, are not). A stack holding one
    of PyTorch's own tracing modes (someone tracing through jvpgraph) is left as it is.

    Example:
        >>> import torch
        >>> from torch.utils.flop_counter import FlopCounterMode
        >>> with FlopCounterMode(display=False) as flops, observers_hidden("fake"):
        ...     _ = torch.randn(4, 4) @ torch.randn(4, 4)
        >>> flops.get_total_flops()
        0
    """
    stack = _get_current_dispatch_mode_stack() if mode != "real" else []
    if not stack or any(m.is_infra_mode() for m in stack):
        return contextlib.nullcontext()
    return _disable_current_modes()


def forked_rng(on: bool = True):
    """A fork of the global generators (CPU, and the CUDA devices in use) when ``on``: make_fx on real values
    runs the graph's random ops for real, and the graph's first call must draw what an eager call would."""
    if not on:
        return contextlib.nullcontext()
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized()
                                 else [])


@contextlib.contextmanager
def _rng_untouched(f, draws: bool = False):
    """Tracing runs on fake tensors and draws no random numbers; a function that reseeds the global RNG
    (``torch.manual_seed`` inside ``forward``) would still change the caller's: restore it, and say that the
    graph does not replay the reseeding."""
    before = torch.get_rng_state()
    seeded = []
    real_seed = torch.manual_seed

    def manual_seed(seed):  # noticed even when the function restores the state afterwards (freeze_rng_state)
        seeded.append(seed)
        return real_seed(seed)

    with forked_rng():
        torch.manual_seed = torch.random.manual_seed = manual_seed
        try:
            yield
        finally:
            torch.manual_seed = torch.random.manual_seed = real_seed
        # (a trace on real values draws real random numbers: only an explicit reseed counts then)
        changed = bool(seeded) or (not draws and not torch.equal(before, torch.get_rng_state()))
    if changed:
        warnings.warn(f"jvpgraph: {getattr(f, '__qualname__', type(f).__name__)} reseeds the global random number "
                      "generator while it runs (torch.manual_seed or set_rng_state); the traced graph does not "
                      "replay that: its random ops (dropout) draw from the caller's generator. Seed before "
                      "calling instead.", stacklevel=4)


def _output_error(j: int, leaf, out) -> str:
    """Why output leaf ``j`` (not a tensor) cannot be traced, and what to do."""
    if leaf is out and (dataclasses.is_dataclass(leaf) or isinstance(leaf, dict) or hasattr(leaf, "_fields")):
        kind = ("a dataclass" if dataclasses.is_dataclass(leaf) else "a subclass of dict" if isinstance(leaf, dict)
                else "a named tuple")
        return (f"the output is of type {type(leaf).__name__}, {kind} that PyTorch's pytree does not know how to "
                "flatten, so jvpgraph cannot see the tensors inside it. Register the type "
                "(torch.utils._pytree.register_dataclass for a dataclass, register_pytree_node otherwise) or "
                "return its tensors as a tuple or a plain dict")
    if leaf is None or isinstance(leaf, (bool, int, float, str)):
        return (f"output {j} is {leaf!r} (a {type(leaf).__name__}); jvpgraph returns tensors only: return the "
                "tensors alone (leave non-tensor values out of the output, or wrap the model to drop them)")
    return (f"output {j} is a {type(leaf).__name__}, not a tensor; outputs must be tensors (or tuples, lists, "
            "dicts of them; register a container type with torch.utils._pytree.register_pytree_node)")


def _fakify_dynamic(example: list[torch.Tensor], n_fixed: int, dynamic) -> list[torch.Tensor]:
    """Fake tensors for a trace with symbolic sizes: the first ``n_fixed`` (parameters, buffers) and every
    dimension not named in ``dynamic`` (per input, the dimensions to make symbols) keep their sizes. A size the
    trace compares with a number or another size becomes a guard of the shape environment (checked per call)."""
    from torch._dynamo.source import LocalSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    out = []
    for i, t in enumerate(example):
        dims = () if i < n_fixed else dynamic[i - n_fixed]
        sizes = [DimDynamic.DYNAMIC if d in dims else DimDynamic.STATIC for d in range(t.dim())]
        fake = mode.from_tensor(t, source=LocalSource(f"t{i}"),
                                symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
        out.append(fake)
    return out


@contextlib.contextmanager
def _conv_backend_unguarded(example: list[torch.Tensor]):
    """While a trace with symbolic sizes runs: PyTorch's fake convolution picks the kernel a real one would
    (mkldnn from batch 16 on the CPU) only to give its output the same memory format, and that choice puts a
    guard ``batch < 16`` on every convolution's trace. The kernel changes neither values nor (for contiguous
    tensors) the format, so it is chosen without guarding: one trace serves batch 2 and batch 64."""
    env = next((t.fake_mode.shape_env for t in example if hasattr(t, "fake_mode")), None)
    select = getattr(torch._C, "_select_conv_backend", None)
    if env is None or select is None:
        yield
        return

    def unguarded(*args, **kwargs):
        with env.suppress_guards():
            return select(*args, **kwargs)

    torch._C._select_conv_backend = unguarded
    try:
        yield
    finally:
        torch._C._select_conv_backend = select


def draws_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers (dropout's bernoulli, rand, randn, ...: PyTorch's
    ``nondeterministic_seeded`` ops)."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and \
        torch.Tag.nondeterministic_seeded in node.target.tags


_VALUE_READS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)


def _reads_random(graph: fx.Graph) -> bool:
    """Whether a value read in a trace on real values depends on a random draw: ``aten._local_scalar_dense``
    (``.item()``, ``bool()`` of a tensor), or an op whose output's size or value a trace on real values fixes
    (``nonzero``, ``torch.where(mask)``, boolean indexing: MoE routing after dropout)."""
    random: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "call_function" and (draws_random(node) or any(a in random for a in node.all_input_nodes)):
            random.add(node)
            if node.target is aten._local_scalar_dense.default or (
                    isinstance(node.target, torch._ops.OpOverload)
                    and any(tag in node.target.tags for tag in _VALUE_READS)):
                return True
    return False


@contextlib.contextmanager
def _graph_capture(on: bool):
    """``torch.compiler.is_compiling()`` is True inside, as it is while torch.export traces a model with
    make_fx (its non-strict mode). Libraries read that flag to skip value-dependent shortcuts that graph
    capture cannot follow (transformers' ``if torch.all(mask == 1): mask = None`` before SDPA) and compute the
    same values the general way. Set only for a second attempt, after a trace met such a branch."""
    if not on:
        yield
        return
    import torch.compiler as tc

    old = tc._is_compiling_flag
    tc._is_compiling_flag = True
    try:
        yield
    finally:
        tc._is_compiling_flag = old


def trace_program(f: Callable, inputs: tuple, *, bn: str = "batch",
                  specialize: BaseException | None = None, dynamic=None) -> TracedProgram:
    """Trace ``f(*inputs)`` to a :class:`TracedProgram`.

    ``f`` is an ``nn.Module`` (its parameters and buffers become graph inputs) or a plain function
    (tensors it closes over become constants of the graph). ``specialize``: the data-dependent error that a
    trace on fake tensors met later (emitting the flipped graph); trace on the real values right away.
    ``dynamic``: per flattened input, the dimensions to trace as symbols (one trace for every batch size);
    a trace that cannot keep them symbolic raises (there is no fallback to real values then).

    Example:
        >>> import torch, torch.nn as nn
        >>> prog = trace_program(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), (torch.randn(4, 3),))
        >>> [n.target.__name__ for n in prog.gm.graph.nodes if n.op == "call_function"]
        ['t.default', 'addmm.default', 'tanh.default']
    """
    with collecting():  # the graph's nodes keep the state their custom ops' keys name (owned.py)
        prog = _trace_program_keeping_buffers(f, inputs, bn=bn, specialize=specialize, dynamic=dynamic)
        own(prog.gm.graph)
    return prog


def trace_and_build(f: Callable, inputs: tuple, build: Callable[[TracedProgram], Any], *, bn: str = "batch",
                    dynamic=None, final: tuple[type[BaseException], ...] = ()):
    """``build(trace_program(f, inputs))``, with the fake→real policy's last step: when ``build`` (emitting the
    flipped graph) meets a size that depends on values in a trace on fake tensors, ``f`` is traced again on
    the real values and built again. Errors of the types in ``final`` are raised as they are.

    Example:
        >>> import torch
        >>> f = lambda x: x[x > 0].exp()  # its output's size depends on x's values
        >>> def build(prog):  # stands for emitting the flipped graph: it needs the output's size as a number
        ...     out = next(n for n in prog.gm.graph.nodes if n.op == "output").args[0][0]
        ...     return int(out.meta["val"].shape[0]), prog.values is not None
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # the warning says the trace holds for these values only
        ...     trace_and_build(f, (torch.tensor([1.0, -2.0, 3.0]),), build)
        (2, True)
    """
    prog = trace_program(f, inputs, bn=bn, dynamic=dynamic)
    try:
        return build(prog)
    except final:
        raise
    except Exception as e:  # noqa: BLE001
        if dynamic is not None or prog.values is not None or not _data_dependent(e):
            raise
        return build(trace_program(f, inputs, bn=bn, specialize=e))


def _trace_program_keeping_buffers(f, inputs, *, bn, specialize, dynamic) -> TracedProgram:
    if isinstance(f, nn.Module):
        return _trace_program(f, inputs, bn=bn, specialize=specialize, dynamic=dynamic)
    # A function's closed-over modules: ops whose inputs are all their real tensors run for real while tracing
    # (functionalization wraps the function's inputs only): a BatchNorm's num_batches_tracked += 1 would count
    # every trace. Their buffers are put back as they were.
    seen: dict[int, torch.Tensor] = {}
    for m in function_roots(f):
        for b in m.buffers():
            seen.setdefault(id(b), b)
    saved = [(b, b.detach().clone()) for b in seen.values()]
    try:
        return _trace_program(f, inputs, bn=bn, specialize=specialize, dynamic=dynamic)
    finally:
        with torch.no_grad():
            for b, was in saved:
                if not torch.equal(b, was):
                    b.copy_(was)


@dataclasses.dataclass(frozen=True)
class _Attempt:
    """How one ``make_fx`` run of the function is set up. :func:`_trace_program` starts from the first and
    :func:`_next_attempt` turns one knob per failure, as PyTorch's error asks."""

    mode: str = "fake"  # "fake", "symbolic" (sizes as symbols: ``dynamic=``) or "real" (on the values)
    #: parameters and inputs cloned first: the function writes into them, and is traced as if it had cloned them
    on_copies: bool = False
    #: inputs require grad, so PyTorch picks differentiable kernels (not ``_embedding_bag_forward_only``)
    inputs_require_grad: bool = True
    #: ``torch.compiler.is_compiling()`` True, as torch.export traces (see :func:`_graph_capture`)
    as_captured: bool = False
    #: tensors computed from constants only made functional (see :func:`_lift_constants`)
    lift_constants: bool = False


def _next_attempt(a: _Attempt, e: BaseException) -> _Attempt | None:
    """The attempt that answers ``e`` (one knob turned), or ``None``: ``e`` is the trace's answer."""
    kind = _classify(e)
    if kind == "non-functional-write" and not a.lift_constants:
        return dataclasses.replace(a, lift_constants=True)
    if kind == "input-not-differentiable" and a.inputs_require_grad:
        # trace with inputs not requiring grad: the input's tangent goes through the op's rule, or the fallback
        # says which op cannot take it
        return dataclasses.replace(a, inputs_require_grad=False)
    if kind == "writes-into-input" and not a.on_copies:
        return dataclasses.replace(a, on_copies=True)  # what it wrote is never written back
    return None


class _Tracer:
    """``make_fx`` over ``torch.func.functionalize`` of one call of ``f``, with its parameters, buffers and
    flattened inputs as the graph's inputs; :meth:`run` is one attempt, and keeps what the run recorded
    (the output's structure, the guards, the BatchNorm layers whose update is dropped)."""

    def __init__(self, f: Callable, inputs: tuple, bn: str):
        self.f, self.bn = f, bn
        self.name = getattr(f, "__qualname__", type(f).__name__)
        self.module = f if isinstance(f, nn.Module) else None
        self.params = dict(self.module.named_parameters()) if self.module is not None else {}
        self.buffers = dict(self.module.named_buffers()) if self.module is not None else {}
        self.flat_in, self.in_spec = pytree.tree_flatten(inputs)
        for i, a in enumerate(self.flat_in):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"input {i} is a {type(a).__name__}; jvpgraph traces tensor inputs only. "
                                "Bind non-tensor arguments with functools.partial or a lambda.")
        self.P, self.B = len(self.params), len(self.buffers)
        # each (module, attribute) holding a parameter or buffer, once, by its first name: a parameter shared by
        # two modules (weight tying) has one slot in each; a module used twice has its slots once
        self.slots = [] if self.module is None else [
            (f"{prefix}.{name}" if prefix else name, t) for prefix, m in self.module.named_modules()
            for name, t in [*m._parameters.items(), *m._buffers.items()] if t is not None]
        self.out_spec = None
        self.originals: dict = {}  # what tracing_state changed on the model, for the guards
        self.guards = Guards([])  # the guards of the last traced call
        self.momentum_none: list[str] = []  # momentum=None BatchNorm layers (their update is dropped)
        self._module_stack: list[str] = []
        self._attempt = _Attempt()

    def example(self, dynamic=None) -> list[torch.Tensor]:
        """The graph's example inputs: parameters, buffers, inputs (fake with symbolic sizes for ``dynamic``)."""
        example = [p.detach().requires_grad_(p.is_floating_point()) for p in self.params.values()]
        example += [b.detach() for b in self.buffers.values()]
        example += [a.detach().requires_grad_(a.is_floating_point() or a.is_complex()) for a in self.flat_in]
        return example if dynamic is None else _fakify_dynamic(example, self.P + self.B, dynamic)

    def run(self, a: _Attempt, example: list) -> fx.GraphModule:
        """One trace as ``a`` says, on ``example`` (inputs detached first when ``a`` asks)."""
        n = self.P + self.B
        if not a.inputs_require_grad:
            example = example[:n] + [t.detach() for t in example[n:]]
        self._attempt = a
        self.momentum_none.clear()
        token = _LIFT_CONSTANTS.set(a.lift_constants)
        try:
            with tracing_state(self.module, self.bn, self.momentum_none) as originals, \
                    _opaque_autograd_functions(), _rng_untouched(self.f, draws=a.mode == "real"), \
                    _conv_backend_unguarded(example), _graph_capture(a.as_captured), observers_hidden(a.mode):
                self.originals = originals
                return make_fx(
                    torch.func.functionalize(self._flat_fn, remove="mutations"),
                    decomposition_table=_DECOMPOSITIONS, tracing_mode=a.mode, _allow_non_fake_inputs=True,
                    record_stack_traces=True,
                    # on real values, a value read (.item(), a branch on x.sum() > 0, aten.equal in cov's
                    # checks) becomes a constant of this trace: the trace is specialized to these values anyway
                    _error_on_data_dependent_ops=a.mode != "real",
                )(*example)
        finally:
            _LIFT_CONSTANTS.reset(token)

    def run_until_answered(self, a: _Attempt, example: list) -> tuple[fx.GraphModule, _Attempt]:
        """:meth:`run`, then again with each knob :func:`_next_attempt` turns, until a trace succeeds (returned
        with the attempt that made it) or an error has no next attempt (raised)."""
        written = None  # where the function wrote into its inputs
        while True:
            try:
                gm = self.run(a, example)
                break
            except Exception as e:  # noqa: BLE001 - re-raised unless an attempt answers it
                nxt = _next_attempt(a, e)
                if nxt is None:
                    raise
                if nxt.on_copies and not a.on_copies:
                    written = _user_frame(e)
                a = nxt
        if written is not None:
            warnings.warn(f"jvpgraph: {self.name} writes in place into its parameters or inputs" +
                          ("" if written.startswith("<unknown") else f"\n  at {written}") +
                          "\n  jvpgraph computes on copies and does not write into what it is given (outputs and Jv "
                          "are those of the function on its values)", stacklevel=4)
        return gm, a

    def _flat_fn(self, *flat):
        # the function runs as if called with gradients on: only torch.no_grad() blocks *inside* it are
        # constants for Jv, never the caller's mode around jvpgraph (a trace made under no_grad would be 0)
        box = [True]
        # the Python attributes the call reads become the trace's guards; what it writes is put back
        roots = [self.module] if self.module is not None else function_roots(self.f)
        with torch.enable_grad(), _RecordGradMode(box, self._module_stack), _SampleGradMode(box), \
                _module_hooks(self.module, self._module_stack), \
                watch(roots, self.originals, None if self.module is not None else self.f) as rec:
            out = self._call(*flat)
        self.guards = rec.guards()
        return out

    def _call(self, *flat):
        P, B = self.P, self.B
        if self._attempt.on_copies:
            flat = [t.clone() for t in flat[:P]] + list(flat[P:P + B]) + [t.clone() for t in flat[P + B:]]
        by_id = dict(zip((id(t) for t in [*self.params.values(), *self.buffers.values()]), flat[:P + B]))
        state = {name: by_id[id(t)] for name, t in self.slots}
        args = pytree.tree_unflatten(list(flat[P + B:]), self.in_spec)
        if self.module is not None:
            # strict=False: `slots` names every (module, attribute) once, which is all there is to replace;
            # strict=True would also want the other names of a module used twice, and PyTorch's
            # reparametrization then restores that module's attributes to the traced values
            out = torch.func.functional_call(self.module, state, args, strict=False, tie_weights=False)
        else:
            out = self.f(*args)
        flat_out, spec = pytree.tree_flatten(out)
        for j, o in enumerate(flat_out):
            if not isinstance(o, torch.Tensor):
                raise TypeError(_output_error(j, o, out))
        self.out_spec = spec
        return flat_out


def _trace_program(f: Callable, inputs: tuple, *, bn: str = "batch", specialize: BaseException | None = None,
                   dynamic=None) -> TracedProgram:
    """The attempts, in order, then the post-passes.

    1. On fake tensors (symbolic sizes with ``dynamic``), each failure PyTorch's error explains answered by the
       next attempt (:func:`_next_attempt`).
    2. After a branch on a tensor's value: the same, with ``torch.compiler.is_compiling()`` True, where
       libraries compute the same values without the branch.
    3. On the real values, where every size and value read is a number: the trace holds for these values only
       (``TracedProgram.values``; ``Traced`` traces again when they change). Never with ``dynamic``.
    """
    bn = check_mode(bn).value
    tracer = _Tracer(f, inputs, bn)
    if dynamic is not None:
        dynamic = tuple(tuple(d) for d in dynamic)
        if len(dynamic) != len(tracer.flat_in):
            raise ValueError(f"dynamic={dynamic}: expected one tuple of dimensions per input ({len(tracer.flat_in)})")
    example = tracer.example(dynamic)
    start = _Attempt(mode="fake" if dynamic is None else "symbolic")
    values, reads_random = None, False
    try:
        why_real = specialize
        if why_real is None:
            try:
                gm, used = tracer.run_until_answered(start, example)
            except Exception as first:  # noqa: BLE001
                if not _data_dependent(first):
                    raise
                try:
                    gm, used = tracer.run_until_answered(dataclasses.replace(start, as_captured=True), example)
                    log.info("jvpgraph: %s: traced with torch.compiler.is_compiling() True (the model branched on a "
                             "tensor's value otherwise: %s)", tracer.name, str(first).splitlines()[0][:120])
                except Exception:  # noqa: BLE001 - the branch is the user's own: the first error says where
                    if dynamic is not None:
                        raise first from None
                    why_real = first
        if why_real is not None:
            # (on copies of the values: the real run must not write into the caller's buffers)
            example = [t.detach().clone().requires_grad_(t.requires_grad) for t in example]
            gm, used = tracer.run_until_answered(_Attempt(mode="real"), example)
            values = [t.detach() for t in example]
            reads_random = _reads_random(gm.graph)
            warnings.warn(
                f"jvpgraph: {tracer.name} branches on tensor values (or its shapes depend on them): traced at "
                "these values, and traced again " + (
                    "on every call (a value it reads depends on random numbers it draws)" if reads_random else
                    "whenever its inputs or parameters change") +
                f"\n  at {_user_frame(why_real)}\n  (PyTorch: {type(why_real).__name__}: "
                f"{str(why_real).splitlines()[0][:120]})\n  Correct, but a trace per call: make the shapes and "
                "branches depend on shapes only for one trace to serve every batch.", stacklevel=3)
    except Exception as e:  # noqa: BLE001 - we re-raise with the user's line
        if dynamic is not None:
            raise  # the caller falls back to a trace at fixed sizes, which gives the error its message
        raise _trace_error(f, inputs, e) from e
    if not used.inputs_require_grad:
        example = example[:tracer.P + tracer.B] + [t.detach() for t in example[tracer.P + tracer.B:]]

    # the post-passes, in order
    graph = gm.graph
    _drop_writes_into_constants(graph, f)
    if _has_leftover_mutations(graph):
        gm = _refunctionalize(gm, example, "real" if used.mode == "real" else "fake")
        graph = gm.graph
    names = [f"p_{_sanitize(k)}" for k in tracer.params] + [f"b_{_sanitize(k)}" for k in tracer.buffers]
    names += [f"x{i}" if len(tracer.flat_in) > 1 else "x" for i in range(len(tracer.flat_in))]
    name_placeholders(graph, names)
    updates = _take_buffer_updates(graph, tracer)
    _drop_dead_code(graph, keep=set(updates.values()))
    if used.on_copies:
        _read_originals_not_copies(graph)
    _renorm_keeps_autograd_history(graph)
    _warn_on_uninitialized_reads(graph, f)
    stamp(graph, bn)  # the BatchNorm mode travels on the nodes (jvpgraph.batchnorm)
    graph.lint()
    gm.recompile()
    diff = [i for i, a in enumerate(tracer.flat_in) if a.is_floating_point() or a.is_complex()]
    return TracedProgram(gm, list(tracer.params), list(tracer.buffers), len(tracer.flat_in), tracer.in_spec,
                         tracer.out_spec, diff, updates, bn, values, tracer.guards, dynamic, reads_random=reads_random)


# --------------------------------------------------------------------------------------------------
# Post-passes over the traced graph
# --------------------------------------------------------------------------------------------------
def name_placeholders(graph: fx.Graph, names: Sequence[str]) -> None:
    """Give the graph's placeholders ``names``, in order (the emitted code's argument names).

    Example:
        >>> g = fx.symbolic_trace(lambda a, b: a + b).graph
        >>> name_placeholders(g, ["x", "v"])
        >>> [n.name for n in g.nodes if n.op == "placeholder"]
        ['x', 'v']
    """
    for node, name in zip([n for n in graph.nodes if n.op == "placeholder"], names):
        node._rename(name)
        node.target = node.name


def _take_buffer_updates(graph: fx.Graph, tracer: _Tracer) -> dict[str, fx.Node]:
    """Drop the ``copy_`` into buffers (running statistics) and return the new values by buffer name: kept
    aside, never written. A write into an input is dropped with a warning."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    buffer_of = {placeholders[tracer.P + i]: k for i, k in enumerate(tracer.buffers)}
    updates: dict[str, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (aten.copy_.default,) and node.args[0] in buffer_of:
            if node.users:
                raise TraceError(f"unexpected use of an in-place buffer update: {node.format_node()}")
            updates[buffer_of[node.args[0]]] = node.args[1]
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is aten.copy_.default and node.args[0].op == "placeholder":
            # e.g. F.batch_norm(x, running_mean, running_var, training=True) with the statistics passed as
            # inputs: the graph reads the new value internally; only the write-back to the caller's tensor is
            # dropped (jvpgraph never writes into what it is given), which changes neither outputs nor Jv
            warnings.warn(f"jvpgraph: {tracer.name} writes in place into its input {node.args[0].name}; jvpgraph "
                          "does not write into its inputs (outputs and Jv are unaffected)", stacklevel=4)
            graph.erase_node(node)
    for name in tracer.momentum_none:  # momentum=None layers: the weight of their update was a stand-in
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            updates.pop(f"{name}.{stat}" if name else stat, None)
    return updates


def _drop_dead_code(graph: fx.Graph, keep: set) -> None:
    """Remove functional aten ops nothing reads (detach/alias of unused values and the like), except those in
    ``keep``. Random draws stay: an unused one, read only by a Python branch, still moves the generator, and
    the draws after it must be the ones an eager call makes."""
    def impure(n: fx.Node) -> bool:
        return not (n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                    and not n.target._schema.is_mutable and not draws_random(n) and n not in keep)

    graph.eliminate_dead_code(is_impure_node=impure)


def _read_originals_not_copies(graph: fx.Graph) -> None:
    """A trace on copies (the function writes into its inputs): the copies were only there to be written; the
    functional graph reads the originals."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.clone.default and \
                isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


#: What to do, by the kind of failure (:data:`_PYTORCH_ERRORS`); a kind not named here gets the eager check.
_HINTS = {
    "old-style-function": (
        "An old-style torch.autograd.Function (forward(ctx, ...)) whose .apply was bound to a name before tracing "
        "cannot be kept opaque: call MyFunction.apply(...) directly, or give the Function a setup_context "
        "staticmethod (new style)."),
    "dtype-not-differentiable": (
        "PyTorch's autograd cannot differentiate this op for this dtype (jvpgraph traces autograd's graph): "
        "compute it on real tensors (torch.view_as_real) or outside the differentiated part."),
    "data-dependent": (
        "The model branches on a tensor's value (or calls .item()/.tolist()), so one trace cannot serve other "
        "batches. Make the branch depend on shapes or flags only, or wrap the value-dependent part in a "
        "torch.autograd.Function (jvpgraph keeps those opaque)."),
    "fake-only": (
        "jvpgraph traces with make_fx over fake tensors (shapes without values); this op cannot run that way."),
}


def _trace_error(f: Callable, inputs: tuple, e: BaseException) -> TraceError:
    """The :class:`TraceError` for a trace that failed with ``e``: the model's line, and what to do."""
    name = getattr(f, "__qualname__", type(f).__name__)
    kind = _classify(e)
    if kind == "writes-into-input":
        return TraceError(
            f"could not trace {name}: it writes in place into one of its inputs\n  at {_user_frame(e)}\n  jvpgraph "
            "needs a function that leaves its inputs unchanged: use the out-of-place op (x * 2, not x.mul_(2)) or "
            "clone the input first.")
    if kind in _HINTS:
        hint = _HINTS[kind]
    elif _raised_by_jvpgraph(e):
        hint = ""  # jvpgraph's own refusal (an output that is not a tensor): its message says what to do
    else:
        # say "eager too" only when it is so: run the function eagerly on copies of the inputs
        eager = _eager_error(f, inputs)
        if eager is not None:
            hint = (f"It raises in eager mode too (jvpgraph ran it on copies of these inputs: "
                    f"{type(eager).__name__}: {(str(eager).strip().splitlines() or [''])[0][:200]}): the model "
                    "or its inputs need fixing, not the trace.")
        else:
            hint = (f"It runs in eager mode on these inputs (jvpgraph checked): what failed is jvpgraph's trace "
                    f"(make_fx over torch.func.functionalize, on fake tensors), which could not follow\n  "
                    f"{_construct(e)}\n  ")
            if kind == "non-functional-write":
                hint += ("That code writes in place into a tensor the function does not take as an input (a "
                         "tensor it closes over, or one computed from such a tensor only). Pass that tensor "
                         "as an input (jvpgraph.jvp(f, (x, lengths), (v, None))) or register it as a buffer.")
            else:
                hint += ("What to do: wrap the part that fails in a torch.autograd.Function with a backward "
                         "(jvpgraph keeps it opaque and flips that backward), pass the tensors the function "
                         "closes over as inputs, and please report this message to jvpgraph.")
    return TraceError(f"could not trace {name}: {type(e).__name__}: {str(e).split(chr(10))[0]}\n"
                      f"  at {_user_frame(e)}" + (f"\n  {hint}" if hint else ""))
