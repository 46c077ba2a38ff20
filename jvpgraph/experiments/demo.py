"""`jvpgraph demo`: the whole toolkit on one model that is not piecewise linear, in about a minute.

1. Jv through the flipped graph of a sigmoid + BatchNorm CNN in train mode, checked against every reference.
2. A drawing of its reverse-mode and flipped graphs.
3. Training on the embedded digits with and without the spectral regularizer, then a table (accuracy, mean
   spectral norm of the input-output Jacobian, time per step) and plots.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch
import torch.nn as nn

__all__ = ["demo"]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _fmt_err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"fails: {type(e).__name__}: {msg}"[:110]


def _verify_section(p, batch: int, seed: int, show_code: int):
    import jvpgraph
    from jvpgraph import testing
    from jvpgraph.experiments.models import SigmoidBNCNN

    torch.manual_seed(seed)
    model = SigmoidBNCNN().double().train()
    x = torch.randn(batch, 1, 16, 16, dtype=torch.double)
    v = torch.randn_like(x)
    state = testing.ModelState(model)

    p(f"1. Jv through the flipped graph. Model: SigmoidBNCNN (conv-BatchNorm-sigmoid x2, GELU head), TRAIN mode, batch {batch}, float64")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, t_trace = _timed(lambda: jvpgraph.trace(model, x, bn="batch"))
    n_ops = sum(1 for n in g.graph.gm.graph.nodes if n.op == "call_function")
    n_flip = sum(1 for n in g.flipped.module.graph.nodes if n.op == "call_function")
    fallbacks = [str(w.message) for w in caught if "no written rule" in str(w.message)]
    p(f"traced in {t_trace:.2f} s: {n_ops} aten ops; flipped graph with v: {n_flip} aten calls; "
      f"ops through the fallback: {len(fallbacks) or 'none'}")
    p("")
    fwd, tan = g.flipped.partition()
    n_fwd = sum(1 for n in fwd.graph.nodes if n.op == "call_function")
    lines = [line for line in tan.code.strip().splitlines()[1:] if line.strip()]
    p(f"the emitted flipped graph, split for a recorded forward: {n_fwd} forward ops, then the tangent pass, "
      "which starts at the fictitious node v:")
    for line in lines[:show_code]:
        p("  " + (line.strip()[:118]))
    p("  ...")
    p("")

    (out_, jv), t_jvp = _timed(lambda: g.jvp(x, v))
    lin = g.linearize(x)
    jv_rec, t_rec = _timed(lambda: lin.jvp(v))

    rows = []
    tol = 1e-9
    for name, fn in [
        ("torch.func.jvp (forward-mode AD)", lambda: testing.func_jvp(model, x, v)),
        ("double-backward trick", lambda: testing.double_backward(model, x, v)),
        ("full Jacobian (jacrev) @ v", lambda: testing.jacobian_times(model, x, v)),
        ("central finite differences", lambda: testing.finite_differences(model, x, v)),
    ]:
        try:
            ref, t = _timed(fn)
            err = testing.max_rel_err(jv, ref)
            limit = 1e-6 if "finite" in name else tol
            rows.append((name, f"{err:.1e}", f"{t * 1e3:.1f} ms", "ok" if err <= limit else "FAIL"))
        except Exception as e:  # noqa: BLE001 - a reference that cannot run is reported, not fatal
            rows.append((name, _fmt_err(e), "", "n/a"))
    gap = testing.adjoint_gap(jv, model, x, v)
    rows.append(("adjoint <u,Jv> = <J^T u,v>", f"{gap:.1e}", "", "ok" if gap <= tol else "FAIL"))
    rows.append(("jvpgraph, recorded forward", f"{testing.max_rel_err(jv_rec, jv):.1e}", f"{t_rec * 1e3:.1f} ms",
                 "ok" if testing.max_rel_err(jv_rec, jv) <= tol else "FAIL"))

    # bn="frozen": batch statistics held constant -> per-sample Jacobian
    gf = jvpgraph.trace(model, x, bn="frozen")
    jv_frozen = gf.jvp(x, v)[1]
    ref_frozen = testing.frozen_batchnorm_jvp(model, x, v)
    err_f = testing.max_rel_err(jv_frozen, ref_frozen)
    rows.append(('bn="frozen" vs stats-held Jacobian', f"{err_f:.1e}", "", "ok" if err_f <= tol else "FAIL"))

    w = max(len(r[0]) for r in rows)
    p(f"jvpgraph Jv on a new batch: {t_jvp * 1e3:.1f} ms.  Compared with (max relative error):")
    p(f"  {'reference'.ljust(w)}  {'max rel err':<14}{'time':>10}  verdict")
    for name, err, t, verdict in rows:
        if verdict == "n/a":
            p(f"  {name.ljust(w)}  {err}")
        else:
            p(f"  {name.ljust(w)}  {err:<14}{t:>10}  {verdict}")
    unchanged = not state.changes(model)
    p("")
    p(f"model left unchanged (parameters, running statistics, num_batches_tracked, training flag): "
      f"{'yes' if unchanged else 'NO'}")
    ok = unchanged and all(r[3] != "FAIL" for r in rows)
    return ok, g


def _train_section(p, out_dir: str, epochs: int, lams, seed: int, progress: bool):
    from .data import digits
    from .models import SigmoidBNCNN
    from .plots import plot_training
    from .robustness import noisy_accuracy
    from .train import TrainConfig, evaluate, fit, sigma_per_sample

    data = digits(size=16, seed=seed)
    p(f"3. Training on the embedded digits ({data.name}: {len(data.train)} train / {len(data.val)} val / "
      f"{len(data.test)} test, 1x16x16, normalized inside the model), SigmoidBNCNN in train mode, SGD "
      f"(lr 0.05, momentum 0.8, batch 32), {epochs} epochs per method:")
    runs = [("none", 0.0)] + [("spectral", lam) for lam in lams]
    noise = 0.2
    results, histories, sigmas = [], {}, {}
    for reg, lam_ in runs:
        torch.manual_seed(seed)
        model = nn.Sequential(data.normalize(), SigmoidBNCNN(width=8))
        label = reg if reg == "none" else f"{reg} (λ={lam_:g})"
        cfg = TrainConfig(reg, lam=lam_, epochs=epochs, lr=0.05, batch_size=32, seed=seed)
        hist, t_total = _timed(lambda: fit(model, data.train, data.val, cfg, progress=progress, desc=label))
        test = evaluate(model, data.test)
        sigma = sigma_per_sample(model, data.test.tensors[0])
        histories[label], sigmas[label] = hist, sigma
        results.append({"method": label, "reg": reg, "lam": lam_, "test_acc": test["acc"],
                        "noise": noise, "noisy_test_acc": noisy_accuracy(model, data.test, noise, seed=seed),
                        "test_loss": test["loss"], "sigma_mean": float(sigma.mean()),
                        "sigma_median": float(sigma.median()), "step_time_s": hist.step_time,
                        "train_time_s": t_total, "history": hist.as_dict()["epochs"]})
        p(f"   {label}: done in {t_total:.1f} s")
    base = results[0]["step_time_s"]
    p("")
    p(f"   {'method':<20}{'test acc':>10}{f'noise {noise:g}':>11}{'mean σ':>9}{'time/step':>12}{'vs none':>9}")
    for r in results:
        p(f"   {r['method']:<20}{r['test_acc']:>10.1%}{r['noisy_test_acc']:>11.1%}{r['sigma_mean']:>9.2f}"
          f"{r['step_time_s'] * 1e3:>9.1f} ms{r['step_time_s'] / base:>8.2f}x")
    p(f"   (noise {noise:g}: test accuracy on clip(x + N(0, {noise:g}²), 0, 1), pixels in [0, 1]. σ: the largest singular")
    p("    value of each test sample's input-output Jacobian, eval mode, by power iteration with Jv from the")
    p("    flipped graph and Jᵀu from autograd; mean over the test set)")
    plot = os.path.join(out_dir, "training.png")
    plot_training(histories, sigmas, plot)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"dataset": "digits 16x16", "model": "Normalize + SigmoidBNCNN(width=8)", "epochs": epochs,
                   "seed": seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "results": results}, f, indent=1)
    p(f"   plots: {plot}; numbers: {os.path.join(out_dir, 'results.json')}")
    return results


def demo(batch: int = 8, seed: int = 0, show_code: int = 14, out=sys.stdout, out_dir: str | None = "jvpgraph-demo",
         epochs: int = 30, lams=(0.01, 0.1), progress: bool = True) -> int:
    """Run the demo; return 0 when every check passes. ``out_dir=None`` runs only the Jv checks (no drawing,
    no training).

    Example:
        >>> import io
        >>> demo(batch=2, out=io.StringIO(), out_dir=None)
        0
    """
    def p(*a):
        print(*a, file=out, flush=True)

    # PyTorch's forward AD loads its decompositions through torch.jit.script on first use and warns
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
    t0 = time.perf_counter()
    p("jvpgraph demo: Jv by flipping the reverse-mode graph (Appendix C), on a model that is not piecewise linear")
    p("")
    ok, g = _verify_section(p, batch, seed, show_code)
    p("all Jv checks passed" if ok else "SOME Jv CHECKS FAILED")
    if out_dir is None:
        return 0 if ok else 1
    os.makedirs(out_dir, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p("")
    path = os.path.join(out_dir, "flipped_graph.png")
    fig = g.graph.draw(path)
    plt.close(fig)
    p(f"2. The reverse-mode graph beside the flipped graph, edges coloured by their local Jacobian: {path}")
    p("")
    _train_section(p, out_dir, epochs, lams, seed, progress)
    p("")
    p(f"demo finished in {time.perf_counter() - t0:.0f} s; " + ("all checks passed" if ok else "SOME CHECKS FAILED"))
    return 0 if ok else 1
