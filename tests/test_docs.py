"""The docs are made by the code and their examples run.

- every ```python block of README.md and docs/**/*.md runs (a page's blocks in order, one namespace, in a
  scratch folder);
- docs/api.md is exactly what docs/build.py generates from the docstrings today;
- every picture and relative link a page shows exists.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import matplotlib
import pytest

from jvpgraph.hessian import _hvp_works

matplotlib.use("Agg")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _build():
    spec = importlib.util.spec_from_file_location("jvpgraph_docs_build", ROOT / "docs" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _name(page):
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p in PAGES if BLOCK.search(p.read_text())], ids=_name)
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that save pictures write here
    namespace: dict = {"__name__": "__docs__"}
    old_torch = not _hvp_works()  # second order refuses torch 2.11
    for i, block in enumerate(BLOCK.findall(page.read_text())):
        if old_torch and re.search(r"jvpgraph\.(Curvature|hvp)\b", block):
            continue
        code = compile(block, f"{_name(page)} [python block {i + 1}]", "exec")
        exec(code, namespace)  # noqa: S102 - the point of the test


def test_api_reference_is_generated_from_the_docstrings():
    assert (ROOT / "docs" / "api.md").read_text() == _build().api_markdown(), \
        "docs/api.md is stale: run ./run docs"


def _torch_neutral(md: str) -> str:
    """The page is generated on CI's torch (constraints.txt); PyTorch's own words that differ between the tested
    releases are made the same: torch 2.15 raises NotImplementedError (a RuntimeError subclass) where 2.11/2.14
    raise RuntimeError for an op without complex autograd (zero_), and prefixes the matmul shape error with
    ``addmm:``. A cell cut to the page's width then ends a few characters earlier or later: cut cells are
    compared on their first 200 characters."""
    md = re.sub(r"NotImplementedError: (\w+ does not support automatic differentiation)", r"RuntimeError: \1", md)
    md = re.sub(r"RuntimeError: addmm: (mat1 and mat2)", r"RuntimeError: \1", md)
    return re.sub(r"\| ([^|]{200,}) … \|", lambda m: f"| {m.group(1)[:200]} … |", md)  # build.py cuts at 230


def test_bad_input_page_is_what_the_calls_answer():
    """docs/bad-input.md lists what each bad call answers; it must be what they answer today."""
    assert _torch_neutral((ROOT / "docs" / "bad-input.md").read_text()) == \
        _torch_neutral(_build().bad_input_markdown()), \
        "docs/bad-input.md is stale: run ./run docs"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_pictures_and_links_exist(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links, not code
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        if not (page.parent / target).exists():
            missing.append(target)
    assert not missing, f"{_name(page)} points to files that do not exist: {missing}"
    for img in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (page.parent / img).read_bytes().startswith(b"\x89PNG"), img
