"""Build jvpgraph's docs offline: `./run docs` (or `python docs/build.py`).

1. the pictures of the theorem, drawn by `jvpgraph.draw` from real traced models (docs/img/*.png);
2. the API reference from the docstrings (docs/api.md);
3. with `--demo`, a fresh `jvpgraph demo` run (docs/img/demo/, docs/demo-output.txt);
4. HTML for every page (docs/_build/, needs the `markdown` package: `pip install markdown`; skipped without it).

tests/test_docs.py checks that docs/api.md is what step 2 writes, that every picture a page shows exists, and
runs every ```python block of the README and docs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import io
import os
import pathlib
import re
import sys
import textwrap

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
IMG = DOCS / "img"

#: Modules in the API reference, in reading order, each with its public names (``__all__``).
API_MODULES = [
    "jvpgraph.api", "jvpgraph.spectral", "jvpgraph.hessian", "jvpgraph.spectra", "jvpgraph.regularizers", "jvpgraph.verify", "jvpgraph.draw",
    "jvpgraph.testing", "jvpgraph.measure", "jvpgraph.graph", "jvpgraph.flip", "jvpgraph.rules.registry",
    "jvpgraph.rules.attention", "jvpgraph.batchnorm", "jvpgraph.sharded", "jvpgraph.ops",
    "jvpgraph.experiments.data", "jvpgraph.experiments.models", "jvpgraph.experiments.train",
    "jvpgraph.experiments.runner", "jvpgraph.experiments.robustness", "jvpgraph.experiments.plots",
    "jvpgraph.experiments.meanflow",
]


# ------------------------------------------------------------------ pictures
def figures(out: pathlib.Path = IMG) -> list[pathlib.Path]:
    """Draw the docs' pictures from traced models; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torchvision

    import jvpgraph
    from jvpgraph.experiments.models import LeNet, SigmoidMLP

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    written = []

    def save(traced, name, **kw):
        path = out / name
        fig = traced.graph.draw(path, **kw)
        plt.close(fig)
        written.append(path)

    save(jvpgraph.trace(SigmoidMLP(), torch.randn(3, 4)), "figure2_sigmoid_mlp.png", depth=None)
    save(jvpgraph.trace(LeNet().train(), torch.randn(2, 1, 28, 28)), "figure1_relu_cnn.png", depth=None)
    block = torchvision.models.resnet.BasicBlock(8, 8).train()
    save(jvpgraph.trace(block, torch.randn(4, 8, 8, 8)), "resnet_block_train.png", depth=None)
    save(jvpgraph.trace(block, torch.randn(4, 8, 8, 8), bn="eval"), "resnet_block_eval_bn.png", depth=None)
    resnet = torchvision.models.resnet18(num_classes=10).train()
    save(jvpgraph.trace(resnet, torch.randn(2, 3, 32, 32)), "resnet18_modules.png", expand=["layer1.0"])

    def gated(x, m):  # m is not differentiated: the ops that only it reaches are pruned from the flip
        return torch.sigmoid(x) * torch.exp(m)

    save(jvpgraph.trace(gated, torch.randn(3), torch.randn(3), wrt=[0]), "pruned.png", depth=None)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=10).train()
    save(jvpgraph.trace(vit, torch.randn(2, 3, 32, 32)), "vit_attention.png",
         expand=["encoder.layers.encoder_layer_0.self_attention"])
    return written


