"""Question: how fast is jvpgraph's Jv against torch.func.jvp, on a new batch and from a recorded forward?

Ratios of medians measured in one run (this machine is shared and noisy: never compare absolute times
across runs). Writes benchmarks/results/core_jvp.json.

    python benchmarks/core_jvp.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torchvision

import jvpgraph
from jvpgraph.experiments.models import LeNet
from jvpgraph.measure import median_times


def bench(name, model, x, repeats):
    v = torch.randn_like(x)
    t0 = time.perf_counter()
    g = jvpgraph.trace(model, x)
    trace_s = time.perf_counter() - t0
    x2 = torch.randn_like(x)
    with torch.no_grad():
        lin = g.linearize(x2, vjp=False)
        med = median_times({
            "forward": lambda: model(x2),
            "func": lambda: torch.func.jvp(model, (x2,), (v,)),
            "new": lambda: g.jvp(x2, v),
            "rec": lambda: lin.jvp(v),
            "lin": lambda: g.linearize(x2, vjp=False),
        }, repeats)
        t_fwd, t_func, t_new, t_rec, t_lin = (med[k] for k in ("forward", "func", "new", "rec", "lin"))
        # correctness in the same run
        ref = torch.func.jvp(model, (x2,), (v,))[1]
        err = ((g.jvp(x2, v)[1] - ref).abs().max() / ref.abs().max()).item()
    row = dict(model=name, batch=x.shape[0], input=list(x.shape[1:]), forward_s=t_fwd, func_jvp_s=t_func,
               new_batch_s=t_new, recorded_forward_s=t_lin, recorded_jvp_s=t_rec, trace_s=trace_s,
               ratio_new_vs_func=t_new / t_func, ratio_recorded_vs_func=t_rec / t_func,
               func_jvp_in_forwards=t_func / t_fwd, new_in_forwards=t_new / t_fwd, rec_in_forwards=t_rec / t_fwd,
               trace_in_func_jvps=trace_s / t_func, max_rel_err_vs_func=err)
    print(f"{name:10s} Jv new batch {row['ratio_new_vs_func']:.3f}x torch.func.jvp | recorded forward "
          f"{row['ratio_recorded_vs_func']:.3f}x | torch.func.jvp = {row['func_jvp_in_forwards']:.2f} forwards, "
          f"ours new = {row['new_in_forwards']:.2f}, recorded = {row['rec_in_forwards']:.2f} | trace "
          f"{trace_s:.2f} s = {row['trace_in_func_jvps']:.0f} torch.func.jvp calls | rel err {err:.1e}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "core_jvp.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [
        bench("LeNet", LeNet().eval(), torch.randn(64, 1, 28, 28), args.repeats),
        bench("ResNet-18", torchvision.models.resnet18().eval(), torch.randn(8, 3, 64, 64), args.repeats),
    ]
    meta = dict(machine=platform.machine(), processor=platform.processor(), cpus=os.cpu_count(),
                torch=torch.__version__, threads=torch.get_num_threads(), grad_mode="no_grad",
                date=time.strftime("%Y-%m-%d"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print("targets: new batch <= 0.3 (LeNet), <= 0.6 (ResNet-18); recorded <= 0.1 (LeNet), <= 0.35 (ResNet-18)")


if __name__ == "__main__":
    main()
