"""Question: does jvpgraph give the right Jv on every timm architecture family, in eval, train and
gradient-checkpointed train mode, where torch.func.jvp does not?

One model per timm family (the module that registers it: ``resnet``, ``vision_transformer``, ...): its smallest
variant by parameter count (counted on the meta device; the choice is cached in the JSON), built by
``jvpgraph.experiments.ecosystem.build("timm:NAME")`` (random weights, 10 classes, the smallest input size it
runs on), batch 2, float32. All-zero weight tensors (timm zero-initializes some heads, layer scales and last
norms of residual blocks: a zero Jv would pass vacuously) are redrawn from N(0, 0.02^2). For each mode:
jvpgraph's Jv (``jvpgraph.jvp``) against double-backward (``jvpgraph.testing.double_backward`` on the math SDPA
kernel, on a copy of the model; the full reverse-mode Jacobian times v where double-backward cannot run), in
float64 where float32 misses the tolerance (to tell rounding from a wrong answer); the same dropout/drop-path
masks on both sides (the same seed); whether ``torch.func.jvp`` runs and how far it is; the time of a Jv on a
new batch against double-backward's; the ops that went through a fallback; whether the model is left unchanged.
Checkpointed train mode (``model.set_grad_checkpointing(True)``, where timm supports it) is compared against the
same model with checkpointing off (the same masks). Each model runs in its own process (crashes and hangs are
isolated; a case over 120 s is recorded as slow). Writes benchmarks/results/zoo_timm.json and zoo_timm.md.

    python benchmarks/zoo_timm.py                       # every family (resumes: families already in the JSON are kept)
    python benchmarks/zoo_timm.py --families 3          # the first 3 families
    python benchmarks/zoo_timm.py resnet10t vit_tiny_patch16_224 --out /tmp/zt
    python benchmarks/zoo_timm.py --report-only         # rewrite the .md from the .json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

TOL = 1e-4  # float32 relative (max|Jv - ref| / max|ref|), as benchmarks/zoo.py
TOL64 = 1e-9  # float64, for the cases float32 misses
REPEAT = 3  # timed calls (median), after the untimed ones
TIME_MAX_PARAMS_M = 30  # timing only for models up to this many million parameters
CASE_LIMIT_S = 120  # one mode of one model; past it: "slow"
MODEL_LIMIT_S = 3 * CASE_LIMIT_S + 120  # the process of one model (3 modes, imports, building)
MODES = ("eval", "train", "train+ckpt")
DEFAULT_OUT = Path(__file__).parent / "results" / "zoo_timm"


class Slow(Exception):
    pass


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:240]


def _seeded(fn, no_grad=False):
    """``fn`` under the same seed at each call (train-mode dropout / drop-path draws the same masks)."""
    def run(*a):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            if no_grad:
                with torch.no_grad():
                    return fn(*a)
            return fn(*a)
    return run


def _math(fn):
    def run(*a):
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*a)
    return run


# ------------------------------------------------------------------ the smallest variant of each family
def count_params(name: str) -> int:
    import timm

    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=10)
    return sum(p.numel() for p in m.parameters())


def choose(families: dict[str, list[str]], cached: dict) -> dict:
    """{family: {model, params_m, skipped}}: the variant with the fewest parameters (names that fail to build
    on the meta device are skipped)."""
    out = {}
    for fam, names in families.items():
        if fam in cached and cached[fam].get("model") in names:
            out[fam] = cached[fam]
            continue
        counts, skipped = {}, {}
        for n in names:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    counts[n] = count_params(n)
            except Exception as e:  # noqa: BLE001 - this name does not build: the next one
                skipped[n] = _first_line(e)
        if counts:
            best = min(counts, key=lambda n: (counts[n], n))
            out[fam] = dict(model=best, params_m=counts[best] / 1e6, variants=len(names), skipped=skipped)
        else:
            out[fam] = dict(model=None, variants=len(names), skipped=skipped)
        print(f"  {fam}: {out[fam].get('model')} ({out[fam].get('params_m', 0):.2f}M of {len(names)} variants"
              f"{f', {len(skipped)} fail to build' if skipped else ''})", flush=True)
    return out


# ------------------------------------------------------------------ one model (in its own process)
def reinit_zeros(model: nn.Module) -> list[str]:
    """Redraw every all-zero floating-point weight from N(0, 0.02^2) (biases are left: a zero bias does not
    make Jv vacuous); returns their names."""
    out = []
    with torch.no_grad():
        for k, p in model.named_parameters():
            if p.is_floating_point() and p.numel() and not k.endswith("bias") and not bool(p.any()):
                nn.init.normal_(p, std=0.02)
                out.append(k)
    return out


def count_checkpoints(model: nn.Module, x: torch.Tensor) -> int:
    """How many torch.utils.checkpoint calls one eager train-mode forward makes (on a copy)."""
    import torch.utils.checkpoint as C

    calls = [0]
    gen, fn = C._checkpoint_without_reentrant_generator_impl, C.CheckpointFunction

    def counting_gen(*a, **k):
        calls[0] += 1
        return gen(*a, **k)

    def counting_apply(*a):
        calls[0] += 1
        return fn.apply(*a)

    C._checkpoint_without_reentrant_generator_impl = counting_gen
    C.CheckpointFunction = types.SimpleNamespace(apply=counting_apply)
    try:
        copy.deepcopy(model)(x)
    finally:
        C._checkpoint_without_reentrant_generator_impl, C.CheckpointFunction = gen, fn
    return calls[0]


def run_case(name: str, mode: str, built, reinit: list[str]) -> dict:
    import jvpgraph
    from jvpgraph import testing
    from jvpgraph.api import _traced_for

    row = dict(model=name, mode=mode, shape=list(built.shapes[0]), reinit=reinit)
    base = built.model
    params_m = sum(p.numel() for p in base.parameters()) / 1e6
    row["params_m"] = params_m
    model = copy.deepcopy(base).train(mode != "eval")
    ref_model = model  # the references run on copies of this one
    if mode == "train+ckpt":
        try:
            model.set_grad_checkpointing(True)
        except Exception as e:  # noqa: BLE001 - timm raises/asserts where a model has no checkpointing
            row.update(ok=None, ckpt=f"n/a: {_first_line(e)}")
            return row
        ref_model = copy.deepcopy(model)
        ref_model.set_grad_checkpointing(False)
    torch.manual_seed(0)
    x = torch.randn(built.shapes[0])
    v = torch.randn_like(x)
    if mode == "train+ckpt":
        try:
            row["ckpt_calls"] = _seeded(lambda: count_checkpoints(model, x))()
        except Exception as e:  # noqa: BLE001
            row["ckpt_calls"] = f"eager forward fails: {_first_line(e)}"
    before = testing.ModelState(model)
    # jvpgraph: the first call traces, flips and runs
    try:
        t0 = time.perf_counter()
        jv = _seeded(lambda: jvpgraph.jvp(model, (x,), (v,))[1])()
        row["trace_s"] = time.perf_counter() - t0
        row["jvpgraph"] = "runs"
        g = _traced_for(model, (x,), "batch")
        nodes = g.graph.nx.nodes
        row["fallback_ops"] = sorted({f"{nodes[n]['target']} ({h})" for n, h in g.flipped.how.items()
                                      if h in ("decomposition", "flipped-vjp", "forward-ad")})
    except Slow:
        raise
    except Exception as e:  # noqa: BLE001 - a failure is a result
        row["jvpgraph"] = _first_line(e)
        jv = None
    # the reference: double-backward on a copy (math attention kernel), else the full Jacobian times v
    ref = None
    for key, fn in (("double_backward", testing.double_backward), ("jacobian", testing.jacobian_times)):
        try:
            twin = copy.deepcopy(ref_model)
            ref = _seeded(lambda: _math(fn)(twin, x, v))()
            row["reference"] = key
            break
        except Slow:
            raise
        except Exception as e:  # noqa: BLE001
            row[f"{key}_error"] = _first_line(e)
    if jv is not None and ref is not None:
        row["rel_err"] = testing.max_rel_err(jv, ref)
        row["ref_max"] = ref.abs().max().item()  # 0 would make the comparison vacuous
        row["ok"] = row["rel_err"] <= TOL and row["ref_max"] > 0
        if not row["ok"]:  # float32 missed: rounding or a wrong answer? float64 decides
            try:
                m64, r64 = copy.deepcopy(model).double(), copy.deepcopy(ref_model).double()
                x64, v64 = x.double(), v.double()
                jv64 = _seeded(lambda: jvpgraph.jvp(m64, (x64,), (v64,))[1])()
                fn = testing.double_backward if row["reference"] == "double_backward" else testing.jacobian_times
                row["rel_err_float64"] = testing.max_rel_err(jv64, _seeded(lambda: _math(fn)(r64, x64, v64))())
                row["ok"] = row["rel_err_float64"] <= TOL64
            except Slow:
                raise
            except Exception as e:  # noqa: BLE001
                row["float64_error"] = _first_line(e)
    else:
        row["ok"] = False
    # torch.func.jvp, on the model as the user has it (checkpointed in train+ckpt)
    try:
        fj = _seeded(lambda: testing.func_jvp(copy.deepcopy(model), x, v))()
        row["func_jvp"] = "runs"
        if ref is not None:
            row["func_jvp_rel_err"] = testing.max_rel_err(fj, ref)
    except Slow:
        raise
    except Exception as e:  # noqa: BLE001
        row["func_jvp"] = _first_line(e)
        try:  # the usual workaround: the math attention kernel, which has a forward-mode formula
            _seeded(_math(lambda: testing.func_jvp(copy.deepcopy(model), x, v)))()
            row["func_jvp_math"] = "runs"
        except Slow:
            raise
        except Exception as e2:  # noqa: BLE001
            row["func_jvp_math"] = _first_line(e2)
    # time: a Jv on a new batch (traced once) against double-backward's
    if row["jvpgraph"] == "runs" and row.get("reference") == "double_backward" and params_m <= TIME_MAX_PARAMS_M:
        x2, v2 = torch.randn_like(x), torch.randn_like(x)
        mine = _seeded(lambda: jvpgraph.jvp(model, (x2,), (v2,)), no_grad=True)
        twin = copy.deepcopy(ref_model)
        theirs = _seeded(lambda: _math(torch.autograd.functional.jvp)(twin, x2, v2))
        from jvpgraph.measure import timeit

        for _ in range(6):  # the first calls try both op orders and keep the faster (jvpgraph.api._FasterOrder)
            mine()
        row["jvp_s"] = timeit(mine, repeat=REPEAT, warmup=0)
        row["double_backward_s"] = timeit(theirs, repeat=REPEAT, warmup=1)
    changes = before.changes(model)
    row["state_unchanged"] = not changes
    if changes:
        row["state_changes"] = changes[:5]
        row["ok"] = False
    return row


def one(name: str, rows_path: Path, modes) -> int:
    """Build ``name`` and run each mode, appending a JSON line per mode to ``rows_path``."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from jvpgraph.experiments.ecosystem import build

    def alarm(*_):
        raise Slow(f"slow: over {CASE_LIMIT_S} s")

    signal.signal(signal.SIGALRM, alarm)

    def emit(row):
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    t0 = time.perf_counter()
    try:
        signal.alarm(CASE_LIMIT_S)
        torch.manual_seed(0)
        built = build("timm:" + name)
        reinit = reinit_zeros(built.model)
        signal.alarm(0)
    except Exception as e:  # noqa: BLE001
        signal.alarm(0)
        for mode in modes:
            emit(dict(model=name, mode=mode, ok=False, stage="build", error=f"build: {_first_line(e)}"))
        return 0
    build_s = time.perf_counter() - t0
    for mode in modes:
        t0 = time.perf_counter()
        signal.alarm(CASE_LIMIT_S)
        try:
            row = run_case(name, mode, built, reinit)
        except Slow as e:
            row = dict(model=name, mode=mode, ok=False, stage="slow", error=str(e), shape=list(built.shapes[0]))
        except Exception as e:  # noqa: BLE001 - the harness itself: still a result
            row = dict(model=name, mode=mode, ok=False, stage="harness", error=_first_line(e))
        finally:
            signal.alarm(0)
        row["case_s"] = time.perf_counter() - t0
        row["build_s"] = build_s
        emit(row)
    return 0


