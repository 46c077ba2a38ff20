"""Question: how much memory and time does a Hessian-vector product over the parameters of one attention layer
take as the sequence grows: jvpgraph with the flash kernel kept in the gradient's graph (its backward's tangent
blockwise), jvpgraph with attention's math in that graph (what it did before, and still does below
HESSIAN_MIN_SCORES), and double backward on PyTorch's math kernel (the flash kernel has no double backward)?

One process, one run: jvpgraph.experiments.models.SelfAttention (4 heads, width 64, batch 1, float32, CPU) under
a mean-squared loss; for each sequence length L the peak tensor memory (jvpgraph.measure.PeakTensorMemory;
parameters, v and inputs not counted) and the median seconds per call (jvpgraph.measure.median_times, rotating
blocks) of each method; a method whose attention weights would not fit (L x L x heads x 4 bytes x 8 >
--max-weights-gb) is not run. The float64 check at L = 1024: jvpgraph's Hv against double backward on the math
kernel. Writes benchmarks/results/hessian_length.{json,md}.

    python benchmarks/hessian_length.py
    python benchmarks/hessian_length.py --lengths 256 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import jvpgraph
from jvpgraph.experiments.models import SelfAttention
from jvpgraph.measure import median_times, peak_memory
from jvpgraph.rules import attention

MB = 1 << 20


def _loss(out, y):
    return (out - y).pow(2).mean()


def _double_backward(layer, x, y, v):
    ps = list(layer.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        g = torch.autograd.grad(_loss(layer(x), y), ps, create_graph=True)
        return torch.autograd.grad(g, ps, v)


def _curvature(layer, x, y, v, blockwise: bool) -> jvpgraph.Curvature:
    """A Curvature whose gradient's graph was built with (or without) the long-attention route."""
    saved = attention.HESSIAN_MIN_SCORES
    attention.HESSIAN_MIN_SCORES = 0 if blockwise else 1 << 62
    try:
        curv = jvpgraph.Curvature(layer, _loss)
        curv.hvp(v, x, y)  # traced, its gradient's graph built and flipped here
    finally:
        attention.HESSIAN_MIN_SCORES = saved
    return curv


def _rel(a, b) -> float:
    a = torch.cat([t.reshape(-1).double() for t in a])
    b = torch.cat([t.reshape(-1).double() for t in b])
    return float((a - b).norm() / b.norm())


