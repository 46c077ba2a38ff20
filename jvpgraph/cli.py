"""Command line: ``jvpgraph demo | verify | draw | train | robustness | bench``.

Example:
    >>> from jvpgraph.cli import build_parser
    >>> build_parser().parse_args(["demo", "--batch", "4"]).batch
    4
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["main", "console", "build_parser", "demo", "build_model", "load_factory", "input_shape", "input_shapes",
           "parse_shape", "reinit_zero_layers"]


def demo(batch: int = 8, seed: int = 0, show_code: int = 14, out=sys.stdout, **kwargs) -> int:
    """`jvpgraph demo` (see :func:`jvpgraph.experiments.demo.demo`): Jv checks, a drawing, a short training run.

    Example:
        >>> import io
        >>> demo(batch=2, out=io.StringIO(), out_dir=None)
        0
    """
    from .experiments.demo import demo as run

    return run(batch=batch, seed=seed, show_code=show_code, out=out, **kwargs)


def build_model(spec: str, size: int, num_classes: int = 10, in_channels: int | None = None):
    """A torchvision classifier by name (random weights), one of jvpgraph's (``lenet``, ``vgg16_bn``,
    ``sigmoid_bn_cnn``, ``sigmoid_mlp``), or ``package.module:factory`` for your own (see
    :func:`jvpgraph.experiments.models.build_model`); a bad name, or a factory that does not import, exits with
    the message (what was tried, what to do).

    Example:
        >>> build_model("resnet18", 32).__class__.__name__
        'ResNet'
        >>> build_model("lenet", 28).__class__.__name__
        'LeNet'
        >>> build_model("torch.nn:Identity", 32).__class__.__name__
        'Identity'
    """
    try:
        return _build_model(spec, size, num_classes, in_channels)
    except ValueError as e:
        raise SystemExit(f"jvpgraph: {e}") from None


def _build_model(spec: str, size: int, num_classes: int = 10, in_channels: int | None = None):
    """:func:`build_model`, raising ValueError with the message instead of exiting."""
    import torch.nn as nn

    from .experiments import ecosystem
    from .experiments.models import build_model as build

    if ecosystem.is_ecosystem(spec):
        return ecosystem.build(spec, size=size).model
    if ":" not in spec:
        return build(spec, in_channels=in_channels, size=size, num_classes=num_classes)
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory: say what it raised and what is expected
        raise ValueError(f"calling {spec}() with no arguments raised {type(e).__name__}: {_first_line(e)}; the "
                         "factory is called with no arguments: give one that takes none (def make(): return "
                         "Net(num_classes=10))") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}() returned a {type(model).__name__}, not an nn.Module; give a factory that "
                         "builds the model")
    return model


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def load_factory(spec: str):
    """The callable named by ``package.module:factory``, imported; a ValueError that says what was tried and
    what to do when it cannot be (the module does not import, or has no such name).

    Example:
        >>> load_factory("torch.nn:Identity").__name__
        'Identity'
        >>> try:
        ...     load_factory("no_such_package.models:make")
        ... except ValueError as e:
        ...     print(str(e).split(" (from")[0], "PYTHONPATH" in str(e))
        cannot import module 'no_such_package.models' True
    """
    import importlib
    import os

    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"{spec!r}: expected package.module:factory (a module, a colon, the function or class in "
                         "it that builds the model), e.g. mypkg.models:make_net")
    if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
        dotted = mod_name.removesuffix(".py").replace("\\", "/").strip("./").replace("/", ".")
        raise ValueError(f"{spec!r}: {mod_name!r} is a file path, not a module name; give the module name "
                         f"({dotted}:{attr}) and run from the folder that holds it with PYTHONPATH=.")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (mod_name == missing or mod_name.startswith(missing + ".")):
            top = mod_name.split(".")[0]
            here = [p for p in (top + ".py", top) if os.path.exists(p)]
            on_path = os.getcwd() in {os.path.abspath(p or ".") for p in sys.path}
            todo = (f"./{here[0]} is in the current folder, but the current folder is not on sys.path for the "
                    "jvpgraph command: run PYTHONPATH=. jvpgraph ... (or python -m jvpgraph ...)"
                    if here and not on_path else
                    "install its package (pip install -e . in its project) or add the folder that holds "
                    f"{top}/ or {top}.py to PYTHONPATH")
            raise ValueError(f"cannot import module {mod_name!r} (from {spec!r}): no module named {missing!r} on "
                             f"sys.path; {todo}") from None
        raise ValueError(f"importing {mod_name!r} (from {spec!r}) failed: it imports {missing!r}, which is not "
                         f"installed here; install {missing!r} (python -c 'import {mod_name}' shows where)") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise ValueError(f"importing {mod_name!r} (from {spec!r}) raised {type(e).__name__}: {_first_line(e)}; "
                         f"fix the module (python -c 'import {mod_name}' shows the traceback)") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            own = sorted(n for n, o in vars(module).items() if callable(o) and not n.startswith("_")
                         and getattr(o, "__module__", None) == module.__name__)
            raise ValueError(f"module {mod_name!r} ({getattr(module, '__file__', None) or 'built in'}) has no "
                             f"{attr!r}; the callables it defines: {', '.join(own[:12]) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not callable; name the function or class that "
                         "builds the model")
    return obj


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


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,1,28,28"`` (or ``2x1x28x28``) -> ``(2, 1, 28, 28)``: the ``type=`` of ``--input-shape``.

    Example:
        >>> parse_shape("2,1,28,28"), parse_shape("8x4")
        ((2, 1, 28, 28), (8, 4))
    """
    parts = [p for p in re.split(r"[,x\s]+", text.strip().strip("()[]")) if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: give positive integers separated by commas, "
                                         "batch first, e.g. --input-shape 2,1,28,28")
    return dims


