"""Benchmarks against autograd: speed, memory and accuracy of Jv and of the regularizers, as ratios from one run.

Three questions, each answered by one function that returns plain rows (saved as JSON by ``jvpgraph bench``):

* :func:`jvp_table` — Jv on a new batch and from a recorded forward, jvpgraph against ``torch.func.jvp``,
  ``torch.func.linearize`` (build + apply, apply only), ``torch.autograd.forward_ad`` dual tensors and the
  double-backward trick, on the paper's LeNet, VGG16-BN at CIFAR size, ResNet-18, a small ViT and a GELU/sigmoid
  MLP, in eval and in train mode. A baseline that cannot run gets its error in the row, not a crash.
* :func:`batch_sweep` — the paper's Figure 5 (left): time per training step against batch size for the Spectral
  regularizer, Spectral-Bound, Frobenius, the exact σ through each sample's full Jacobian, and plain passes.
* :func:`trace_cost` — the one-off cost of tracing and emitting the flipped graph, and after how many steps it
  is paid back.

Times are medians of rotating blocks (:func:`jvpgraph.measure.median_times`) after warm-up; memory is the peak
of tensor storage created inside one call (:class:`jvpgraph.measure.PeakTensorMemory`). This machine is shared
and noisy: compare ratios from one run, never absolute times across runs. :func:`run` measures and saves;
:mod:`jvpgraph.experiments.bench_report` writes the table and the plots from what was saved.

Example:
    >>> rows = jvp_table(["mlp"], modes=["eval"], batch=4, repeats=2, methods=["func_jvp", "new", "recorded"])
    >>> r = rows[0]
    >>> r["model"], r["mode"], r["methods"]["new"]["ok"], r["methods"]["func_jvp"]["runs"]
    ('mlp', 'eval', True, True)
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import time
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import api, testing
from ..measure import median_times, peak_memory
from ..regularizers import FrobeniusRegularizer, SpectralBoundRegularizer, SpectralRegularizer
from ..spectral import jacobian_per_sample
from . import ecosystem
from .models import LeNet, VGG16BN

__all__ = ["BENCH_MODELS", "bench_entry", "JVP_METHODS", "bench_model", "jvp_table", "batch_sweep", "trace_cost",
           "machine", "run", "PARTS"]

MB = 1 << 20
#: float32 agreement with the double-backward reference (see benchmarks/results/zoo.md for why 1e-4)
TOL = 1e-4


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.GELU(), nn.Linear(512, 512), nn.Sigmoid(),
                         nn.Linear(512, 10))


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def _vit() -> nn.Module:
    import torchvision

    m = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                             hidden_dim=128, mlp_dim=512, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.02)  # torchvision zero-initializes the head: Jv would be 0
    return m


#: name -> (factory, shape of one input sample, default batch, what it is)
BENCH_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, str]] = {
    "lenet": (LeNet, (1, 28, 28), 64, "the paper's LeNet, 28x28"),
    "mlp": (_mlp, (1, 28, 28), 64, "MLP 784-512-512-10, GELU and sigmoid"),
    "vgg16_bn": (VGG16BN, (3, 32, 32), 16, "the paper's VGG16-BN at CIFAR size"),
    "resnet18": (_resnet18, (3, 64, 64), 16, "torchvision ResNet-18, 64x64"),
    "vit": (_vit, (3, 32, 32), 16, "ViT: 4 layers, 4 heads, width 128, patches 4x4 of 32x32"),
}



def bench_entry(name: str) -> tuple[Callable[[], nn.Module], tuple[int, ...], int, str]:
    """``(factory, shape of one input sample, default batch, what it is)`` for a model ``jvpgraph bench`` runs:
    one of :data:`BENCH_MODELS`, or ``timm:NAME``, ``hf:MODEL_TYPE``, ``diffusers:NAME`` (random weights from a
    tiny config, :func:`jvpgraph.experiments.ecosystem.build`; a diffusers denoiser as a module of its latent,
    the timestep fixed). A ValueError names the choices.

    Example:
        >>> factory, shape, batch, what = bench_entry("lenet")
        >>> shape, batch, type(factory()).__name__
        ((1, 28, 28), 64, 'LeNet')
    """
    if name in BENCH_MODELS:
        return BENCH_MODELS[name]
    if not ecosystem.is_ecosystem(name):
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(BENCH_MODELS)}, or timm:NAME, "
                         "hf:MODEL_TYPE, diffusers:NAME")
    built = ecosystem.build(name, batch=2, inputs="latent")
    if len(built.shapes) != 1:
        raise ValueError(f"{name}: takes {len(built.shapes)} inputs; jvpgraph bench times models of one input")
    # a copy each time (the same weights): built.model itself is never handed out
    return (lambda: copy.deepcopy(built.model)), tuple(built.shapes[0][1:]), 8, built.what


#: methods of :func:`jvp_table`: key -> description
JVP_METHODS = {
    "forward": "plain forward pass (the unit)",
    "new": "jvpgraph Jv on a new batch (flipped graph: primal and tangent in one pass)",
    "recorded": "jvpgraph Jv from a recorded forward (tangent pass only)",
    "linearize": "jvpgraph linearize: record the forward, then the tangent pass (build + apply)",
    "compiled": "jvpgraph Jv on a new batch, trace(..., compile=True) (torch.compile, inductor)",
    "compiled_recorded": "jvpgraph Jv from a recorded forward, tangent pass under torch.compile",
    "func_jvp": "torch.func.jvp",
    "func_linearize": "torch.func.linearize, build + apply",
    "func_linearize_apply": "torch.func.linearize, apply only",
    "forward_ad": "torch.autograd.forward_ad dual tensors",
    "double_backward": "double-backward trick (torch.autograd.functional.jvp)",
}
_DEFAULT_METHODS = [k for k in JVP_METHODS if not k.startswith("compiled")]


def machine() -> dict:
    """Where a run happened: the figures only compare within one run on one machine.

    Example:
        >>> sorted(machine())[:3]
        ['cpus', 'date', 'device']
    """
    import torchvision

    return dict(machine=platform.machine(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                torchvision=torchvision.__version__, python=platform.python_version(),
                device="cpu", date=time.strftime("%Y-%m-%d %H:%M"))


def _error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:240]


@contextlib.contextmanager
def _math_attention():
    """The CPU flash-attention kernel's backward is not differentiable twice: double-backward needs MATH."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _fixed_rng(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` under the same seed each call (dropout draws the same masks), the caller's RNG untouched."""
    def run():
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return fn()
    return run


def _jvp_callables(model: nn.Module, x: torch.Tensor, v: torch.Tensor, methods: Iterable[str]):
    """Each method as ``(prepare, call)``: ``prepare()`` builds what is reused (traces, linearizations,
    outside the timing) and returns the callable timed, which returns Jv (or the output, for ``forward``)."""
    def fresh():  # every baseline on its own copy: train-mode ones write running statistics
        return copy.deepcopy(model)

    def functional(m):
        p, b = dict(m.named_parameters()), dict(m.named_buffers())
        return lambda z: torch.func.functional_call(m, (p, b), (z,))

    def forward():
        m = fresh()
        return lambda: torch.no_grad()(m)(x)

    def new():
        g = api.trace(model, x)
        return lambda: torch.no_grad()(g.jvp)(x, v)[1]

    def recorded():
        g = api.trace(model, x)
        with torch.no_grad():
            lin = g.linearize(x, vjp=False)
        return lambda: torch.no_grad()(lin.jvp)(v)

    def linearize():
        g = api.trace(model, x)
        return lambda: torch.no_grad()(g.linearize)(x, vjp=False).jvp(v)

    def compiled():
        g = api.trace(model, x, compile=True)
        return lambda: torch.no_grad()(g.jvp)(x, v)[1]

    def compiled_recorded():
        g = api.trace(model, x, compile=True)
        with torch.no_grad():
            lin = g.linearize(x, vjp=False)
        return lambda: torch.no_grad()(lin.jvp)(v)

    def func_jvp():
        f = functional(fresh())
        return lambda: torch.no_grad()(torch.func.jvp)(f, (x,), (v,))[1]

    def func_linearize():
        f = functional(fresh())

        def run():
            with torch.no_grad():
                _, jvp_fn = torch.func.linearize(f, x)
                return jvp_fn(v)
        return run

    def func_linearize_apply():
        f = functional(fresh())
        with torch.no_grad():
            _, jvp_fn = torch.func.linearize(f, x)
        return lambda: torch.no_grad()(jvp_fn)(v)

    def forward_ad():
        import torch.autograd.forward_ad as fwAD

        m = fresh()

        def run():
            with torch.no_grad(), fwAD.dual_level():
                out = m(fwAD.make_dual(x, v))
                return fwAD.unpack_dual(out).tangent
        return run

    def double_backward():
        m = fresh()

        def run():
            with _math_attention():
                return torch.autograd.functional.jvp(m, x, v)[1]
        return run

    table = dict(forward=forward, new=new, recorded=recorded, linearize=linearize, compiled=compiled,
                 compiled_recorded=compiled_recorded,
                 func_jvp=func_jvp, func_linearize=func_linearize, func_linearize_apply=func_linearize_apply,
                 forward_ad=forward_ad, double_backward=double_backward)
    unknown = [k for k in methods if k not in table]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: choose from {', '.join(JVP_METHODS)}")
    return {k: table[k] for k in methods}


def bench_model(name: str, mode: str = "eval", batch: int | None = None, repeats: int = 20,
                methods: Iterable[str] | None = None, seed: int = 0) -> dict:
    """One row of :func:`jvp_table`: every method's median time, peak memory and error on one model.

    Each method is timed on its own copy of the model (train-mode baselines write running statistics);
    its Jv is checked against the double-backward reference computed in the same run (relative max error,
    float32 tolerance 1e-4). A method that raises is reported with its error.

    Example:
        >>> r = bench_model("lenet", "eval", batch=2, repeats=2, methods=["new", "func_jvp"])
        >>> r["methods"]["new"]["rel_err"] < 1e-4, r["ratios"]["new_vs_func_jvp"] > 0
        (True, True)
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode={mode!r}: expected 'eval' or 'train'")
    factory, shape, default_batch, what = bench_entry(name)
    batch = batch or default_batch
    methods = list(methods or _DEFAULT_METHODS)
    torch.manual_seed(seed)
    model = factory().train(mode == "train")
    x = torch.randn(batch, *shape)
    v = torch.randn_like(x)
    with _math_attention():
        reference = _fixed_rng(lambda: torch.autograd.functional.jvp(copy.deepcopy(model), x, v)[1])()
    row = dict(model=name, what=what, mode=mode, batch=batch, input=list(shape),
               params_m=sum(p.numel() for p in model.parameters()) / 1e6, methods={})
    timed = {}
    for key, prepare in _jvp_callables(model, x, v, methods).items():
        entry = dict(description=JVP_METHODS[key])
        try:
            call = _fixed_rng(prepare())
            t0 = time.perf_counter()
            result = call()  # the first call: compiles where there is something to compile
            entry["first_call_s"] = time.perf_counter() - t0
            if key != "forward":
                entry["rel_err"] = testing.max_rel_err(result, reference)
                entry["ok"] = entry["rel_err"] <= TOL
            entry["runs"] = True
            timed[key] = call
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is a result
            entry.update(runs=False, error=_error(e))
        row["methods"][key] = entry
    times = median_times(timed, repeats, rounds=min(5, max(1, repeats)), warmup=1)
    for key, t in times.items():
        row["methods"][key]["time_s"] = t
        row["methods"][key]["peak_mb"] = peak_memory(timed[key]) / MB
    row["ratios"] = _ratios(row["methods"])
    return row


