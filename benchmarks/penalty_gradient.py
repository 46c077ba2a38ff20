"""Question: can the flipped graph spare the ``grad="JTu"`` and ``grad="iterations"`` spectral penalties their
double backward (issue 19, part 5), and what would it save?

``σ = ‖Jᵀu‖`` and, with ``ŵ = Jᵀu/‖Jᵀu‖``, ``∇θσ = ŵᵀ∇θ(Jᵀu) = ∇θ⟨u, Jŵ⟩``: a tangent pass recorded by
autograd (and its backward) gives the same value and gradient as ``Jᵀu`` recorded with ``create_graph=True``
and differentiated again, which is what the regularizer does. (For ``"iterations"``, ``u = Jv/‖Jv‖`` is
differentiated too: ``∇θσ = ∇θ⟨u, Jŵ⟩ + ⟨Jŵ, ∇θu⟩``, two recorded tangent passes.) This script builds both
forms from the public API and times one training step (penalty + cross-entropy + λ·penalty.mean() + backward)
of each, interleaved in rotating blocks in one run (jvpgraph.measure.median_times), with the peak tensor
memory of one step, the regularizer's default ``grad="uJv"`` step for scale, and the largest relative
difference of the parameters' gradients between the two forms (and the regularizer's own ``"JTu"``).

    python benchmarks/penalty_gradient.py [--repeats 20]

Writes benchmarks/results/penalty_gradient.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import jvpgraph
from jvpgraph.experiments.models import LeNet, SigmoidBNCNN
from jvpgraph.measure import median_times, peak_memory
from jvpgraph.spectral import normalize_per_sample, per_sample_norm

RESULTS = Path(__file__).parent / "results"
MB = 1 << 20
LAM = 0.1


def _vit():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                               hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision starts the head at zero: J would be 0
    return vit


MODELS = {  # name: (constructor, input shape, train mode)
    "lenet": (LeNet, (64, 1, 28, 28), False),
    "sigmoid_bn_cnn (train, bn=frozen)": (SigmoidBNCNN, (64, 1, 16, 16), True),
    "resnet18 32x32 (train, bn=frozen)": (lambda: torchvision.models.resnet18(num_classes=10), (16, 3, 32, 32),
                                          True),
    "vit 4 layers, width 64": (_vit, (16, 3, 32, 32), False),
}


def _linearize(model, x, record_x):
    return jvpgraph.cached_trace(model, x, bn="frozen").linearize(x, vjp=record_x)


def double_backward_penalty(model, x, grad, generator):
    """The penalty as the regularizer computes it: ``Jᵀu`` recorded with ``create_graph=True``."""
    lin = _linearize(model, x, True)
    v = normalize_per_sample(torch.randn(x.shape, generator=generator))
    if grad == "JTu":
        with torch.no_grad():
            u = normalize_per_sample(lin.detach().jvp(v))
    else:
        u = normalize_per_sample(lin.jvp(v))
    return lin.out, per_sample_norm(lin.vjp(u, create_graph=True))


def tangent_penalty(model, x, grad, generator):
    """The same value and gradient through recorded tangent passes: ``⟨u, Jŵ⟩`` (+ ``⟨Jŵ, u(θ)⟩`` for
    "iterations"); ``Jᵀu`` itself by the recorded forward's backward, without ``create_graph``."""
    lin = _linearize(model, x, True)
    v = normalize_per_sample(torch.randn(x.shape, generator=generator))
    if grad == "JTu":
        with torch.no_grad():
            u = normalize_per_sample(lin.detach().jvp(v))
    else:
        u = normalize_per_sample(lin.jvp(v))
    with torch.no_grad():
        w = normalize_per_sample(lin.vjp(u.detach()))
    jw = lin.jvp(w)
    if grad == "JTu":
        return lin.out, (u * jw).flatten(1).sum(1)
    both = (u.detach() * jw + jw.detach() * u).flatten(1).sum(1)
    return lin.out, both - (u.detach() * jw.detach()).flatten(1).sum(1)


def steps_for(model, x, y):
    def step(call):
        def run():
            for p in model.parameters():
                p.grad = None
            logits, penalty = call()
            (F.cross_entropy(logits, y) + LAM * penalty.mean()).backward()
        return run

    reg = jvpgraph.SpectralRegularizer(model, n_iter=1, warm_start=False, update_buffers=False)
    steps = {"uJv_regularizer": step(lambda: reg(x))}
    for g in ("JTu", "iterations"):
        for form, fn in (("double_backward", double_backward_penalty), ("tangent", tangent_penalty)):
            gen = torch.Generator().manual_seed(0)
            steps[f"{g}_{form}"] = step(lambda g=g, gen=gen, fn=fn: fn(model, x, g, gen))
    return steps


