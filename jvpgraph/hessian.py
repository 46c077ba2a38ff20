"""Second order: Hessian-vector products by flipping the gradient's own graph, and Gauss-Newton products.

The theorem does not care which graph it flips. The gradient of a loss is a computation too: jvpgraph traces
the loss (functionalized, at the aten level: BatchNorm in train mode, dropout masks and custom Functions as
for Jv), differentiates that trace by reverse mode into a second aten graph — ``convolution_backward``,
``native_batch_norm_backward``, ``threshold_backward``... — and flips *that* graph. Its path sums give

    H v = ∂/∂ε ∇L(θ + ε v) |₀          (forward over reverse),

one pass that computes the gradient and ``Hv`` together. Nothing runs through ``torch.func.grad`` (which
refuses BatchNorm's running-statistic update) or PyTorch's forward mode (no formulas for the fused kernels).

* :func:`hvp` — ``(∇f, H v)`` for a function or module returning a scalar, like
  ``torch.func.jvp(torch.func.grad(f), primals, tangents)``.
* :class:`Curvature` — the usual case: a model, a loss and a batch; ``H v`` and the generalized Gauss-Newton
  ``G v = Jᵀ H_L J v`` over the parameters, traced once and applied to new batches and new parameter values;
  a ``scipy.sparse.linalg.LinearOperator`` view and the spectra of :mod:`jvpgraph.spectra`.

The model is never changed: the running statistics a training forward would write are dropped, the caller's
random generator is left where it was only as far as a Jv call leaves it (a dropout mask is drawn once per
call and shared by the gradient and ``Hv``).
"""

from __future__ import annotations

import inspect
import operator
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx

from . import api
from .owned import collecting, own
from .rules import attention
from .rules.core import attention_scores
from .batchnorm import check_mode
from .trace import TracedProgram, _data_dependent, observers_hidden

__all__ = ["hvp", "Curvature", "gradient_module"]

aten = torch.ops.aten


# ------------------------------------------------------------------ the gradient's graph
class _AboveAutograd(fx.Interpreter):
    """Runs a traced program for autograd to record, with the ops of :data:`_WITHOUT_SECOND_DERIVATIVE`
    (fused attention, cdist, ...) replaced by their math: their backward ops have no derivative of their own,
    the math's ops all do; and views as reshapes, since the math's outputs need not have the kernels' strides.
    A long attention keeps the CPU flash kernel instead (:class:`_LongAttention`: its backward is one op with a
    blockwise tangent). Everything else is called as traced."""

    def run_node(self, n):
        self._node = n
        return super().run_node(n)

    def call_function(self, target, args, kwargs):
        if target is aten._scaled_dot_product_flash_attention_for_cpu.default and _long_attention(self._node, args,
                                                                                                   kwargs):
            return _LongAttention.apply(*args[:3], kwargs.get("attn_mask"), args[4] if len(args) > 4 else
                                        kwargs.get("is_causal", False), kwargs.get("scale"))
        if target in _WITHOUT_SECOND_DERIVATIVE:
            return _WITHOUT_SECOND_DERIVATIVE[target](*args, **kwargs)
        if target is aten.view.default:
            # a view traced on a fused kernel's output layout (the CPU flash kernel's [B, H, L, D] output is laid
            # out as [B, L, H, D], so timm's transpose(1, 2).reshape was a view) may not be one on the math's
            # output: reshape is the same view where the strides allow it and a copy where they do not
            return aten.reshape.default(*args, **kwargs)
        return super().call_function(target, args, kwargs)


def _decomposed(op):
    def run(*args, **kwargs):
        from torch._decomp import decomposition_table

        return decomposition_table[op](*args, **kwargs)
    return run


