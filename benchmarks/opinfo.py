"""Question: on PyTorch's own OpInfo database, does jvpgraph give the right Jv for every op with a backward?

Every entry of ``op_db`` that supports autograd, every sample input, float64 on the CPU: jvpgraph's Jv
against ``torch.func.jvp`` where PyTorch has forward AD, else against the double-backward trick and central
finite differences. An entry passes when all its samples pass. Writes benchmarks/results/opinfo.{json,md}.
``--dtype complex128``: the entries that take complex tensors, judged against ``torch.func.jvp`` and finite
differences (the real-linear derivative); writes benchmarks/results/opinfo_complex128.{json,md}.

    python benchmarks/opinfo.py                  # the whole database (long)
    python benchmarks/opinfo.py sigmoid grid_sampler_2d --max-samples 3
    python benchmarks/opinfo.py --dtype complex128

``--order 2``: for every entry the first-order sweep passes, the derivatives of jvpgraph's Jv (autograd
through the emitted graph, with tangents on every input and on the first only) and ``jvpgraph.hvp`` against
Richardson finite differences (``jvpgraph.testing.check_opinfo_sample_second_order``); writes
benchmarks/results/opinfo_second_order.{json,md}. In two processes, then merged:

    python benchmarks/opinfo.py --order 2 --max-samples 5 --part 0/2 --out /tmp/o0 &
    python benchmarks/opinfo.py --order 2 --max-samples 5 --part 1/2 --out /tmp/o1; wait
    python benchmarks/opinfo.py --order 2 --merge /tmp/o0.json /tmp/o1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from jvpgraph.testing import check_opinfo_sample, check_opinfo_sample_second_order


# Why an entry does not pass (or is excluded): read off the failures of the sweep, checked by hand.
WHY = {
    "sparse.mm.reduce": "sparse CSR inputs: jvpgraph traces strided tensors only",
    "nn.functional.linear_cross_entropy.chunked": "the chunked path is a custom op (torch_nn::_linear_cross_entropy_"
    "batch_chunked) whose backward is not differentiable and which has no forward AD: no local Jacobian yet (a "
    "rule through the unchunked linear + cross_entropy would give one); the unchunked samples pass",
    "nn.functional.linear_cross_entropy.chunked_none": "as chunked (torch_nn::_linear_cross_entropy_batch_chunked_"
    "no_reduction)",
    "nn.functional.max_unpool2d": "the failing samples have duplicate indices (overlapping pooling windows): the "
    "CPU kernel's output is then nondeterministic, PyTorch's own torch.func.jvp differs between two runs on them",
    "logcumsumexp": "jvpgraph agrees with a long-double evaluation to 7e-13 (tests/test_rules.py::test_logcumsumexp_"
    "is_accurate_over_a_wide_range); on the +-1e4 sample torch.func.jvp is off by up to 1.1e-6, double-backward "
    "gives NaN and finite differences cannot resolve it",
    "nn.functional.embedding_bag": "the failing samples use max_norm, which renormalizes weight rows in place "
    "under no_grad: jvpgraph follows autograd, for which the renorm is invisible (torch.func.jvp agrees on "
    "nn.functional.embedding's max_norm samples); embedding_bag has no forward AD and double-backward does not run "
    "on these samples, so only finite differences judge, and they see the renorm",
}


# complex128: why an entry that takes complex tensors does not pass
WHY_COMPLEX = {
    "nn.functional.pad.circular": "PyTorch raises 'slice_scatter does not support automatic differentiation for "
    "outputs with complex dtype' while the circular pad is traced",
    "zero_": "PyTorch: zero_ has no autograd for complex outputs; raised at trace time",
    "svd_lowrank": "no local Jacobian for aten._linalg_svd of a complex matrix here: its backward checks the "
    "gauge with allclose (a value read the trace cannot make) and the forward-AD fallback hits a PyTorch internal "
    "assert (_make_dual); a RuleError lists both (float64: skipped, the op reseeds the RNG)",
    "pca_lowrank": "as svd_lowrank",
}


# second order: why an entry does not pass
WHY_SECOND = {
    "nn.functional.ctc_loss": "refused: PyTorch has no derivative for aten::_ctc_loss_backward, which the Jv rule "
    "calls (the alignment posteriors): autograd through the Jv graph raises PyTorch's 'derivative for "
    "aten::_ctc_loss_backward is not implemented'; a rule would need a differentiable forward-backward recursion",
    "scatter": "refused on the samples with scatter's deprecated reduce='add'/'multiply': PyTorch has no derivative "
    "for aten::scatter with reduce at all (eager backward raises the same 'derivative for aten::scatter is not "
    "implemented'); the other samples pass",
    "linalg.lstsq": "2 samples fail (4-D batches of 3x3, drivers gelsd/gelss), 8 more are undecided: OpInfo's A "
    "here is near-orthogonal (one undecided sample's singular values: 1.0016, 1.0015, 0.9990), and the second "
    "derivative of the singular values holds 1/(σᵢ - σⱼ): finite differences of jvpgraph's Jv in A moved by 50x "
    "between steps 1e-3 and 1e-6 on that sample. Not a located defect; the other samples pass (2e-13), and first "
    "order passes on all (4e-13)",
    "grid_sampler_3d": "trilinear sampling is smooth only inside each grid cell, and these samples place 26,400 "
    "points (20x12x11x10): every step from 1e-3 to 1e-5 carries some point across a cell face, so finite "
    "differences do not settle (6 samples undecided, one judged 1.6e-3 off where the extrapolation looked settled). "
    "Not a located defect; the small samples pass, and grid_sampler_2d passes on all",
}


def write_report(rows, out: Path, final: bool, updated: list[str] | None = None, dtype: str = "float64",
                 order: int = 1, max_samples: int = 0) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    if order == 2:
        return write_second_order_report(rows, out, final, max_samples, updated)
    judged = [r for r in rows if r["status"] != "skip"]
    no_fwd = [r for r in judged if not r.get("forward_ad")]
    passed = sum(r["status"] == "pass" for r in judged)
    summary = dict(dtype=dtype, entries=len(rows), judged=len(judged), passed=passed,
                   without_forward_ad=len(no_fwd), without_forward_ad_passed=sum(r["status"] == "pass" for r in no_fwd),
                   skipped=len(rows) - len(judged), torch=torch.__version__, updated_after_sweep=updated or [])
    out.with_suffix(".json").write_text(json.dumps(dict(summary=summary, rows=rows), indent=2))
    head = (("" if final else "(partial run: stopped before the end) ") +
            f"OpInfo sweep, {dtype}, CPU, torch {torch.__version__}: {passed}/{len(judged)} judged entries pass on all "
            f"their samples ({100 * passed / max(len(judged), 1):.1f}%; {passed}/{len(rows)} = "
            f"{100 * passed / max(len(rows), 1):.1f}% of all {len(rows)} entries with a backward, the "
            f"{len(rows) - len(judged)} skipped counted as not passing); without forward AD in PyTorch: "
            f"{summary['without_forward_ad_passed']}/{summary['without_forward_ad']}")
    md = [head, ""]
    if updated:
        md += [f"Entries re-run after the full sweep (a rule or the checker changed since): {', '.join(updated)}.", ""]
    md += _tables(rows, WHY if dtype == "float64" else WHY_COMPLEX, ("fail", "error"), 160, 120)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return head


def _name(r) -> str:
    return r["op"] + (f".{r['variant']}" if r.get("variant") else "")


def _tables(rows, why: dict, not_passing: tuple, why_len: int, detail_len: int) -> list[str]:
    """The report's three tables: not passing (with the reason, from ``why`` or the detail), skipped, every entry."""
    ok = lambda r: f"{r.get('judged', 0) - r.get('failing', 0)}/{r.get('judged', 0)}"  # noqa: E731
    md = ["## Not passing, and why", "", "| op | status | samples ok | why |", "|---|---|---|---|"]
    md += [f"| {_name(r)} | {r['status']} | {ok(r)} | {why.get(_name(r), r['detail'][:why_len])} |"
           for r in rows if r["status"] in not_passing]
    md += ["", "## Skipped (nothing to judge), and why", "", "| op | why |", "|---|---|"]
    md += [f"| {_name(r)} | {r['detail'][:160]} |" for r in rows if r["status"] == "skip"]
    md += ["", "## Every entry", "", "| op | status | samples ok | detail |", "|---|---|---|---|"]
    md += [f"| {_name(r)} | {r['status']} | {ok(r)} | {r['detail'][:detail_len]} |" for r in rows]
    return md