def gradient_difference(model, x, grad):
    """Largest relative differences of the penalty and its parameter gradients, from the same starting
    vector: the tangent-pass form against the double-backward form, and the regularizer against the latter."""
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(penalty):
        gs = torch.autograd.grad(penalty.sum(), params, allow_unused=True, materialize_grads=True)
        return torch.cat([g.flatten() for g in gs])

    _, old = double_backward_penalty(model, x, grad, torch.Generator().manual_seed(3))
    _, new = tangent_penalty(model, x, grad, torch.Generator().manual_seed(3))
    reg = jvpgraph.SpectralRegularizer(model, n_iter=1, grad=grad, warm_start=False, update_buffers=False,
                                       generator=torch.Generator().manual_seed(3))
    _, own = reg(x)
    g_old = grads(old)
    return dict(value=float(((new - old).abs() / old.abs()).max()),
                gradient=float((grads(new) - g_old).norm() / g_old.norm()),
                regularizer_value=float(((own - old).abs() / old.abs()).max()),
                regularizer_gradient=float((grads(own) - g_old).norm() / g_old.norm()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for name, (make, shape, train) in MODELS.items():
        torch.manual_seed(0)
        model = make().train(train)
        x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
        diff = {g: gradient_difference(model, x, g) for g in ("JTu", "iterations")}
        steps = steps_for(model, x, y)
        for fn in steps.values():  # trace and warm up outside the timing
            fn()
        times = median_times(steps, args.repeats)
        memory = {k: peak_memory(fn) / MB for k, fn in steps.items()}
        row = dict(model=name, batch=shape[0], times_s=times, peak_mb=memory, difference=diff)
        for g in ("JTu", "iterations"):
            row[f"{g}_time_ratio"] = times[f"{g}_tangent"] / times[f"{g}_double_backward"]
            row[f"{g}_memory_ratio"] = memory[f"{g}_tangent"] / memory[f"{g}_double_backward"]
        rows.append(row)
        print(f"{name}: JTu step {row['JTu_time_ratio']:.2f}x the double-backward form's time, "
              f"{row['JTu_memory_ratio']:.2f}x its memory; iterations {row['iterations_time_ratio']:.2f}x, "
              f"{row['iterations_memory_ratio']:.2f}x; the regularizer's uJv step "
              f"{times['uJv_regularizer'] / times['JTu_double_backward']:.2f}x its JTu step; gradients differ by {diff['JTu']['gradient']:.1e} (JTu), "
              f"{diff['iterations']['gradient']:.1e} (iterations); the regularizer's from the double-backward form "
              f"{diff['JTu']['regularizer_gradient']:.1e}, {diff['iterations']['regularizer_gradient']:.1e}",
              flush=True)
    out = dict(machine=dict(platform=platform.platform(), torch=torch.__version__,
                            threads=torch.get_num_threads()), lam=LAM, repeats=args.repeats, rows=rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "penalty_gradient.json").write_text(json.dumps(out, indent=1))
    lines = ["# Spectral penalty's gradient: tangent passes vs double backward (one training step)", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32, median of "
             f"{args.repeats} steps each, interleaved. Ratios: tangent-pass form / double-backward form "
             "(the regularizer's); last column: the regularizer's default step / its JTu step.", "",
             "| model | batch | JTu time | JTu memory | iterations time | iterations memory | uJv step / JTu step "
             "| gradient difference (JTu, iterations) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["times_s"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['JTu_time_ratio']:.2f}x | {r['JTu_memory_ratio']:.2f}x "
                     f"({r['peak_mb']['JTu_tangent']:.1f} vs {r['peak_mb']['JTu_double_backward']:.1f} MB) | "
                     f"{r['iterations_time_ratio']:.2f}x | {r['iterations_memory_ratio']:.2f}x | "
                     f"{t['uJv_regularizer'] / t['JTu_double_backward']:.2f}x | {r['difference']['JTu']['gradient']:.1e}, "
                     f"{r['difference']['iterations']['gradient']:.1e} |")
    (RESULTS / "penalty_gradient.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