def _flash_attention_math(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """The CPU flash kernel as its math: the output by PyTorch's decomposition, whose second output is the
    attention weights where the kernel's is their row-wise ``logsumexp`` ([N, H, L]), computed here."""
    out = _decomposed(aten._scaled_dot_product_flash_attention_for_cpu.default)(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    if k.shape[-3] != q.shape[-3]:  # grouped-query attention: each key head serves several query heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    return out[0], attention_scores(q, k, is_causal, attn_mask, scale)[0].logsumexp(-1)


def _long_attention(node: fx.Node, args, kwargs) -> bool:
    """Does the CPU flash kernel's call keep its kernel in the gradient's graph (:class:`_LongAttention`) rather
    than its math? When the attention has more than ``attention.HESSIAN_MIN_SCORES`` scores per batch and head,
    no dropout, grouped heads or mask that carries a gradient, and nothing reads its ``logsumexp``."""
    q, k, v = args[:3]
    dropout = args[3] if len(args) > 3 else kwargs.get("dropout_p", 0.0)
    mask = kwargs.get("attn_mask")
    return (dropout == 0 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
            and q.shape[-2] * k.shape[-2] > attention.HESSIAN_MIN_SCORES
            and (mask is None or not mask.requires_grad)
            and all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users))


class _LongAttention(torch.autograd.Function):
    """The CPU flash kernel (O(L) memory) with its backward recorded as ``jvpgraph::attention_backward``, whose
    tangent has a blockwise rule: the Hessian's gradient graph of a long attention, flipped without ever holding
    the L × S weights (the math's graph holds them several times per layer)."""

    @staticmethod
    def forward(q, k, v, attn_mask, is_causal, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, 0.0, is_causal,
                                                                            attn_mask=attn_mask, scale=scale)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, is_causal, scale = inputs
        ctx.save_for_backward(q, k, v, *output, *(() if attn_mask is None else (attn_mask,)))
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.mark_non_differentiable(output[1])  # nothing reads it (_long_attention)

    @staticmethod
    def backward(ctx, g, _g_lse):
        q, k, v, out, lse, *mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.jvpgraph.attention_backward(g.contiguous(), q, k, v, out, lse, mask[0] if mask else None,
                                                           ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None, None


def _copy(dst, src, non_blocking=False):
    """Functionalization's ``copy_`` (``aten.copy``), which autograd has no formula for: ``src`` in ``dst``'s
    shape, dtype and device."""
    src = src.to(dtype=dst.dtype, device=dst.device)
    return src.expand(dst.shape).clone(memory_format=torch.contiguous_format)


def _norm_last(d, p):
    if d.numel() == 0:  # no pairs or no features: vector_norm refuses the inf norm of an empty tensor
        return d.sum(-1)
    return torch.linalg.vector_norm(d, ord=p, dim=-1)


def _cdist(x1, x2, p=2.0, compute_mode=None):
    return _norm_last(x1.unsqueeze(-2) - x2.unsqueeze(-3), p)


def _pdist(x, p=2.0):
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    return _norm_last(x[i] - x[j], p)


def _renorm_outside_autograd(weight, indices, max_norm, norm_type):
    """``F.embedding(..., max_norm=...)``'s renorm as eager autograd sees it: it runs in place on
    ``weight.detach()``, so the lookup reads the renormalized values while the weight's derivative passes
    unchanged (the first-order rule of ``embedding_renorm`` says the same); ``w - w.detach()`` is that
    derivative, and exactly zero in value."""
    renormed = aten.embedding_renorm.default(weight.detach(), indices, max_norm, norm_type)
    return renormed + (weight - weight.detach())


#: Ops recorded for autograd as the same function written in differentiable ops, so that the gradient's graph
#: can be flipped: their backward kernels have no derivative of their own (fused attention, cdist, ...; the
#: second-order OpInfo sweep), or autograd has no formula for them at all (aten.copy, embedding_renorm).
_WITHOUT_SECOND_DERIVATIVE = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: _flash_attention_math,
    aten._cdist_forward.default: _cdist,  # the pairwise differences: memory n·m·d
    aten._pdist_forward.default: _pdist,
    aten.multi_margin_loss.default: _decomposed(aten.multi_margin_loss.default),  # p = 2 moves with x
    aten.copy.default: _copy,
    aten.embedding_renorm.default: _renorm_outside_autograd,  # autograd has no formula: eager holds it outside
}


def gradient_module(prog: TracedProgram, values: Sequence[torch.Tensor], wrt: Sequence[int]) -> fx.GraphModule:
    """The reverse-mode gradient of a traced scalar program as an aten graph of its own.

    ``prog`` computes one scalar from its placeholders (parameters, buffers, inputs; ``values`` are theirs);
    the returned module takes the same placeholders and returns ``(value, *gradients)``, the gradients with
    respect to the placeholders ``wrt`` (indices into them). It is built by ``make_fx`` over
    ``torch.autograd.grad`` of the program (on fake tensors; on the real values for a program specialized to
    values), so it holds the backward kernels autograd runs, as ordinary nodes.

    Example:
        >>> import torch, jvpgraph
        >>> prog, values = jvpgraph.trace(lambda x: (x.sin() ** 2).sum(), torch.randn(3)).program(torch.randn(3))
        >>> g = gradient_module(prog, values, [0])
        >>> value, grad = g(*values)
        >>> torch.testing.assert_close(grad, 2 * values[0].sin() * values[0].cos())
    """
    _check_torch()
    if len(prog.output_nodes) != 1:
        raise ValueError(f"the function returns {len(prog.output_nodes)} tensors; a Hessian needs one scalar (a loss): return "
                         "loss alone, or reduce the outputs to one number")
    out_val = prog.output_nodes[0].meta.get("val") if isinstance(prog.output_nodes[0], fx.Node) else None
    if out_val is not None and (out_val.numel() != 1 or not out_val.is_floating_point()):
        raise ValueError(f"the function returns a tensor of shape {tuple(out_val.shape)} and dtype {out_val.dtype};"
                         " a Hessian needs one floating-point scalar (a loss): reduce it (.sum(), .mean())")
    wrt = list(wrt)
    interp_gm = prog.gm

    def grad_fn(*vals):
        with torch.enable_grad():
            (value,) = _AboveAutograd(interp_gm).run(*vals)
            # create_graph: backward formulas take their differentiable form (linalg.solve's and det's solve
            # with A again rather than reuse LU factors autograd holds constant: Hv through them was off by
            # 20-100% without it; the second-order OpInfo sweep)
            grads = torch.autograd.grad(value, [vals[i] for i in wrt], allow_unused=True, create_graph=True) \
                if value.requires_grad else [None] * len(wrt)  # a constant (matrix_power(x, 0)): gradient 0
        return (value.detach(), *(torch.zeros_like(vals[i]) if g is None else g for g, i in zip(grads, wrt)))

    example = [v.detach().requires_grad_(i in wrt) for i, v in enumerate(values)]
    mode = "real" if prog.values is not None else "fake"
    # a real-mode trace draws the dropout masks once: not the caller's; the custom ops' state is owned by the graph
    with torch.random.fork_rng(devices=[]), collecting():
        try:
            try:
                with observers_hidden(mode):
                    gm = make_fx(grad_fn, tracing_mode=mode, _allow_non_fake_inputs=True)(*example)
            except Exception as e:  # noqa: BLE001
                if mode != "fake" or not _data_dependent(e):
                    raise
                # the backward branches on values (scatter_reduce's prod counts zeros): traced at these values,
                # and marked so that it is not kept for other values
                gm = make_fx(grad_fn, tracing_mode="real", _allow_non_fake_inputs=True,
                             _error_on_data_dependent_ops=False)(*example)
                gm._jvpgraph_at_values = True
        except RuntimeError as e:
            if "is not differentiable with respect to argument" not in str(e):
                raise
            raise ValueError(_refused_inputs(interp_gm, values, wrt, e)) from None
        own(gm.graph)
    return gm


def _refused_inputs(gm: fx.GraphModule, values: Sequence[torch.Tensor], wrt: Sequence[int], error) -> str:
    """Which of the inputs ``wrt`` autograd refuses to differentiate (each tried alone, on the real values)."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    refused = []
    for i in wrt:
        try:
            with torch.enable_grad(), torch.random.fork_rng(devices=[]):
                _AboveAutograd(gm).run(*(v.detach().requires_grad_(j == i) for j, v in enumerate(values)))
        except RuntimeError as e:
            if "is not differentiable with respect to argument" in str(e):
                refused.append(names[i])
    first = (str(error).splitlines() or [""])[0]
    which = (f"the inputs named {', '.join(refused)} in its trace (the first input is x0)" if refused
             else "one of them")
    return (f"a Hessian is taken in every input with a tangent, but PyTorch cannot differentiate in {which} "
            f"({first}). Pass None "
            "as the tangent of such a tensor (it is then not differentiated in: its gradient and Hv are None), or "
            "keep it inside f (a closure, or a module buffer such as BatchNorm's running statistics).")


#: The oldest torch on which the gradient's graph gives the right Hv. On torch 2.11 the graph make_fx records
#: for autograd.grad gives wrong second-order terms (checked against double-backward: even tanh's Hv is off);
#: torch 2.14 and 2.15 agree with double-backward to rounding (tests/test_hessian.py, the torchvision sweep).
HVP_MIN_TORCH = (2, 14)


def _hvp_works(version: str | None = None) -> bool:
    """Is ``version`` (default: this torch) one on which the gradient's graph gives the right Hv?"""
    version = str(torch.__version__) if version is None else version
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2]) >= HVP_MIN_TORCH


