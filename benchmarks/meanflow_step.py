"""Question: what does one MeanFlow training step (the loss with one Jv of the whole network, and its backward)
cost with jvpgraph's Jv through the fused attention kernel, against torch.func.jvp on the math kernel, as the
number of tokens grows?

One process, one run: jvpgraph.experiments.meanflow.TinyDiT (width 64, 4 heads, 2 blocks, patch 1, so
size² tokens), batch 4, float32, CPU. For each image size, the median seconds per step (loss and backward;
jvpgraph.measure.median_times, rotating blocks, same noise and times for both) and the peak tensor memory of
one step (jvpgraph.measure.PeakTensorMemory; parameters and the batch not counted), and how far the two losses
and gradients are apart. Writes benchmarks/results/meanflow_step.{json,md}.

Target (issue 20): time and peak memory against torch.func.jvp (math kernel) at >= 1024 tokens.

    python benchmarks/meanflow_step.py                  # 16x16, 32x32 and 48x48 images: 256, 1024, 2304 tokens
    python benchmarks/meanflow_step.py --sizes 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from jvpgraph.experiments import meanflow
from jvpgraph.measure import median_times, peak_memory

MB = 1 << 20


def measure(size: int, batch: int, repeats: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = meanflow.TinyDiT(image_size=size, patch=1, width=64, depth=2, heads=4)
    x = torch.rand(batch, 1, size, size) * 2 - 1
    params = list(model.parameters())

    def step(jvp):
        def run():
            loss = meanflow.meanflow_loss(model, x, torch.Generator().manual_seed(1), jvp=jvp)
            return loss.detach(), torch.autograd.grad(loss, params)
        return run

    fns = {"jvpgraph": step("jvpgraph"), "torch.func": step("torch.func")}
    (l1, g1), (l2, g2) = fns["jvpgraph"](), fns["torch.func"]()
    g1, g2 = torch.cat([g.reshape(-1) for g in g1]), torch.cat([g.reshape(-1) for g in g2])
    row = dict(size=size, tokens=model.tokens, batch=batch, loss_rel_diff=float((l1 - l2).abs() / l2.abs()),
               grad_rel_diff=float((g1 - g2).norm() / g2.norm()))
    for key, fn in fns.items():
        row[f"{key}_peak_mb"] = peak_memory(fn) / MB
    for key, t in median_times(fns, repeats=repeats, rounds=rounds, warmup=1).items():
        row[f"{key}_s"] = t
    row["time_ratio"] = row["jvpgraph_s"] / row["torch.func_s"]
    row["memory_ratio"] = row["jvpgraph_peak_mb"] / row["torch.func_peak_mb"]
    return row


def write_report(rows, out: Path, meta: dict) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = [f"torch {torch.__version__}, {meta['threads']} thread(s), float32; TinyDiT (width 64, 4 heads, 2 blocks, "
             f"patch 1), batch {rows[0]['batch']}; one step = MeanFlow loss (one Jv along (v, 0, 1)) and its backward; "
             f"median of {meta['repeats']} steps in {meta['rounds']} rotating blocks, one process", "",
             "| tokens | jvpgraph s / MB | torch.func.jvp (math kernel) s / MB | time ratio | memory ratio | "
             "loss, gradient apart |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['jvpgraph_s']:.3f} / {r['jvpgraph_peak_mb']:.0f} | "
                     f"{r['torch.func_s']:.3f} / {r['torch.func_peak_mb']:.0f} | {r['time_ratio']:.2f} | "
                     f"{r['memory_ratio']:.2f} | {r['loss_rel_diff']:.1e}, {r['grad_rel_diff']:.1e} |")
    lines += ["", "MB: peak tensor storage alive at once during one step (jvpgraph.measure.PeakTensorMemory, which "
              "counts inside jvpgraph's attention op). jvpgraph's trace is made before timing."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[16, 32, 48])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "meanflow_step"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), repeats=args.repeats, rounds=args.rounds)
    rows = []
    for size in args.sizes:
        rows.append(measure(size, args.batch, args.repeats, args.rounds))
        print({k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    print(write_report(rows, Path(args.out), meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