# ------------------------------------------------------------------ API reference
def _fence_docstring(doc: str) -> str:
    """A docstring as Markdown: prose kept as preformatted text, ``>>>`` examples as pycon blocks."""
    doc = inspect.cleandoc(doc or "(no docstring)")
    out, block, in_example = [], [], False

    def flush(kind):
        if block:
            out.append(f"```{kind}\n" + textwrap.dedent("\n".join(block)).strip("\n") + "\n```")
            block.clear()

    for line in doc.splitlines():
        starts_example = line.strip().startswith(">>>")
        if starts_example and not in_example:
            flush("text")
            in_example = True
        elif in_example and not line.strip():
            flush("pycon")
            in_example = False
            continue
        block.append(line)
    flush("pycon" if in_example else "text")
    return "\n\n".join(out)


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def api_markdown() -> str:
    """The API reference page, generated from the docstrings of :data:`API_MODULES`."""
    parts = ["# API reference",
             "",
             "Generated from the docstrings by `./run docs` (docs/build.py); every example here is also a doctest "
             "run by `./run test`.",
             ""]
    toc = []
    body = []
    for modname in API_MODULES:
        mod = importlib.import_module(modname)
        anchor = modname.replace(".", "")
        toc.append(f"- [`{modname}`](#{anchor})")
        body.append(f"## `{modname}`\n")
        summary = inspect.cleandoc(mod.__doc__ or "").split("\n\n")[0]
        body.append(summary.replace("\n", " ") + "\n")
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            obj = getattr(obj, "_init_fn", obj)  # an op made by torch.library.custom_op: its Python function
            if inspect.isclass(obj) or inspect.isfunction(obj):
                kind = "class" if inspect.isclass(obj) else "def"
                body.append(f"### `{kind} {name}{_signature(obj)}`\n")
                body.append(_fence_docstring(obj.__doc__) + "\n")
                if inspect.isclass(obj):
                    for meth, fn in vars(obj).items():
                        if meth.startswith("_") or not (inspect.isfunction(fn) or isinstance(fn, property)):
                            continue
                        target = fn.fget if isinstance(fn, property) else fn
                        if not target.__doc__:
                            continue
                        sig = "" if isinstance(fn, property) else _signature(fn)
                        body.append(f"#### `{name}.{meth}{sig}`\n")
                        body.append(_fence_docstring(target.__doc__) + "\n")
            else:
                body.append(f"### `{name}`\n")
                text = repr(obj)
                if " at 0x" in text or len(text) > 240:  # addresses change from run to run; registries grow
                    text = f"<{type(obj).__name__}>"
                body.append(f"`{name} = {text}`\n")
    return "\n".join(parts + toc + [""] + body).rstrip() + "\n"


