"""Jacobian regularizers with one call: ``logits, penalty = reg(x)``.

* :class:`SpectralRegularizer` — the exact per-sample spectral norm of the input-output Jacobian by power
  iteration (the paper's Algorithm 1), for any network through the flipped graph (its Section 3.2);
* :class:`FrobeniusRegularizer` — Hoffman et al. (2019): ``‖J‖_F²`` estimated with random projections;
* :class:`SpectralBoundRegularizer` — Yoshida & Miyato (2017): the sum of squared spectral norms of the
  layers' weights, an upper bound of ``σ`` for a piecewise-linear network (the paper's Spectral-Bound).

Each returns the model's output (the one forward the training loss uses too) and a per-sample penalty
``(B,)`` that is differentiable in the parameters::

    logits, penalty = reg(x)
    loss = F.cross_entropy(logits, y) + lam * penalty.mean()
    loss.backward()

In train mode the forward updates BatchNorm running statistics exactly as ``model(x)`` would, once; the
regularizer's extra passes never touch them. Weight decay stays the optimizer's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import api
from .batchnorm import check_per_sample
from .spectral import normalize_per_sample, per_sample_norm

__all__ = ["SpectralRegularizer", "FrobeniusRegularizer", "SpectralBoundRegularizer", "Regularized"]


class _JacobianRegularizer:
    def __init__(self, model: nn.Module, bn: str, update_buffers: bool, compile: bool | dict = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} expects an nn.Module, got {type(model).__name__}")
        check_per_sample(model, bn)  # a per-sample penalty needs a per-sample Jacobian
        self.model = model
        self.bn = bn
        self.update_buffers = update_buffers
        self.compile = compile

    def _forward(self, x: torch.Tensor, vjp: bool) -> "api.Linearized":
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        traced = api.cached_trace(self.model, x, bn=self.bn, compile=self.compile)
        # one forward, recorded by autograd for the loss (and with respect to x when Jᵀu is its backward)
        lin = traced.linearize(x, vjp=vjp)
        out = lin.out
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0]:
            raise ValueError(f"{type(self).__name__} needs a model whose output is one tensor of shape (B, ...)")
        if self.update_buffers and lin.new_buffers:
            # what model(x) in train mode would have written (running statistics, num_batches_tracked)
            buffers = dict(self.model.named_buffers())
            with torch.no_grad():
                for name, value in lin.new_buffers.items():
                    buffers[name].copy_(value)
        return lin


class SpectralRegularizer(_JacobianRegularizer):
    """The exact spectral norm of each sample's input-output Jacobian as a penalty (Algorithm 1).

    Args:
        model: the network, called as ``model(x)`` on a batch.
        n_iter: power iterations per call (1 in the paper: with ``warm_start`` they accumulate over training).
        penalty: ``"sigma"`` (``σ_b``) or ``"sigma2"`` (``σ_b²``).
        bn: BatchNorm in train mode: ``"frozen"`` (batch statistics held constant in the Jacobian: the
            paper's pseudo-inference mode) or ``"eval"`` (running statistics).
        warm_start: keep each sample's right singular vector between calls, keyed by the ``index`` passed
            to :meth:`__call__` (e.g. dataset indices), so one iteration per step converges over training
            (default on; calls without ``index`` start cold). From a cold start, ``n_iter=1`` with the default
            ``grad`` gives ``‖Jv‖`` for a random unit ``v`` — half an iteration, nearer ``‖J‖_F/√n`` than ``σ``:
            pass indices, or ``n_iter >= 2``, or ``grad="JTu"`` (the paper's one full iteration).
        grad: what the penalty is, and what its gradient flows through (the first ``n_iter - 1`` iterations
            always run without autograd):

            * ``"uJv"`` (default): ``σ = uᵀ J v`` with ``u = Jv/‖Jv‖`` and ``v`` held constant: one tangent
              pass recorded by autograd. Its gradient ``uᵀ(∇J)v`` is exactly ``∇σ`` at a singular pair.
              The ``Jᵀu`` of the iteration comes out of the same ``loss.backward()`` that computes the
              parameters' gradients (as the gradient with respect to ``v``); with ``warm_start`` it becomes
              the next call's ``v``, so a step costs one forward, one tangent pass and one backward.
            * ``"JTu"``: ``σ = ‖Jᵀu‖`` (the paper's estimate after a whole iteration, closer to ``σ`` from a
              cold start), ``u`` held constant; the gradient goes through that transposed pass
              (double backward).
            * ``"iterations"``: autograd through every product of the last iteration, as Algorithm 1
              written out differentiates ``‖u‖/‖v‖``; the same gradient at convergence, more memory.
        update_buffers: copy the forward's new running statistics into the model (as ``model(x)`` would).
        generator: random starting vectors (default: a private generator; the caller's RNG is not touched).
        compile: run the recorded forward and the tangent pass under ``torch.compile`` (``True`` or a dict
            of its options; see :class:`jvpgraph.Traced`).

    Calling ``reg(x, index=None)`` returns ``(output, penalty)`` with ``penalty`` of shape ``(B,)``;
    ``reg.last`` holds ``u``, ``v`` and ``sigma`` (detached) of the last call.

    Example:
        >>> import torch, torch.nn as nn, torch.nn.functional as F, jvpgraph
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 3))
        >>> reg = jvpgraph.SpectralRegularizer(net, n_iter=3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> logits, penalty = reg(x)
        >>> (F.cross_entropy(logits, y) + 0.1 * penalty.mean()).backward()
        >>> penalty.shape, net[0].weight.grad is not None
        (torch.Size([8]), True)
    """

    GRADS = ("uJv", "JTu", "iterations")

    def __init__(self, model: nn.Module, n_iter: int = 1, penalty: str = "sigma", *, bn: str = "frozen",
                 warm_start: bool = True, grad: str = "uJv", update_buffers: bool = True,
                 generator: torch.Generator | None = None, compile: bool | dict = False):
        super().__init__(model, bn, update_buffers, compile)
        if penalty not in ("sigma", "sigma2"):
            raise ValueError(f"penalty={penalty!r}: expected 'sigma' or 'sigma2'")
        if grad not in self.GRADS:
            raise ValueError(f"grad={grad!r}: expected one of {self.GRADS}")
        if n_iter < 1:
            raise ValueError(f"n_iter={n_iter}: at least one power iteration")
        self.n_iter, self.penalty, self.warm_start, self.grad = n_iter, penalty, warm_start, grad
        self.generator = generator
        # warm-start vectors by dataset index: row i of _store, valid where _kept[i]
        self._store: torch.Tensor | None = None
        self._kept: torch.Tensor | None = None
        self.last: dict[str, torch.Tensor] = {}

    def _start(self, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """Starting right vectors: kept ones for the indices ``idx`` (checked, or ``None``: a cold start)."""
        if self.generator is None:
            self.generator = torch.Generator(device=x.device).manual_seed(0)
        if idx is None:
            return normalize_per_sample(torch.randn(x.shape, generator=self.generator, dtype=x.dtype,
                                                    device=x.device))
        self._reserve(x, int(idx.max()) + 1 if idx.numel() else 0)
        on = idx.to(self._store.device)
        kept = self._kept[on].to(x.device)
        v = torch.where(kept.reshape(-1, *([1] * (x.dim() - 1))), self._store[on].to(x), torch.zeros_like(x))
        # a sample's first vector depends on its index only (not on the batch it came in, nor on the process
        # that sees it: a run sharded by DistributedDataParallel starts like a single process)
        seed = self.generator.initial_seed()
        for row in (~kept).nonzero().flatten().tolist():
            g = torch.Generator(device=x.device).manual_seed((seed * 1_000_003 + int(idx[row])) % (2 ** 63))
            v[row] = torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device)
        return normalize_per_sample(v)

    def _reserve(self, x: torch.Tensor, size: int) -> None:
        """Grow the vector store to ``size`` rows of ``x``'s sample shape (a new shape starts it afresh)."""
        shape = tuple(x.shape[1:])
        if self._store is None or tuple(self._store.shape[1:]) != shape or self._store.dtype != x.dtype:
            self._store = x.new_zeros((0, *shape))
            self._kept = torch.zeros(0, dtype=torch.bool, device=x.device)
        if size > self._store.shape[0]:
            grow = max(size, 2 * self._store.shape[0]) - self._store.shape[0]
            self._store = torch.cat([self._store, x.new_zeros((grow, *shape))])
            self._kept = torch.cat([self._kept, torch.zeros(grow, dtype=torch.bool, device=self._kept.device)])

    def _keep(self, idx: torch.Tensor | None, v: torch.Tensor) -> None:
        if idx is None:
            return
        self._reserve(v, int(idx.max()) + 1 if idx.numel() else 0)
        nonzero = v.detach().flatten(1).abs().sum(1) > 0  # a zero gradient (lambda = 0) keeps the old vector
        rows = idx[nonzero.cpu()].to(self._store.device)
        self._store[rows] = v.detach()[nonzero].to(self._store)
        self._kept[rows] = True

    def __call__(self, x: torch.Tensor, index=None):
        # the batch's dataset indices, checked before any work; None: no warm start for this call
        idx = _index_tensor(index, x.shape[0]) if self.warm_start and index is not None else None
        lin = self._forward(x, vjp=self.grad != "uJv")
        v = self._start(x, idx)
        expand = (-1,) + (1,) * (x.dim() - 1)
        plain = lin.detach()
        with torch.no_grad():
            for _ in range(self.n_iter - 1):
                v = normalize_per_sample(plain.vjp(normalize_per_sample(plain.jvp(v))))
        if self.grad == "uJv":
            if idx is not None and torch.is_grad_enabled():
                v = v.clone().requires_grad_(True)  # its gradient in loss.backward() is Jᵀu (scaled)
                v.register_hook(lambda g: self._keep(idx, normalize_per_sample(g)))
            jv = lin.jvp(v)  # the one tangent pass, recorded by autograd
            u = normalize_per_sample(jv.detach())
            sigma = (u * jv).flatten(1).sum(1)  # = ‖Jv‖, differentiable as uᵀ(∇J)v (u held constant)
            if idx is not None and not v.requires_grad:  # no backward to come: Jᵀu for the next call here
                self._keep(idx, normalize_per_sample(plain.vjp(u)))
        elif self.grad == "JTu":
            with torch.no_grad():
                u = normalize_per_sample(plain.jvp(v))
            w = lin.vjp(u, create_graph=True)  # Jᵀu, differentiable in the parameters
            sigma = per_sample_norm(w)
            v = normalize_per_sample(w.detach())
            self._keep(idx, v)
        else:  # "iterations"
            u = normalize_per_sample(lin.jvp(v))
            w = lin.vjp(u, create_graph=True)
            sigma = per_sample_norm(w)
            v = w / sigma.clamp_min(1e-30).reshape(expand)
            self._keep(idx, v)
        self.last = dict(u=u.detach(), v=v.detach(), sigma=sigma.detach())
        return lin.out, sigma if self.penalty == "sigma" else sigma ** 2


class FrobeniusRegularizer(_JacobianRegularizer):
    """Hoffman et al. (2019): ``‖J_b‖_F²`` per sample, estimated with ``n_proj`` random projections,
    ``n_out / n_proj · Σ_p ‖J_bᵀ ε_p‖²`` with ``ε_p`` uniform on the unit sphere of the output space
    (``bn``, ``update_buffers``, ``generator``, ``compile``: as :class:`SpectralRegularizer`).

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        >>> logits, penalty = jvpgraph.FrobeniusRegularizer(net, n_proj=2)(torch.randn(8, 4))
        >>> penalty.shape
        torch.Size([8])
    """

    def __init__(self, model: nn.Module, n_proj: int = 1, *, bn: str = "frozen", update_buffers: bool = True,
                 generator: torch.Generator | None = None, compile: bool | dict = False):
        super().__init__(model, bn, update_buffers, compile)
        if n_proj < 1:
            raise ValueError(f"n_proj={n_proj}: at least one projection")
        self.n_proj = n_proj
        self.generator = generator

    def __call__(self, x: torch.Tensor, index=None):
        lin = self._forward(x, vjp=True)
        out = lin.out
        if self.generator is None:
            self.generator = torch.Generator(device=x.device).manual_seed(0)
        n_out = out[0].numel()
        total = 0
        for _ in range(self.n_proj):
            e = normalize_per_sample(torch.randn(out.shape, generator=self.generator, dtype=out.dtype,
                                                 device=out.device))
            total = total + per_sample_norm(lin.vjp(e, create_graph=True)) ** 2
        return out, total * (n_out / self.n_proj)


class SpectralBoundRegularizer:
    """Yoshida & Miyato (2017): ``Σ_l σ(W_l)²`` over the linear and convolution layers, each ``σ(W_l)`` by
    power iteration on the weight reshaped to ``(out, -1)`` with a persistent vector (``n_iter`` steps per
    call). The same for every sample: the penalty is that sum repeated ``B`` times.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> reg = jvpgraph.SpectralBoundRegularizer(net, n_iter=500)  # power iteration: converged
        >>> logits, penalty = reg(torch.randn(8, 4))
        >>> want = sum(torch.linalg.matrix_norm(m.weight, 2) ** 2 for m in (net[0], net[2]))
        >>> torch.testing.assert_close(penalty[0], want, rtol=1e-4, atol=1e-6)
    """

    def __init__(self, model: nn.Module, n_iter: int = 1, generator: torch.Generator | None = None):
        if n_iter < 1:
            raise ValueError(f"n_iter={n_iter}: at least one power iteration")
        self.model, self.n_iter = model, n_iter
        self.generator = generator or torch.Generator().manual_seed(0)
        self._u: dict[str, torch.Tensor] = {}

    def layers(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, m.weight) for name, m in self.model.named_modules()
                if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight is not None]

    def bound(self) -> torch.Tensor:
        """``Σ_l σ(W_l)²``, differentiable in the weights (singular vectors held constant)."""
        total = 0
        for name, w in self.layers():
            W = w.flatten(1) if not isinstance(w, nn.parameter.UninitializedParameter) else w
            u = self._u.get(name)
            if u is None or u.shape[0] != W.shape[0]:
                u = torch.randn(W.shape[0], generator=self.generator, dtype=W.dtype).to(W.device)
            with torch.no_grad():
                for _ in range(self.n_iter):
                    v = W.t() @ u
                    v = v / v.norm().clamp_min(1e-30)
                    u = W @ v
                    u = u / u.norm().clamp_min(1e-30)
            self._u[name] = u
            total = total + (u @ W @ v) ** 2
        return total

    def __call__(self, x: torch.Tensor, index=None):
        out = self.model(x)
        bound = self.bound()
        return out, bound.expand(out.shape[0]) if isinstance(bound, torch.Tensor) else \
            torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)


