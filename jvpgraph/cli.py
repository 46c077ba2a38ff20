"""Command line: ``jvpgraph demo | verify | draw | train | robustness | bench``.

Example:
    >>> from jvpgraph.cli import build_parser
    >>> build_parser().parse_args(["demo", "--batch", "4"]).batch
    4
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

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
    """A torchvision classifier by name (random weights), one of jvpgraph's (``lenet``, ``vgg16_bn``,
    ``sigmoid_bn_cnn``, ``sigmoid_mlp``), or ``package.module:factory`` for your own (see
    :func:`jvpgraph.experiments.models.build_model`); a bad name exits with the message.

    Example:
        >>> build_model("resnet18", 32).__class__.__name__
        'ResNet'
        >>> build_model("lenet", 28).__class__.__name__
        'LeNet'
        >>> build_model("torch.nn:Identity", 32).__class__.__name__
        'Identity'
    """
    from .experiments.models import build_model as build

    try:
        return build(spec, size=size, num_classes=num_classes)
    except ValueError as e:
        raise SystemExit(f"jvpgraph: {e}") from None


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


def train_cmd(args) -> int:
    from .experiments.runner import GRIDS, run_experiment

    lams, lrs, bss = args.lam, args.lr, args.batch_size
    if args.grid:
        if args.model not in GRIDS:
            raise SystemExit(f"jvpgraph train: --grid is the paper's grid for {', '.join(GRIDS)}; for "
                             f"{args.model!r} give --lam/--lr/--batch-size lists")
        g = GRIDS[args.model]
        lams, lrs, bss = g["lam"], g["lr"], g["batch_size"]
        args.schedule = g.get("schedule", args.schedule)
        args.augment = g.get("augment", args.augment)
    if args.threads:
        torch.set_num_threads(args.threads)
    group = _join_launcher()
    try:
        run_experiment(args.out, dataset=args.dataset, model=args.model, regs=args.reg, lams=lams, lrs=lrs,
                       batch_sizes=bss, epochs=args.epochs, seeds=args.seeds, data_dir=args.data_dir,
                       size=args.size, n_iter=args.n_iter, limit=args.limit, schedule=args.schedule,
                       augment=args.augment, progress=not args.no_progress)
        if group:
            torch.distributed.barrier()  # no rank tears the group down while another still talks (gloo aborts)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"jvpgraph train: {e}") from None
    finally:
        if group:
            torch.distributed.destroy_process_group()
    return 0


def _join_launcher() -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) join its process group (gloo: the training
    runs on the CPU); True if this call initialized it."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if not dist.is_available():
        raise SystemExit("jvpgraph train: launched with WORLD_SIZE > 1, but this PyTorch has no torch.distributed")
    dist.init_process_group("gloo")
    return True


def robustness_cmd(args) -> int:
    from .experiments.runner import robustness_report

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        robustness_report(args.out, noise=args.noise, attacks=args.attacks, iterations=args.iterations,
                          square_queries=args.square_queries, n_test=args.n_test, n_boundary=args.n_boundary,
                          n_directions=args.n_directions, max_radius=args.max_radius, data_dir=args.data_dir)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"jvpgraph robustness: {e}") from None
    return 0


def bench_cmd(args) -> int:
    from .experiments import bench

    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")  # inductor's compile chatter
    if args.threads:
        torch.set_num_threads(args.threads)
    # --quick's choices, then what was given; the rest: bench.run's defaults
    kwargs = dict(models=["lenet", "mlp"], modes=["eval"], repeats=3, batches=(1, 8, 64)) if args.quick else {}
    given = dict(models=args.models, modes=args.modes, repeats=args.repeats, batches=args.batches)
    kwargs.update({k: v for k, v in given.items() if v is not None})
    try:
        bench.run(args.out, parts=args.parts, compile=args.compile, readme=args.readme, **kwargs)
    except ValueError as e:
        raise SystemExit(f"jvpgraph bench: {e}") from None
    print((Path(args.out) / "bench.md").read_text())
    print(f"jvpgraph bench: wrote {args.out}/bench.json, bench.md and the plots")
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
    from . import __version__
    ap.add_argument("--version", action="version", version=f"jvpgraph {__version__} (torch {torch.__version__})")
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
    from .experiments.data import DATASETS
    from .experiments.train import REGULARIZERS

    t = sub.add_parser("train", help="train with each regularizer over a grid and seeds; results table (Table 1)",
                       description="Train with each regularizer over a grid and seeds; results table (Table 1). "
                       "Data-parallel: launch it with torchrun (torchrun --nproc_per_node 2 -m jvpgraph train ...); "
                       "each global batch of --batch-size samples is split over the processes (gloo, CPU).")
    t.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits ships with scikit-learn; the others are read from --data-dir (never downloaded)")
    t.add_argument("--data-dir", default=None, help="folder in torchvision's layout (FashionMNIST/raw/..., ...)")
    t.add_argument("--model", default="lenet", help="lenet, vgg16_bn (32x32), sigmoid_bn_cnn, a torchvision "
                                                    "classifier or package.module:factory")
    t.add_argument("--reg", nargs="+", default=list(REGULARIZERS), choices=REGULARIZERS)
    t.add_argument("--lam", nargs="+", type=float, default=[1e-3, 1e-2, 1e-1], help="penalty weights to try")
    t.add_argument("--lr", nargs="+", type=float, default=[0.01])
    t.add_argument("--batch-size", nargs="+", type=int, default=[32])
    t.add_argument("--grid", action="store_true", help="the paper's grid (Appendix A.2) instead of the lists; for "
                                                       "vgg16_bn also its cosine schedule and augmentation")
    t.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="learning-rate schedule")
    t.add_argument("--augment", action="store_true", help="random padded crops and horizontal flips")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    t.add_argument("--n-iter", type=int, default=1, help="power iterations / projections per step (default 1)")
    t.add_argument("--size", type=int, default=None, help="resize images (default: digits 28, others as stored)")
    t.add_argument("--limit", type=int, default=None, help="at most this many training and test images")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--out", default="runs/experiment", help="results, checkpoints (resumes what is there)")
    t.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("bench", help="Jv and the regularizers against autograd: time, memory, accuracy as ratios "
                                     "from one run; JSON, plots and a markdown table")
    b.add_argument("--out", default="benchmarks/results", help="folder for bench.json, bench.md and the plots")
    b.add_argument("--parts", nargs="+", choices=("jvp", "sweep", "trace"), default=["jvp", "sweep", "trace"],
                   help="jvp: Jv vs torch.func/forward_ad/double-backward; sweep: Figure 5 (left), time per "
                        "batch vs batch size; trace: one-off trace cost and its amortization")
    b.add_argument("--models", nargs="+", default=None, help="lenet, mlp, vgg16_bn, resnet18, vit (default all)")
    b.add_argument("--modes", nargs="+", choices=("eval", "train"), default=None)
    b.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 20)")
    b.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes of the sweep")
    b.add_argument("--compile", action="store_true", help="also time the flipped graph under torch.compile")
    b.add_argument("--quick", action="store_true", help="LeNet and the MLP, eval, 3 repeats: a minute")
    b.add_argument("--readme", default=None, help="replace this README's generated benchmark section")
    b.add_argument("--threads", type=int, default=None)
    r = sub.add_parser("robustness", help="noise, PGD/TPGD/Square and decision-boundary distances for the models "
                                          "`jvpgraph train` selected (Figures 3 and 4)")
    r.add_argument("out", help="the folder `jvpgraph train --out` wrote")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--noise", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3, 0.4])
    r.add_argument("--attacks", nargs="+", choices=("pgd", "tpgd", "square"), default=["pgd", "tpgd", "square"])
    r.add_argument("--iterations", nargs="+", type=int, default=[1, 2, 5, 10], help="PGD and TPGD steps")
    r.add_argument("--square-queries", nargs="+", type=int, default=[10, 50, 100, 200])
    r.add_argument("--n-test", type=int, default=500, help="test images attacked (default 500)")
    r.add_argument("--n-boundary", type=int, default=50, help="test points whose boundary distance is measured")
    r.add_argument("--n-directions", type=int, default=100)
    r.add_argument("--max-radius", type=float, default=100.0, help="boundary search radius (L2, pixels in [0, 1])")
    r.add_argument("--threads", type=int, default=None)
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
    if args.command == "train":
        return train_cmd(args)
    if args.command == "robustness":
        return robustness_cmd(args)
    if args.command == "bench":
        return bench_cmd(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