def input_shapes(spec: str, shapes: list[tuple[int, ...]] | None = None, batch: int | None = None,
                 size: int | None = None, channels: int | None = None) -> list[tuple[int, ...]]:
    """Whole input shapes, batch first, for the model ``spec``: ``shapes`` (one ``--input-shape`` per input) as
    given, else one input of ``(batch, *input_shape(spec, size, channels))`` (batch 2). Giving both is a
    ValueError that says so.

    Example:
        >>> input_shapes("lenet"), input_shapes("resnet18", batch=4, size=32)
        ([(2, 1, 28, 28)], [(4, 3, 32, 32)])
        >>> input_shapes("mypkg:make", [(2, 10), (2, 5)])
        [(2, 10), (2, 5)]
    """
    from .experiments import ecosystem

    if shapes:
        given = [f"--{k}" for k, val in (("batch", batch), ("size", size), ("channels", channels)) if val is not None]
        if given:
            raise ValueError(f"--input-shape gives the whole shape, batch first; {' and '.join(given)} would "
                             "change it: drop one or the other")
        return [tuple(s) for s in shapes]
    if ecosystem.is_ecosystem(spec):
        if channels is not None:
            raise ValueError(f"--channels: {spec} takes the channels of its config; give the whole shape with "
                             "--input-shape instead")
        return ecosystem.input_shapes(spec, batch or 2, size)
    return [(batch or 2, *input_shape(spec, size, channels))]


def _add_input_options(p: argparse.ArgumentParser) -> None:
    """The input options ``draw`` and ``verify`` share (read back by :func:`input_shapes`)."""
    p.add_argument("--input-shape", type=parse_shape, action="append", metavar="B,C,H,W",
                   help="an input's whole shape, batch first (e.g. 2,1,28,28); repeat it for a model of several "
                        "inputs. Default: the model's own sample shape (lenet 1,28,28; vgg16_bn 3,32,32; "
                        "sigmoid_bn_cnn 1,16,16; sigmoid_mlp 4), else 3,SIZE,SIZE, with batch 2")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 2)")
    p.add_argument("--size", type=int, default=None, help="input height and width (default: the model's, or 64)")
    p.add_argument("--channels", type=int, default=None, help="input channels (default: the model's, or 3)")