def _check_torch(version: str | None = None) -> None:
    version = str(torch.__version__) if version is None else version
    if not _hvp_works(version):
        raise RuntimeError(
            f"jvpgraph's Hessian-vector products need torch >= {'.'.join(map(str, HVP_MIN_TORCH))}: on torch "
            f"{version} the gradient graph it builds gives wrong Hv (checked against double-backward), so it "
            "refuses rather than answer. Upgrade torch, or use torch.autograd.functional.hvp (double-backward) "
            "there; first-order Jv is unaffected.")


class _GradientTraces:
    """For one forward :class:`~jvpgraph.api.Traced`: the gradient module of each of its traces, flipped by a
    :class:`~jvpgraph.api.Traced` of its own (kept as long as the forward trace is, per input shapes)."""

    def __init__(self, forward: api.Traced, wrt_of: Callable[[TracedProgram], list[int]]):
        self.forward = forward
        self._wrt_of = wrt_of
        # keyed by the trace's graph module (a TracedProgram, a dataclass, is not hashable)
        self._by_trace: "weakref.WeakKeyDictionary[fx.GraphModule, dict]" = weakref.WeakKeyDictionary()

    def __call__(self, inputs: tuple, without: frozenset = frozenset()
                 ) -> tuple[api.Traced, list[torch.Tensor], list[int], TracedProgram]:
        """``without``: placeholder indices not to differentiate in (inputs whose tangent is None)."""
        prog, values = self.forward.program(*inputs)
        key = (tuple((tuple(v.shape), v.dtype, v.device) for v in values), without)
        per = self._by_trace.setdefault(prog.gm, {})
        hit = per.get(key)
        if hit is None:
            wrt = [i for i in self._wrt_of(prog) if i not in without]
            gm = gradient_module(prog, values, wrt)
            hit = (api.Traced(gm, values, wrt=wrt, dynamic=False), wrt)
            if not getattr(gm, "_jvpgraph_at_values", False):  # one traced at these values serves this call only
                per[key] = hit
        return hit[0], values, hit[1], prog


