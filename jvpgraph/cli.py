"""Command line: ``jvpgraph demo``.

Example:
    >>> from jvpgraph.cli import build_parser
    >>> build_parser().parse_args(["demo", "--batch", "4"]).batch
    4
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

__all__ = ["main", "build_parser", "demo"]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _fmt_err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"fails: {type(e).__name__}: {msg}"[:110]


def demo(batch: int = 8, seed: int = 0, show_code: int = 14, out=sys.stdout) -> int:
    """Trace a sigmoid + BatchNorm CNN in train mode, compute Jv through the flipped graph, and compare it
    with every independent reference. Returns 0 when all references agree.
    """
    import jvpgraph
    from jvpgraph import testing
    from jvpgraph.experiments.models import SigmoidBNCNN

    def p(*a):
        print(*a, file=out)

    # PyTorch's forward AD loads its decompositions through torch.jit.script on first use and warns
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

    torch.manual_seed(seed)
    model = SigmoidBNCNN().double().train()
    x = torch.randn(batch, 1, 16, 16, dtype=torch.double)
    v = torch.randn_like(x)
    state = {k: t.clone() for k, t in model.state_dict().items()}

    p("jvpgraph demo: Jv through the flipped graph (Appendix C), for a model that is not piecewise linear")
    p(f"model: SigmoidBNCNN (conv-BatchNorm-sigmoid x2, GELU head), TRAIN mode, batch {batch}, float64")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, t_trace = _timed(lambda: jvpgraph.trace(model, x, bn="batch"))
    n_ops = sum(1 for n in g.graph.gm.graph.nodes if n.op == "call_function")
    n_flip = sum(1 for n in g.flipped.module.graph.nodes if n.op == "call_function")
    fallbacks = [str(w.message) for w in caught if "no written rule" in str(w.message)]
    p(f"traced in {t_trace:.2f} s: {n_ops} aten ops; flipped graph with v: {n_flip} aten calls; "
      f"ops through the fallback: {len(fallbacks) or 'none'}")
    p("")
    p("first lines of the emitted flipped graph (primal and tangent interleaved; `v` is the fictitious node):")
    for line in g.flipped.code.strip().splitlines()[1:1 + show_code]:
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
    unchanged = all(torch.equal(state[k], t) for k, t in model.state_dict().items()) and model.training
    p("")
    p(f"model left unchanged (parameters, running statistics, num_batches_tracked, training flag): "
      f"{'yes' if unchanged else 'NO'}")
    ok = unchanged and all(r[3] != "FAIL" for r in rows)
    p("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jvpgraph", description="Jv for any PyTorch model by flipping its "
                                 "reverse-mode graph (Appendix C).")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="trace a sigmoid+BatchNorm CNN in train mode and check Jv against "
                                    "every reference")
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return demo(batch=args.batch, seed=args.seed)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