def _build_for(spec: str, shapes: list[tuple[int, ...]]):
    """The model for input shapes ``shapes``: a torchvision ViT's image size and the channels of a built-in
    model follow the first input (a grayscale input is repeated to RGB for torchvision's classifiers)."""
    from .experiments import ecosystem

    if ecosystem.is_ecosystem(spec):
        return ecosystem.build(spec, shapes=shapes).model
    first = shapes[0]
    size = first[-1] if len(first) >= 3 else 64
    in_channels = first[1] if len(first) == 4 and ":" not in spec else None
    return _build_model(spec, size, in_channels=in_channels)


def reinit_zero_layers(model) -> list[str]:
    """Re-initialize (``reset_parameters()``) every layer whose weight is all zero; their names.

    torchvision zero-initializes its ViT heads, so a freshly built ``vit_b_16`` has ``Jv = 0`` everywhere and
    any comparison agrees trivially; ``jvpgraph verify`` calls this for built-in model names (``--keep-init``
    keeps the model as built).

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        >>> _ = nn.init.zeros_(net[1].weight)
        >>> reinit_zero_layers(net), bool(net[1].weight.any())
        (['1'], True)
    """
    names = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and hasattr(m, "reset_parameters") and not w.any():
            m.reset_parameters()
            names.append(name)
    return names


def draw_cmd(args) -> int:
    from .api import trace

    torch.manual_seed(args.seed)
    try:
        shapes = input_shapes(args.model, args.input_shape, args.batch, args.size, args.channels)
        model = _build_for(args.model, shapes)
    except ValueError as e:
        raise SystemExit(f"jvpgraph draw: {e}") from None
    model.train(args.mode == "train")
    xs = [torch.randn(s) for s in shapes]
    depth = {"auto": "auto", "ops": None}.get(args.depth, None)
    if args.depth not in ("auto", "ops"):
        try:
            depth = int(args.depth)
        except ValueError:
            raise SystemExit(f"jvpgraph draw: --depth must be auto, ops or a number, not {args.depth!r}") from None
    import matplotlib

    matplotlib.use("Agg")
    g = trace(model, *xs, bn=args.bn)
    try:
        g.graph.draw(args.output, depth=depth, expand=args.expand or (), max_nodes=args.max_nodes)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"jvpgraph draw: {args.model} [{args.mode}, bn={args.bn}] -> {args.output}")
    return 0


def train_cmd(args) -> int:
    global _LEFT_A_GLOO_GROUP
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
            _LEFT_A_GLOO_GROUP = True
    return 0


_LEFT_A_GLOO_GROUP = False  # set by train_cmd once it destroyed the group it joined (see console)


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


def bench_cmd(args, **extra) -> int:
    """``jvpgraph bench``; ``extra`` goes to :func:`jvpgraph.experiments.bench.run` (``checks``, ``notes``)."""
    from .experiments import bench

    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")  # inductor's compile chatter
    if args.threads:
        torch.set_num_threads(args.threads)
    # --quick's choices, then what was given; the rest: bench.run's defaults
    kwargs = dict(models=["lenet", "mlp"], modes=["eval"], repeats=3, batches=(1, 8, 64)) if args.quick else {}
    given = dict(models=args.models, modes=args.modes, repeats=args.repeats, batches=args.batches)
    kwargs.update({k: v for k, v in given.items() if v is not None})
    try:
        bench.run(args.out, parts=args.parts, compile=args.compile, readme=args.readme, **kwargs, **extra)
    except ValueError as e:
        raise SystemExit(f"jvpgraph bench: {e}") from None
    print((Path(args.out) / "bench.md").read_text())
    print(f"jvpgraph bench: wrote {args.out}/bench.json, bench.md and the plots")
    return 0


def _seeded_model(args) -> tuple[torch.dtype, list[tuple[int, ...]], torch.nn.Module]:
    """``(dtype, input shapes, model)`` for ``verify``/``curvature``'s arguments, after seeding torch with
    ``--seed`` (a ValueError says what is wrong with them)."""
    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    shapes = input_shapes(args.model, args.input_shape, args.batch, args.size, args.channels)
    return dtype, shapes, _build_for(args.model, shapes)