def _index_tensor(index, batch: int) -> torch.Tensor:
    """Dataset indices of a batch as a CPU int64 tensor, checked: one non-negative integer per sample."""
    idx = torch.as_tensor(index).reshape(-1)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"index must hold integers (dataset indices), got dtype {idx.dtype}")
    idx = idx.to(device="cpu", dtype=torch.int64)
    if idx.numel() != batch:
        raise ValueError(f"index has {idx.numel()} entries for a batch of {batch}")
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"index must be non-negative dataset indices, got {int(idx.min())}")
    return idx


class Regularized(nn.Module):
    """A model and its regularizer as one module whose ``forward(x, index=None)`` returns ``(output, penalty)``:
    what a training engine that wraps modules needs, e.g. ``DistributedDataParallel(Regularized(model, reg))``
    (the regularizer's forward then runs inside DDP's, so its gradients are all-reduced like any other).

    With DDP each rank regularizes its own samples; the penalty's mean over a rank's batch, averaged over the
    ranks by DDP's gradient averaging, is the mean over the global batch. BatchNorm in train mode uses each
    rank's batch statistics, as in any DDP training (``bn="frozen"`` holds those), and DDP broadcasts rank 0's
    running statistics at each forward.

    Example:
        >>> import torch, torch.nn as nn, jvpgraph
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> both = Regularized(net, jvpgraph.SpectralRegularizer(net))
        >>> out, penalty = both(torch.randn(5, 4), torch.arange(5))
        >>> out.shape, penalty.shape, [n for n, _ in both.named_parameters()][:1]
        (torch.Size([5, 3]), torch.Size([5]), ['model.0.weight'])
    """

    def __init__(self, model: nn.Module, regularizer):
        super().__init__()
        if getattr(regularizer, "model", model) is not model:
            raise ValueError("Regularized: the regularizer was built for another model; build it with this one")
        self.model = model
        self.regularizer = regularizer  # not a module: its state (warm-start vectors) stays per process

    def forward(self, x: torch.Tensor, index=None):
        return self.regularizer(x, index=index)
