"""Question: what do guards cost on the hot path, and what does a loop over many batch sizes cost?

1. The paper's LeNet, batch 1, float32, eval and train mode: a cached ``jvpgraph.jvp`` call against the part
   of it that checks the trace's guards (``Guards.check`` + ``global_state``) and the whole cache lookup
   (module walk, key, guards), medians of rotating blocks in one run.
2. A loop over 60 batch sizes (1..60) through ``jvpgraph.jvp``: how many traces it makes, how many the cache
   keeps, and the mean time per call against a loop at one fixed batch size (the first pass, which traces,
   and a second pass over the same sizes, served from the cache).
3. A trace with a symbolic batch size (LeNet after batches 2 and 3), at batch 4: its cache lookup, which
   includes evaluating the size guards on the input, against the Jv it serves.

    python benchmarks/guards.py [--repeats 400]

Writes benchmarks/results/guards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import jvpgraph
from jvpgraph import api
from jvpgraph.experiments.models import LeNet
from jvpgraph.guards import global_state
from jvpgraph.measure import median_times

RESULTS = Path(__file__).parent / "results"


def hot_path(mode: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = getattr(LeNet(), mode)()
    x, v = torch.randn(1, 1, 28, 28), torch.randn(1, 1, 28, 28)
    jvpgraph.jvp(model, (x,), (v,))
    traced = api._traced_for(model, (x,), "batch")
    comp = traced._compiled_for((x,))
    guards = comp.graph.program.guards
    for _ in range(10):  # let the emitted graph's op order settle (see api._FasterOrder)
        jvpgraph.jvp(model, (x,), (v,))
    times = median_times({
        "jvp": lambda: jvpgraph.jvp(model, (x,), (v,)),
        "guards": lambda: (guards.check(), global_state()),
        "lookup": lambda: traced._compiled_for((x,)),
    }, repeats=repeats)
    assert len(traced.history) == 1, traced.explain()  # no call above traced again
    return {"mode": mode, "n_guards": len(guards), "jvp_s": times["jvp"], "guards_s": times["guards"],
            "lookup_s": times["lookup"], "guards_vs_jvp": times["guards"] / times["jvp"],
            "lookup_vs_jvp": times["lookup"] / times["jvp"]}


def batch_sizes(n: int = 60) -> dict:
    torch.manual_seed(0)
    model = LeNet().eval()
    fixed = LeNet().eval()
    xs = [torch.randn(b, 1, 28, 28) for b in range(1, n + 1)]
    x_fixed = torch.randn(32, 1, 28, 28)
    jvpgraph.jvp(fixed, (x_fixed,), (x_fixed,))
    t0 = time.perf_counter()
    for x in xs:
        jvpgraph.jvp(model, (x,), (x,))
    varying = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in xs:
        jvpgraph.jvp(fixed, (x_fixed,), (x_fixed,))
    one = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for x in xs:  # second pass: every size is served by a cached trace
        jvpgraph.jvp(model, (x,), (x,))
    again = (time.perf_counter() - t0) / n
    traced = api._traced_for(model, (xs[0],), "batch")
    return {"batch_sizes": n, "traces_made": len(traced.history), "traces_cached":
            sum(len(b) for b in traced._cache.values()), "cache_size": traced.cache_size,
            "mean_call_s_varying": varying, "mean_call_s_fixed_batch_32": one, "varying_vs_fixed": varying / one,
            "mean_call_s_second_pass": again, "second_pass_vs_fixed": again / one}


def symbolic_lookup(repeats: int) -> dict:
    torch.manual_seed(0)
    model = LeNet().eval()
    for b in (2, 3):
        jvpgraph.jvp(model, (torch.randn(b, 1, 28, 28),), (torch.randn(b, 1, 28, 28),))
    x, v = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)  # no trace at this exact size
    traced = api._traced_for(model, (x,), "batch")
    comp = traced._compiled_for((x,))
    assert comp.graph.program.dynamic is not None, traced.explain()
    times = median_times({
        "jvp": lambda: jvpgraph.jvp(model, (x,), (v,)),
        "sizes": lambda: comp.graph.program.sizes_hold([x]),
        "lookup": lambda: traced._compiled_for((x,)),
    }, repeats=repeats)
    return {"size_guards": comp.graph.program.size_guards(), "jvp_s": times["jvp"], "sizes_s": times["sizes"],
            "lookup_s": times["lookup"], "sizes_vs_jvp": times["sizes"] / times["jvp"],
            "lookup_vs_jvp": times["lookup"] / times["jvp"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = [hot_path(mode, args.repeats) for mode in ("eval", "train")]
    for r in rows:
        print(f"LeNet batch 1, {r['mode']}: jvp {r['jvp_s'] * 1e3:.3f} ms; guard check ({r['n_guards']} reads) "
              f"{r['guards_s'] * 1e6:.1f} us = {100 * r['guards_vs_jvp']:.2f}% of it; whole cache lookup "
              f"{r['lookup_s'] * 1e6:.1f} us = {100 * r['lookup_vs_jvp']:.2f}%")
    loop = batch_sizes()
    print(f"60 batch sizes through jvpgraph.jvp: {loop['traces_made']} traces made, {loop['traces_cached']} kept "
          f"(cache_size {loop['cache_size']}); {loop['mean_call_s_varying'] * 1e3:.1f} ms per call against "
          f"{loop['mean_call_s_fixed_batch_32'] * 1e3:.1f} ms at a fixed batch of 32 "
          f"({loop['varying_vs_fixed']:.0f}x); a second pass over the same sizes "
          f"{loop['mean_call_s_second_pass'] * 1e3:.1f} ms per call ({loop['second_pass_vs_fixed']:.2f}x)")
    sym = symbolic_lookup(args.repeats)
    print(f"LeNet, symbolic batch size ({sym['size_guards']}), batch 4: jvp {sym['jvp_s'] * 1e3:.3f} ms; size "
          f"check {sym['sizes_s'] * 1e6:.1f} us = {100 * sym['sizes_vs_jvp']:.2f}% of it; whole cache lookup "
          f"{sym['lookup_s'] * 1e6:.1f} us = {100 * sym['lookup_vs_jvp']:.2f}%")
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "hot_path": rows, "batch_sizes": loop,
           "symbolic": sym}
    (RESULTS / "guards.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