def verify_cmd(args) -> int:
    """`jvpgraph verify`: exit 0 OK, 1 FAILED, 2 INCONCLUSIVE (see :data:`jvpgraph.verify.EXIT_CODES`), 3 when it
    could not run (bad arguments, a model that does not load or does not run on the input)."""
    import copy

    from .experiments import ecosystem
    from .experiments.models import MODELS
    from .verify import verify

    def cannot(msg: str) -> int:
        print(f"jvpgraph verify: {msg}", file=sys.stderr)
        return 3

    try:
        dtype, shapes, model = _seeded_model(args)
    except ValueError as e:
        return cannot(str(e))
    model = model.to(dtype)
    model.train(args.mode == "train")
    if (":" not in args.model or ecosystem.is_ecosystem(args.model)) and not args.keep_init:
        redone = reinit_zero_layers(model)
        if redone:
            print(f"jvpgraph verify: {args.model} is built with all-zero weights in {', '.join(redone)} (Jv would be "
                  "0 everywhere, so every reference would agree trivially); re-initialized them with reset_parameters()"
                  " (--keep-init verifies the model as built)")
    xs = tuple(torch.randn(s, dtype=dtype) for s in shapes)
    try:
        with torch.no_grad(), torch.random.fork_rng():
            copy.deepcopy(model)(*xs)
    except Exception as e:  # noqa: BLE001 - the model and input the user chose do not fit: say so
        given = " and ".join(",".join(map(str, s)) for s in shapes)
        takes = f"; it takes --input-shape {','.join(map(str, (shapes[0][0], *MODELS[args.model][1])))}" \
            if args.model in MODELS else ""
        return cannot(f"{args.model} does not run on an input of shape {given} ({args.dtype}{takes}): "
                      f"{type(e).__name__}: {_first_line(e)}. Give the shape it takes with --input-shape B,C,H,W "
                      "(batch first; repeat it for several inputs)")
    name = f"{args.model} [{args.mode}]"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"jvpgraph\.verify: .*INCONCLUSIVE")  # said below, once
        try:
            report = verify(model, xs[0] if len(xs) == 1 else xs, bn=args.bn, seed=args.seed, name=name)
        except Exception as e:  # noqa: BLE001 - the model runs, jvpgraph could not give its Jv: a failure
            print(f"jvpgraph verify: {name}: FAILED: jvpgraph could not compute Jv: {type(e).__name__}: {e}",
                  file=sys.stderr)
            return 1
    print(report)
    if report.verdict == "FAILED":
        for c in report.failures:
            print(f"FAILED: {c.reference}: max rel err {c.max_rel_err:.2e} > {c.tol:.0e}", file=sys.stderr)
        if not report.state_unchanged:
            print("FAILED: the model's state changed", file=sys.stderr)
        for s in report.suspects:
            print(f"FAILED: suspect op {s}", file=sys.stderr)
    elif report.verdict == "INCONCLUSIVE":
        print(f"INCONCLUSIVE: {report.inconclusive}", file=sys.stderr)
    return report.exit_code