def write_second_order_report(rows, out: Path, final: bool, max_samples: int = 0,
                              updated: list[str] | None = None) -> str:
    judged = [r for r in rows if r["status"] in ("pass", "fail", "error")]
    passed = sum(r["status"] == "pass" for r in judged)
    undecided = [r for r in rows if r["status"] == "undecided"]
    summary = dict(order=2, dtype="float64", entries=len(rows), judged=len(judged), passed=passed,
                   undecided=len(undecided), skipped=len(rows) - len(judged) - len(undecided),
                   torch=torch.__version__, complete=final, max_samples=max_samples,  # 0: every sample
                   updated_after_sweep=updated or [])
    out.with_suffix(".json").write_text(json.dumps(dict(summary=summary, rows=rows), indent=2))
    head = (("" if final else "(partial run: stopped before the end) ") +
            f"Second-order OpInfo sweep, float64, CPU, torch {torch.__version__}: {passed}/{len(judged)} judged "
            f"entries pass on all their samples ({'the first ' + str(max_samples) if max_samples else 'all'} "
            f"samples of each; {100 * passed / max(len(judged), 1):.1f}%); "
            f"{len(undecided)} undecided (finite differences do not converge), {summary['skipped']} skipped "
            f"(of {len(rows)} entries the first-order sweep passes)")
    md = [head, "",
          "Each sample: `s(x) = <u, J(x) v>` differentiated along a random direction `w` three ways — autograd "
          "through jvpgraph's emitted Jv graph (tangents on every input; and on the first input only, traced "
          "`wrt=(0,)`, the others playing parameters), and `<v, H w>` from `jvpgraph.hvp` of `<u, f>` — against "
          "Richardson-extrapolated central differences of first-order values (`torch.func.jvp` or double-backward "
          "where they agree with jvpgraph at `x`, else jvpgraph's Jv), relative error <= 1e-6; steps 1e-3, then 1e-4 "
          "and 1e-5 where a kink or a jump lies within the step; inputs along which `f` jumps at `x` (a ±1 target) "
          "are not moved. `jvpgraph.testing.check_opinfo_sample_second_order`; the entries are those the "
          "first-order sweep (benchmarks/results/opinfo.md) passes.", ""]
    if updated:
        md += [f"Entries re-run after the full sweep (a rule or the checker changed since): {', '.join(updated)}.", ""]
    md += _tables(rows, WHY_SECOND, ("fail", "error", "undecided"), 200, 160)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return head