# ------------------------------------------------------------------ bad input
def _bad_input_cases():
    """(what the user does, a call) pairs; the page shows what each call answers."""
    import functools

    import torch
    import torch.nn as nn

    import jvpgraph
    from jvpgraph.experiments.models import SigmoidBNCNN
    from jvpgraph.rules import RuleError  # noqa: F401 - named in the page

    x = torch.randn(4, 3)
    bn_model = SigmoidBNCNN(width=2).train()

    class Counter(nn.Module):  # writes a buffer that is not a BatchNorm statistic
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, z):
            self.calls += 1
            return self.lin(z)

    counter = Counter()

    def counter_case():
        lin = jvpgraph.trace(counter, x).linearize(x)
        return f"model.calls stays {float(counter.calls):g}; lin.new_buffers = {dict(lin.new_buffers)}"

    if hasattr(torch.ops, "docs_bad_input") and hasattr(torch.ops.docs_bad_input, "noback"):
        noback = torch.ops.docs_bad_input.noback  # registered by an earlier call in this process
    else:
        @torch.library.custom_op("docs_bad_input::noback", mutates_args=(), schema="(Tensor z) -> Tensor")
        def noback(z):
            return z * 2

        noback.register_fake(lambda z: torch.empty_like(z))

    def nested_case():
        out, jv = jvpgraph.jvp(lambda d, scale=2.0: {"sum": d["a"] + d["b"][0], "pair": (d["a"] * scale,)},
                               ({"a": x, "b": [x]},), ({"a": torch.ones_like(x), "b": [torch.ones_like(x)]},))
        return f"Jv = {{'sum': tensor of {tuple(jv['sum'].shape)}, 'pair': (tensor of {tuple(jv['pair'][0].shape)},)}}"

    def complex_case():
        z, t = torch.randn(3, dtype=torch.complex64), torch.randn(3, dtype=torch.complex64)
        jv = jvpgraph.jvp(torch.abs, (z,), (t,))[1]
        same = torch.allclose(jv, torch.func.jvp(torch.abs, (z,), (t,))[1])
        return f"Jv = Re(conj(sgn z) v), {jv.dtype}; {'equal to' if same else 'NOT equal to'} torch.func.jvp's"

    def autocast_case():
        net = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2))
        _, low = jvpgraph.jvp(net.to(torch.bfloat16), (x.bfloat16(),), (x.bfloat16(),))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, mixed = jvpgraph.jvp(net.float(), (x,), (x,))
        return (f"Jv in {low.dtype} for the bfloat16 model and {mixed.dtype} under autocast (a trace per autocast "
                "state); tests/test_precision.py bounds the error by autograd's in the same dtype")

    def verify_zero_head():
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the message quotes max|f(x)|: the same on every build
            head = nn.Linear(8, 3)
            nn.init.zeros_(head.weight)  # torchvision's ViT heads are built so: the output does not move with x
            return jvpgraph.verify(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), head), torch.randn(4, 3)).verdict

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, z):
            return self.att(z, z, z, need_weights=False)[0]

    def verify_pytree():
        report = jvpgraph.verify(lambda a, b: (a * b.sin(), {"sum": a + b, "label": a.argmax(-1)}), (x, x.cos()))
        return (f"verdict: {report.verdict}; {report.n_inputs} inputs, {report.n_outputs} floating-point outputs "
                "compared one by one (the integer one carries no tangent)")

    class Scaled(nn.Module):  # reads a Python attribute in forward
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.temperature = 1.0

        def forward(self, z):
            return self.lin(z) / self.temperature

    def stale_attribute():
        m = Scaled()
        jvpgraph.jvp(m, (x,), (x,))
        m.temperature = 10.0
        jvpgraph.jvp(m, (x,), (x,))
        return "traced again; jvpgraph.explain(m) says: " + jvpgraph.explain(m).splitlines()[-1].split(": ", 1)[1]

    class BiasCache(nn.Module):  # timm's LeViT caches its attention biases in a dict, in eval mode
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.attention_bias_cache = {}

        def forward(self, z):
            if "b" not in self.attention_bias_cache:
                self.attention_bias_cache["b"] = self.lin.weight.sum(0)
            return self.lin(z) + self.attention_bias_cache["b"]

    def caching_forward():
        m = BiasCache().eval()
        jvpgraph.jvp(m, (x,), (x,))
        copy.deepcopy(m)  # raised "invalid python storage" when the trace's tensors stayed in the dict
        return (f"after the call the cache holds {len(m.attention_bias_cache)} entries, as before it (nothing of the "
                "trace stays in the model: deepcopy works; tests/test_guards.py also saves and loads it)")

    def dataclass_output():
        import dataclasses

        @dataclasses.dataclass
        class Out:
            logits: torch.Tensor

        lin = nn.Linear(3, 2)
        return jvpgraph.jvp(lambda z: Out(lin(z)), (x,), (x,))

    def cli(*argv):
        from jvpgraph.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch.random.fork_rng():
            try:
                code = main(["verify", *argv])
            except SystemExit as e:
                code = e.code
        said = err.getvalue().strip() or next(ln for ln in out.getvalue().splitlines() if "verdict" in ln).strip()
        return f"exit {code} ({({0: 'OK', 1: 'FAILED', 2: 'INCONCLUSIVE'}.get(code, 'could not run'))})", said

    return [
        ("Python control flow on a value: `if x.sum() > 0`",
         lambda: jvpgraph.jvp(lambda z: z.sin() if z.sum() > 0 else z.cos(), (x,), (x,)) and "Jv computed"),
        ("dict / list / tuple inputs and outputs, keyword defaults", nested_case),
        ("an integer input given a tangent",
         lambda: jvpgraph.jvp(lambda z, n: z * n, (x, torch.tensor(2)), (x, torch.tensor(1)))),
        ("an integer input with `None` as its tangent",
         lambda: jvpgraph.jvp(lambda z, n: z * n, (x, torch.tensor(2)), (x, None)) and "Jv computed"),
        ("a tangent of the wrong shape", lambda: jvpgraph.jvp(torch.sin, (x,), (torch.randn(3, 4),))),
        ("a tangent of the wrong dtype", lambda: jvpgraph.jvp(torch.sin, (x,), (x.double(),))),
        ("a tangent on the wrong device",
         lambda: jvpgraph.jvp(torch.sin, (x,), (torch.empty(4, 3, device="meta"),))),
        ("a non-tensor input", lambda: jvpgraph.jvp(torch.sin, ([1.0, 2.0],), ([1.0, 2.0],))),
        ("an attribute the forward reads changes between calls (`m.temperature = 10`)", stale_attribute),
        ("a forward that caches tensors in a Python dict (timm's `attention_bias_cache`)", caching_forward),
        ("a float32 input to a float64 model",
         lambda: jvpgraph.jvp(nn.Linear(3, 2).double(), (x,), (x,))),
        ("an output that is a dataclass", dataclass_output),
        ("a new batch size after tracing",
         lambda: (lambda g: g.jvp(torch.randn(7, 3), torch.randn(7, 3)) and
                  f"traced again for (7, 3): {g}")(jvpgraph.trace(nn.Linear(3, 2), x))),
        ("NaN and inf in the input", lambda: "Jv = " + str(jvpgraph.jvp(
            torch.sin, (torch.tensor([float("nan"), 0.0, float("inf")]),), (torch.ones(3),))[1])),
        ("complex input through `abs` (complex to real)", complex_case),
        ("complex input through an op PyTorch cannot differentiate for complex (`zero_`)",
         lambda: jvpgraph.jvp(lambda z: z.clone().zero_() + z, (torch.randn(3, dtype=torch.complex64),),
                              (torch.randn(3, dtype=torch.complex64),))),
        ("a bfloat16 model, or float32 under `torch.autocast`", autocast_case),
        ("an op with neither a backward nor a rule",
         lambda: jvpgraph.jvp(lambda z: noback(z), (x,), (x,))),
        ("a model that writes a buffer of its own", counter_case),
        ("an unknown `bn=` mode", lambda: jvpgraph.trace(nn.Linear(3, 3), x, bn="sync")),
        ("per-sample σ with BatchNorm coupling the batch",
         lambda: jvpgraph.SpectralRegularizer(bn_model, bn="batch")),
        ("warm-start indices that do not match the batch",
         lambda: jvpgraph.SpectralRegularizer(bn_model)(torch.randn(4, 1, 8, 8), index=[0, 1])),
        ("drawing with a module name the model does not have",
         lambda: jvpgraph.trace(nn.Linear(3, 3), x).graph.draw(expand=["encoder"])),
        ("functools.partial binding a non-tensor argument",
         lambda: jvpgraph.jvp(functools.partial(torch.pow, exponent=2), (x,), (x,)) and "Jv computed"),
        ("`jvpgraph.verify` where Jv is zero (a zero-initialized last layer, as torchvision's ViT heads)",
         verify_zero_head),
        ("`jvpgraph.verify` where no reference can run (attention with `bn=\"frozen\"`)",
         lambda: jvpgraph.verify(SelfAttention(), torch.randn(2, 5, 4), bn="frozen").verdict),
        ("`jvpgraph.verify` on two inputs, a tuple and dict output", verify_pytree),
        ("`jvpgraph verify lenet` (shell): the model's own input shape, 1x28x28", lambda: cli("lenet")),
        ("`jvpgraph verify lenet --input-shape 2,3,64,64`: a shape the model does not take",
         lambda: cli("lenet", "--input-shape", "2,3,64,64")),
        ("`jvpgraph verify mypkg.models:make` where `mypkg` does not import", lambda: cli("mypkg.models:make")),
    ]