def meanflow_cmd(args) -> int:
    """``jvpgraph meanflow``: train :class:`~jvpgraph.experiments.meanflow.TinyDiT` on the digits, write the
    one-step samples beside the data and the loss curve (``samples.png``) and the log (``log.json``)."""
    import json
    import pathlib

    from .experiments import meanflow
    from .experiments.data import digits
    from .experiments.train import _progress

    if args.threads:
        torch.set_num_threads(args.threads)
    images = digits(size=args.size).train.tensors[0] * 2 - 1  # [0, 1] -> [-1, 1]
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = meanflow.TinyDiT(image_size=args.size, channels=images.shape[1], patch=args.patch, width=args.width,
                                 depth=args.depth, heads=args.heads)
    print(f"MeanFlow on the digits: {len(images)} images {tuple(images.shape[1:])}, {model.tokens} tokens, "
          f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters, du/dt by {args.jvp}")
    bar = _progress(args.steps, "meanflow", not args.no_progress)

    def progress(step, error):
        bar.update(1)
        if step % 50 == 0 or step == args.steps - 1:
            bar.set_postfix_str(f"mse {error:.3f}")

    log = meanflow.train(model, images, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                         jvp=args.jvp, progress=progress)
    bar.close()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = meanflow.sample(model, 64, torch.Generator().manual_seed(args.seed + 1))
    meanflow.plot_samples(samples, log["losses"], str(out / "samples.png"), data=images[:64])
    n = min(20, len(log["losses"]))
    first, last = sum(log["losses"][:n]) / n, sum(log["losses"][-n:]) / n
    (out / "log.json").write_text(json.dumps(dict(vars(args), losses=log["losses"], seconds=log["seconds"]),
                                             indent=1, default=str))
    print(f"{args.steps} steps in {log['seconds']:.1f} s ({1e3 * log['seconds'] / max(args.steps, 1):.0f} ms/step); "
          f"loss (mean squared error) {first:.3f} over the first {n} steps -> {last:.3f} over the last {n}")
    print(f"wrote {out / 'samples.png'} and {out / 'log.json'}")
    return 0


def curvature_cmd(args) -> int:
    """`jvpgraph curvature`: the top Hessian (or Gauss-Newton) eigenvalues of a model's loss in its parameters
    (Lanczos, with residuals), Hutchinson's trace estimate with its standard error, and the spectral density
    (stochastic Lanczos quadrature), printed and plotted; exit 3 when it could not run."""
    with warnings.catch_warnings():  # the caller's filters are left as they were
        warnings.filterwarnings("ignore", message="jvpgraph: no written rule")  # the theorem covers those ops
        return _curvature(args)


def _curvature(args) -> int:
    """:func:`curvature_cmd`'s work."""
    import copy
    import json
    from pathlib import Path

    from tqdm.auto import tqdm

    from .experiments import ecosystem
    from .hessian import Curvature
    from .spectra import hutchinson, lanczos, slq

    def cannot(msg: str) -> int:
        print(f"jvpgraph curvature: {msg}", file=sys.stderr)
        return 3

    try:
        dtype, shapes, model = _seeded_model(args)
    except ValueError as e:
        return cannot(str(e))
    model = model.to(dtype).train(args.mode == "train")
    if ":" not in args.model or ecosystem.is_ecosystem(args.model):
        redone = reinit_zero_layers(model)  # a zero head makes every curvature term through it vanish
        if redone:
            print(f"jvpgraph curvature: {args.model} is built with all-zero weights in {', '.join(redone)}; "
                  "re-initialized them with reset_parameters()")
    xs = tuple(torch.randn(s, dtype=dtype) for s in shapes)
    try:
        with torch.no_grad(), torch.random.fork_rng():
            out = copy.deepcopy(model)(*xs)  # a copy: a train-mode forward moves running statistics (--bn eval)
    except Exception as e:  # noqa: BLE001 - the model and input the user chose do not fit: say so
        return cannot(f"{args.model} does not run on an input of shape {' and '.join(map(str, shapes))}: "
                      f"{type(e).__name__}: {_first_line(e)}. Give the shape it takes with --input-shape B,C,H,W")
    out = getattr(out, "logits", out)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return cannot(f"{args.model} returns {type(out).__name__}, not one floating-point tensor: the loss needs "
                      "one output (give a factory that returns a model whose forward returns it)")
    loss_name = args.loss if args.loss != "auto" else ("cross_entropy" if out.dim() == 2 else "mse_loss")
    if loss_name == "cross_entropy":
        if out.dim() != 2:
            return cannot(f"--loss cross_entropy needs (batch, classes) logits; {args.model} returns shape "
                          f"{tuple(out.shape)}: use --loss mse_loss")
        targets = torch.randint(0, out.shape[1], (out.shape[0],))
    else:
        targets = torch.randn(out.shape, dtype=out.dtype)
    loss = getattr(torch.nn.functional, loss_name)

    def loss_fn(o, y):
        return loss(getattr(o, "logits", o), y)  # Hugging Face models return an output object
    curv = Curvature(model, loss_fn, bn=args.bn)
    inputs = xs[0] if len(xs) == 1 else xs
    mv = curv.matvec(inputs, targets, kind=args.kind)
    p0 = next(model.parameters())
    kinds = {"hessian": "Hessian", "ggn": "Gauss-Newton"}
    print(f"jvpgraph curvature: {args.model} [{args.mode}, bn={args.bn}], {loss_name} on random targets, input "
          f"{' and '.join(','.join(map(str, s)) for s in shapes)}, {args.dtype}: the {kinds[args.kind]} in "
          f"{curv.dim:,} parameters")

    def counted(total: int, desc: str):
        bar = tqdm(total=total, desc=desc, unit="product", disable=args.no_progress, leave=False)

        def f(v):
            bar.update(1)
            return mv(v)
        return f, bar

    f, bar = counted(args.iters, f"top-{args.k} eigenvalues")
    eig = lanczos(f, curv.dim, k=args.k, iters=args.iters, tol=args.tol, seed=args.seed, dtype=dtype,
                  device=p0.device)
    bar.close()
    f, bar = counted(args.trace_samples, "trace")
    tr = hutchinson(f, curv.dim, samples=args.trace_samples, seed=args.seed + 1, dtype=dtype, device=p0.device)
    bar.close()
    f, bar = counted(args.density_iters * args.probes, "density")
    dens = slq(f, curv.dim, iters=args.density_iters, probes=args.probes, seed=args.seed + 2, dtype=dtype,
               device=p0.device)
    bar.close()
    print(f"top {args.k} eigenvalues (Lanczos, {eig.iterations} products):")
    for lam, res, ok in zip(eig.eigenvalues.tolist(), eig.residuals.tolist(), eig.converged.tolist()):
        print(f"  {lam: .6e}   residual {res:.1e}{'' if ok else f'  (not converged to {args.tol:g}: raise --iters)'}")
    print(f"trace (Hutchinson, {tr.samples} Rademacher probes): {float(tr.estimate):.6e} ± {float(tr.stderr):.1e} "
          "(standard error)")
    lo, hi = float(dens.nodes.min()), float(dens.nodes.max())
    print(f"density (stochastic Lanczos quadrature, {args.probes} probes x {args.density_iters} steps): support "
          f"[{lo:.4e}, {hi:.4e}]; its trace {float(dens.trace.mean()):.6e} (per probe: "
          f"{', '.join(f'{float(t):.3e}' for t in dens.trace)})")
    result = dict(model=args.model, mode=args.mode, bn=args.bn, kind=args.kind, loss=loss_name, dim=curv.dim,
                  shapes=[list(s) for s in shapes], dtype=args.dtype, eigenvalues=eig.eigenvalues.tolist(),
                  residuals=eig.residuals.tolist(), converged=eig.converged.tolist(),
                  trace=float(tr.estimate), trace_stderr=float(tr.stderr), density_nodes=dens.nodes.tolist(),
                  density_weights=dens.weights.tolist())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x, rho = dens.curve(400)
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.semilogy(x.tolist(), rho.clamp_min(1e-12).tolist(), color="C0", label="density (SLQ)")
        for i, lam in enumerate(eig.eigenvalues.tolist()):
            ax.axvline(lam, color="C3", lw=0.8, ls="--", label="top eigenvalues (Lanczos)" if i == 0 else None)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"{kinds[args.kind]} spectrum: {args.model} [{args.mode}]", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
        print(f"wrote {args.plot}")
    return 0


VERIFY_EXIT_CODES = """exit status:
  0  OK            every reference that ran agrees with jvpgraph's Jv, and Jv is not zero
  1  FAILED        a reference disagrees (the report names it, and the ops whose rules differ from their
                   own backward), the model's state changed, or jvpgraph could not compute Jv
  2  INCONCLUSIVE  nothing disagrees but nothing was compared: no reference could run, or Jv and every
                   reference are zero (e.g. a zero-initialized last layer)
  3  could not run: bad arguments, a model that does not load or does not run on the input

Built-in names (torchvision's classifiers, lenet, ...) and timm:NAME, hf:MODEL_TYPE, diffusers:NAME (tiny
configs; pip install 'jvpgraph[zoo]') are built with random weights; a layer built all zero (torchvision's ViT
heads) is re-initialized first, and said so (--keep-init keeps it)."""


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
    v = sub.add_parser("verify", help="compare jvpgraph's Jv with every reference on a model; exit 0 OK, "
                                      "1 FAILED, 2 INCONCLUSIVE, 3 could not run",
                       description="Compare jvpgraph's Jv with every independent reference that applies,\n"
                                   "on a model built with random weights and a random input.",
                       epilog=VERIFY_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("model", help="a torchvision classifier name (e.g. resnet18), lenet, vgg16_bn, sigmoid_bn_cnn, "
                                 "sigmoid_mlp, timm:NAME, hf:MODEL_TYPE, diffusers:NAME (random weights, tiny "
                                 "configs), or package.module:factory (called with no arguments)")
    v.add_argument("--mode", choices=("train", "eval"), default="train")
    v.add_argument("--bn", choices=("batch", "frozen", "eval"), default="batch")
    _add_input_options(v)
    v.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the model and its inputs (default float32)")
    v.add_argument("--keep-init", action="store_true",
                   help="verify a built-in model as built, even with an all-zero layer (Jv = 0: INCONCLUSIVE)")
    v.add_argument("--seed", type=int, default=0)
    w = sub.add_parser("draw", help="draw a model's reverse-mode graph beside its flipped graph (svg, png, pdf)")
    w.add_argument("model", help="a torchvision classifier (resnet18), lenet, sigmoid_bn_cnn, sigmoid_mlp, "
                                 "timm:NAME, hf:MODEL_TYPE, diffusers:NAME or package.module:factory")
    w.add_argument("-o", "--output", default="flipped.svg", help="output file; the suffix picks the format")
    w.add_argument("--mode", choices=("train", "eval"), default="train")
    w.add_argument("--bn", choices=("batch", "frozen", "eval"), default="batch")
    w.add_argument("--depth", default="auto", help="ops (every op), N (one box per module at depth N) or auto")
    w.add_argument("--expand", action="append", metavar="MODULE", help="draw this module op by op (repeatable)")
    w.add_argument("--max-nodes", type=int, default=40, help="auto depth: at most this many boxes (default 40)")
    _add_input_options(w)
    w.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("curvature", help="top Hessian (or Gauss-Newton) eigenvalues, trace and spectral density "
                                         "of a model's loss in its parameters; plots the density",
                       description="The curvature of a model's loss in its parameters, on a random batch and random "
                                   "targets: the top eigenvalues by Lanczos (with residuals), Hutchinson's trace "
                                   "estimate (with its standard error), and the spectral density by stochastic "
                                   "Lanczos quadrature. Hessian-vector products flip the gradient's graph, so "
                                   "BatchNorm in train mode is the Hessian of the loss the model computes.")
    c.add_argument("model", help="as for verify: a torchvision classifier (resnet18), lenet, sigmoid_bn_cnn, "
                                 "timm:NAME, hf:MODEL_TYPE, diffusers:NAME or package.module:factory")
    c.add_argument("--mode", choices=("train", "eval"), default="train")
    c.add_argument("--bn", choices=("batch", "eval"), default="batch",
                   help="train-mode BatchNorm: batch statistics (the loss the model computes) or running ones")
    c.add_argument("--kind", choices=("hessian", "ggn"), default="hessian")
    c.add_argument("--loss", choices=("auto", "cross_entropy", "mse_loss"), default="auto",
                   help="auto: cross-entropy for (batch, classes) outputs, else mse_loss")
    _add_input_options(c)
    c.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    c.add_argument("-k", type=int, default=3, help="top eigenvalues (default 3)")
    c.add_argument("--iters", type=int, default=60, help="most Lanczos products for the eigenvalues (default 60)")
    c.add_argument("--tol", type=float, default=1e-3,
                   help="eigenvalue residual tolerance, relative to the largest (default 1e-3)")
    c.add_argument("--trace-samples", type=int, default=20, help="Hutchinson probes (default 20)")
    c.add_argument("--density-iters", type=int, default=30, help="Lanczos steps per density probe (default 30)")
    c.add_argument("--probes", type=int, default=2, help="density probes (default 2)")
    c.add_argument("--plot", default="curvature-density.png", help="the density plot ('' for none)")
    c.add_argument("--json", default=None, help="also write the numbers to this file")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    mf = sub.add_parser("meanflow", help="train a small DiT with the MeanFlow objective on the digits (Jv of the "
                                         "network in every step); plot its one-step samples",
                        description="MeanFlow on the embedded 8x8 digits: a small DiT-style transformer u(z, r, t) "
                                    "trained with u = v - (t - r) du/dt, du/dt one Jv of the whole network along "
                                    "(v, 0, 1) per step (jvpgraph through the fused attention kernel, or "
                                    "torch.func.jvp on the math kernel); one-step samples x = e - u(e, 0, 1).")
    mf.add_argument("--steps", type=int, default=400)
    mf.add_argument("--batch", type=int, default=64)
    mf.add_argument("--lr", type=float, default=1e-3)
    mf.add_argument("--size", type=int, default=8, help="image size (the digits are 8x8; larger: upsampled)")
    mf.add_argument("--patch", type=int, default=1, help="patch size: (size / patch)^2 tokens")
    mf.add_argument("--width", type=int, default=64)
    mf.add_argument("--depth", type=int, default=2)
    mf.add_argument("--heads", type=int, default=4)
    mf.add_argument("--jvp", choices=("jvpgraph", "torch.func"), default="jvpgraph")
    mf.add_argument("--out", default="runs/meanflow", help="folder for samples.png and log.json")
    mf.add_argument("--seed", type=int, default=0)
    mf.add_argument("--threads", type=int, default=None)
    mf.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    b.add_argument("--models", nargs="+", default=None, help="lenet, mlp, vgg16_bn, resnet18, vit (default all), "
                                                            "or timm:NAME, hf:MODEL_TYPE, diffusers:NAME")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error of verify must not read as its verdict INCONCLUSIVE (2)
        if e.code == 2 and argv[:1] == ["verify"]:
            raise SystemExit(3) from None
        raise
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
    if args.command == "curvature":
        return curvature_cmd(args)
    if args.command == "meanflow":
        return meanflow_cmd(args)
    return 2


def console(argv=None) -> None:
    """The ``jvpgraph`` console script and ``python -m jvpgraph``: :func:`main`, then the process's exit with
    its code.

    After ``jvpgraph train`` under ``torchrun`` the process flushes its output and ends with ``os._exit``,
    skipping the interpreter's shutdown: in PyTorch 2.14 a gloo worker thread can still be dropping its last
    reference to a finished collective when the interpreter shuts down, and the process then aborts
    ("terminate called without an active exception", exit -6) after the run completed and wrote its results
    (pytorch#190489; here about one two-rank run in 30 aborted so, with or without jvpgraph in the step).

    Example:
        >>> try:
        ...     console(["no-such-command"])
        ... except SystemExit as e:
        ...     print(e.code)
        2
    """
    code = main(argv)
    if _LEFT_A_GLOO_GROUP:
        _exit_skipping_shutdown(code)
    raise SystemExit(code)


def _exit_skipping_shutdown(code: int = 0) -> None:
    """End the process now with ``code`` after flushing ``sys.stdout``, ``sys.stderr`` and ``logging``:
    ``os._exit``, which runs no interpreter shutdown (no atexit handlers, no finalizers; see :func:`console`)."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced streams: nothing left to flush
            pass
    os._exit(int(code) if isinstance(code, int) else 1)


if __name__ == "__main__":
    console()