def _check_bn(bn: str) -> None:
    check_mode(bn, allowed=("batch", "eval"),
               why="bn='frozen' holds the batch statistics constant in Jv only, and is no loss's Hessian: use "
                   "bn='batch' (the Hessian of the loss the model computes in train mode) or bn='eval' (running "
                   "statistics)")


def hvp(f: Callable, primals, tangents, *, bn: str = "batch"):
    """``(∇f(x), H v)`` for ``f`` returning a scalar, by flipping the graph of its gradient.

    The same as ``torch.func.jvp(torch.func.grad(f, argnums), primals, tangents)`` with ``argnums`` every
    primal whose tangent is not ``None`` (a ``None`` tangent: not differentiated in, its gradient and ``Hv``
    are ``None``; for integer inputs, and for tensors autograd cannot differentiate, such as running statistics
    passed to ``F.batch_norm``), but it also runs where that raises: BatchNorm in train mode (``bn="batch"``:
    the batch statistics' coupling included; the model's running statistics are not written), fused attention,
    custom ``autograd.Function``. ``primals``/``tangents`` are a tensor each or tuples (one per input, like
    ``torch.func.jvp``); the result has the same structure. Traces of an ``nn.Module`` are cached per shape (a
    new batch is one pass); a function is traced on each call.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).train()
        >>> f = lambda x: net(x).pow(2).sum()
        >>> x, v = torch.randn(6, 3), torch.randn(6, 3)
        >>> grad, hv = jvpgraph.hvp(f, x, v)  # tensors in, tensors out (tuples in: tuples out)
        >>> ref = torch.autograd.functional.hvp(f, x, v)[1]  # double-backward reference
        >>> torch.testing.assert_close(hv, ref, rtol=1e-4, atol=1e-5)
    """
    _check_bn(bn)
    single = not isinstance(primals, (tuple, list))
    primals = api._as_tuple(primals)
    tangents = api._as_tuple(tangents)
    forward = api.cached_trace(f, *primals, bn=bn)
    # kept on the forward trace itself (a table keyed weakly by it would hold it through its value: never freed)
    traces = getattr(forward, "_gradient_traces", None)
    if traces is None:
        traces = forward._gradient_traces = _GradientTraces(
            forward, lambda p: [len(p.param_names) + len(p.buffer_names) + i for i in p.diff_inputs])
    flat_in, spec = pytree.tree_flatten(primals)
    flat_t = pytree.tree_leaves(tangents, is_leaf=lambda z: z is None)
    if len(flat_t) != len(flat_in):
        raise ValueError(f"got {len(flat_t)} tangents for {len(flat_in)} inputs: pass one per input (None for an "
                         "integer input, or one not to differentiate in)")
    offset = len(forward.program(*primals)[1]) - len(flat_in)
    traced, values, wrt, prog = traces(primals, frozenset(offset + i for i, t in enumerate(flat_t) if t is None))
    ts = [flat_t[i - offset] for i in wrt]
    out, tan = traced.jvp(tuple(values), tuple(ts))
    grads, hvs = dict(zip(wrt, out[1:])), dict(zip(wrt, tan[1:]))
    g = [grads.get(offset + i) for i in range(len(flat_in))]
    h = [hvs.get(offset + i) for i in range(len(flat_in))]
    if single:
        return g[0], h[0]
    return pytree.tree_unflatten(g, spec), pytree.tree_unflatten(h, spec)