# ------------------------------------------------------------------ the sweep
def _stage(r) -> str:
    if r.get("stage"):
        return r["stage"]
    if r.get("ok") is None:
        return "n/a"
    if r.get("jvpgraph", "runs") != "runs":
        return "jvpgraph"
    if "reference" not in r:
        return "reference"
    if not r.get("state_unchanged", True):
        return "state"
    if r.get("ref_max") == 0:
        return "vacuous"
    if not r.get("ok"):
        return "mismatch"
    return "ok"


def error_text(r) -> str:
    s = _stage(r)
    if s in ("build", "slow", "harness", "crash"):
        return r.get("error", "")
    if s == "jvpgraph":
        return "jvpgraph: " + r["jvpgraph"]
    if s == "reference":
        return "reference: " + r.get("double_backward_error", "") + " / jacobian: " + r.get("jacobian_error", "")
    if s == "state":
        return "model changed: " + ", ".join(r.get("state_changes", []))
    if s == "vacuous":
        return "the reference Jv is 0 everywhere (nothing compared)"
    if s == "mismatch":
        return (f"rel err {r['rel_err']:.1e}" + (f", float64 {r['rel_err_float64']:.1e}" if "rel_err_float64" in r
                                                 else f", float64: {r.get('float64_error', '')}"))
    return ""


