"""Question: what does the exact spectral norm cost as a regularizer, and how fast does power iteration
converge, cold and warm started (the paper's Figure 5, right)?

1. Train steps on the paper's LeNet, batch 64, on the CPU: plain, Spectral (n_iter=1), Frobenius (n_proj=1),
   Spectral-Bound, and the Spectral step built naively from ``torch.func.jvp`` + ``torch.autograd.grad``.
   Medians of rotating blocks in one run (jvpgraph.measure.median_times) and peak tensor memory of one step.
2. Exact σ (each sample's whole Jacobian) against the regularizer's power-iteration σ at 10, 100 and 1000
   outputs.
3. σ's relative error against the number of power iterations, cold (random start) and warm (the previous
   training step's singular vectors), beside the Spectral-Bound product of layer norms, while LeNet trains
   on scikit-learn's digits. Plot: benchmarks/results/spectral_power_iterations.png.

    python benchmarks/spectral.py [--repeats 20] [--skip-plot]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import jvpgraph
from jvpgraph.experiments.models import LeNet
from jvpgraph.measure import median_times, peak_memory
from jvpgraph.spectral import normalize_per_sample, per_sample_norm

RESULTS = Path(__file__).parent / "results"
MB = 1 << 20


# ------------------------------------------------------------------ 1. train steps
def make_steps(model: nn.Module, x, y, lam=0.01):
    """One optimizer step per method, each on its own copy of the model."""
    steps = {}

    def with_opt(fn):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        inner = fn(m)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = inner()
            loss.backward()
            opt.step()
        return step

    steps["plain"] = with_opt(lambda m: lambda: F.cross_entropy(m(x), y))

    def regularized(make_reg):
        def build(m):
            reg = make_reg(m)

            def loss():
                logits, penalty = reg(x)
                return F.cross_entropy(logits, y) + lam * penalty.mean()
            return loss
        return build

    steps["spectral"] = with_opt(regularized(lambda m: jvpgraph.SpectralRegularizer(m, n_iter=1)))
    steps["frobenius"] = with_opt(regularized(lambda m: jvpgraph.FrobeniusRegularizer(m, n_proj=1)))
    steps["spectral_bound"] = with_opt(regularized(lambda m: jvpgraph.SpectralBoundRegularizer(m, n_iter=1)))

    def naive(m):
        g = torch.Generator().manual_seed(0)

        def loss():
            logits = m(x)
            v = normalize_per_sample(torch.randn(x.shape, generator=g))
            with torch.no_grad():
                jv = torch.func.jvp(m, (x,), (v,))[1]  # forward mode: a second forward pass
            u = normalize_per_sample(jv)
            xg = x.detach().requires_grad_(True)
            out = m(xg)  # a third forward, recorded for Jᵀu with create_graph
            jtu = torch.autograd.grad(out, xg, u, create_graph=True)[0]
            return F.cross_entropy(logits, y) + lam * per_sample_norm(jtu).mean()
        return loss

    steps["naive_func_jvp"] = with_opt(naive)

    def frobenius_autograd(m):  # Hoffman et al. written directly with autograd (no jvpgraph)
        g = torch.Generator().manual_seed(0)

        def loss():
            xg = x.detach().requires_grad_(True)
            logits = m(xg)
            e = normalize_per_sample(torch.randn(logits.shape, generator=g))
            jte = torch.autograd.grad(logits, xg, e, create_graph=True)[0]
            penalty = per_sample_norm(jte) ** 2 * logits[0].numel()
            return F.cross_entropy(logits, y) + lam * penalty.mean()
        return loss

    steps["frobenius_autograd"] = with_opt(frobenius_autograd)
    return steps


def bench_steps(repeats: int) -> dict:
    torch.manual_seed(0)
    model = LeNet()
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    steps = make_steps(model, x, y)
    for fn in steps.values():  # trace and warm up outside the timing
        fn()
    times = median_times(steps, repeats)
    memory = {k: peak_memory(fn) / MB for k, fn in steps.items()}
    row = dict(times_s=times, peak_mb=memory,
               spectral_vs_plain=times["spectral"] / times["plain"],
               spectral_vs_frobenius=times["spectral"] / times["frobenius"],
               spectral_vs_frobenius_autograd=times["spectral"] / times["frobenius_autograd"],
               frobenius_autograd_vs_plain=times["frobenius_autograd"] / times["plain"],
               frobenius_vs_plain=times["frobenius"] / times["plain"],
               naive_vs_plain=times["naive_func_jvp"] / times["plain"],
               spectral_bound_vs_plain=times["spectral_bound"] / times["plain"],
               spectral_memory_vs_plain=memory["spectral"] / memory["plain"])
    print(f"LeNet batch 64 train step: Spectral {row['spectral_vs_plain']:.2f}x plain (target <= 2.5), "
          f"{row['spectral_vs_frobenius']:.2f}x Frobenius (target <= 1.0; Frobenius = {row['frobenius_vs_plain']:.2f}x "
          f"plain; {row['spectral_vs_frobenius_autograd']:.2f}x Frobenius written with plain autograd, which is "
          f"{row['frobenius_autograd_vs_plain']:.2f}x plain), naive torch.func.jvp + autograd.grad "
          f"{row['naive_vs_plain']:.2f}x plain, Spectral-Bound "
          f"{row['spectral_bound_vs_plain']:.2f}x; peak memory {row['spectral_memory_vs_plain']:.2f}x plain "
          f"(target <= 2)")
    return row


# ------------------------------------------------------------------ 2. exact σ against power iteration
def bench_outputs(repeats: int) -> list[dict]:
    rows = []
    for n_out in (10, 100, 1000):
        torch.manual_seed(0)
        model = LeNet(num_classes=n_out)
        x = torch.randn(64, 1, 28, 28)
        reg = jvpgraph.SpectralRegularizer(model, n_iter=1, update_buffers=False)
        reg(x)
        jvpgraph.spectral_norm(model, x, method="exact")  # trace once outside the timing
        times = median_times({"regularizer": lambda: reg(x),
                              "exact": lambda: jvpgraph.spectral_norm(model, x, method="exact")},
                             max(3, repeats // 4), rounds=3, warmup=1)
        row = dict(outputs=n_out, regularizer_s=times["regularizer"], exact_s=times["exact"],
                   exact_vs_regularizer=times["exact"] / times["regularizer"])
        print(f"{n_out:5d} outputs: exact σ costs {row['exact_vs_regularizer']:.1f}x the regularizer's forward + "
              "power-iteration penalty" + (" (target >= 10)" if n_out == 1000 else ""))
        rows.append(row)
    return rows


# ------------------------------------------------------------------ 3. convergence while training
def digits_batches(batch=64, seed=0):
    """scikit-learn's 8x8 digits, upscaled to 28x28 and standardized (ships with scikit-learn: offline)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    x = F.pad(x, (2, 2, 2, 2))
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i:i + batch]
            yield x[idx], y[idx]


