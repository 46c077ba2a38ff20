"""Question: how fast is jvpgraph's Hessian-vector product over the parameters, and how much memory does it
hold, against double-backward and torch.func's forward-over-reverse, on the models people train?

One process, one run: for each model and mode, the median seconds per call of (a) ``Curvature.hvp`` on a new
batch (the loss traced, its gradient's graph built and flipped once, before timing), (b) the double-backward
HVP (``autograd.grad(grad, params, v)`` with ``create_graph=True``; math attention kernel), (c)
``torch.func.jvp(torch.func.grad(loss))`` where it runs; the three interleaved in rotating blocks
(jvpgraph.measure.median_times), and the peak tensor memory of one call of each. The targets (issue 19):
jvpgraph ≤ 0.7x double-backward on ResNet-18 in train mode and a torchvision ViT, ≤ 1.0x torch.func where it
runs, peak memory ≤ double-backward's. The FLOPs each call does (FlopCounterMode) bound what the time ratio
can be. Writes benchmarks/results/hessian_speed.json and .md.

    python benchmarks/hessian_speed.py                 # resnet18 train/eval, vit_b_16 train/eval
    python benchmarks/hessian_speed.py resnet18 --modes train --repeats 3
    python benchmarks/hessian_speed.py vit_b_16 --size 224 --batch 2 --out benchmarks/results/hessian_speed_vit224
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from hessian_zoo import _init_heads, loss_fn  # noqa: E402
from zoo import _seeded  # noqa: E402

import jvpgraph  # noqa: E402
from jvpgraph import testing  # noqa: E402
from jvpgraph.cli import build_model  # noqa: E402
from jvpgraph.measure import median_times, peak_memory  # noqa: E402

MB = 1 << 20
TARGETS = {"double_backward": 0.7, "func": 1.0}
SIZES = {"resnet18": 64, "vit_b_16": 32}


def measure(name: str, mode: str, batch: int, repeats: int, rounds: int, size: int = 0) -> dict:
    size = size or SIZES.get(name, 64)
    torch.manual_seed(0)
    model = build_model(name, size).train(mode == "train")
    _init_heads(model)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    names = [n for n, _ in model.named_parameters()]
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    curv = jvpgraph.Curvature(model, loss_fn)
    twin = copy.deepcopy(model)
    tparams = dict(twin.named_parameters())
    buffers = dict(twin.named_buffers())

    def mine():
        return curv.hvp(v, x, y)

    def double_backward():
        with sdpa_kernel(SDPBackend.MATH):
            ps = [tparams[n] for n in names]
            g = torch.autograd.grad(loss_fn(twin(x), y), ps, create_graph=True)
            return dict(zip(names, torch.autograd.grad(g, ps, [v[n] for n in names])))

    def func():
        def loss_of(p):
            return loss_fn(torch.func.functional_call(twin, (p, buffers), (x,)), y)
        return torch.func.jvp(torch.func.grad(loss_of), ({n: tparams[n].detach() for n in names},), (v,))[1]

    fns = {"jvpgraph": _seeded(mine), "double_backward": _seeded(double_backward), "func": _seeded(func)}
    row = dict(model=name, mode=mode, size=size, batch=batch, params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    ref = None
    for key in list(fns):
        try:
            out = fns[key]()
        except Exception as e:  # noqa: BLE001 - a method that cannot run is a result
            row[f"{key}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            del fns[key]
            continue
        flat = torch.cat([out[n].detach().reshape(-1) for n in names])
        if ref is None:
            ref = flat
        else:
            row[f"{key}_rel_err_vs_jvpgraph"] = testing.max_rel_err(ref, flat)
    for key, fn in fns.items():
        row[f"{key}_peak_mb"] = peak_memory(fn) / MB
        with FlopCounterMode(display=False) as flops:
            fn()
        row[f"{key}_gflop"] = flops.get_total_flops() / 1e9
    for key, t in median_times(fns, repeats=repeats, rounds=rounds, warmup=1).items():
        row[f"{key}_s"] = t
    for key in TARGETS:
        if f"{key}_s" in row and "jvpgraph_s" in row:
            row[f"time_vs_{key}"] = row["jvpgraph_s"] / row[f"{key}_s"]
            row[f"memory_vs_{key}"] = row["jvpgraph_peak_mb"] / row[f"{key}_peak_mb"]
            row[f"flop_vs_{key}"] = row["jvpgraph_gflop"] / row[f"{key}_gflop"]
    return row


def write_report(rows, out: Path, meta: dict) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = [f"torch {torch.__version__}, torchvision {torchvision.__version__}, {meta['threads']} thread(s), float32;"
             f" median of {meta['repeats']} calls in {meta['rounds']} rotating blocks (one warm-up call each), one process", "",
             "| model | mode | size | batch | jvpgraph s / MB | double-backward s / MB | torch.func s / MB | "
             "time vs double-backward (target ≤ 0.7) | FLOPs vs double-backward | time vs torch.func (≤ 1.0) | "
             "memory vs double-backward (≤ 1) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, k):
        return f"{r[k + '_s']:.3f} / {r[k + '_peak_mb']:.0f}" if k + "_s" in r else \
            f"fails: {r.get(k + '_error', '')[:50]}"

    def ratio(r, k, target):
        if k not in r:
            return "-"
        return f"{r[k]:.2f}" + ("" if r[k] <= target else " (misses)")

    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['size']} | {r['batch']} | {cell(r, 'jvpgraph')} | "
                     f"{cell(r, 'double_backward')} | {cell(r, 'func')} | "
                     f"{ratio(r, 'time_vs_double_backward', 0.7)} | {ratio(r, 'flop_vs_double_backward', 2)} | "
                     f"{ratio(r, 'time_vs_func', 1.0)} | "
                     f"{ratio(r, 'memory_vs_double_backward', 1.0)} |")
    lines += ["", "Peak MB: tensor storage alive at once during one call (jvpgraph.measure.PeakTensorMemory; "
              "parameters, v and inputs not counted). jvpgraph's Hv is timed on a trace made before timing (a new "
              "batch of the same shape is one pass); its first call (tracing) is not in these numbers. FLOPs: "
              "torch.utils.flop_counter.FlopCounterMode over one call (matmuls and convolutions, forward and "
              "backward kernels): on work bound by arithmetic the time ratio cannot go much below the FLOP ratio."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["resnet18", "vit_b_16"])
    ap.add_argument("--modes", nargs="+", default=["train", "eval"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=0, help=f"image side (default per model: {SIZES}, else 64)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hessian_speed"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = dict(torch=torch.__version__, torchvision=torchvision.__version__, threads=torch.get_num_threads(),
                repeats=args.repeats, rounds=args.rounds)
    rows = []
    for name in args.models:
        for mode in args.modes:
            rows.append(measure(name, mode, args.batch, args.repeats, args.rounds, args.size))
            print({k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
            write_report(rows, Path(args.out), meta)
    print(write_report(rows, Path(args.out), meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
