"""Question: does jvpgraph give the right Jv on torchvision's models beyond classification (segmentation, video,
optical flow, detection), in eval and train mode, where torch.func.jvp does not?

Random weights (weights=None, weights_backbone=None), float32, the smallest input each model runs on. All-zero
weight tensors of >= 2 dimensions are redrawn from N(0, 0.02^2) (the rows name them). For segmentation, video
and optical flow: jvpgraph's Jv (``jvpgraph.trace`` then ``.jvp``) against double-backward
(``jvpgraph.testing.double_backward``, math SDPA kernel, on a copy, the same seed on both sides), within 1e-4
relative in float32 (``jvpgraph.testing.max_rel_err``), retried in float64 at 1e-9 on a miss; where
double-backward cannot run (MobileNetV3: hardsigmoid_backward has no derivative) the adjoint identity
<u, Jv> = <J^T u, v> with autograd's backward instead. Whether torch.func.jvp runs; whether the model is left
unchanged (``jvpgraph.testing.ModelState``); the time of a second jvpgraph call against double-backward's
(models up to 30M parameters). Detection (eval only): f(x) = the first image's float outputs of model(list(x));
checked by the adjoint identity (roi_align has no double backward); a refusal is recorded verbatim.
Each model runs in its own process with a time limit. Writes benchmarks/results/zoo_vision.json and .md.

    python benchmarks/zoo_vision.py                          # everything
    python benchmarks/zoo_vision.py --part 0/2 --out /tmp/zv0 & python benchmarks/zoo_vision.py --part 1/2 --out /tmp/zv1
    python benchmarks/zoo_vision.py --merge /tmp/zv0.json /tmp/zv1.json
    python benchmarks/zoo_vision.py seg:fcn_resnet50 video:r3d_18
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
from zoo_timm import _first_line, _math, _seeded, reinit_zeros as _reinit_zeros_1d  # noqa: E402,F401

TOL, TOL64 = 1e-4, 1e-9
REPEAT = 2
TIME_MAX_PARAMS_M = 30
MODEL_LIMIT_S = 240
DEFAULT_OUT = Path(__file__).parent / "results" / "zoo_vision"

SEG = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "deeplabv3_resnet50",
       "fcn_resnet101", "deeplabv3_resnet101"]
VIDEO = ["r3d_18", "mc3_18", "r2plus1d_18", "s3d", "swin3d_t", "swin3d_s", "swin3d_b", "mvit_v2_s", "mvit_v1_b"]
FLOW = ["raft_small", "raft_large"]
DET = ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn",
       "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"]
CASES = ([f"seg:{n}" for n in SEG] + [f"video:{n}" for n in VIDEO] + [f"flow:{n}" for n in FLOW]
         + [f"det:{n}" for n in DET])


def reinit_zeros(model: nn.Module) -> list[str]:
    """Redraw every all-zero floating-point parameter of >= 2 dimensions from N(0, 0.02^2); their names."""
    out = []
    with torch.no_grad():
        for k, p in model.named_parameters():
            if p.is_floating_point() and p.dim() >= 2 and p.numel() and not bool(p.any()):
                nn.init.normal_(p, std=0.02)
                out.append(k)
    return out


class Seg(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)["out"]


class Flow(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, a, b):
        return self.m(a, b, num_flow_updates=3)[-1]


class Det(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        out = self.m(list(x))[0]
        return tuple(out[k] for k in ("boxes", "scores", "masks", "keypoints", "keypoints_scores") if k in out
                     and out[k].is_floating_point())


def build(case: str):
    """(wrapper module, input shapes, note)."""
    import torchvision.models.detection as D
    import torchvision.models.optical_flow as F
    import torchvision.models.segmentation as S
    import torchvision.models.video as V

    task, name = case.split(":")
    if task == "seg":
        m = getattr(S, name)(weights=None, weights_backbone=None, num_classes=3, aux_loss=False)
        return Seg(m), [(2, 3, 32, 32)], ""
    if task == "video":
        m = getattr(V, name)(weights=None, num_classes=5)
        if name.startswith("mvit"):  # the builders fix spatial_size=(224, 224), temporal_size=16
            return m, [(1, 3, 16, 224, 224)], "fixed input size of the builder; no timing"
        if name == "s3d":  # its head's AvgPool3d((2, 7, 7)) needs 16 frames at 224 (stride 8 in time, 32 in space)
            return m, [(1, 3, 16, 224, 224)], "AvgPool3d((2,7,7)) head needs 16x224x224; no timing"
        return m, [(1, 3, 4, 32, 32)], ""
    if task == "flow":
        return Flow(getattr(F, name)(weights=None)), [(1, 3, 128, 128)] * 2, ""
    if task == "det":
        kw = dict(weights=None, weights_backbone=None, num_classes=3)
        if name.startswith("ssdlite"):
            kw.update(score_thresh=0.0)
            shape = (1, 3, 320, 320)  # SSDlite resizes to 320 anyway; min_size/max_size not accepted
        else:
            kw.update(min_size=64, max_size=64)
            kw.update({"box_score_thresh": 0.0} if "rcnn" in name else {"score_thresh": 0.0})
            shape = (1, 3, 64, 64)
        if name.startswith("maskrcnn"):  # paste_masks_in_image loops over the boxes: 100 made it run past 150 s
            kw.update(box_detections_per_img=10)
        if name.startswith("keypoint"):
            kw.update(num_keypoints=5)
            kw["num_classes"] = 2  # keypoint R-CNN: background + person
        return Det(getattr(D, name)(**kw)), [shape], f"score threshold 0 (boxes are found); {kw}"
    raise ValueError(case)


def adjoint(jv, model, xs, vs):
    """Relative gap |<u,Jv> - <J^T u, v>| / (|u||Jv| + |J^T u||v|), J^T u from autograd on a copy."""
    twin = copy.deepcopy(model)
    xr = [x.detach().requires_grad_(True) for x in xs]
    with torch.enable_grad():
        out = _seeded(_math(lambda: twin(*xr)))()
    outs = out if isinstance(out, tuple) else (out,)
    jvs = jv if isinstance(jv, tuple) else (jv,)
    g = torch.Generator().manual_seed(7)
    us = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    pairs = [(o, u) for o, u in zip(outs, us) if o.requires_grad and o.numel()]
    if not pairs:
        return 0.0, dict(adjoint_note="no differentiable output")
    jtu = torch.autograd.grad([p[0] for p in pairs], xr, [p[1] for p in pairs], allow_unused=True)
    jtu = [torch.zeros_like(x) if t is None else t for t, x in zip(jtu, xr)]
    lhs = sum((u.double() * j.double()).sum() for u, j in zip(us, jvs)).item()
    rhs = sum((t.double() * v.double()).sum() for t, v in zip(jtu, vs)).item()
    scale = (sum(u.double().norm() ** 2 for u in us).sqrt() * sum(j.double().norm() ** 2 for j in jvs).sqrt()
             + sum(t.double().norm() ** 2 for t in jtu).sqrt() * sum(v.double().norm() ** 2 for v in vs).sqrt()).item()
    # decisive: |lhs - rhs| / max(|lhs|, |rhs|), about |Jv error| / |Jv| for random u (the normalization by
    # |u||Jv| + |J^T u||v| of testing.adjoint_gap shrinks any error by ~1/sqrt(numel) and is kept as a second number)
    info = dict(adjoint_lhs=lhs, adjoint_rhs=rhs, adjoint_gap_normalized=abs(lhs - rhs) / scale if scale > 0 else 0.0,
                jtu_norm=sum(t.double().norm() ** 2 for t in jtu).sqrt().item())
    den = max(abs(lhs), abs(rhs))
    return (abs(lhs - rhs) / den if den > 0 else abs(lhs - rhs)), info


def _err(a, b):
    from jvpgraph import testing
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return max(testing.max_rel_err(x, y) for x, y in zip(a, b))


def run_case(case: str, mode: str) -> dict:
    import jvpgraph
    from jvpgraph import testing
    from jvpgraph.measure import timeit

    task, name = case.split(":")
    row = dict(task=task, model=name, mode=mode)
    torch.manual_seed(0)
    try:
        model, shapes, note = build(case)
    except Exception as e:  # noqa: BLE001
        return {**row, "ok": False, "error": f"build: {_first_line(e)}"}
    row["note"] = note
    row["reinit"] = reinit_zeros(model)
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    row["shape"] = [list(s) for s in shapes]
    model.train(mode == "train")
    torch.manual_seed(0)
    xs = [torch.rand(s) * 2 - 1 if task == "flow" else torch.randn(s) for s in shapes]
    vs = [torch.randn_like(x) for x in xs]
    before = testing.ModelState(model)

    def ours(m, xs_, vs_):
        g = jvpgraph.trace(m, *xs_)
        jv = _seeded(lambda: g.jvp(tuple(xs_), tuple(vs_))[1], no_grad=True)()
        return g, jv

    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            g, jv = ours(model, xs, vs)
        row["trace_s"] = time.perf_counter() - t0
        row["warnings"] = sorted({str(x.message).splitlines()[0][:160] for x in w
                                  if "jvpgraph" in (x.filename or "") or "branch" in str(x.message)})[:3]
        row["jvpgraph"] = "runs"
    except Exception as e:  # noqa: BLE001 - a failure (or refusal) is a result
        row.update(jvpgraph=_first_line(e), ok=False, error=f"jvpgraph: {_first_line(e)}")
        row["state_unchanged"] = not before.changes(model)
        return row
    row["state_unchanged"] = not before.changes(model)
    row["jv_max_abs"] = max((float(t.abs().max()) for t in (jv if isinstance(jv, tuple) else (jv,)) if t.numel()),
                            default=0.0)
    if task == "det":
        row["n_boxes"] = int(jv[0].shape[0]) if isinstance(jv, tuple) and jv else 0
        row["outputs"] = [list(t.shape) for t in (jv if isinstance(jv, tuple) else (jv,))]
        try:
            gap, info = adjoint(jv, model, xs, vs)
            row.update(reference="adjoint", adjoint_gap=gap, max_rel_err=gap, **info)
        except Exception as e:  # noqa: BLE001
            row.update(reference=f"adjoint fails: {_first_line(e)}")
        row["ok"] = row.get("max_rel_err", float("inf")) <= TOL and row["state_unchanged"]
        return row
    # the references
    try:
        ref = _seeded(lambda: testing.double_backward(model, tuple(xs) if len(xs) > 1 else xs[0],
                                                      tuple(vs) if len(vs) > 1 else vs[0]))()
        row["double_backward"] = "runs"
        row["double_backward_rel_err"] = _err(jv, ref)
        row["reference"] = "double_backward"
        row["max_rel_err"] = row["double_backward_rel_err"]
    except Exception as e:  # noqa: BLE001
        row["double_backward"] = _first_line(e)
        try:
            gap, info = adjoint(jv, model, xs, vs)
            row.update(reference="adjoint", adjoint_gap=gap, max_rel_err=gap, **info)
        except Exception as e2:  # noqa: BLE001
            row["reference"] = f"adjoint fails: {_first_line(e2)}"
    try:
        twin = copy.deepcopy(model)
        fj = _seeded(lambda: torch.func.jvp(twin, tuple(xs), tuple(vs))[1], no_grad=True)()
        row["func_jvp"] = "runs"
        row["func_jvp_rel_err"] = _err(jv, fj)
    except Exception as e:  # noqa: BLE001
        row["func_jvp"] = _first_line(e)
    ok32 = row.get("max_rel_err", float("inf")) <= TOL
    row["ok"] = ok32
    if not ok32 and "max_rel_err" in row:  # float64: rounding or a wrong answer?
        try:
            m64 = copy.deepcopy(model).double()
            x64, v64 = [x.double() for x in xs], [v.double() for v in vs]
            _, jv64 = ours(m64, x64, v64)
            if row["reference"] == "double_backward":
                ref64 = _seeded(lambda: testing.double_backward(m64, tuple(x64) if len(x64) > 1 else x64[0],
                                                                tuple(v64) if len(v64) > 1 else v64[0]))()
                row["float64_rel_err"] = _err(jv64, ref64)
            else:
                row["float64_rel_err"] = adjoint(jv64, m64, x64, v64)[0]
            row["ok"] = row["float64_rel_err"] <= TOL64
        except Exception as e:  # noqa: BLE001
            row["float64"] = _first_line(e)
    row["ok"] = bool(row["ok"]) and row["state_unchanged"]
    if row["params_m"] <= TIME_MAX_PARAMS_M and "no timing" not in note:
        try:
            row["jvp_s"] = timeit(_seeded(lambda: g.jvp(tuple(xs), tuple(vs)), no_grad=True), repeat=REPEAT, warmup=0)
            if row.get("double_backward") == "runs":
                twin = copy.deepcopy(model)
                a, b = (tuple(xs), tuple(vs)) if len(xs) > 1 else (xs[0], vs[0])
                row["double_backward_s"] = timeit(_seeded(_math(
                    lambda: torch.autograd.functional.jvp(twin, a, b)[1])), repeat=REPEAT, warmup=1)
        except Exception as e:  # noqa: BLE001
            row["timing"] = _first_line(e)
    return row


def child(case: str, modes: list[str], out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for mode in modes:
        try:
            row = run_case(case, mode)
        except BaseException as e:  # noqa: BLE001
            task, name = case.split(":")
            row = dict(task=task, model=name, mode=mode, ok=False, error=f"crash: {_first_line(e)}")
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------ report
def diagnose(r: dict) -> str:
    return r.get("diagnosis", "")


def write_report(rows: list[dict], out: Path, final: bool, elapsed: float | None = None) -> None:
    import torchvision
    out.parent.mkdir(parents=True, exist_ok=True)
    order = {c: i for i, c in enumerate(CASES)}
    rows = sorted(rows, key=lambda r: (order.get(f"{r['task']}:{r['model']}", 999), r["mode"] != "eval"))
    meta = dict(torch=torch.__version__, torchvision=torchvision.__version__, threads=1, dtype="float32", tol=TOL,
                tol64=TOL64, complete=final, elapsed_s=elapsed)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    names = dict(seg="segmentation", video="video", flow="optical flow", det="detection")
    lines = ["(partial run: the sweep was stopped before the end)", ""] if not final else []
    lines += [f"torchvision {torchvision.__version__}, torch {torch.__version__}, float32, 1 thread, random weights. "
              f"Reference: double-backward (math SDPA) within {TOL} relative, float64 retry at {TOL64} on a miss; "
              "the adjoint identity <u,Jv> = <J^T u, v> (autograd backward) where double-backward cannot run and "
              "for detection (eval only, score threshold 0 so boxes are found). "
              "All-zero >=2-d weights redrawn from N(0, 0.02^2). The adjoint check's number is "
              "|<u,Jv> - <J^T u,v>| / max(|<u,Jv>|, |<J^T u,v>|) for a random u (about the relative error of Jv in "
              "norm; testing.adjoint_gap's normalization by |u||Jv| + |J^T u||v| would shrink any error by "
              "~1/sqrt(numel)), also within 1e-4. Times: median of 2 calls, seconds, for models up to 30M parameters "
              "at the small inputs; several sweep processes shared 2 cores with a test suite, so times are rough.",
              "", "## Summary", ""]
    for task in ("seg", "video", "flow", "det"):
        for mode in ("eval", "train"):
            rs = [r for r in rows if r["task"] == task and r["mode"] == mode]
            if not rs:
                continue
            lines.append(f"- {names[task]} {mode}: passes {sum(bool(r.get('ok')) for r in rs)}/{len(rs)}"
                         + ("" if task == "det" else
                            f"; torch.func.jvp runs {sum(r.get('func_jvp') == 'runs' for r in rs)}/{len(rs)}"
                            f"; double-backward runs {sum(r.get('double_backward') == 'runs' for r in rs)}/{len(rs)}"))
    lines += ["", "## Models", "",
              "| task | model | mode | input | params M | jvpgraph rel err (reference) | float64 | torch.func.jvp "
              "| state unchanged | jvpgraph 2nd call s | double-backward s | reinit zero weights | notes |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "max_rel_err" in r:
            res = f"{r['max_rel_err']:.1e} ({r.get('reference', '').replace('_', '-')})" + ("" if r.get("ok") else " FAIL")
        else:
            res = f"FAIL: {r.get('error', r.get('reference', ''))[:90]}"
        f64 = f"{r['float64_rel_err']:.1e}" if "float64_rel_err" in r else r.get("float64", "-")[:60]
        fj = "-" if r["task"] == "det" else ("runs" + (f" ({r['func_jvp_rel_err']:.0e})" if "func_jvp_rel_err" in r
                                                        else "") if r.get("func_jvp") == "runs"
                                             else f"fails: {str(r.get('func_jvp', ''))[:130]}")
        notes = []
        if r["task"] == "det" and "n_boxes" in r:
            notes.append(f"{r['n_boxes']} boxes; outputs {r.get('outputs')}")
        if "adjoint_lhs" in r:
            notes.append(f"<u,Jv> {r['adjoint_lhs']:.4e}, <J^T u,v> {r['adjoint_rhs']:.4e}, max abs Jv "
                         f"{r.get('jv_max_abs', float('nan')):.1e}")
        if r.get("jv_max_abs") is not None and r["jv_max_abs"] < 1e-6:
            notes.append("Jv is ~0 at these random weights (a weak check)")
        if r.get("double_backward", "runs") != "runs":
            notes.append(f"double-backward fails: {r['double_backward'][:70]}")
        if r.get("note"):
            notes.append(r["note"][:90] if r["task"] != "det" else "")
        if r.get("warnings"):
            notes.append("warns: " + "; ".join(r["warnings"])[:100])
        if r.get("timing"):
            notes.append("timing: " + r["timing"][:60])
        if r.get("diagnosis"):
            notes.append("diagnosis: " + r["diagnosis"])
        shape = " ".join("x".join(map(str, s)) for s in r.get("shape", []))
        re = r.get("reinit", [])
        lines.append(f"| {names[r['task']]} | {r['model']} | {r['mode']} | {shape} | {r.get('params_m', 0):.1f} | "
                     f"{res} | {f64} | {fj} | {r.get('state_unchanged', '-')} | "
                     f"{r['jvp_s']:.3f} |" if "jvp_s" in r else
                     f"| {names[r['task']]} | {r['model']} | {r['mode']} | {shape} | {r.get('params_m', 0):.1f} | "
                     f"{res} | {f64} | {fj} | {r.get('state_unchanged', '-')} | - |")
        lines[-1] += (f" {r['double_backward_s']:.3f} |" if "double_backward_s" in r else " - |") + \
            f" {', '.join(re) if re else '-'} | {'; '.join(n for n in notes if n) or '-'} |"
    fails = [r for r in rows if not r.get("ok")]
    lines += ["", "## Failures", ""]
    for r in fails:
        first = r.get("error") or (f"rel err {r['max_rel_err']:.1e} ({r.get('reference')})" if "max_rel_err" in r
                                   else r.get("reference", ""))
        lines.append(f"- {r['task']}:{r['model']} {r['mode']}: `{first}`" +
                     (f" — {r['diagnosis']}" if r.get("diagnosis") else ""))
    if not fails:
        lines.append("none")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--part", default="0/1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=float, default=MODEL_LIMIT_S)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "FILE"))
    ap.add_argument("--modes", nargs="+", default=["eval", "train"], help="(detection: eval only)")
    ap.add_argument("--merge", nargs="+")
    ap.add_argument("--diagnoses", help="JSON {task:model:mode: diagnosis} to add to rows (report only)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.child:
        case = args.child[0]
        modes = ["eval"] if case.startswith("det:") else args.modes
        child(case, modes, args.child[1], args.threads)
        return 0
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        latest = {}  # a later file's row replaces an earlier one of the same model and mode (reruns)
        for p in parts:
            for r in p["rows"]:
                latest[(r["task"], r["model"], r["mode"])] = r
        rows = list(latest.values())
        if args.diagnoses:
            d = json.loads(Path(args.diagnoses).read_text())
            for r in rows:
                k = f"{r['task']}:{r['model']}:{r['mode']}"
                if k in d:
                    r["diagnosis"] = d[k]
        write_report(rows, out, final=all(p["meta"]["complete"] for p in parts),
                     elapsed=max(p["meta"].get("elapsed_s") or 0 for p in parts))
        return 0
    cases = args.cases or CASES
    k, n = (int(a) for a in args.part.split("/"))
    cases = cases[k::n]
    rows: list[dict] = []
    t_all = time.perf_counter()
    for case in cases:
        t0 = time.perf_counter()
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as tf:
            path = tf.name
        modes = ["eval"] if case.startswith("det:") else args.modes
        try:
            p = subprocess.run([sys.executable, __file__, "--child", case, path, "--threads", str(args.threads),
                                "--modes", *modes],
                               timeout=args.limit, capture_output=True, text=True)
            rc = p.returncode
            tail = (p.stderr.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            rc, tail = "timeout", f"timeout after {args.limit:.0f} s"
        got = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        done = {r["mode"] for r in got}
        task, name = case.split(":")
        for mode in modes:
            if mode not in done:
                got.append(dict(task=task, model=name, mode=mode, ok=False,
                                error=f"process: {tail}" if rc != "timeout" else tail))
        rows += got
        for r in got:
            err = f"{r['max_rel_err']:.1e} ({r.get('reference')})" if "max_rel_err" in r else r.get("error", "")
            print(f"{'ok  ' if r.get('ok') else 'FAIL'} {case:45s} {r['mode']:5s} {err[:100]} "
                  f"func.jvp={'runs' if r.get('func_jvp') == 'runs' else 'fails'} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        write_report(rows, out, final=False, elapsed=time.perf_counter() - t_all)
    write_report(rows, out, final=True, elapsed=time.perf_counter() - t_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
