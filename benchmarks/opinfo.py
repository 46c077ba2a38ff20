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
from pathlib import Path

import torch

from jvpgraph.testing import check_opinfo_sample as check_sample


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
