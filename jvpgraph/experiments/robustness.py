"""Robustness of a trained classifier: accuracy under white noise (the paper's Figure 3, left).

Inputs are images in ``[0, 1]``; the model normalizes them itself (:class:`jvpgraph.experiments.data.Normalize`
first), so noise is added to pixels and clipped to ``[0, 1]``, as in the paper's eq. (9).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

__all__ = ["noisy_accuracy"]


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
