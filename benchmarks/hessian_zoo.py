"""Question: does jvpgraph give the right Hessian-vector product over the parameters on every torchvision
classifier, in train and in eval mode, where torch.func's forward-over-reverse does not?

For each of torchvision's classification models (random weights, 10 classes, batch 2, float32, the small
input sizes of benchmarks/zoo.py): ``jvpgraph.Curvature(model, cross_entropy).hvp(v, x, y)`` against the
double-backward HVP (``autograd.grad`` of the gradient with ``create_graph=True``, math attention kernel, the
same dropout masks); whether ``torch.func.jvp(torch.func.grad(loss))`` runs and how far it is; the model's
state (parameters, buffers, ``training`` flags) before and after. A float64 subset is checked to 1e-8.
Writes benchmarks/results/hessian_zoo.json and .md.

    python benchmarks/hessian_zoo.py                       # all models, both modes, then the float64 subset
    python benchmarks/hessian_zoo.py --part 0/2 --out /tmp/h0 &    # or in two processes, then
    python benchmarks/hessian_zoo.py --part 1/2 --out /tmp/h1; wait
    python benchmarks/hessian_zoo.py --merge /tmp/h0.json /tmp/h1.json
    python benchmarks/hessian_zoo.py resnet18 vit_b_16 --modes train --dtype float64
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from zoo import SIZES, _seeded  # noqa: E402

import jvpgraph  # noqa: E402
from jvpgraph import testing  # noqa: E402
from jvpgraph.cli import build_model  # noqa: E402

TOL = {"float32": 1e-4, "float64": 1e-8}
# float64 subset: one of each family that is cheap in double precision (convolutions, BatchNorm, depthwise,
# squeeze-excitation, LayerNorm, attention)
FLOAT64 = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "convnext_tiny", "vit_b_16",
           "swin_t", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_x_400mf"]


def _init_heads(model: torch.nn.Module) -> None:
    """torchvision zero-initializes some heads (ViT): a zero head makes every Hv term through it vanish."""
    head = getattr(model, "heads", None)
    if head is not None and hasattr(head, "head"):
        torch.nn.init.normal_(head.head.weight, std=0.02)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out  # inception/googlenet in train mode: aux outputs


def loss_fn(out, y):
    return F.cross_entropy(_logits(out), y)


class _Hardsigmoid(torch.nn.Module):
    """``relu6(x + 3) / 6``: hardsigmoid itself, written in ops whose backward autograd can differentiate
    (``hardsigmoid_backward`` has no derivative: double-backward raises on MobileNetV3)."""

    def forward(self, x):
        return F.relu6(x + 3) / 6


def twice_differentiable(model: torch.nn.Module) -> int:
    """Replace ``nn.Hardsigmoid`` in ``model`` (in place) by :class:`_Hardsigmoid`; returns how many."""
    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.Hardsigmoid)]
    for parent, name in swaps:
        setattr(parent, name, _Hardsigmoid())
    return len(swaps)


def run_one(name: str, mode: str, dtype: torch.dtype = torch.float32, max_params_m: float | None = None,
            func: bool = True) -> dict:
    size = SIZES.get(name, 64)
    dname = str(dtype).removeprefix("torch.")
    torch.manual_seed(0)
    row = dict(model=name, mode=mode, size=size, dtype=dname)
    try:
        if name == "vgg16_bn":  # jvpgraph's own model of that name (CIFAR-sized) would shadow torchvision's
            model = torchvision.models.get_model(name, weights=None, num_classes=10).to(dtype)
        else:
            model = build_model(name, size).to(dtype)
    except Exception as e:  # noqa: BLE001
        return {**row, "ok": False, "error": f"build: {type(e).__name__}: {e}"[:300]}
    model.train(mode == "train")
    _init_heads(model)
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    if max_params_m is not None and row["params_m"] > max_params_m:
        return {**row, "ok": None, "error": f"skipped here: {row['params_m']:.0f}M parameters (> {max_params_m}M)"}
    x = torch.randn(2, 3, size, size, dtype=dtype)
    y = torch.tensor([3, 7])
    params = dict(model.named_parameters())
    v = {n: torch.randn_like(p) for n, p in params.items()}
    before = testing.ModelState(model)
    try:
        curv = jvpgraph.Curvature(model, loss_fn)
        t0 = time.perf_counter()
        hv = _seeded(functools.partial(curv.hvp, v, x, y))()
        row["first_hvp_s"] = time.perf_counter() - t0  # tracing, the gradient's graph, flipping it, one pass
        t0 = time.perf_counter()
        hv2 = _seeded(functools.partial(curv.hvp, v, x, y))()
        row["hvp_s"] = time.perf_counter() - t0
        row["repeatable"] = all(torch.equal(hv2[n], hv[n]) for n in hv)  # bit for bit, no flat copies
        del hv2  # the largest models (600M parameters) hold a few copies of them at once: no more than needed
    except Exception as e:  # noqa: BLE001
        return {**row, "ok": False, "error": f"jvpgraph: {type(e).__name__}: {str(e).splitlines()[0]}"[:300]}
    row["state_unchanged"] = not before.changes(model)
    del curv
    mine = hv  # per parameter: a flat copy (and the comparison's float64 ones) of a 630M-parameter Hv is GBs
    del hv
    twin = copy.deepcopy(model)  # the references' own copy (train mode moves its running statistics)
    if twice_differentiable(twin):
        row["reference_note"] = "hardsigmoid written as relu6(x + 3) / 6 (its backward has no derivative)"
    names = list(params)
    tparams = dict(twin.named_parameters())

    def double_backward():
        with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel's backward has no derivative
            ps = [tparams[n] for n in names]
            g = torch.autograd.grad(loss_fn(twin(x), y), ps, create_graph=True, allow_unused=True)
            keep = [(gi, vi) for gi, vi in zip(g, (v[n] for n in names)) if gi is not None and gi.requires_grad]
            hs = torch.autograd.grad([a for a, _ in keep], ps, [b for _, b in keep], allow_unused=True)
            return {n: torch.zeros_like(tparams[n]) if h is None else h for n, h in zip(names, hs)}

    def func_fwd_over_rev():
        buffers = dict(twin.named_buffers())

        def loss_of(p):
            return loss_fn(torch.func.functional_call(twin, (p, buffers), (x,)), y)
        return torch.func.jvp(torch.func.grad(loss_of), ({n: tparams[n].detach() for n in names},), (v,))[1]

    if not func:
        row["func"] = "not run (--no-func: the largest models hold too much beside it)"
    for key, fn in (("double_backward", double_backward), ("func", func_fwd_over_rev))[:2 if func else 1]:
        try:
            t0 = time.perf_counter()
            ref = _seeded(fn)()
            row[f"{key}_s"] = time.perf_counter() - t0
            row[key] = "runs"
            row[f"{key}_finite"] = all(bool(torch.isfinite(ref[n]).all()) for n in names)
            row[f"{key}_rel_err"] = testing.max_rel_err([mine[n] for n in names], [ref[n] for n in names])
            del ref
        except Exception as e:  # noqa: BLE001 - a reference that cannot run is a result, not a crash
            row[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        gc.collect()
    # the reference that decides: double-backward, else torch.func where double-backward's Hv is not finite
    # (swin_v2 at these sizes: the keys of zero-padded windows are zero vectors, and the second derivative of
    # their norm in double-backward is NaN) or cannot run
    decider = "double_backward"
    if (row.get("double_backward") != "runs" or not row["double_backward_finite"]) and row.get("func") == "runs" \
            and row["func_finite"]:
        decider = "func"
    row["reference"] = decider
    if row.get(decider) == "runs":
        row["max_rel_err"] = row[f"{decider}_rel_err"]
        row["ok"] = bool(row["max_rel_err"] <= TOL[dname] and row["state_unchanged"] and row["repeatable"])
    else:
        row["ok"] = False
        row["error"] = f"no reference: {row['double_backward']}"
    return row


def _db_finite(r) -> bool:
    """Whether double-backward's Hv was finite (rows written before the flag: a finite error says so)."""
    return bool(r.get("double_backward_finite", r.get("double_backward_rel_err", float("inf")) < float("inf")))