def _compress(names: list[str]) -> str:
    """``head.fc.weight, 12x gamma`` from a list of parameter names."""
    if not names:
        return ""
    tails: dict[str, int] = {}
    for n in names:
        t = n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] if n.count(".") else n
        tails[t] = tails.get(t, 0) + 1
    return ", ".join(f"{c}x {t}" if c > 1 else t for t, c in tails.items())


def write_report(data: dict, out: Path, final: bool) -> str:
    import timm

    out.parent.mkdir(parents=True, exist_ok=True)
    data["meta"] = dict(torch=torch.__version__, timm=timm.__version__, threads=1, batch=2, dtype="float32",
                        tol=TOL, tol_float64=TOL64, complete=final, **{k: v for k, v in data.get("meta", {}).items()
                                                                       if k in ("command", "runtime_s")})
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    rows = data["rows"]
    fam_of = {c["model"]: f for f, c in data["choices"].items() if c.get("model")}
    fams = {fam_of.get(r["model"], "?") for r in rows}
    head = [f"timm {timm.__version__}, torch {torch.__version__}, CPU, 1 thread; one model per family (the fewest "
            f"parameters), batch 2, float32, tolerance {TOL} (float64 {TOL64} where float32 misses)", ""]
    if not final:
        head = ["(partial run: the sweep has not reached the end)", ""] + head
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode]
        applicable = [r for r in rs if r.get("ok") is not None]
        ok = sum(bool(r.get("ok")) for r in applicable)
        fj = sum(r.get("func_jvp") == "runs" for r in applicable)
        fjm = sum(r.get("func_jvp") == "runs" or r.get("func_jvp_math") == "runs" for r in applicable)
        f64 = sum("rel_err_float64" in r and bool(r.get("ok")) for r in applicable)
        ratios = sorted(r["jvp_s"] / r["double_backward_s"] for r in applicable if "jvp_s" in r)
        na = len(rs) - len(applicable)
        line = (f"- {mode}: jvpgraph passes {ok}/{len(applicable)} families"
                + (f" ({f64} of them in float64 after float32 missed)" if f64 else "")
                + f"; torch.func.jvp runs on {fj}/{len(applicable)} ({fjm}/{len(applicable)} with the math "
                f"attention kernel)" + (f"; {na} n/a (no gradient checkpointing)" if na else ""))
        if ratios:
            line += (f"; Jv on a new batch: median {ratios[len(ratios) // 2]:.2f}x double-backward's time "
                     f"(range {ratios[0]:.2f}x-{ratios[-1]:.2f}x, {len(ratios)} models)")
        head.append(line)
        stages: dict[str, int] = {}
        for r in applicable:
            if not r.get("ok"):
                stages[_stage(r)] = stages.get(_stage(r), 0) + 1
        if stages:
            head.append("  - failures: " + ", ".join(f"{n} {s}" for s, n in sorted(stages.items())))
    reinit = [r for r in rows if r.get("reinit") and r["mode"] == "eval"]
    head += ["", f"Families: {len(fams)} run of {len(data['choices'])}. Reference: double-backward "
             "(jvpgraph.testing.double_backward, math SDPA kernel, on a copy of the model; the full Jacobian times v "
             "where it cannot run); train+ckpt: model.set_grad_checkpointing(True), compared against the same "
             "model with checkpointing off (the same dropout/drop-path masks); 'ckpt calls' is the number of "
             "torch.utils.checkpoint calls in one eager forward (0: timm accepts the flag but this model does not "
             "checkpoint). All-zero weights were redrawn from N(0, 0.02^2) in "
             f"{len(reinit)} models (listed in the table's last column).",
             f"Times: median of {REPEAT} calls (seconds), jvpgraph under no_grad after 6 untimed calls (the order "
             f"trials), double-backward after 1; for models up to {TIME_MAX_PARAMS_M}M parameters; a shared "
             "2-core machine. 'first call s': trace + flip + one Jv. A case over "
             f"{CASE_LIMIT_S} s is 'slow'.", ""]
    if data["meta"].get("command"):
        head.append(f"Command: `{data['meta']['command']}`" + (f"; runtime {data['meta']['runtime_s'] / 60:.0f} min"
                                                               if data["meta"].get("runtime_s") else ""))
        head.append("")
    lines = ["| family | model | params M | input | mode | jvpgraph rel err (reference) | torch.func.jvp "
             "| Jv s / double-backward s | first call s | fallback ops | error / notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = _stage(r)
        if "rel_err" in r:
            res = f"{r['rel_err']:.1e} ({r.get('reference', '').replace('_', '-')})"
            if "rel_err_float64" in r:
                res += f", float64 {r['rel_err_float64']:.1e}"
            res += "" if r.get("ok") else " FAIL"
        elif s == "n/a":
            res = "n/a"
        else:
            res = "FAIL" if s != "reference" else "no reference"
        if r.get("func_jvp") == "runs":
            fj = "runs" + (f" ({r['func_jvp_rel_err']:.0e})" if "func_jvp_rel_err" in r else "")
        elif "func_jvp" in r:
            fj = "fails: " + r["func_jvp"][:70] + ("; math kernel: runs" if r.get("func_jvp_math") == "runs" else "")
        else:
            fj = "-"
        t = f"{r['jvp_s']:.3f} / {r['double_backward_s']:.3f}" if "jvp_s" in r else "-"
        notes = error_text(r) if s not in ("ok",) else ""
        if s == "n/a":
            notes = r.get("ckpt", "")[5:90]
        elif r["mode"] == "train+ckpt" and "ckpt_calls" in r:
            notes = (f"ckpt calls {r['ckpt_calls']}" + ("; " + notes if notes else ""))
        if r.get("reinit") and r["mode"] == "eval":
            notes = (notes + "; " if notes else "") + "reinit: " + _compress(r["reinit"])
        shape = "x".join(str(d) for d in r.get("shape", [])[2:]) or "-"
        fo = ", ".join(o.replace("aten.", "").replace(".default", "") for o in r.get("fallback_ops", [])) or "-"
        lines.append(f"| {fam_of.get(r['model'], '?')} | {r['model']} | {r.get('params_m', 0):.2f} | {shape} | "
                     f"{r['mode']} | {res} | {fj} | {t} | {r.get('trace_s', 0):.1f} | {fo} | "
                     f"{notes.replace('|', '/')[:200]} |")
    out.with_suffix(".md").write_text("\n".join(head + lines) + "\n")
    return "\n".join(head)


def run_model(name: str, modes) -> list[dict]:
    """``name``'s rows, from its own process (what a crash or a hang left out is recorded as such)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        cmd = [sys.executable, __file__, "--one", name, "--rows", str(path), "--modes", *modes]
        err = None
        try:
            p = subprocess.run(cmd, timeout=MODEL_LIMIT_S, capture_output=True, text=True)
            if p.returncode:
                tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1:] or [""]
                err = f"crash: exit code {p.returncode}: {tail[0][:200]}"
        except subprocess.TimeoutExpired:
            err = f"slow: the model's process was killed after {MODEL_LIMIT_S} s"
        rows = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []
    done = {r["mode"] for r in rows}
    for mode in modes:
        if mode not in done:
            rows.append(dict(model=name, mode=mode, ok=False, stage="slow" if err and err.startswith("slow")
                             else "crash", error=err or "no result"))
    return sorted(rows, key=lambda r: modes.index(r["mode"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="timm model names (default: the smallest of each family)")
    ap.add_argument("--families", type=int, default=0, help="only the first N families")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--fresh", action="store_true", help="rerun the families already in the JSON")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        return one(a.one, a.rows, a.modes)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    out = a.out.with_suffix("")
    data = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    if data.get("rows") and "choices" not in data:
        sys.exit(f"{out.with_suffix('.json')} is not a zoo_timm result (no 'choices'): give another --out")
    data.setdefault("rows", [])
    if a.report_only:
        print(write_report(data, out, final=data.get("meta", {}).get("complete", False)))
        return 0
    from jvpgraph.experiments.ecosystem import timm_families

    families = timm_families()
    t_start = time.perf_counter()
    print("choosing the smallest variant of each family (meta device)...", flush=True)
    data["choices"] = choose(families, data.get("choices", {}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    if a.models:
        names = a.models
    else:
        names = [c["model"] for c in data["choices"].values() if c.get("model")]
        if a.families:
            names = names[:a.families]
    keep = [] if a.fresh else [r for r in data["rows"] if r["model"] in names]
    done = {r["model"] for r in keep}
    data["rows"] = keep
    data["meta"] = dict(command="python benchmarks/zoo_timm.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    for i, name in enumerate(names):
        if name in done:
            continue
        t0 = time.perf_counter()
        rows = run_model(name, list(a.modes))
        data["rows"] += rows
        data["rows"].sort(key=lambda r: (names.index(r["model"]) if r["model"] in names else 999,
                                         MODES.index(r["mode"])))
        for r in rows:
            s = _stage(r)
            print(f"[{i + 1}/{len(names)}] {'ok  ' if r.get('ok') else ('n/a ' if s == 'n/a' else 'FAIL')} "
                  f"{name:28s} {r['mode']:10s} "
                  f"{('rel err %.1e' % r['rel_err']) if 'rel_err' in r else '':16s} "
                  + (f"func.jvp {'runs' if r.get('func_jvp') == 'runs' else 'fails'}" if s != "n/a"
                     else r.get("ckpt", "")[:60])
                  + f"  {error_text(r)[:90]}", flush=True)
        print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)
        write_report(data, out, final=False)
    data["meta"]["runtime_s"] = time.perf_counter() - t_start
    print(write_report(data, out, final=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
