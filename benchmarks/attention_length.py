"""Question: how much memory and time does Jv through one attention layer take as the sequence grows, with
jvpgraph's blockwise tangent, its written exact rule (the L x S weights held), and torch.func.jvp on PyTorch's
math kernel (forward mode has no formula for the fused kernels)?

One process, one run: one self-attention layer (4 heads, model width 64, batch 1, float32, CPU), for each
sequence length L (the blockwise and the exact path each forced) the peak tensor memory (jvpgraph.measure.PeakTensorMemory: storage created and alive at
once, inputs and parameters not counted; it counts inside jvpgraph's attention op too) of the forward and of
Jv on a new batch by each method, and the median seconds per call (jvpgraph.measure.median_times, rotating
blocks). A method whose weights would not fit (L x L x heads x 4 bytes x ~8 > --max-weights-gb) is not run.
The float64 check at L = 1024: jvpgraph's Jv against double-backward on the math kernel
(Jv = d/du <Jᵀu, v>). Writes benchmarks/results/attention_length.{json,md}.

Targets (issue 20): peak memory of Jv ≤ 3x the forward's at L = 1k, 4k, 16k; float64 ≤ 1e-9 from
double-backward at 1k; time ≤ 1.0x torch.func.jvp (math) at 4096 and no slower than the exact rule at 256
(there the exact rule still serves: EXACT_MAX_SCORES).

    python benchmarks/attention_length.py
    python benchmarks/attention_length.py --lengths 256 1024 --repeats 3
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


def _math(fn):
    def run():
        with sdpa_kernel(SDPBackend.MATH):
            return fn()
    return run


def _double_backward_jv(f, x, v):
    """Jv without forward mode: d/du <Jᵀu, v> at u = 0 (two reverse passes, math kernel)."""
    with sdpa_kernel(SDPBackend.MATH):
        x = x.detach().requires_grad_()
        y = f(x)
        u = torch.zeros_like(y, requires_grad=True)
        (g,) = torch.autograd.grad(y, x, u, create_graph=True)
        return torch.autograd.grad(g, u, v)[0]


def measure(L: int, causal: bool, repeats: int, rounds: int, max_weights_gb: float) -> dict:
    torch.manual_seed(0)
    layer = SelfAttention(causal=causal)
    x, v = torch.randn(1, L, 64), torch.randn(1, L, 64)
    fits = L * L * layer.heads * 4 * 8 <= max_weights_gb * 2 ** 30
    default = jvpgraph.trace(layer, x)
    default.jvp(x, v)
    row = dict(L=L, causal=causal, default_path="blockwise" if "jvpgraph.attention_tangent" in default.flipped.code
               else "exact")

    def forced(threshold):  # a trace emitted with the path chosen by this threshold
        saved = attention.EXACT_MAX_SCORES
        attention.EXACT_MAX_SCORES = threshold
        try:
            t = jvpgraph.trace(lambda x: layer(x), x)
            t.jvp(x, v)
        finally:
            attention.EXACT_MAX_SCORES = saved
        return t

    blockwise = forced(0)
    fns = {"jvpgraph": lambda: blockwise.jvp(x, v)}
    if fits:
        exact = forced(1 << 62)
        fns["exact_rule"] = lambda: exact.jvp(x, v)
        fns["func_math"] = _math(lambda: torch.func.jvp(layer, (x,), (v,)))
    else:
        row["not_run"] = f"exact rule and torch.func (math): the weights alone are {L * L * 4 * 4 / MB:.0f} MB"
    ref = fns["jvpgraph"]()[1].detach()
    for key in ("exact_rule", "func_math"):
        if key in fns:
            row[f"{key}_rel_err_vs_jvpgraph"] = float((fns[key]()[1] - ref).norm() / ref.norm())
    repeats = max(repeats, int(repeats * 2 ** 20 // (L * L)))  # short calls: more of them (noise)
    row["forward_peak_mb"] = peak_memory(lambda: layer(x)) / MB
    for key, fn in fns.items():
        row[f"{key}_peak_mb"] = peak_memory(fn) / MB
        row[f"{key}_vs_forward"] = row[f"{key}_peak_mb"] / row["forward_peak_mb"]
    for key, t in median_times(fns, repeats=repeats, rounds=rounds, warmup=1).items():
        row[f"{key}_s"] = t
    for key in ("exact_rule", "func_math"):
        if f"{key}_s" in row:
            row[f"time_vs_{key}"] = row["jvpgraph_s"] / row[f"{key}_s"]
    return row


def float64_check(L: int = 1024) -> dict:
    torch.manual_seed(0)
    layer = SelfAttention().double()
    x, v = torch.randn(1, L, 64, dtype=torch.float64), torch.randn(1, L, 64, dtype=torch.float64)
    jv = jvpgraph.jvp(layer, (x,), (v,))[1]
    ref = _double_backward_jv(layer, x, v)
    return dict(L=L, rel_err_vs_double_backward=float((jv - ref).norm() / ref.norm()))


def write_report(rows, check, out: Path, meta: dict) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, float64=check), indent=2))

    def cell(r, k):
        if f"{k}_s" not in r:
            return "not run"
        return f"{r[k + '_s'] * 1e3:.1f} ms / {r[k + '_peak_mb']:.1f} MB ({r[k + '_vs_forward']:.1f}x)"

    def ratio(r, k):
        return f"{r[k]:.2f}" if k in r else "-"

    lines = [f"torch {torch.__version__}, {meta['threads']} thread(s), float32, one attention layer (4 heads, width "
             f"64, batch 1), causal={meta['causal']}; jvpgraph takes the blockwise path above EXACT_MAX_SCORES = "
             f"{attention.EXACT_MAX_SCORES} scores L·S; median of "
             f"{meta['repeats']} calls (more for short L) in {meta['rounds']} rotating blocks, one process", "",
             "| L | forward MB | jvpgraph blockwise ms / MB (x forward) | written exact rule | "
             "torch.func.jvp, math kernel | blockwise time vs exact rule | vs torch.func | jvpgraph's choice |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['L']} | {r['forward_peak_mb']:.1f} | {cell(r, 'jvpgraph')} | {cell(r, 'exact_rule')} | "
                     f"{cell(r, 'func_math')} | {ratio(r, 'time_vs_exact_rule')} | {ratio(r, 'time_vs_func_math')} | "
                     f"{r['default_path']} |")
    lines += ["", f"float64 at L = {check['L']}: jvpgraph's Jv vs double-backward on the math kernel, relative error "
              f"{check['rel_err_vs_double_backward']:.1e}.", "",
              "MB: peak tensor storage alive at once during one call (jvpgraph.measure.PeakTensorMemory; inputs, "
              "tangents and parameters not counted). jvpgraph's Jv is on a trace made before timing (a new batch "
              "of the same shape is one pass)."]
    for r in rows:
        if "not_run" in r:
            lines.append(f"L = {r['L']}: not run: {r['not_run']}.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 16384])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-weights-gb", type=float, default=4.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_length"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), repeats=args.repeats, rounds=args.rounds,
                causal=args.causal)
    rows = []
    for L in args.lengths:
        rows.append(measure(L, args.causal, args.repeats, args.rounds, args.max_weights_gb))
        print({k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    check = float64_check()
    print(write_report(rows, check, Path(args.out), meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