def write_report(rows, out: Path, final: bool) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, torchvision=torchvision.__version__, threads=torch.get_num_threads(),
                batch=2, tol=TOL, complete=final)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["| model | mode | dtype | jvpgraph vs the reference | torch.func fwd-over-rev | "
             "jvpgraph Hv s (first) | double-backward s | torch.func s |", "|---|---|---|---|---|---|---|---|"]

    def ref(r, key):
        if r.get(key) != "runs":
            if str(r.get(key, "")).startswith("not run"):
                return "not run"
            return f"fails: {r[key][:60]}" if key in r else "-"
        return f"runs, {r[key + '_rel_err']:.1e} from jvpgraph"

    for r in rows:
        if r.get("ok") is None:
            res = r.get("error", "")
        elif "max_rel_err" in r:
            res = f"{r['max_rel_err']:.1e}" + ("" if r["ok"] else " FAIL") + \
                (" (vs torch.func: double-backward " + ("NaN)" if r.get("double_backward") == "runs" else "fails)")
                 if r.get("reference") == "func" else "") + \
                ("" if r.get("state_unchanged", True) else " (state changed)")
        else:
            res = f"FAIL: {r.get('error', '')[:80]}"
        t = f"{r['hvp_s']:.2f} ({r['first_hvp_s']:.1f})" if "hvp_s" in r else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['dtype']} | {res} | {ref(r, 'func')} | {t} | "
                     f"{r.get('double_backward_s', float('nan')):.2f} | {'-' if 'func_s' not in r else format(r['func_s'], '.2f')} |")
    head = [f"torchvision {torchvision.__version__}, torch {torch.__version__}, batch 2, cross-entropy, "
            f"tolerance float32 {TOL['float32']}, float64 {TOL['float64']}", "",
            "Reference: the double-backward HVP (math attention kernel; MobileNetV3's hardsigmoid written as "
            "relu6(x + 3) / 6, whose backward autograd can differentiate). Where double-backward's Hv has NaN "
            "entries (swin_v2 at these small sizes: zero-padded windows give zero key vectors, and the second "
            "derivative of their norm is NaN in double-backward) torch.func's forward-over-reverse decides, marked "
            "so in the table.", ""]
    for dname in ("float32", "float64"):
        for mode in ("train", "eval"):
            rs = [r for r in rows if r["mode"] == mode and r["dtype"] == dname]
            judged = [r for r in rs if r.get("ok") is not None]
            if not rs:
                continue
            worst = max((r.get("max_rel_err", 0) for r in judged), default=0)
            head.append(f"- {dname} {mode}: jvpgraph {sum(bool(r.get('ok')) for r in judged)}/{len(judged)} within "
                        f"tolerance of the reference (largest error {worst:.1e}; double-backward runs on "
                        f"{sum(r.get('double_backward') == 'runs' for r in judged)}, finite on "
                        f"{sum(_db_finite(r) for r in judged)}), torch.func forward-over-reverse"
                        f" runs on {sum(r.get('func') == 'runs' for r in judged)}/{len(judged)}"
                        + (f" (not run on {nf}: --no-func)" if (nf := sum(str(r.get('func', '')).startswith('not run')
                                                                       for r in judged)) else "")
                        + "; model state "
                        f"unchanged on {sum(bool(r.get('state_unchanged')) for r in judged)}/{len(judged)}"
                        + (f"; {len(rs) - len(judged)} skipped (size)" if len(rs) > len(judged) else ""))
    order = torchvision.models.list_models(module=torchvision.models)
    ran = {r["model"] for r in rows if r["dtype"] == "float32" and r.get("ok") is not None}
    missing = [m for m in order if m not in ran]
    if missing:
        head.append(f"- not run in float32 ({len(missing)} of {len(order)}): {', '.join(missing)}")
    head += ["", "Times are single calls (seconds; the first jvpgraph call includes tracing the loss, building and "
             "flipping its gradient's graph); they are not the speed benchmark (benchmarks/hessian_speed.py).", ""]
    if not final:
        head = ["(partial run: the sweep was stopped before the end)", ""] + head
    out.with_suffix(".md").write_text("\n".join(head + lines) + "\n")
    return "\n".join(head)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--modes", nargs="+", default=["train", "eval"])
    ap.add_argument("--dtype", choices=["float32", "float64", "both"], default="both",
                    help="both: every model in float32, then the float64 subset")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hessian_zoo"))
    ap.add_argument("--part", default="0/1", help="k/n: run every n-th model from the k-th (parallel processes)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--max-params", type=float, default=None,
                    help="skip models with more million parameters (run the largest alone: they need ~20 GB)")
    ap.add_argument("--skip-models", nargs="+", default=[], help="models to leave out of this run")
    ap.add_argument("--no-func", action="store_true",
                    help="leave torch.func's forward-over-reverse out (memory: for the largest models)")
    ap.add_argument("--merge", nargs="+", help="JSON files of parts to merge into --out (no models run)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    order = torchvision.models.list_models(module=torchvision.models)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        best = {}  # one row per (model, mode, dtype): a later file's row replaces an earlier one (a rerun),
        for p_ in parts:  # except that a model skipped in one file does not replace its run in another
            for r in p_["rows"]:
                key = (r["model"], r["mode"], r["dtype"])
                if r.get("ok") is not None or key not in best:
                    best[key] = r
        rows = sorted(best.values(), key=lambda r: (r["dtype"], order.index(r["model"]) if r["model"] in order
                                                    else 999, r["mode"] != "train"))
        print(write_report(rows, Path(args.out), final=all(p_["meta"]["complete"] for p_ in parts)))
        return 0
    k, n = (int(a) for a in args.part.split("/"))
    jobs = []
    if args.dtype in ("float32", "both"):
        jobs += [(m, torch.float32) for m in (args.models or order)[k::n] if m not in args.skip_models]
    if args.dtype in ("float64", "both"):
        jobs += [(m, torch.float64) for m in (args.models or FLOAT64)[k::n] if m not in args.skip_models]
    rows = []
    for i, (name, dtype) in enumerate(jobs):
        for mode in args.modes:
            t0 = time.perf_counter()
            row = run_one(name, mode, dtype, args.max_params, func=not args.no_func)
            rows.append(row)
            status = {True: "ok  ", False: "FAIL", None: "skip"}[row.get("ok")]
            err = f"rel err {row['max_rel_err']:.1e}" if "max_rel_err" in row else row.get("error", "")[:60]
            print(f"[{i + 1}/{len(jobs)}] {status} {name:22s} {mode:5s} {row['dtype']:7s} {err:40s} "
                  f"func {'runs' if row.get('func') == 'runs' else 'not run' if args.no_func else 'fails'}  "
                  f"({time.perf_counter() - t0:.1f} s)",
                  flush=True)
            write_report(rows, Path(args.out), final=False)
            gc.collect()
    print(write_report(rows, Path(args.out), final=True))
    return 0 if all(r.get("ok") is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
