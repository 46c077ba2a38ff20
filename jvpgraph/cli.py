"""Command line: ``jvpgraph demo | verify | draw``.

Example:
    >>> from jvpgraph.cli import build_parser
    >>> build_parser().parse_args(["demo", "--batch", "4"]).batch
    4
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

__all__ = ["main", "build_parser", "demo"]


def demo(batch: int = 8, seed: int = 0, show_code: int = 14, out=sys.stdout, **kwargs) -> int:
    """`jvpgraph demo` (see :func:`jvpgraph.experiments.demo.demo`): Jv checks, a drawing, a short training run.

    Example:
        >>> import io
        >>> demo(batch=2, out=io.StringIO(), out_dir=None)
        0
    """
    from .experiments.demo import demo as run

    return run(batch=batch, seed=seed, show_code=show_code, out=out, **kwargs)


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
    d.add_argument("--batch", type=int, default=8, help="batch of the Jv checks (default 8)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="jvpgraph-demo", help="folder for the drawing, plots and results.json")
    d.add_argument("--epochs", type=int, default=30, help="training epochs per method (default 30)")
    d.add_argument("--lam", type=float, nargs="+", default=[0.01, 0.1],
                   help="weights of the spectral penalty, one run each (default 0.01 0.1)")
    d.add_argument("--checks-only", action="store_true", help="only the Jv checks: no drawing, no training")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
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
        return demo(batch=args.batch, seed=args.seed, out_dir=None if args.checks_only else args.out,
                    epochs=args.epochs, lams=args.lam, progress=not args.no_progress)
    if args.command == "verify":
        return verify_cmd(args)
    if args.command == "draw":
        return draw_cmd(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