def measure(L: int, repeats: int, rounds: int, max_weights_gb: float) -> dict:
    torch.manual_seed(0)
    layer = SelfAttention()
    x, y = torch.randn(1, L, 64), torch.randn(1, L, 64)
    v = tuple(torch.randn_like(p) for p in layer.parameters())
    fits = L * L * layer.heads * 4 * 8 <= max_weights_gb * 2 ** 30
    row = dict(L=L, default_path="flash kept" if L * L > attention.HESSIAN_MIN_SCORES else "math")
    blockwise = _curvature(layer, x, y, v, blockwise=True)
    fns = {"jvpgraph": lambda: blockwise.hvp(v, x, y)}
    if fits:
        math = _curvature(layer, x, y, v, blockwise=False)
        fns["jvpgraph_math"] = lambda: math.hvp(v, x, y)
        fns["double_backward"] = lambda: _double_backward(layer, x, y, v)
    else:
        row["not_run"] = f"attention's math and double backward: the weights alone are {L * L * 4 * 4 / MB:.0f} MB"
    ref = fns["jvpgraph"]()
    for key in ("jvpgraph_math", "double_backward"):
        if key in fns:
            row[f"{key}_rel_err_vs_jvpgraph"] = _rel(fns[key](), ref)
    repeats = max(repeats, int(repeats * 2 ** 20 // (L * L)))  # short calls: more of them (noise)
    for key, fn in fns.items():
        row[f"{key}_peak_mb"] = peak_memory(fn) / MB
    for key, t in median_times(fns, repeats=repeats, rounds=rounds, warmup=1).items():
        row[f"{key}_s"] = t
    for key in ("jvpgraph_math", "double_backward"):
        if f"{key}_s" in row:
            row[f"time_vs_{key}"] = row["jvpgraph_s"] / row[f"{key}_s"]
            row[f"memory_vs_{key}"] = row["jvpgraph_peak_mb"] / row[f"{key}_peak_mb"]
    return row


def float64_check(L: int = 1024) -> dict:
    torch.manual_seed(0)
    layer = SelfAttention().double()
    x, y = torch.randn(1, L, 64, dtype=torch.float64), torch.randn(1, L, 64, dtype=torch.float64)
    v = tuple(torch.randn_like(p) for p in layer.parameters())
    hv = _curvature(layer, x, y, v, blockwise=True).hvp(v, x, y)
    return dict(L=L, rel_err_vs_double_backward=_rel(hv, _double_backward(layer, x, y, v)))


def write_report(rows, check, out: Path, meta: dict) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, float64=check), indent=2))

    def cell(r, k):
        return f"{r[k + '_s'] * 1e3:.1f} ms / {r[k + '_peak_mb']:.1f} MB" if k + "_s" in r else "not run"

    def ratio(r, k):
        return f"{r[k]:.2f}" if k in r else "-"

    lines = [f"torch {meta['torch']}, {meta['threads']} thread(s), float32, one attention layer (4 heads, width 64, "
             "batch 1) under a mean-squared loss, Hv over its parameters; both jvpgraph routes forced; jvpgraph "
             "keeps the flash kernel above HESSIAN_MIN_SCORES = "
             f"{attention.HESSIAN_MIN_SCORES} scores L·S; median of "
             f"{meta['repeats']} calls (more for short L) in {meta['rounds']} rotating blocks, one process", "",
             "| L | jvpgraph, flash kept (ms / MB) | jvpgraph, attention's math | double backward, math kernel | "
             "time vs math route | vs double backward | memory vs math route | vs double backward | "
             "jvpgraph's choice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['L']} | {cell(r, 'jvpgraph')} | {cell(r, 'jvpgraph_math')} | "
                     f"{cell(r, 'double_backward')} | {ratio(r, 'time_vs_jvpgraph_math')} | "
                     f"{ratio(r, 'time_vs_double_backward')} | {ratio(r, 'memory_vs_jvpgraph_math')} | "
                     f"{ratio(r, 'memory_vs_double_backward')} | {r['default_path']} |")
    if check:
        lines += ["", f"float64 at L = {check['L']}: jvpgraph's Hv vs double backward on the math kernel, relative "
                  f"error {check['rel_err_vs_double_backward']:.1e}."]
    errs = [f"L = {r['L']}: {r['double_backward_rel_err_vs_jvpgraph']:.1e}" for r in rows
            if "double_backward_rel_err_vs_jvpgraph" in r]
    if errs:
        lines += ["", "float32, double backward vs jvpgraph (relative, whole Hv): " + ", ".join(errs) + "."]
    lines += ["", "MB: peak tensor storage alive at once during one call (jvpgraph.measure.PeakTensorMemory; inputs, "
              "v and parameters not counted). jvpgraph's Hv is on a trace made before timing (a new batch of the "
              "same shape is one pass)."]
    lines += [f"L = {r['L']}: not run: {r['not_run']}." for r in rows if "not_run" in r]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-weights-gb", type=float, default=4.0)
    ap.add_argument("--no-check", action="store_true", help="skip the float64 check at L = 1024")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hessian_length"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), repeats=args.repeats, rounds=args.rounds)
    check = None if args.no_check else float64_check()
    if check:
        print(check, flush=True)
    rows = []
    for L in args.lengths:
        rows.append(measure(L, args.repeats, args.rounds, args.max_weights_gb))
        print({k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
        write_report(rows, check, Path(args.out), meta)
    print(write_report(rows, check, Path(args.out), meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
