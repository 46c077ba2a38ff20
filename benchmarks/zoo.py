"""Question: does jvpgraph give the right Jv on every torchvision classifier, in train and in eval mode,
where torch.func.jvp does not?

For each of torchvision's classification models (random weights, 10 classes, batch 2, float32, a small
valid input size): jvpgraph's Jv against the full Jacobian by reverse mode (one forward, 20 backward passes:
reverse mode runs on every model) times v; whether the double-backward trick and torch.func.jvp run, and
how far they are from jvpgraph when they do. Writes benchmarks/results/zoo.json and zoo.md.

    python benchmarks/zoo.py                 # all models, both modes (about half an hour on 2 cores)
    python benchmarks/zoo.py resnet18 vit_b_16 --modes train
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import jvpgraph
from jvpgraph import testing
from jvpgraph.cli import build_model

TOL = 1e-4  # float32: both sides round differently over ~100 layers; see jvpgraph.verify.tolerance

# Inputs must survive each model's downsampling; everything else runs at 64x64.
SIZES = {"inception_v3": 80, "alexnet": 64, "maxvit_t": 224, "vit_h_14": 56, "swin_t": 64, "swin_s": 64,
         "swin_b": 64, "swin_v2_t": 64, "swin_v2_s": 64, "swin_v2_b": 64}


def run_one(name: str, mode: str) -> dict:
    size = SIZES.get(name, 64)
    torch.manual_seed(0)
    row = dict(model=name, mode=mode, size=size)
    try:
        model = build_model(name, size)
    except Exception as e:  # noqa: BLE001
        return {**row, "ok": False, "error": f"build: {type(e).__name__}: {e}"[:300]}
    model.train(mode == "train")
    head = getattr(model, "heads", None)
    if head is not None and hasattr(head, "head"):  # torchvision zero-initializes ViT heads: Jv would be 0
        torch.nn.init.normal_(head.head.weight, std=0.02)
    x = torch.randn(2, 3, size, size)
    v = torch.randn_like(x)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    try:
        t0 = time.perf_counter()
        g = jvpgraph.trace(model, x)
        row["trace_s"] = time.perf_counter() - t0
        with torch.random.fork_rng():
            torch.manual_seed(1)
            t0 = time.perf_counter()
            with torch.no_grad():
                jv = g.jvp(x, v)[1]
            row["jvp_s"] = time.perf_counter() - t0
        row["fallback_ops"] = sorted({f"{g.graph.nx.nodes[n]['target']}" for n, h in g.flipped.how.items()
                                      if h in ("decomposition", "flipped-vjp", "forward-ad")})
    except Exception as e:  # noqa: BLE001
        return {**row, "ok": False, "error": f"jvpgraph: {type(e).__name__}: {str(e).splitlines()[0]}"[:300]}
    row["state_unchanged"] = all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    for key, ref_fn in (("jacobian", testing.jacobian_times), ("double_backward", testing.double_backward),
                        ("func_jvp", testing.func_jvp)):
        try:
            with torch.random.fork_rng():  # the same dropout masks as jvpgraph's pass
                torch.manual_seed(1)
                t0 = time.perf_counter()
                ref = ref_fn(model, x, v)
                row[f"{key}_s"] = time.perf_counter() - t0
            row[key] = "runs"
            row[f"{key}_rel_err"] = testing.max_rel_err(jv, ref)
        except Exception as e:  # noqa: BLE001 - a reference that cannot run is a result, not a crash
            row[key] = f"{type(e).__name__}: {str(e).splitlines()[0]}"[:200]
    # the reverse-mode Jacobian runs on every model: it is the reference that decides
    if row["jacobian"] == "runs":
        row["max_rel_err"] = row["jacobian_rel_err"]
        row["ok"] = row["max_rel_err"] <= TOL and row["state_unchanged"]
    else:
        row["ok"] = False
        row["error"] = f"jacobian: {row['jacobian']}"
    return row


def write_report(rows, modes, out: Path, final: bool) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, torchvision=torchvision.__version__, threads=torch.get_num_threads(),
                batch=2, dtype="float32", tol=TOL, complete=final)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["| model | mode | jvpgraph vs Jacobian @ v | torch.func.jvp | double-backward | fallback ops | trace s "
             "| Jv s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = (f"{r['max_rel_err']:.1e}" + ("" if r.get("ok") else " FAIL")) if "max_rel_err" in r \
            else f"FAIL: {r.get('error', '')[:80]}"
        fj = "runs" if r.get("func_jvp") == "runs" else "fails"
        db = "runs" if r.get("double_backward") == "runs" else "fails"
        lines.append(f"| {r['model']} | {r['mode']} | {res} | {fj} | {db} | {', '.join(r.get('fallback_ops', [])) or '-'} "
                     f"| {r.get('trace_s', 0):.2f} | {r.get('jvp_s', 0):.3f} |")
    summary = {}
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode]
        summary[mode] = dict(jvpgraph=sum(bool(r.get("ok")) for r in rs),
                             func_jvp=sum(r.get("func_jvp") == "runs" for r in rs),
                             double_backward=sum(r.get("double_backward") == "runs" for r in rs), total=len(rs))
    head = [f"torchvision {torchvision.__version__}, torch {torch.__version__}, batch 2, float32, tolerance {TOL}",
            ""] + [f"- {m}: jvpgraph {s['jvpgraph']}/{s['total']} (vs the reverse-mode Jacobian); torch.func.jvp runs "
                   f"on {s['func_jvp']}/{s['total']}; double-backward runs on {s['double_backward']}/{s['total']}"
                   for m, s in summary.items()] + [""]
    if not final:
        head = ["(partial run: the sweep was stopped before the end)", ""] + head
    out.with_suffix(".md").write_text("\n".join(head + lines) + "\n")
    return "\n".join(head)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--modes", nargs="+", default=["train", "eval"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "zoo"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    rows = []
    for i, name in enumerate(names):
        for mode in args.modes:
            t0 = time.perf_counter()
            row = run_one(name, mode)
            rows.append(row)
            status = "ok  " if row.get("ok") else "FAIL"
            err = f"rel err {row['max_rel_err']:.1e}" if "max_rel_err" in row else row.get("error", "")
            fj = ("func.jvp runs" if row.get("func_jvp") == "runs" else "func.jvp fails") + \
                (", double-backward runs" if row.get("double_backward") == "runs" else ", double-backward fails")
            print(f"[{i + 1}/{len(names)}] {status} {name:22s} {mode:5s} {err:40s} {fj}  "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
            write_report(rows, args.modes, Path(args.out), final=False)
    print(write_report(rows, args.modes, Path(args.out), final=True))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