def main(argv=None) -> int:
    from torch.testing._internal.common_methods_invocations import op_db

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ops", nargs="*", help="OpInfo names (default: all that support autograd)")
    ap.add_argument("--max-samples", type=int, default=0, help="samples per op (0: all)")
    ap.add_argument("--dtype", choices=("float64", "complex128"), default="float64")
    ap.add_argument("--out", default=None, help="report path without suffix (default results/opinfo[_complex128])")
    ap.add_argument("--update", action="store_true",
                    help="re-run the named ops and replace their rows in the existing report")
    ap.add_argument("--order", type=int, choices=(1, 2), default=1,
                    help="2: the derivatives of Jv and jvpgraph.hvp, on the entries the first-order sweep passes")
    ap.add_argument("--part", default="0/1", help="k/n: every n-th entry from the k-th (parallel processes)")
    ap.add_argument("--merge", nargs="+", help="JSON reports of parts to merge into --out (nothing runs; a "
                    "later file's row for an entry replaces an earlier one)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    args.out = args.out or str(Path(__file__).parent / "results" / (
        "opinfo_second_order" if args.order == 2 else "opinfo" if args.dtype == "float64" else f"opinfo_{args.dtype}"))
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        key = lambda r: (r["op"], r.get("variant", ""))  # noqa: E731
        order = {(o.name, o.variant_test_name): i for i, o in enumerate(op_db)}
        latest = {key(r): r for p_ in parts for r in p_["rows"]}  # a later file's row replaces an earlier one
        rows = sorted(latest.values(), key=lambda r: order.get(key(r), len(order)))
        print(write_report(rows, Path(args.out), final=all(p_["summary"].get("complete", True) for p_ in parts),
                           dtype=args.dtype, order=args.order,
                           max_samples=parts[0]["summary"].get("max_samples", 0) if args.order == 2 else 0))
        return 0
    check_sample = check_opinfo_sample_second_order if args.order == 2 else check_opinfo_sample
    first = None
    if args.order == 2:  # the entries the first-order sweep passes
        report = json.loads((Path(__file__).parent / "results" / "opinfo.json").read_text())
        first = {(r["op"], r.get("variant", "")) for r in report["rows"] if r["status"] == "pass"}
    entries = [o for o in op_db if o.supports_autograd and (not args.ops or o.name in args.ops)
               and (args.dtype == "float64" or dtype in o.supported_dtypes("cpu"))
               and (first is None or (o.name, o.variant_test_name) in first)]
    k_, n_ = (int(a) for a in args.part.split("/"))
    entries = entries[k_::n_]
    rows = []
    for k, op in enumerate(entries):
        t0 = time.perf_counter()
        results = []
        try:
            samples = list(op.sample_inputs("cpu", dtype, requires_grad=False))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(op=op.name, variant=op.variant_test_name, status="skip",
                             detail=f"no {args.dtype} samples: {type(e).__name__}"))
            continue
        if args.max_samples:
            samples = samples[: args.max_samples]
        for s in samples:
            results.append(check_sample(op, s))
        judged = [r for r in results if r[0] not in ("skip", "undecided")]
        status = ("undecided" if any(r[0] == "undecided" for r in results) else "skip") if not judged else \
            "pass" if all(r[0] == "pass" for r in judged) else \
            "error" if args.order == 2 and any(r[0] == "error" for r in judged) else "fail"
        bad = [r[1] for r in judged if r[0] != "pass"]
        rows.append(dict(op=op.name, variant=op.variant_test_name, forward_ad=op.supports_forward_ad,
                         status=status, samples=len(samples), judged=len(judged),
                         failing=len(bad), detail=bad[0] if bad else (judged[0][1] if judged else results[0][1]
                                                                      if results else "no samples")))
        print(f"[{k + 1}/{len(entries)}] {status:4s} {op.name + ('.' + op.variant_test_name if op.variant_test_name else ''):40s} "
              f"{len(judged) - len(bad)}/{len(judged)} samples  {rows[-1]['detail'][:90]}  ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        if not args.update:
            write_report(rows, Path(args.out), final=False, dtype=args.dtype, order=args.order,
                         max_samples=args.max_samples)
    if args.update:
        old = json.loads(Path(args.out).with_suffix(".json").read_text())
        fresh = {(r["op"], r.get("variant", "")): r for r in rows}
        merged = [fresh.pop((r["op"], r.get("variant", "")), r) for r in old["rows"]] + list(fresh.values())
        updated = sorted(set(old["summary"].get("updated_after_sweep", [])) | {r["op"] for r in rows})
        print(write_report(merged, Path(args.out), final=True, updated=updated, dtype=args.dtype, order=args.order,
                           max_samples=old["summary"].get("max_samples", args.max_samples)))
        return 0
    print(write_report(rows, Path(args.out), final=True, dtype=args.dtype, order=args.order,
                       max_samples=args.max_samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
