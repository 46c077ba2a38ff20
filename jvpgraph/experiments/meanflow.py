"""MeanFlow: a one-step generative model trained with ``Jv`` inside its loss.

MeanFlow (Geng et al., 2025) learns the *average* velocity ``u(z, r, t)`` of a flow from noise (``t = 1``) to
data (``t = 0``) along the straight path ``z_t = (1 − t) x + t e``, whose instantaneous velocity is
``v = e − x``. The identity it trains on,

    u(z_t, r, t) = v − (t − r) · d/dt u(z_t, r, t),     d/dt u = ∂z u · v + ∂t u,

needs the total derivative of the network along ``(v, 0, 1)`` in its three inputs ``(z, r, t)``: one ``Jv``
per training step, through every attention layer, held constant (stop-gradient) in the target. That is the
JVP PyTorch's forward mode cannot take through fused attention; jvpgraph takes it through the fused kernel
(blockwise at long sequences: :mod:`jvpgraph.rules.attention`). One network call ``u(e, 0, 1)`` then turns
noise into a sample.

:class:`TinyDiT` is a small DiT-style transformer (patch tokens, adaLN conditioning on ``t`` and ``t − r``),
:func:`meanflow_loss` the objective with either JVP (``jvp="jvpgraph"`` or ``"torch.func"`` on the math
kernel), :func:`train` a loop over the embedded digits, :func:`sample` the one-step sampler.
``jvpgraph meanflow`` runs it and plots the samples; ``benchmarks/meanflow_step.py`` times one step of each.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import api

__all__ = ["TinyDiT", "meanflow_loss", "train", "sample", "plot_samples"]


def _frequencies(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of a per-sample scalar in [0, 1] (``[B] -> [B, dim]``), angular frequencies 0.1 to
    10: slow enough that ``du/dt`` stays moderate (the MeanFlow target holds ``(t − r) du/dt``; frequencies
    up to 100 made training diverge here)."""
    half = dim // 2
    freqs = 10.0 * torch.exp(-math.log(100.0) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    angles = t[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], -1)


class _Block(nn.Module):
    """Pre-norm transformer block whose norms are scaled and shifted by the conditioning (adaLN)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.normal_(self.ada.weight, std=0.02)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, -1)
        h = self.norm1(x) * (1 + scale1) + shift1
        B, L, width = h.shape
        q, k, v = self.qkv(h).view(B, L, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, width)
        x = x + (1 + gate1) * self.proj(a)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + (1 + gate2) * self.mlp(h)


class TinyDiT(nn.Module):
    """A small DiT-style transformer ``u(z, r, t)``: ``z`` an image batch ``[B, C, H, W]``, ``r``, ``t`` per-sample
    times ``[B]``; patches of ``patch × patch`` pixels are the tokens (``H·W / patch²`` of them), conditioned on
    ``t`` and ``t − r`` through adaLN. Returns a tensor shaped like ``z``.

    Example:
        >>> import torch
        >>> net = TinyDiT(image_size=8, channels=1, patch=2, width=32, depth=1, heads=2)
        >>> z, t = torch.randn(3, 1, 8, 8), torch.rand(3)
        >>> net(z, t * 0.5, t).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(self, image_size: int = 8, channels: int = 1, patch: int = 1, width: int = 64, depth: int = 2,
                 heads: int = 4):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not a multiple of patch={patch}")
        if width % heads:
            raise ValueError(f"width={width} is not a multiple of heads={heads}")
        self.image_size, self.channels, self.patch, self.width = image_size, channels, patch, width
        self.tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, width)
        self.position = nn.Parameter(torch.randn(1, self.tokens, width) * 0.02)
        self.time = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.head = nn.Linear(width, channels * patch * patch)

    def forward(self, z, r, t):
        B, C, H, W = z.shape
        p = self.patch
        tokens = z.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, self.tokens, C * p * p)
        x = self.embed(tokens) + self.position
        c = self.time(torch.cat([_frequencies(t, self.width), _frequencies(t - r, self.width)], -1))
        for block in self.blocks:
            x = block(x, c)
        out = self.head(self.norm(x))
        return out.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def _times(batch: int, generator: torch.Generator, dtype, equal: float = 0.75):
    """``(r, t)`` with ``0 ≤ r ≤ t ≤ 1``: ``t`` logit-normal (as MeanFlow samples it), ``r`` uniform below it,
    and ``r = t`` (plain flow matching) for a fraction ``equal`` of the batch."""
    t = torch.sigmoid(torch.randn(batch, generator=generator, dtype=dtype) - 0.4)
    r = t * torch.rand(batch, generator=generator, dtype=dtype)
    same = torch.rand(batch, generator=generator) < equal
    return torch.where(same, t, r), t


def _func_jvp(model, primals, tangents):
    with sdpa_kernel(SDPBackend.MATH):  # forward AD has no formula for the fused kernels
        return torch.func.jvp(model, primals, tangents)


