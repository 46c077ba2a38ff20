"""Question: on PyTorch's own OpInfo database, does jvpgraph give the right Jv for every op with a backward?

Every entry of ``op_db`` that supports autograd, every sample input, float64 on the CPU: jvpgraph's Jv
against ``torch.func.jvp`` where PyTorch has forward AD, else against the double-backward trick and central
finite differences. An entry passes when all its samples pass. Writes benchmarks/results/opinfo.{json,md}.

    python benchmarks/opinfo.py                  # the whole database (long)
    python benchmarks/opinfo.py sigmoid grid_sampler_2d --max-samples 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree

import jvpgraph
from jvpgraph import testing

RTOL = 1e-7  # float64; finite differences are held to 1e-5 (step 1e-7)


def _float_leaves(x):
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def check_sample(op, sample, seed: int = 0) -> tuple[str, str]:
    """('pass'|'fail'|'error'|'skip', detail) for one sample."""
    try:
        return _check_sample(op, sample, seed)
    except Exception as e:  # noqa: BLE001 - a reference that cannot run on this sample (as_strided on a copy)
        return "skip", f"no reference runs: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:200]


def _check_sample(op, sample, seed: int) -> tuple[str, str]:
    structure = (sample.input, sample.args, sample.kwargs)
    flat, spec = pytree.tree_flatten(structure)
    pos = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not pos:
        return "skip", "no floating-point input"

    def f(*xs):
        items = list(flat)
        for i, x in zip(pos, xs):
            items[i] = x
        inp, args, kwargs = pytree.tree_unflatten(items, spec)
        out = op.gradcheck_wrapper(op, inp, *args, **kwargs)  # e.g. symmetrizes cholesky's input
        outs = _float_leaves(out)
        return tuple(outs) if len(outs) != 1 else outs[0]

    xs = tuple(flat[i].detach() for i in pos)
    gen = torch.Generator().manual_seed(seed)
    vs = tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in xs)
    try:
        with torch.no_grad():
            out = f(*xs)
    except Exception as e:  # noqa: BLE001
        return "skip", f"the sample itself fails: {type(e).__name__}"
    if not _float_leaves(out):
        return "skip", "no floating-point output"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = jvpgraph.trace(f, *xs)
            torch.manual_seed(seed)  # random ops (dropout, normal) draw the same numbers in every evaluation
            _, jv = traced.jvp(xs, vs)
    except Exception as e:  # noqa: BLE001
        return "error", f"jvpgraph: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
    jv = _float_leaves(jv)
    if op.supports_forward_ad:
        try:
            torch.manual_seed(seed)
            ref = _float_leaves(torch.func.jvp(f, xs, vs)[1])
            name, tol = "torch.func.jvp", RTOL
        except Exception:  # noqa: BLE001 - fall through to the other references
            ref = None
    else:
        ref = None
    def finite_differences():
        eps = 1e-7
        with torch.no_grad():
            torch.manual_seed(seed)
            plus = _float_leaves(f(*(x + eps * v for x, v in zip(xs, vs))))
            torch.manual_seed(seed)
            minus = _float_leaves(f(*(x - eps * v for x, v in zip(xs, vs))))
        return [(p - m) / (2 * eps) for p, m in zip(plus, minus)]

    finite = [torch.isfinite(o) for o in _float_leaves(out)]

    def worst(a, b):
        # where the function's own value is inf/nan its derivative is undefined (PyTorch gives nan, a
        # decomposition 0): those entries are not compared
        if len(a) != len(b) or len(a) != len(finite):
            return float("inf")
        return max((testing.max_rel_err(torch.where(m, x, 0.0), torch.where(m, y, 0.0))
                    for x, y, m in zip(a, b, finite)), default=0.0)

    if ref is None:
        try:
            torch.manual_seed(seed)
            ref = _float_leaves(torch.autograd.functional.jvp(f, xs, vs)[1])
            name, tol = "double-backward", RTOL
        except Exception:  # noqa: BLE001
            ref, name, tol = finite_differences(), "finite differences", 1e-5
    err = worst(jv, ref)
    if err <= tol:
        return "pass", f"vs {name}: {err:.1e}"
    if name == "torch.func.jvp":  # a second reference: PyTorch's backward formula, differentiated once more
        try:
            torch.manual_seed(seed)
            db = _float_leaves(torch.autograd.functional.jvp(f, xs, vs)[1])
            if worst(jv, db) <= RTOL:
                return "pass", (f"torch.func.jvp disagrees ({err:.1e}); double-backward agrees "
                                f"({worst(jv, db):.1e})")
        except Exception:  # noqa: BLE001
            pass
    if name != "finite differences":  # who is right? finite differences arbitrate
        fd = finite_differences()
        if worst(jv, fd) <= 1e-3 and 100 * worst(jv, fd) <= worst(ref, fd):  # FD picks the closer answer
            return "pass", (f"{name} disagrees with finite differences ({worst(ref, fd):.1e}); jvpgraph agrees "
                            f"({worst(jv, fd):.1e})")
    return "fail", f"vs {name}: rel err {err:.1e}"


def write_report(rows, out: Path, final: bool) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    judged = [r for r in rows if r["status"] != "skip"]
    no_fwd = [r for r in judged if not r.get("forward_ad")]
    summary = dict(entries=len(rows), judged=len(judged), passed=sum(r["status"] == "pass" for r in judged),
                   without_forward_ad=len(no_fwd), without_forward_ad_passed=sum(r["status"] == "pass" for r in no_fwd))
    out.with_suffix(".json").write_text(json.dumps(dict(summary=summary, rows=rows), indent=2))
    md = [("" if final else "(partial run: stopped before the end) ") + f"OpInfo sweep, float64, CPU, torch {torch.__version__}: {summary['passed']}/{summary['judged']} entries pass "
          f"on all samples; without forward AD in PyTorch: {summary['without_forward_ad_passed']}/"
          f"{summary['without_forward_ad']}", "", "| op | status | samples ok | detail |", "|---|---|---|---|"]
    for r in rows:
        name = r["op"] + (f".{r['variant']}" if r.get("variant") else "")
        md.append(f"| {name} | {r['status']} | {r.get('judged', 0) - r.get('failing', 0)}/{r.get('judged', 0)} | "
                  f"{r['detail'][:120]} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return md[0]


def main(argv=None) -> int:
    from torch.testing._internal.common_methods_invocations import op_db

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ops", nargs="*", help="OpInfo names (default: all that support autograd)")
    ap.add_argument("--max-samples", type=int, default=0, help="samples per op (0: all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "opinfo"))
    args = ap.parse_args(argv)
    entries = [o for o in op_db if o.supports_autograd and (not args.ops or o.name in args.ops)]
    rows = []
    for k, op in enumerate(entries):
        t0 = time.perf_counter()
        results = []
        try:
            samples = list(op.sample_inputs("cpu", torch.float64, requires_grad=False))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(op=op.name, variant=op.variant_test_name, status="skip",
                             detail=f"no float64 samples: {type(e).__name__}"))
            continue
        if args.max_samples:
            samples = samples[: args.max_samples]
        for s in samples:
            results.append(check_sample(op, s))
        judged = [r for r in results if r[0] != "skip"]
        status = "skip" if not judged else "pass" if all(r[0] == "pass" for r in judged) else "fail"
        bad = [r[1] for r in judged if r[0] != "pass"]
        rows.append(dict(op=op.name, variant=op.variant_test_name, forward_ad=op.supports_forward_ad,
                         status=status, samples=len(samples), judged=len(judged),
                         failing=len(bad), detail=bad[0] if bad else (judged[0][1] if judged else results[0][1]
                                                                      if results else "no samples")))
        print(f"[{k + 1}/{len(entries)}] {status:4s} {op.name + ('.' + op.variant_test_name if op.variant_test_name else ''):40s} "
              f"{len(judged) - len(bad)}/{len(judged)} samples  {rows[-1]['detail'][:90]}  ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        write_report(rows, Path(args.out), final=False)
    print(write_report(rows, Path(args.out), final=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