def _outcome(fn) -> tuple[str, str]:
    """(kind, first line of the message or result) of one call, with warnings it raised."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
            kind = "works"
            text = result if isinstance(result, str) else "ok"
            if isinstance(result, tuple):  # a shell command: (its exit status, what it printed)
                kind, text = result
        except Exception as e:  # noqa: BLE001 - the page shows what the user sees
            kind, text = type(e).__name__, str(e)
    said = [str(w.message) for w in caught if "jvpgraph" in str(w.message)]
    if kind == "works" and said:
        kind, text = "works, warns", said[0]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":"):  # a list follows: show its hint
        text += " … " + next((ln for ln in lines if ln.startswith(("Register", "Make", "use"))), lines[-1])
    text = text.replace(str(ROOT), "…").replace("|", "\\|")
    return kind, (text[:230] + " …") if len(text) > 230 else text


def bad_input_markdown() -> str:
    """The bad-input page: every case of :func:`_bad_input_cases`, run now, with what the user sees."""
    import matplotlib

    matplotlib.use("Agg")
    lines = ["# Bad input: what you see", "",
             "Each row is run by `./run docs` (docs/build.py) and checked by tests/test_docs.py: the message is what "
             "the call printed on this build (first line). Nothing here changes the model: parameters, buffers, "
             "`training` flags and the caller's random number generator stay as they were.", "",
             "| you do | jvpgraph answers | message (first line) |", "|---|---|---|"]
    for what, fn in _bad_input_cases():
        kind, text = _outcome(fn)
        lines.append(f"| {what} | {kind} | {text} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ demo, HTML
def demo(out: pathlib.Path = IMG / "demo") -> None:
    from jvpgraph.experiments.demo import demo as run

    buf = io.StringIO()
    with contextlib.redirect_stderr(io.StringIO()):
        code = run(out=buf, out_dir=str(out), progress=False)
    text = buf.getvalue().replace(str(out), "jvpgraph-demo")
    (DOCS / "demo-output.txt").write_text(text)
    if code:
        raise SystemExit("the demo failed: see docs/demo-output.txt")


def pages() -> list[pathlib.Path]:
    return sorted(DOCS.rglob("*.md"))


def html(out: pathlib.Path = DOCS / "_build") -> int:
    try:
        import markdown
    except ImportError:
        print("docs: HTML skipped (pip install markdown to build it)", file=sys.stderr)
        return 0
    n = 0
    for page in pages():
        rel = page.relative_to(DOCS).with_suffix(".html")
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        depth = len(rel.parts) - 1
        prefix = "../" * (depth + 1)  # from docs/_build/<page> back to the page's own folder under docs/

        def link(m):
            target, anchor = m.group(1), m.group(2) or ""
            if re.match(r"[a-z]+:|/|#", target):
                return m.group(0)
            if target.endswith(".md"):
                return f"]({target[:-3]}.html{anchor})"
            return f"]({prefix}{'/'.join(rel.parts[:-1] + ('',))}{target}{anchor})"

        text = re.sub(r"\]\(([^)#\s]+)(#[^)]*)?\)", link, page.read_text())
        body = markdown.markdown(text, extensions=["fenced_code", "tables", "toc"])
        target.write_text(f"<!doctype html><meta charset='utf-8'><title>jvpgraph: {page.stem}</title>"
                          f"<style>body{{max-width:60em;margin:auto;font-family:sans-serif}}img{{max-width:100%}}"
                          f"pre{{background:#f6f6f6;padding:.6em;overflow:auto}}</style>{body}")
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", action="store_true", help="also re-run the demo for its pictures and output")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if not args.no_figures:
        for path in figures():
            print(f"docs: {path.relative_to(ROOT)}")
    (DOCS / "api.md").write_text(api_markdown())
    print("docs: docs/api.md")
    (DOCS / "bad-input.md").write_text(bad_input_markdown())
    print("docs: docs/bad-input.md")
    if args.demo:
        demo()
        print("docs: docs/img/demo/, docs/demo-output.txt")
    n = html()
    if n:
        print(f"docs: {n} HTML pages in docs/_build/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