def product_bound(model: nn.Module) -> float:
    """Π_l ‖W_l‖₂ with conv kernels reshaped to (out, -1), as Spectral-Bound measures each layer."""
    bound = 1.0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            bound *= torch.linalg.matrix_norm(m.weight.detach().flatten(1), 2).item()
    return bound


def convergence(steps: int = 40, max_iter: int = 10, measure_every: int = 4) -> dict:
    torch.manual_seed(0)
    model = LeNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = digits_batches()
    probe, _ = next(data)  # a fixed batch whose σ is followed
    warm_v = None
    cold_err = {k: [] for k in range(1, max_iter + 1)}
    warm_err = {k: [] for k in range(1, max_iter + 1)}
    bound_err = []
    for step in range(steps):
        x, y = next(data)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % measure_every:
            continue
        exact = jvpgraph.spectral_norm(model, probe, method="exact").sigma
        g = torch.Generator().manual_seed(step)
        v0 = torch.randn(probe.shape, generator=g)
        for k in range(1, max_iter + 1):
            cold = jvpgraph.spectral_norm(model, probe, n_iter=k, tol=0.0, v0=v0).sigma
            cold_err[k].append(((exact - cold) / exact).mean().item())
            if warm_v is not None:
                warm = jvpgraph.spectral_norm(model, probe, n_iter=k, tol=0.0, v0=warm_v).sigma
                warm_err[k].append(((exact - warm) / exact).mean().item())
        warm_v = jvpgraph.spectral_norm(model, probe, n_iter=1, tol=0.0, v0=warm_v if warm_v is not None else v0).v
        bound_err.append(((product_bound(model) - exact) / exact).mean().item())

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    res = dict(iterations=list(range(1, max_iter + 1)), cold=[mean(cold_err[k]) for k in cold_err],
               warm=[mean(warm_err[k]) for k in warm_err], spectral_bound=mean(bound_err),
               steps=steps, measured_every=measure_every)
    print("σ relative error (mean over the probe batch and the measured steps), by power iterations:")
    for k, c, w in zip(res["iterations"], res["cold"], res["warm"]):
        print(f"  {k:2d}: cold {c:.2e}  warm {w:.2e}")
    print(f"  Spectral-Bound product of layer norms: {res['spectral_bound']:.2e} (an upper bound, relative excess)")
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.semilogy(res["iterations"], [max(c, 1e-16) for c in res["cold"]], "o-", label="power iteration, cold start")
    ax.semilogy(res["iterations"], [max(w, 1e-16) for w in res["warm"]], "s-",
                label="warm start (previous step's vector)")
    ax.axhline(res["spectral_bound"], color="gray", ls="--", label="Spectral-Bound (product of layer norms)")
    ax.set_xlabel("power iterations")
    ax.set_ylabel("relative error of σ (mean per sample)")
    ax.set_title("LeNet on digits while training (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-plot", action="store_true")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = dict(meta=dict(machine=platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                         threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d")))
    out["train_step"] = bench_steps(args.repeats)
    out["exact_vs_outputs"] = bench_outputs(args.repeats)
    if not args.skip_plot:
        out["convergence"] = convergence()
        plot(out["convergence"], RESULTS / "spectral_power_iterations.png")
    (RESULTS / "spectral.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
