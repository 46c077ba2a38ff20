"""The package as a user gets it: a wheel built from this tree, installed (not editable) into a clean virtual
environment beside the torch that runs this suite (never downloaded again), imported from there.

This catches what the editable install used by the rest of the suite hides: a module or data file missing from
the wheel, a console script that does not start, a version that is written twice. It also checks that
pyproject.toml's ranges, constraints.txt's pins and the tested-versions warning agree.
"""

from __future__ import annotations

import os
import re
import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import networkx
import pytest
import torch
import torchvision

import jvpgraph

ROOT = Path(__file__).resolve().parents[1]
SMOKE = r"""
import json, sys, importlib.metadata as md
import torch, jvpgraph

net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 2)).double()
x, v = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
out, jv = jvpgraph.jvp(net, (x,), (v,))
torch.testing.assert_close(jv, torch.func.jvp(net, (x,), (v,))[1])
files = md.files("jvpgraph")
print(json.dumps(dict(file=jvpgraph.__file__, version=jvpgraph.__version__, dist_version=md.version("jvpgraph"),
                      typed=any(str(f).endswith("jvpgraph/py.typed") for f in files), torch=torch.__file__)))
"""


def _source_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "jvpgraph").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` of a copy of the tree (the build writes build/ and *.egg-info beside its source)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes((ROOT / rel).read_bytes())
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
          "-w", str(tmp / "dist"), str(src)])
    (whl,) = (tmp / "dist").glob("jvpgraph-*.whl")
    return whl


def test_wheel_holds_every_file_of_the_package(wheel):
    assert wheel.name == f"jvpgraph-{jvpgraph.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_source_files() - names)
    assert not missing, f"files of jvpgraph/ missing from the wheel: {missing}"
    assert "jvpgraph/py.typed" in names
    meta = zipfile.ZipFile(wheel).read(f"jvpgraph-{jvpgraph.__version__}.dist-info/METADATA").decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = sorted(r for r in requires if "extra ==" not in r)
    assert [re.split(r"[<>=!~ ]", r)[0] for r in core] == ["networkx", "torch", "torchvision"], core


def test_wheel_installs_and_runs_beside_this_torch(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # the wheel alone, from the file (no index, no dependencies): torch is not downloaded
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
          "--disable-pip-version-check", str(wheel)])
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # then this suite's torch, torchvision, networkx: their folders, read after the venv's own site-packages
    # (a plain path list: the .pth files there, among them this tree's editable install, are not run)
    theirs = {str(Path(m.__file__).resolve().parents[1]) for m in (torch, torchvision, networkx)}
    (site / "_jvpgraph_test_deps.pth").write_text("\n".join(sorted(theirs)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    cli = env_dir / "bin" / "jvpgraph"

    r = _run([str(py), "-c", SMOKE], cwd=tmp_path, env=env)  # cwd: not the source tree
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(site.resolve()), got["file"]
    assert got["version"] == got["dist_version"] == jvpgraph.__version__
    assert got["typed"], "py.typed is not installed"
    assert Path(got["torch"]).resolve() == Path(torch.__file__).resolve()

    help_ = _run([str(cli), "--help"], cwd=tmp_path, env=env).stdout
    assert "verify" in help_ and "demo" in help_
    version = _run([str(cli), "--version"], cwd=tmp_path, env=env).stdout.strip()
    assert version == f"jvpgraph {jvpgraph.__version__} (torch {torch.__version__})"


def test_version_has_one_source():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', text, re.M) and 'attr = "jvpgraph.__version__"' in text
    project = text.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.M), "pyproject.toml's [project] writes the version itself"
    assert f"## {jvpgraph.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def _release(v: str) -> tuple[int, int]:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:2])


def test_lock_pins_a_tested_torch_inside_the_ranges():
    pins = _pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert _release(pins["torch"]) in jvpgraph.TESTED_TORCH
    deps = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S).group(1)
    low, high = re.search(r'"torch>=([\d.]+),<([\d.]+)"', deps).groups()
    assert (_release(low), _release(high)) == jvpgraph.SUPPORTED_TORCH
    assert all(_release(low) <= t < _release(high) for t in jvpgraph.TESTED_TORCH)
    assert "jvpgraph" not in pins  # the lock pins the dependencies, not the package itself


@pytest.mark.parametrize("version,expect", [
    ("2.14.1+cu130", None), ("2.15.0", None), ("2.11.0", None),
    ("2.13.0+cpu", "torch 2.13.0+cpu is inside the range jvpgraph admits (>=2.11,<2.16) but untested"),
    ("2.12.1", "inside the range"), ("2.16.0.dev20270101", "outside the range"), ("2.10.0", "outside the range"),
])
def test_import_warns_outside_the_tested_set(version, expect):
    msg = jvpgraph._untested_torch(version)
    if expect is None:
        assert msg is None
    else:
        assert expect in msg and msg.startswith("jvpgraph is tested on torch 2.11, 2.14 and 2.15;"), msg
