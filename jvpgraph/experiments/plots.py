"""Plots of training runs (matplotlib, written to files)."""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["plot_training"]


def plot_training(histories: Mapping[str, "object"], sigmas: Mapping[str, torch.Tensor], path: str) -> None:
    """Three panels: validation accuracy per epoch, mean training penalty-free loss per epoch, and the
    histogram of per-sample spectral norms on the test set, one colour per method.

    Example:
        >>> import tempfile, os, torch
        >>> from jvpgraph.experiments.train import History, TrainConfig
        >>> h = History(TrainConfig(), [{"epoch": 1, "train_loss": 1.0, "penalty": 0.0, "val_loss": 1.0,
        ...                               "val_acc": 0.5, "step_time": 0.01}])
        >>> path = os.path.join(tempfile.mkdtemp(), "t.png")
        >>> plot_training({"none": h}, {"none": torch.rand(20)}, path)
        >>> os.path.getsize(path) > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (label, hist), colour in zip(histories.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        ep = [e["epoch"] for e in hist.epochs]
        axes[0].plot(ep, [e["val_acc"] for e in hist.epochs], label=label, color=colour)
        axes[1].plot(ep, [e["val_loss"] for e in hist.epochs], label=label, color=colour)
        s = sigmas[label].detach().cpu().float()
        axes[2].hist(s.numpy(), bins=30, alpha=0.55, color=colour,
                     label=f"{label}: mean {float(s.mean()):.1f}")
    axes[0].set(xlabel="epoch", ylabel="validation accuracy", title="accuracy (eval mode)")
    axes[1].set(xlabel="epoch", ylabel="validation cross-entropy", title="validation loss", yscale="log")
    axes[2].set(xlabel="σ = ‖J(x)‖₂ per test sample", ylabel="samples",
                title="spectral norm of the input-output Jacobian")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