def meanflow_loss(model: nn.Module, x: torch.Tensor, generator: torch.Generator, *, jvp: str = "jvpgraph",
                  adaptive: float = 0.0) -> torch.Tensor:
    """The MeanFlow loss of ``model`` (``u(z, r, t)``) on a data batch ``x``: noise, times and ``z_t`` drawn
    from ``generator``; ``(u, du/dt)`` by one JVP along ``(v, 0, 1)`` — ``jvp="jvpgraph"`` (:func:`jvpgraph.jvp`,
    the fused attention kernel) or ``"torch.func"`` (``torch.func.jvp``, math kernel); the target
    ``v − (t − r) du/dt`` held constant; the mean squared error (``adaptive=p > 0``: each sample's weighted
    by ``1 / (error + 1e-3)^p``, held constant, as MeanFlow's adaptive loss). Differentiable in the model's
    parameters.

    Example:
        >>> import torch
        >>> net = TinyDiT(image_size=4, patch=1, width=16, depth=1, heads=2)
        >>> x = torch.rand(6, 1, 4, 4) * 2 - 1
        >>> mine = meanflow_loss(net, x, torch.Generator().manual_seed(0))
        >>> ref = meanflow_loss(net, x, torch.Generator().manual_seed(0), jvp="torch.func")
        >>> torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-6)
    """
    return _loss_and_error(model, x, generator, jvp, adaptive)[0]


def _loss_and_error(model, x, generator, jvp, adaptive):
    """:func:`meanflow_loss` and the batch's plain mean squared error (what the training log shows)."""
    if jvp not in ("jvpgraph", "torch.func"):
        raise ValueError(f"jvp={jvp!r}: expected 'jvpgraph' or 'torch.func'")
    e = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    r, t = _times(x.shape[0], generator, x.dtype)
    tb = t.view(-1, *([1] * (x.dim() - 1)))
    z = (1 - tb) * x + tb * e
    v = e - x
    primals, tangents = (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t))
    u, dudt = api.jvp(model, primals, tangents) if jvp == "jvpgraph" else _func_jvp(model, primals, tangents)
    target = (v - (tb - r.view_as(tb)) * dudt).detach()
    error = (u - target).pow(2).flatten(1).mean(1)
    weight = (error.detach() + 1e-3).pow(-adaptive) if adaptive else torch.ones_like(error)
    return (weight * error).mean(), float(error.detach().mean())


@torch.no_grad()
def sample(model: nn.Module, n: int, generator: torch.Generator, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``n`` samples in one network call: ``x = e − u(e, 0, 1)`` from noise ``e`` (MeanFlow's one-step
    sampler).

    Example:
        >>> import torch
        >>> net = TinyDiT(image_size=4, patch=2, width=16, depth=1, heads=2)
        >>> sample(net, 5, torch.Generator().manual_seed(0)).shape
        torch.Size([5, 1, 4, 4])
    """
    shape = shape or (model.channels, model.image_size, model.image_size)
    dtype = next(model.parameters()).dtype
    e = torch.randn((n, *shape), generator=generator, dtype=dtype)
    return e - model(e, torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype))


def train(model: nn.Module, images: torch.Tensor, *, steps: int = 300, batch: int = 64, lr: float = 1e-3,
          seed: int = 0, jvp: str = "jvpgraph", adaptive: float = 1.0, clip: float = 1.0,
          progress: Callable[[int, float], None] | None = None) -> dict:
    """Train ``model`` with :func:`meanflow_loss` (``adaptive`` weighting: the MeanFlow paper's ``p = 1``
    steadies the ``(t − r) du/dt`` term's large errors) on ``images`` (``[N, C, H, W]`` in ``[-1, 1]``) by Adam
    for ``steps`` steps of ``batch`` images, gradients clipped to norm ``clip``; ``progress(step, error)``
    after each. Returns ``{"losses": [...], "seconds": ...}``, the losses each batch's plain mean squared
    error. The caller's random generator is left alone (a generator seeded by ``seed`` draws
    batches, noise and times).

    Example:
        >>> import torch
        >>> net = TinyDiT(image_size=4, patch=2, width=16, depth=1, heads=2)
        >>> log = train(net, torch.rand(32, 1, 4, 4) * 2 - 1, steps=3, batch=8)
        >>> len(log["losses"])
        3
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        loss, error = _loss_and_error(model, images[idx], gen, jvp, adaptive)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(error)
        if progress is not None:
            progress(step, losses[-1])
    return {"losses": losses, "seconds": time.perf_counter() - t0}


def plot_samples(samples: torch.Tensor, losses: list[float], path: str, data: torch.Tensor | None = None) -> None:
    """A grid of samples (and of data, if given) beside the training loss curve, written to ``path``.

    Example:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "s.png")
        >>> plot_samples(torch.rand(16, 1, 8, 8), [1.0, 0.5], path, data=torch.rand(16, 1, 8, 8))
        >>> os.path.getsize(path) > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grid(images, cols=8):
        images = images[: cols * cols].detach().float().clamp(-1, 1)
        n, c, h, w = images.shape
        rows = math.ceil(n / cols)
        canvas = torch.full((rows * (h + 1), cols * (w + 1)), -1.0)
        for i, im in enumerate(images):
            y, x = divmod(i, cols)
            canvas[y * (h + 1): y * (h + 1) + h, x * (w + 1): x * (w + 1) + w] = im.mean(0)
        return canvas.numpy()

    panels = 2 + (data is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4.2))
    if data is not None:
        axes[0].imshow(grid(data), cmap="gray", vmin=-1, vmax=1)
        axes[0].set(title="data", xticks=[], yticks=[])
    axes[-2].imshow(grid(samples), cmap="gray", vmin=-1, vmax=1)
    axes[-2].set(title="one-step samples x = e − u(e, 0, 1)", xticks=[], yticks=[])
    axes[-1].plot(losses, lw=0.8)
    axes[-1].set(xlabel="step", ylabel="MeanFlow loss (mean squared error)", yscale="log", title="training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
