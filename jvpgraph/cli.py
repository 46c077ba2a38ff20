"""Command line: ``jvpgraph demo | verify | draw``.

Example:
    >>> from jvpgraph.cli import build_parser
    >>> build_parser().parse_args(["demo", "--batch", "4"]).batch
    4
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

__all__ = ["main", "build_parser", "demo"]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _fmt_err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"fails: {type(e).__name__}: {msg}"[:110]


def demo(batch: int = 8, seed: int = 0, show_code: int = 14, out=sys.stdout) -> int:
    """Trace a sigmoid + BatchNorm CNN in train mode, compute Jv through the flipped graph, and compare it
    with every independent reference. Returns 0 when all references agree.
    """
    import jvpgraph
    from jvpgraph import testing
    from jvpgraph.experiments.models import SigmoidBNCNN

    def p(*a):
        print(*a, file=out)

    # PyTorch's forward AD loads its decompositions through torch.jit.script on first use and warns
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

    torch.manual_seed(seed)
    model = SigmoidBNCNN().double().train()
    x = torch.randn(batch, 1, 16, 16, dtype=torch.double)
    v = torch.randn_like(x)
    state = testing.ModelState(model)

    p("jvpgraph demo: Jv through the flipped graph (Appendix C), for a model that is not piecewise linear")
    p(f"model: SigmoidBNCNN (conv-BatchNorm-sigmoid x2, GELU head), TRAIN mode, batch {batch}, float64")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, t_trace = _timed(lambda: jvpgraph.trace(model, x, bn="batch"))
    n_ops = sum(1 for n in g.graph.gm.graph.nodes if n.op == "call_function")
    n_flip = sum(1 for n in g.flipped.module.graph.nodes if n.op == "call_function")
    fallbacks = [str(w.message) for w in caught if "no written rule" in str(w.message)]
    p(f"traced in {t_trace:.2f} s: {n_ops} aten ops; flipped graph with v: {n_flip} aten calls; "
      f"ops through the fallback: {len(fallbacks) or 'none'}")
    p("")
    lines = g.flipped.code.strip().splitlines()[1:]
    start = next((i for i, line in enumerate(lines) if "(v," in line), 0)
    p(f"the emitted flipped graph: {start} forward lines, then the tangent pass, which starts at the fictitious "
      f"node v:")
    for line in lines[start:start + show_code]:
        p("  " + (line.strip()[:118]))
    p("  ...")
    p("")

    (out_, jv), t_jvp = _timed(lambda: g.jvp(x, v))
    lin = g.linearize(x)
    jv_rec, t_rec = _timed(lambda: lin.jvp(v))

    rows = []
    tol = 1e-9
    for name, fn in [
        ("torch.func.jvp (forward-mode AD)", lambda: testing.func_jvp(model, x, v)),
        ("double-backward trick", lambda: testing.double_backward(model, x, v)),
        ("full Jacobian (jacrev) @ v", lambda: testing.jacobian_times(model, x, v)),
        ("central finite differences", lambda: testing.finite_differences(model, x, v)),
    ]:
        try:
            ref, t = _timed(fn)
            err = testing.max_rel_err(jv, ref)
            limit = 1e-6 if "finite" in name else tol
            rows.append((name, f"{err:.1e}", f"{t * 1e3:.1f} ms", "ok" if err <= limit else "FAIL"))
        except Exception as e:  # noqa: BLE001 - a reference that cannot run is reported, not fatal
            rows.append((name, _fmt_err(e), "", "n/a"))
    gap = testing.adjoint_gap(jv, model, x, v)
    rows.append(("adjoint <u,Jv> = <J^T u,v>", f"{gap:.1e}", "", "ok" if gap <= tol else "FAIL"))
    rows.append(("jvpgraph, recorded forward", f"{testing.max_rel_err(jv_rec, jv):.1e}", f"{t_rec * 1e3:.1f} ms",
                 "ok" if testing.max_rel_err(jv_rec, jv) <= tol else "FAIL"))

    # bn="frozen": batch statistics held constant -> per-sample Jacobian
    gf = jvpgraph.trace(model, x, bn="frozen")
    jv_frozen = gf.jvp(x, v)[1]
    ref_frozen = testing.frozen_batchnorm_jvp(model, x, v)
    err_f = testing.max_rel_err(jv_frozen, ref_frozen)
    rows.append(('bn="frozen" vs stats-held Jacobian', f"{err_f:.1e}", "", "ok" if err_f <= tol else "FAIL"))

    w = max(len(r[0]) for r in rows)
    p(f"jvpgraph Jv on a new batch: {t_jvp * 1e3:.1f} ms.  Compared with (max relative error):")
    p(f"  {'reference'.ljust(w)}  {'max rel err':<14}{'time':>10}  verdict")
    for name, err, t, verdict in rows:
        if verdict == "n/a":
            p(f"  {name.ljust(w)}  {err}")
        else:
            p(f"  {name.ljust(w)}  {err:<14}{t:>10}  {verdict}")
    unchanged = not state.changes(model)
    p("")
    p(f"model left unchanged (parameters, running statistics, num_batches_tracked, training flag): "
      f"{'yes' if unchanged else 'NO'}")
    ok = unchanged and all(r[3] != "FAIL" for r in rows)
    p("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def build_model(spec: str, size: int, num_classes: int = 10):
    """A torchvision classifier by name (random weights), one of jvpgraph's (``lenet``, ``sigmoid_bn_cnn``,
    ``sigmoid_mlp``), or ``package.module:factory`` for your own.

    Example:
        >>> build_model("resnet18", 32).__class__.__name__
        'ResNet'
        >>> build_model("lenet", 28).__class__.__name__
        'LeNet'
        >>> build_model("torch.nn:Identity", 32).__class__.__name__
        'Identity'
    """
    import importlib

    from .experiments.models import MODELS

    if spec in MODELS:
        return MODELS[spec][0](num_classes=num_classes) if spec != "sigmoid_mlp" else MODELS[spec][0]()

    if ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise SystemExit(f"jvpgraph: cannot load {spec!r}: {e}") from e
        return factory()
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        raise SystemExit(f"jvpgraph: unknown model {spec!r}: use one of torchvision's classifiers "
                         f"({', '.join(names[:6])}, ...) or package.module:factory")
    kwargs = {"weights": None, "num_classes": num_classes}
    if spec.startswith("vit_"):
        kwargs["image_size"] = size  # torchvision's ViTs take any image size divisible by the patch size
    if spec in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return torchvision.models.get_model(spec, **kwargs)


def input_shape(spec: str, size: int | None, channels: int | None) -> tuple[int, ...]:
    """Shape of one input sample for ``spec``: a jvpgraph model's own, else ``(channels, size, size)``
    (defaults 3 and 64).

    Example:
        >>> input_shape("lenet", None, None), input_shape("resnet18", 32, None)
        ((1, 28, 28), (3, 32, 32))
    """
    from .experiments.models import MODELS

    if spec in MODELS and size is None and channels is None:
        return MODELS[spec][1]
    return (channels or 3, size or 64, size or 64)


def draw_cmd(args) -> int:
    from .api import trace

    torch.manual_seed(args.seed)
    shape = input_shape(args.model, args.size, args.channels)
    model = build_model(args.model, shape[-1])
    model.train(args.mode == "train")
    x = torch.randn(args.batch, *shape)
    depth = {"auto": "auto", "ops": None}.get(args.depth, None)
    if args.depth not in ("auto", "ops"):
        try:
            depth = int(args.depth)
        except ValueError:
            raise SystemExit(f"jvpgraph draw: --depth must be auto, ops or a number, not {args.depth!r}") from None
    import matplotlib

    matplotlib.use("Agg")
    g = trace(model, x, bn=args.bn)
    try:
        g.graph.draw(args.output, depth=depth, expand=args.expand or (), max_nodes=args.max_nodes)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"jvpgraph draw: {args.model} [{args.mode}, bn={args.bn}] -> {args.output}")
    return 0


def verify_cmd(args) -> int:
    from .verify import verify

    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    model = build_model(args.model, args.size).to(dtype)
    model.train(args.mode == "train")
    x = torch.randn(args.batch, args.channels, args.size, args.size, dtype=dtype)
    report = verify(model, x, bn=args.bn, seed=args.seed, name=f"{args.model} [{args.mode}]")
    print(report)
    if not report.ok:
        for c in report.failures:
            print(f"FAILED: {c.reference}: max rel err {c.max_rel_err:.2e} > {c.tol:.0e}", file=sys.stderr)
        for s in report.suspects:
            print(f"FAILED: suspect op {s}", file=sys.stderr)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jvpgraph", description="Jv for any PyTorch model by flipping its "
                                 "reverse-mode graph (Appendix C).")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="trace a sigmoid+BatchNorm CNN in train mode and check Jv against "
                                    "every reference")
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    v = sub.add_parser("verify", help="compare jvpgraph's Jv with every reference on a model; exit 1 on failure")
    v.add_argument("model", help="a torchvision classifier name (e.g. resnet18) or package.module:factory")
    v.add_argument("--mode", choices=("train", "eval"), default="train")
    v.add_argument("--bn", choices=("batch", "frozen", "eval"), default="batch")
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    v.add_argument("--channels", type=int, default=3)
    v.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    v.add_argument("--seed", type=int, default=0)
    w = sub.add_parser("draw", help="draw a model's reverse-mode graph beside its flipped graph (svg, png, pdf)")
    w.add_argument("model", help="a torchvision classifier (resnet18), lenet, sigmoid_bn_cnn, sigmoid_mlp or "
                                 "package.module:factory")
    w.add_argument("-o", "--output", default="flipped.svg", help="output file; the suffix picks the format")
    w.add_argument("--mode", choices=("train", "eval"), default="train")
    w.add_argument("--bn", choices=("batch", "frozen", "eval"), default="batch")
    w.add_argument("--depth", default="auto", help="ops (every op), N (one box per module at depth N) or auto")
    w.add_argument("--expand", action="append", metavar="MODULE", help="draw this module op by op (repeatable)")
    w.add_argument("--max-nodes", type=int, default=40, help="auto depth: at most this many boxes (default 40)")
    w.add_argument("--batch", type=int, default=2)
    w.add_argument("--size", type=int, default=None, help="input height and width (default: the model's, or 64)")
    w.add_argument("--channels", type=int, default=None)
    w.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
    if args.command == "demo":
        return demo(batch=args.batch, seed=args.seed)
    if args.command == "verify":
        return verify_cmd(args)
    if args.command == "draw":
        return draw_cmd(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