# ------------------------------------------------------------------ the parameter-space form
class _Loss(nn.Module):
    """``loss_fn(model(*inputs), targets)`` as one module (its parameters are the model's, prefixed
    ``model.``); ``loss_fn(model(*inputs))`` without targets."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs, *targets):
        return self.loss_fn(_call(self.model, inputs), *targets)


def _check_targets(loss_fn: Callable, targets) -> None:
    """``targets=None`` calls ``loss_fn(output)``: said before tracing when ``loss_fn`` needs more."""
    if targets is not None:
        return
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return  # no signature to read (a C function): the call itself says
    try:
        sig.bind(None)
    except TypeError:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        needs = [p.name for p in sig.parameters.values() if p.default is p.empty and p.kind in (
            p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise TypeError(f"targets is None, so loss_fn is called on the model's output alone, but {name} needs "
                        f"({', '.join(needs)}): pass the targets (curv.hvp(v, inputs, targets)), or a loss_fn of the "
                        "output alone (lambda out: out.loss for a model that computes its loss)") from None


def _batch(inputs, targets) -> tuple:
    """The arguments of :class:`_Loss` (and :class:`_OutputLoss` after the output): no targets when ``None``."""
    return (inputs,) if targets is None else (inputs, targets)


def _call(model: nn.Module, inputs):
    """``model`` on a batch's inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _check_inputs(model: nn.Module, inputs) -> None:
    """The model's inputs as :class:`Curvature` takes them, checked before any tracing."""
    if isinstance(inputs, torch.Tensor):
        return
    if not isinstance(inputs, (tuple, list, dict)):
        raise TypeError(f"inputs is a {type(inputs).__name__}: pass a tensor, a tuple of the model's positional "
                        "tensors, or a dict of its keyword tensors (called as model(**inputs))")
    items = inputs.items() if isinstance(inputs, dict) else enumerate(inputs)
    for key, value in items:
        if not isinstance(value, torch.Tensor):
            where = f"inputs[{key!r}]"
            raise TypeError(f"{where} is a {type(value).__name__}; Curvature passes tensors to "
                            f"{type(model).__name__} only. Pass the inputs as a dict of keyword tensors, called as "
                            "model(**inputs), leaving out those that are None (e.g. dict(input_ids=x, "
                            "decoder_input_ids=d)); bind other arguments in a wrapper module")


class _OutputLoss(nn.Module):
    """The loss alone, as a function of the model's output: its Hessian there is the GGN's middle factor."""

    def __init__(self, loss_fn: Callable):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, out, *targets):
        return self.loss_fn(out, *targets)


