"""Robustness of a trained classifier: accuracy under white noise (the paper's Figure 3, left).

Inputs are images in ``[0, 1]``; the model normalizes them itself (:class:`jvpgraph.experiments.data.Normalize`
first), so noise is added to pixels and clipped to ``[0, 1]``, as in the paper's eq. (9).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from ..spectral import normalize_per_sample

__all__ = ["noisy_accuracy", "attack_accuracy", "boundary_distance", "ATTACKS"]


@torch.no_grad()
def noisy_accuracy(model: nn.Module, data: TensorDataset, sigma: float, seed: int = 0,
                   batch_size: int = 512) -> float:
    """Accuracy of ``model`` (eval mode; its flag is restored) on ``clip(x + N(0, sigma²), 0, 1)``, the noise
    drawn from a generator seeded with ``seed`` (the caller's RNG is not touched).

    Example:
        >>> import torch, torch.nn as nn
        >>> from torch.utils.data import TensorDataset
        >>> x = torch.rand(100, 4); y = (x[:, 0] > 0.5).long()
        >>> net = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[-10., 0, 0, 0], [10., 0, 0, 0]]))
        ...     _ = net.bias.copy_(torch.tensor([5., -5.]))  # class 1 iff x[0] > 0.5
        >>> noisy_accuracy(net, TensorDataset(x, y), 0.0), noisy_accuracy(net, TensorDataset(x, y), 0.5) < 1
        (1.0, True)
    """
    if sigma < 0:
        raise ValueError(f"sigma={sigma}: expected a standard deviation >= 0")
    was = model.training
    model.eval()
    try:
        g = torch.Generator(device="cpu").manual_seed(seed)
        x, y = data.tensors
        correct = 0
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            noise = torch.randn(xb.shape, generator=g, dtype=xb.dtype).to(xb.device)
            xb = (xb + sigma * noise).clamp(0, 1)
            correct += int((model(xb).argmax(1) == y[i:i + batch_size]).sum())
        return correct / len(x)
    finally:
        model.train(was)


#: Attacks of the paper's Figure 3 (torchattacks): what "iterations" means for each.
ATTACKS = {"pgd": "PGD steps (random start)", "tpgd": "TPGD steps (KL to the clean prediction)",
           "square": "Square queries"}


def attack_accuracy(model: nn.Module, data: TensorDataset, attack: str, iterations: int, eps: float = 32 / 255,
                    alpha: float = 2 / 255, seed: int = 0, batch_size: int = 500) -> float:
    """Accuracy of ``model`` (eval mode; flag restored) on adversarial examples from torchattacks' ``attack``
    (``pgd``, ``tpgd``, ``square``) with L∞ radius ``eps``, step ``alpha`` and ``iterations`` steps (queries
    for Square), inputs in ``[0, 1]``. The attack's random draws come from ``seed``; the caller's RNG is
    restored.

    Example:
        >>> import torch, torch.nn as nn
        >>> from torch.utils.data import TensorDataset
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> data = TensorDataset(torch.rand(20, 1, 2, 2), torch.randint(0, 2, (20,)))
        >>> clean = noisy_accuracy(net, data, 0.0)
        >>> attack_accuracy(net, data, "pgd", 10) <= clean
        True
    """
    try:
        import torchattacks
    except ImportError as e:
        raise ImportError("attacks need torchattacks: pip install 'jvpgraph[experiments]'") from e
    if attack not in ATTACKS:
        raise ValueError(f"attack {attack!r}: expected one of {', '.join(ATTACKS)}")
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if attack == "pgd":
                atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=iterations, random_start=True)
            elif attack == "tpgd":
                atk = torchattacks.TPGD(model, eps=eps, alpha=alpha, steps=iterations)
            else:
                atk = torchattacks.Square(model, eps=eps, n_queries=iterations, seed=seed)
            x, y = data.tensors
            correct = 0
            for i in range(0, len(x), batch_size):
                adv = atk(x[i:i + batch_size], y[i:i + batch_size])
                with torch.no_grad():
                    correct += int((model(adv).argmax(1) == y[i:i + batch_size]).sum())
        return correct / len(x)
    finally:
        model.train(was)


@torch.no_grad()
def boundary_distance(model: nn.Module, x: torch.Tensor, n_directions: int = 100, max_radius: float = 20.0,
                      tol: float = 1e-3, seed: int = 0, batch_size: int = 4096) -> torch.Tensor:
    """Distance (L2, in pixel units) from each ``x[i]`` to the nearest decision boundary found by sampling
    ``n_directions`` directions uniformly on the sphere and binary-searching along each for where the
    predicted class changes (the paper's Figure 4); ``inf`` where no direction crosses within
    ``max_radius``. The model is evaluated in eval mode (flag restored); points are not clipped to
    ``[0, 1]`` (the boundary of the function, not of the image domain).

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1., 0.], [-1., 0.]]))  # boundary: the line x0 = 0
        >>> d = boundary_distance(net, torch.tensor([[0.5, 0.0]]), n_directions=2000, tol=1e-4)
        >>> abs(float(d[0]) - 0.5) < 0.02
        True
    """
    was = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(seed)
        out = torch.empty(len(x), dtype=torch.float64)
        for i, xi in enumerate(x):
            label = model(xi[None]).argmax(1)
            dirs = torch.randn((n_directions, *xi.shape), generator=g).to(xi)
            dirs = normalize_per_sample(dirs)

            def flips(r):  # (n_directions,) bool: class changed at radius r along each direction
                res = []
                pts = xi[None] + r.reshape(-1, *([1] * xi.dim())) * dirs
                for j in range(0, len(pts), batch_size):
                    res.append(model(pts[j:j + batch_size]).argmax(1) != label)
                return torch.cat(res)

            hi = torch.full((n_directions,), max_radius, dtype=xi.dtype)
            crossed = flips(hi)
            if not crossed.any():
                out[i] = float("inf")
                continue
            lo = torch.zeros(int(crossed.sum()), dtype=xi.dtype)
            hi = hi[crossed]
            dirs = dirs[crossed]
            while float((hi - lo).max()) > tol:
                mid = (lo + hi) / 2
                f = flips(mid)
                hi = torch.where(f, mid, hi)
                lo = torch.where(f, lo, mid)
            out[i] = float(hi.min())
        return out
    finally:
        model.train(was)
