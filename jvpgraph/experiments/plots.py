"""Plots of training runs (matplotlib, written to files)."""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["plot_training", "plot_robustness", "plot_boundary"]


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


def _band(ax, xs, rows, label, colour):
    t = torch.tensor(rows, dtype=torch.float64)
    mean, std = t.mean(0), (t.std(0) if len(rows) > 1 else torch.zeros(t.shape[1], dtype=torch.float64))
    ax.plot(xs, mean.numpy(), marker="o", ms=3, label=label, color=colour)
    ax.fill_between(xs, (mean - std).numpy(), (mean + std).numpy(), color=colour, alpha=0.15)


def plot_robustness(report: dict, path: str) -> None:
    """The paper's Figure 3: accuracy drop (clean minus perturbed, as the paper plots it, so that methods with
    different clean accuracy compare fairly) under white noise against σ and under each attack against its
    number of iterations; one line per method, mean ± std over seeds (bands).

    Example:
        >>> import tempfile, os
        >>> rep = {"noise": [0.1, 0.2], "iterations": [1, 2], "square_queries": [10], "eps": 0.1, "dataset": "d",
        ...        "model": "m", "methods": {"none": {"seeds": [{"clean": 0.9, "noise_drop": [0.1, 0.2],
        ...        "pgd": [0.5, 0.4]}]}}}
        >>> path = os.path.join(tempfile.mkdtemp(), "r.png"); plot_robustness(rep, path); os.path.getsize(path) > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in ("pgd", "tpgd", "square") if any(a in s for m in report["methods"].values()
                                                          for s in m["seeds"])]
    fig, axes = plt.subplots(1, 1 + len(attacks), figsize=(4.2 * (1 + len(attacks)), 3.6), squeeze=False)
    axes = axes[0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (reg, m), c in zip(report["methods"].items(), colours):
        _band(axes[0], report["noise"], [s["noise_drop"] for s in m["seeds"]], reg, c)
        for ax, atk in zip(axes[1:], attacks):
            xs = report["square_queries"] if atk == "square" else report["iterations"]
            _band(ax, xs, [[s["clean"] - a for a in s[atk]] for s in m["seeds"]], reg, c)
    axes[0].set(xlabel="noise σ (pixels in [0, 1])", ylabel="accuracy drop", title="white noise")
    for ax, atk in zip(axes[1:], attacks):
        ax.set(xlabel="queries" if atk == "square" else "iterations", ylabel="accuracy drop",
               title=f"{atk.upper()}, ε = {report['eps'] * 255:.0f}/255")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['model']} on {report['dataset']}: robustness (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_boundary(report: dict, path: str) -> None:
    """The paper's Figure 4: histograms of the distance to the nearest decision boundary, one per method,
    seeds pooled.

    Example:
        >>> import tempfile, os
        >>> rep = {"dataset": "d", "model": "m", "methods": {"none": {"seeds": [{"boundary": [1.0, 2.0, 2.5]}]}}}
        >>> path = os.path.join(tempfile.mkdtemp(), "b.png"); plot_boundary(rep, path); os.path.getsize(path) > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.0), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dists = {reg: [d for s in m["seeds"] for d in s["boundary"]] for reg, m in methods.items()}
    finite = [d for ds in dists.values() for d in ds if d != float("inf")]
    hi = max(finite, default=1.0)
    for ax, (reg, d), c in zip(axes[0], dists.items(), colours):
        ax.hist([v for v in d if v != float("inf")], bins=20, range=(0, hi), color=c, alpha=0.8)
        med = float(torch.tensor(d).median()) if d else float("nan")  # inf (no crossing found) counts as far
        beyond = sum(v == float("inf") for v in d)
        ax.axvline(med, color="black", lw=1, ls="--")
        ax.set(title=f"{reg}: median {med:.2f}" + (f"\n{beyond}/{len(d)} beyond the search radius" if beyond else ""),
               xlabel="L2 distance to the boundary")
    axes[0][0].set_ylabel("test points")
    fig.suptitle(f"{report['model']} on {report['dataset']}: distance to the nearest decision boundary", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