class Curvature:
    """The curvature of ``loss_fn(model(inputs), targets)`` in the model's parameters: Hessian- and
    Gauss-Newton-vector products, traced once and applied to new batches and new parameter values.

    * :meth:`hvp` — ``H v``: the gradient's graph flipped (forward over reverse). In train mode with
      ``bn="batch"`` this is the Hessian of the loss the model really computes (batch statistics depend on
      the parameters); ``bn="eval"`` uses the running statistics.
    * :meth:`ggnvp` — ``G v = Jᵀ H_L J v`` with ``J`` the Jacobian of the model's output in the parameters
      (one flipped-graph Jv, the loss's Hessian in the output by a small :func:`hvp`, one vjp). For
      cross-entropy on logits and mean-squared error this is also the Fisher information (of the
      categorical and the Gaussian likelihood; up to the loss's reduction scale).
    * :meth:`operator` — a ``scipy.sparse.linalg.LinearOperator`` of either, on the flattened parameters,
      for ``eigsh`` and the tools that take one; :meth:`eigenvalues`, :meth:`trace` and :meth:`density`
      (Lanczos, Hutchinson, stochastic Lanczos quadrature, :mod:`jvpgraph.spectra`).

    ``v`` is a dict ``{name: tensor}`` (the names of ``model.named_parameters()``), a tuple in that order, or
    one flat vector (their concatenation); results come back in the same form. ``params`` restricts the
    products to some parameters (names); by default every parameter with ``requires_grad``. ``inputs`` is a
    tensor, a tuple of the model's positional inputs, or a dict of its keyword inputs (``model(**inputs)``, as
    a Hugging Face batch is passed: ``curv.hvp(v, dict(input_ids=x, decoder_input_ids=d), labels)``).
    ``targets=None`` (the default) calls ``loss_fn(output)`` alone: a loss the model computes itself, as a
    Hugging Face model given ``labels`` does (``Curvature(model, lambda out: out.loss).hvp(v, batch)``). A
    ``torch.compile``'d model is traced through its original module (``_orig_mod``; the names stay the
    compiled model's). Neither the model's parameters, buffers, ``training`` flags nor the caller's random
    generator are changed.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> curv = jvpgraph.Curvature(net, nn.functional.cross_entropy)
        >>> v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
        >>> hv = curv.hvp(v, x, y)
        >>> # double-backward reference
        >>> params = dict(net.named_parameters())
        >>> g = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), list(params.values()), create_graph=True)
        >>> ref = torch.autograd.grad(g, list(params.values()), list(v.values()))
        >>> for name, r in zip(params, ref):
        ...     torch.testing.assert_close(hv[name], r, rtol=1e-4, atol=1e-5)
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, bn: str = "batch", params: Sequence[str] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Curvature expects an nn.Module, got {type(model).__name__} (for a function of tensors,"
                            " use jvpgraph.hvp)")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn={loss_fn!r} is not callable: pass e.g. torch.nn.functional.cross_entropy")
        _check_bn(bn)
        self.model = model
        self.loss_fn = loss_fn
        self.bn = bn
        # torch.compile's wrapper: its original module is traced (make_fx cannot trace Dynamo's frame); the
        # parameters keep the names the caller sees ("_orig_mod." first)
        self._plain = api._uncompiled(model)
        named = dict(model.named_parameters())
        if params is None:
            self.names = [n for n, p in named.items() if p.requires_grad]
        else:
            params = list(params)
            unknown = [n for n in params if n not in named]
            if unknown:
                raise ValueError(f"params: {unknown[0]!r} is not a parameter of {type(model).__name__} (it has "
                                 f"{', '.join(list(named)[:6])}{', ...' if len(named) > 6 else ''})")
            self.names = [n for n in named if n in set(params)]
        if not self.names:
            raise ValueError(f"{type(model).__name__} has no parameter to take the curvature in (none requires grad)")
        plain_name = {id(p): n for n, p in self._plain.named_parameters()}
        self._plain_names = [plain_name[id(named[n])] for n in self.names]
        self._loss = _Loss(self._plain, loss_fn)
        self._hessian: _GradientTraces | None = None
        self._output: api.Traced | None = None  # model(inputs) with its parameters as tangent carriers
        self._output_loss = _OutputLoss(loss_fn)

    # -------------------------------------------------------------- vectors
    def _shapes(self) -> list[torch.Size]:
        named = dict(self.model.named_parameters())
        return [named[n].shape for n in self.names]

    @property
    def dim(self) -> int:
        """The number of parameters the products act on (the operator's size)."""
        return sum(s.numel() for s in self._shapes())

    def _split(self, v) -> tuple[list[torch.Tensor], Callable]:
        """``v`` as one tensor per parameter (in :attr:`names` order), and how to give results back in
        ``v``'s form."""
        named = dict(self.model.named_parameters())
        ps = [named[n] for n in self.names]
        if isinstance(v, dict):
            extra = [k for k in v if k not in self.names]
            if extra:
                raise ValueError(f"v has {extra[0]!r}, which is not among the parameters the products act on "
                                 f"({', '.join(self.names[:6])}{', ...' if len(self.names) > 6 else ''})")
            vs = [v.get(n) if v.get(n) is not None else torch.zeros_like(p) for n, p in zip(self.names, ps)]
            back = lambda ts: dict(zip(self.names, ts))  # noqa: E731
        elif isinstance(v, torch.Tensor) and v.dim() == 1 and len(ps) > 1 or (
                isinstance(v, torch.Tensor) and v.dim() == 1 and ps[0].dim() != 1):
            if v.numel() != self.dim:
                raise ValueError(f"v is a flat vector of {v.numel()} numbers; the parameters have {self.dim}")
            vs = [c.view(p.shape).to(p.dtype) for c, p in zip(v.split([p.numel() for p in ps]), ps)]
            back = lambda ts: torch.cat([t.reshape(-1) for t in ts]).to(v.dtype)  # noqa: E731
        else:
            vs = list(v) if isinstance(v, (tuple, list)) else [v]
            if len(vs) != len(ps):
                raise ValueError(f"v has {len(vs)} tensors; the parameters the products act on are {len(ps)}: "
                                 + ", ".join(self.names[:6]) + (", ..." if len(ps) > 6 else ""))
            vs = [torch.zeros_like(p) if t is None else t for t, p in zip(vs, ps)]
            back = (lambda ts: type(v)(ts)) if isinstance(v, (tuple, list)) else (lambda ts: ts[0])
        for n, t, p in zip(self.names, vs, ps):
            if t.shape != p.shape:
                raise ValueError(f"v[{n!r}] has shape {tuple(t.shape)}, but the parameter has {tuple(p.shape)}")
        return [t.to(p.dtype) for t, p in zip(vs, ps)], back

    def _wrt(self, prog: TracedProgram) -> list[int]:
        index = {n: i for i, n in enumerate(prog.param_names)}
        return [index[f"model.{n}"] for n in self._plain_names]

    # -------------------------------------------------------------- products
    def _grad_and_hvp(self, v, inputs, targets=None, *, gradient: bool = True):
        """``(loss, ∇L, H v)``; with ``gradient=False`` only ``H v``, from the flipped graph pruned to it (the
        primal gradients' last kernels left out: ~10% of the time on a convolutional network)."""
        vs, back = self._split(v)
        _check_inputs(self.model, inputs)
        _check_targets(self.loss_fn, targets)
        batch = _batch(inputs, targets)
        if self._hessian is None:
            self._hessian = _GradientTraces(api.Traced(self._loss, batch, bn=self.bn), self._wrt)
        traced, values, wrt, _ = self._hessian(batch)
        # the products are numbers, not a graph back to the parameters (that would keep every pass alive)
        primals, tangents = tuple(v.detach() for v in values), tuple(t.detach() for t in vs)
        if not gradient:
            return back(list(traced.jv(primals, tangents)[1:]))
        out, tan = traced.jvp(primals, tangents)
        return out[0], back(list(out[1:])), back(list(tan[1:]))

    def hvp(self, v, inputs, targets=None):
        """``H v``: the Hessian of the loss in the parameters times ``v`` (same form as ``v``).

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
            >>> curv = jvpgraph.Curvature(net, nn.functional.mse_loss)
            >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
            >>> v = torch.randn(curv.dim)
            >>> hv = curv.hvp(v, x, y)  # a flat vector in, a flat vector out
            >>> w = torch.randn(curv.dim)
            >>> torch.testing.assert_close(w @ hv, v @ curv.hvp(w, x, y), rtol=1e-4, atol=1e-6)  # H is symmetric
        """
        return self._grad_and_hvp(v, inputs, targets, gradient=False)

    def grad_and_hvp(self, v, inputs, targets=None):
        """``(loss, ∇L, H v)`` from one pass (the gradient and ``v`` in the same form).

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Linear(3, 1)
            >>> curv = jvpgraph.Curvature(net, nn.functional.mse_loss)
            >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
            >>> loss, grad, hv = curv.grad_and_hvp(dict(net.named_parameters()), x, y)
            >>> torch.testing.assert_close(loss, nn.functional.mse_loss(net(x), y))
        """
        return self._grad_and_hvp(v, inputs, targets)

    def ggnvp(self, v, inputs, targets=None):
        """``G v = Jᵀ H_L J v``: the generalized Gauss-Newton matrix times ``v`` (same form as ``v``).

        ``J`` is the Jacobian of the model's output in the parameters, ``H_L`` the Hessian of ``loss_fn`` in
        that output (any twice-differentiable loss; ``G`` is positive semi-definite when the loss is convex
        in the output, as cross-entropy and MSE are).

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
            >>> curv = jvpgraph.Curvature(net, nn.functional.mse_loss)
            >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
            >>> v = torch.randn(curv.dim)
            >>> # MSE (mean over 16 numbers): H_L = 2/16 I, so vᵀ G v = 2/16 ‖J v‖²
            >>> jv = torch.func.jvp(lambda *p: torch.func.functional_call(net, dict(zip(
            ...     [n for n, _ in net.named_parameters()], p)), (x,)), tuple(net.parameters()),
            ...     tuple(c.view(p.shape) for c, p in zip(v.split([p.numel() for p in net.parameters()]),
            ...                                           net.parameters())))[1]
            >>> torch.testing.assert_close(v @ curv.ggnvp(v, x, y), 2 / 16 * jv.pow(2).sum(), rtol=1e-4, atol=1e-6)
        """
        vs, back = self._split(v)
        _check_inputs(self.model, inputs)
        _check_targets(self.loss_fn, targets)
        inputs_t = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)  # a dict: one argument
        if self._output is None:
            self._output = api.Traced(_ParamsAsInputs(self._plain, self._plain_names),
                                      (*self._param_values(), *inputs_t), bn=self.bn, wrt=list(range(len(self.names))))
        with torch.enable_grad():
            ps = [p.detach().requires_grad_(True) for p in self._param_values()]
            lin = self._output.linearize(*ps, *inputs_t, vjp=True)
            jv = lin.jvp(*vs)
            outs = pytree.tree_leaves(lin.out)
            if len(outs) != 1:
                raise ValueError(f"{type(self.model).__name__} returns {len(outs)} tensors; ggnvp needs the loss's "
                                 "input to be one tensor (wrap the model to return it)")
            (out,) = outs
            jv = pytree.tree_leaves(jv)[0]
            primals = _batch(out.detach(), targets)
            _, hjv = hvp(self._output_loss, primals, (jv, None)[:len(primals)], bn="batch")
            g = lin.vjp(hjv)
        g = g if isinstance(g, tuple) else (g,)
        return back([t.detach() for t in g[:len(self.names)]])

    def _param_values(self) -> list[torch.Tensor]:
        named = dict(self.model.named_parameters())
        return [named[n].detach() for n in self.names]

    # -------------------------------------------------------------- operators and spectra
    def operator(self, inputs, targets=None, kind: str = "hessian"):
        """A ``scipy.sparse.linalg.LinearOperator`` of ``H`` (``kind="hessian"``) or ``G`` (``"ggn"``) on the
        flattened parameters (float64 NumPy vectors in and out; the products run in the parameters' dtype).

        Example:
            >>> import numpy as np, torch, torch.nn as nn, jvpgraph
            >>> from scipy.sparse.linalg import eigsh
            >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
            >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
            >>> op = jvpgraph.Curvature(net, nn.functional.mse_loss).operator(x, y)
            >>> top = eigsh(op, k=1, which="LA", return_eigenvectors=False)
            >>> dense = np.column_stack([op @ e for e in np.eye(op.shape[0])])
            >>> np.testing.assert_allclose(top, np.linalg.eigvalsh(dense)[-1:], rtol=1e-8)
        """
        from scipy.sparse.linalg import LinearOperator
        import numpy as np

        mv = self.matvec(inputs, targets, kind)
        dtype = self._param_values()[0].dtype

        def matvec(x):
            x = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1), dtype=dtype)
            return mv(x).detach().to(torch.float64).cpu().numpy()

        return LinearOperator((self.dim, self.dim), matvec=matvec, rmatvec=matvec, dtype=np.float64)

    def matvec(self, inputs, targets=None, kind: str = "hessian") -> Callable[[torch.Tensor], torch.Tensor]:
        """``v ↦ H v`` (or ``G v``) on flat vectors, for the batch ``(inputs, targets)``.

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Linear(3, 1, bias=False)
            >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
            >>> mv = jvpgraph.Curvature(net, nn.functional.mse_loss).matvec(x, y)
            >>> torch.testing.assert_close(mv(torch.eye(3)[0]), 2 / 8 * x.T @ x[:, 0])  # H = 2/N XᵀX
        """
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"kind={kind!r}: expected 'hessian' or 'ggn'")
        product = self.hvp if kind == "hessian" else self.ggnvp
        dtype, device = self._param_values()[0].dtype, self._param_values()[0].device

        def mv(v: torch.Tensor) -> torch.Tensor:
            return product(v.to(dtype=dtype, device=device).reshape(-1), inputs, targets)

        return mv

    def eigenvalues(self, inputs, targets=None, k: int = 1, *, kind: str = "hessian", iters: int | None = None,
                    tol: float = 1e-6, seed: int = 0):
        """The ``k`` largest eigenvalues of ``H`` (or ``G``) by Lanczos: :func:`jvpgraph.spectra.lanczos`.

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Linear(3, 1, bias=False).double()
            >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
            >>> res = jvpgraph.Curvature(net, nn.functional.mse_loss).eigenvalues(x, y, k=1)
            >>> torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(2 / 20 * x.T @ x)[-1:])
        """
        from .spectra import lanczos

        dtype = self._param_values()[0].dtype
        return lanczos(self.matvec(inputs, targets, kind), self.dim, k=k, iters=iters, tol=tol, seed=seed,
                       dtype=dtype, device=self._param_values()[0].device)

    def trace(self, inputs, targets=None, *, kind: str = "hessian", samples: int = 100, seed: int = 0):
        """Hutchinson's estimate of ``tr H`` (or ``tr G``) with its standard error:
        :func:`jvpgraph.spectra.hutchinson`.

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Linear(3, 1, bias=False).double()
            >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
            >>> est = jvpgraph.Curvature(net, nn.functional.mse_loss).trace(x, y, samples=200)
            >>> exact = (2 / 20 * x.T @ x).trace()
            >>> bool(abs(est.estimate - exact) < 4 * est.stderr + 1e-12)
            True
        """
        from .spectra import hutchinson

        p = self._param_values()[0]
        return hutchinson(self.matvec(inputs, targets, kind), self.dim, samples=samples, seed=seed, dtype=p.dtype,
                          device=p.device)

    def density(self, inputs, targets=None, *, kind: str = "hessian", iters: int = 40, probes: int = 4, seed: int = 0):
        """The spectral density of ``H`` (or ``G``) by stochastic Lanczos quadrature:
        :func:`jvpgraph.spectra.slq`.

        Example:
            >>> import torch, torch.nn as nn, jvpgraph
            >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
            >>> x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
            >>> d = jvpgraph.Curvature(net, nn.functional.mse_loss).density(x, y, iters=21, probes=2)
            >>> torch.testing.assert_close(d.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
        """
        from .spectra import slq

        p = self._param_values()[0]
        return slq(self.matvec(inputs, targets, kind), self.dim, iters=iters, probes=probes, seed=seed,
                   dtype=p.dtype, device=p.device)

    def __repr__(self):
        return (f"Curvature({type(self.model).__name__}, {getattr(self.loss_fn, '__name__', type(self.loss_fn).__name__)}"
                f", bn={self.bn!r}, {len(self.names)} parameter tensors, dim={self.dim})")


class _ParamsAsInputs(nn.Module):
    """``model(*inputs)`` with some of its parameters taken as inputs (tangent carriers of a Jv in the
    parameters); the rest of its state stays the model's."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, *args: Any):
        ps, inputs = args[:len(self.names)], args[len(self.names):]
        if len(inputs) == 1 and isinstance(inputs[0], dict):  # keyword inputs
            return torch.func.functional_call(self.model, dict(zip(self.names, ps)), (), inputs[0], strict=False)
        return torch.func.functional_call(self.model, dict(zip(self.names, ps)), inputs, strict=False)