def _ratios(m: dict) -> dict:
    def ratio(a, b, what="time_s"):
        if a in m and b in m and what in m[a] and what in m[b] and m[b][what] > 0:
            return m[a][what] / m[b][what]
        return None

    out = {}
    for ours in ("new", "recorded", "compiled", "compiled_recorded", "linearize"):
        for base in ("func_jvp", "double_backward", "forward_ad", "func_linearize", "func_linearize_apply",
                     "forward"):
            r = ratio(ours, base)
            if r is not None:
                out[f"{ours}_vs_{base}"] = r
    for base in ("func_jvp", "double_backward"):
        r = ratio("new", base, "peak_mb")
        if r is not None:
            out[f"memory_new_vs_{base}"] = r
    r = ratio("func_jvp", "forward")
    if r is not None:
        out["func_jvp_in_forwards"] = r
    return out


def jvp_table(models: Iterable[str] | None = None, modes: Iterable[str] = ("eval", "train"),
              batch: int | None = None, repeats: int = 20, methods: Iterable[str] | None = None,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """:func:`bench_model` for each model and mode (``train`` only where it differs: BatchNorm, dropout,
    attention's train path).

    Example:
        >>> [r["model"] for r in jvp_table(["mlp"], modes=["eval", "train"], batch=2, repeats=1,
        ...                                methods=["new"])]
        ['mlp']
    """
    rows = []
    for name in models or BENCH_MODELS:
        for mode in modes:
            if mode == "train" and not _train_differs(name):
                continue
            if progress:
                progress(f"{name} {mode}")
            rows.append(bench_model(name, mode, batch, repeats, methods))
    return rows


def _train_differs(name: str) -> bool:
    m = bench_entry(name)[0]()
    return any(isinstance(k, (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.MultiheadAttention))
               for k in m.modules())


# ------------------------------------------------------------------ Figure 5 (left)
def _exact_penalty(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact per-sample σ as a differentiable penalty: each sample's whole Jacobian (one transposed
    pass per output, kept differentiable), its largest singular value (the paper's analytical method)."""
    g = api.cached_trace(model, x, bn="frozen")
    lin = g.linearize(x, vjp=True)
    J = jacobian_per_sample(lin, x, lin.out, create_graph=True)
    return lin.out, torch.linalg.matrix_norm(J, ord=2)


def _step_fns(model: nn.Module, x: torch.Tensor, y: torch.Tensor, methods: Iterable[str], lam: float = 0.01):
    """One training step per method (forward, penalty, backward, SGD update), each on its own model copy."""
    fns = {}
    for key in methods:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        if key == "forward":
            fns[key] = (lambda m: lambda: m(x))(m)
            continue
        if key == "plain":
            loss_fn = (lambda m: lambda: F.cross_entropy(m(x), y))(m)
        elif key == "exact":
            def loss_fn(m=m):
                out, sigma = _exact_penalty(m, x)
                return F.cross_entropy(out, y) + lam * sigma.mean()
        else:
            reg = {"spectral": lambda: SpectralRegularizer(m, n_iter=1),
                   "spectral_bound": lambda: SpectralBoundRegularizer(m, n_iter=1),
                   "frobenius": lambda: FrobeniusRegularizer(m, n_proj=1)}[key]()

            def loss_fn(reg=reg):
                out, penalty = reg(x)
                return F.cross_entropy(out, y) + lam * penalty.mean()

        def step(opt=opt, loss_fn=loss_fn):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            opt.step()
        fns[key] = step
    return fns


SWEEP_METHODS = ("forward", "plain", "spectral", "spectral_bound", "frobenius", "exact")


def batch_sweep(batches: Iterable[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256), num_classes: int = 10,
                repeats: int = 10, methods: Iterable[str] = SWEEP_METHODS, exact_max_s: float = 5.0,
                progress: Callable[[str], None] | None = None) -> dict:
    """Figure 5 (left): seconds per training step of LeNet against batch size, for each regularizer.

    ``exact`` (each sample's full Jacobian, its 2-norm, differentiated) is skipped at the larger batches once
    one step of it takes more than ``exact_max_s`` seconds (it grows with outputs x batch).

    Example:
        >>> r = batch_sweep([2], repeats=1, methods=["plain", "spectral"])
        >>> sorted(r["times_s"]), r["batches"]
        (['plain', 'spectral'], [2])
    """
    methods = list(methods)
    times: dict[str, list] = {k: [] for k in methods}
    slow = set()
    for b in batches:
        if progress:
            progress(f"batch {b}")
        torch.manual_seed(0)
        model = LeNet(num_classes=num_classes)
        x, y = torch.randn(b, 1, 28, 28), torch.randint(0, num_classes, (b,))
        keys = [k for k in methods if k not in slow]
        fns = _step_fns(model, x, y, keys)
        for k in keys:  # trace, warm up; the first exact step decides whether it is timed at this size
            t0 = time.perf_counter()
            fns[k]()
            if k == "exact" and time.perf_counter() - t0 > exact_max_s:
                slow.add(k)
        med = median_times({k: fns[k] for k in keys}, repeats, rounds=min(3, repeats), warmup=1)
        for k in methods:
            times[k].append(med.get(k))
    ratios = {f"{k}_vs_frobenius": [None if a is None or f is None else a / f
                                    for a, f in zip(times[k], times.get("frobenius", []))]
              for k in ("spectral", "exact") if k in times and "frobenius" in times}
    if "exact" in times and "spectral" in times:
        ratios["exact_vs_spectral"] = [None if e is None else e / s for e, s in zip(times["exact"], times["spectral"])]
    return dict(model="lenet", num_classes=num_classes, batches=list(batches), times_s=times, ratios=ratios)


# ------------------------------------------------------------------ trace cost
def trace_cost(models: Iterable[str] | None = None, repeats: int = 10,
               progress: Callable[[str], None] | None = None) -> list[dict]:
    """One-off cost of ``jvpgraph.trace`` + emitting the flipped graph (+ the recorded-forward split), in
    units of one new-batch Jv, and the number of Jv calls after which it is paid back against the fastest
    autograd route that runs and needs no trace (``torch.func.jvp``, else double-backward), in train mode.

    Example:
        >>> r = trace_cost(["mlp"], repeats=1)[0]
        >>> r["trace_s"] > 0 and r["baseline"] == "func_jvp"
        True
        >>> r["calls_to_amortize"] is None or r["calls_to_amortize"] > 0  # None: no saving per call in this run
        True
    """
    rows = []
    for name in models or BENCH_MODELS:
        if progress:
            progress(name)
        factory, shape, batch, _ = bench_entry(name)
        torch.manual_seed(0)
        model = factory().train()
        x, v = torch.randn(batch, *shape), torch.randn(batch, *shape)
        t0 = time.perf_counter()
        g = api.Traced(model, (x,))
        t_trace = time.perf_counter() - t0  # aten tracing + flipping + emitting fx code
        t0 = time.perf_counter()
        with torch.no_grad():
            g.linearize(x, vjp=False)
        t_split = time.perf_counter() - t0  # first linearize: partition into forward + tangent pass
        calls = {k: _fixed_rng(prepare()) for k, prepare in
                 _jvp_callables(model, x, v, ["new", "func_jvp", "double_backward"]).items()}
        baseline = "func_jvp"
        try:
            calls["func_jvp"]()
        except Exception:  # noqa: BLE001 - train-mode BatchNorm, attention: forward AD cannot run
            baseline = "double_backward"
        med = median_times({"new": calls["new"], baseline: calls[baseline]}, repeats, rounds=min(3, repeats),
                           warmup=1)
        saving = med[baseline] - med["new"]
        rows.append(dict(model=name, batch=batch, trace_s=t_trace, partition_s=t_split, new_s=med["new"],
                         baseline=baseline, baseline_s=med[baseline],
                         trace_in_new_calls=(t_trace + t_split) / med["new"],
                         calls_to_amortize=(t_trace + t_split) / saving if saving > 0 else None))
    return rows


# ------------------------------------------------------------------ the whole suite
PARTS = ("jvp", "sweep", "trace")


def run(out, parts: Iterable[str] = PARTS, models: Iterable[str] | None = None,
        modes: Iterable[str] = ("eval", "train"), repeats: int = 20, batches=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        compile: bool = False, readme=None, checks: Callable[[list[dict]], list[dict]] | None = None,
        notes: dict[str, list[str]] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the suite, write ``out/bench.json``, then the report (:func:`jvpgraph.experiments.bench_report.
    write_report`: ``bench.md``, the plots, ``readme``'s generated section); return the results.

    ``checks(rows)``: targets to check on the :func:`jvp_table` rows (``[dict(model, mode, target, value, limit,
    met)]``), saved as ``results["targets"]``; ``notes``: prose per part to print under its table, saved as
    ``results["notes"]``. jvpgraph has neither: ``benchmarks/bench.py`` passes the project's.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> res = run(d, parts=["trace"], models=["mlp"], repeats=1, log=lambda s: None)
        >>> sorted(p.name for p in d.iterdir())
        ['bench.json', 'bench.md', 'trace_amortization.png']
    """
    import json
    from pathlib import Path

    from .bench_report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = list(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}: choose from {', '.join(PARTS)}")
    models = list(models or BENCH_MODELS)
    unknown = [m for m in models if m not in BENCH_MODELS and not ecosystem.is_ecosystem(m)]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}: choose from {', '.join(BENCH_MODELS)}, or timm:NAME, "
                         "hf:MODEL_TYPE, diffusers:NAME")
    path = out / "bench.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["meta"] = machine()
    if notes is not None:
        results["notes"] = notes

    def save():
        path.write_text(json.dumps(results, indent=1))

    if "jvp" in parts:
        methods = _DEFAULT_METHODS + (["compiled", "compiled_recorded"] if compile else [])
        t0 = time.perf_counter()
        results["jvp"] = jvp_table(models, modes, repeats=repeats, methods=methods,
                                   progress=lambda s: log(f"jvp: {s} ({time.perf_counter() - t0:.0f} s)"))
        results["targets"] = checks(results["jvp"]) if checks is not None else []
        save()
    if "sweep" in parts:
        results["sweep"] = batch_sweep(batches, 10, max(3, repeats // 2), progress=lambda s: log(f"sweep: {s}"))
        wide = [b for b in batches if b <= 64]
        results["sweep_outputs"] = [batch_sweep(wide, 1000, max(3, repeats // 4), exact_max_s=20.0,
                                                progress=lambda s: log(f"sweep, 1000 outputs: {s}"))]
        save()
    if "trace" in parts:
        results["trace"] = trace_cost(models, repeats, progress=lambda s: log(f"trace: {s}"))
    save()
    write_report(out, results, readme)
    return results
