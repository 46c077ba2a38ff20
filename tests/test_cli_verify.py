"""`jvpgraph verify` on the command line: verdicts and exit codes (0 OK, 1 FAILED, 2 INCONCLUSIVE, 3 could not
run), input shapes and dtypes for any model, and what a model that does not load says."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from jvpgraph.cli import main, parse_shape
from jvpgraph.rules import RULES, defjvp

aten = torch.ops.aten

MODELS_PY = '''
import torch, torch.nn as nn

def zero_head():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    nn.init.zeros_(net[2].weight)
    return net

def live_head():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

class Pair(nn.Module):
    """Two inputs, a tuple and a dict out."""
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
    def forward(self, a, b):
        return self.lin(a * b), {"gate": torch.sigmoid(a - b)}

def needs_args(width):
    return nn.Linear(width, 2)

def not_a_model():
    return 3
'''


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A module `cli_models` of small factories, importable for the test."""
    (tmp_path / "cli_models.py").write_text(MODELS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "cli_models"
    sys.modules.pop("cli_models", None)


def _run(capsys, *argv):
    code = main(["verify", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_zero_jacobian_exits_2_inconclusive(models, capsys):
    """The case of torchvision's ViT (zero-initialized head), on a small model: every reference agrees with a Jv
    of 0, so the verdict is INCONCLUSIVE, exit 2, never OK. A model of yours is verified as given."""
    code, out, err = _run(capsys, f"{models}:zero_head", "--input-shape", "2,4")
    assert code == 2
    assert "verdict: INCONCLUSIVE" in out and "verdict: OK" not in out
    assert "is built with all-zero weights" not in out  # only built-in names are re-initialized
    assert "INCONCLUSIVE: Jv is zero here" in err and "2.weight" in err


def test_a_live_head_exits_0_ok(models, capsys):
    code, out, _ = _run(capsys, f"{models}:live_head", "--input-shape", "2,4", "--dtype", "float64")
    assert code == 0 and "verdict: OK" in out and "(float64)" in out


def test_a_wrong_jv_exits_1_failed(models, capsys, monkeypatch):
    monkeypatch.setitem(RULES, aten.tanh, RULES[aten.tanh])  # restored after the test
    defjvp(aten.tanh, lambda t, out, x: 0.5 * (1 - out * out) * t, override=True)
    code, out, err = _run(capsys, f"{models}:live_head", "--input-shape", "2,4", "--dtype", "float64")
    assert code == 1 and "verdict: FAILED" in out
    assert "FAILED: double-backward" in err and "aten.tanh" in err


def test_lenet_runs_at_its_own_shape(capsys):
    """lenet takes 1x28x28 (the README advertises `jvpgraph verify lenet`); it used to get 3x64x64 and crash."""
    code, out, _ = _run(capsys, "lenet")
    assert code == 0 and "verdict: OK" in out


def test_input_shape_and_dtype_for_a_built_in_model(capsys):
    code, out, _ = _run(capsys, "sigmoid_mlp", "--input-shape", "3,4", "--dtype", "float64", "--mode", "eval")
    assert code == 0 and "verdict: OK" in out and "(float64)" in out


def test_several_inputs_and_pytree_outputs(models, capsys):
    code, out, _ = _run(capsys, f"{models}:Pair", "--input-shape", "2,3", "--input-shape", "2,3")
    assert code == 0, out
    assert "2 input(s), 2 output tensor(s)" in out and "verdict: OK" in out


def test_a_shape_the_model_does_not_take_exits_3_and_says_what_it_takes(capsys):
    code, out, err = _run(capsys, "lenet", "--input-shape", "2,3,64,64")
    assert code == 3 and out == ""
    assert "lenet does not run on an input of shape 2,3,64,64" in err
    assert "(float32; it takes --input-shape 2,1,28,28)" in err


@pytest.mark.parametrize("argv, says", [
    (["lenet", "--input-shape", "2x1xa"], "is not a shape"),
    (["lenet", "--input-shape", "2,1,28,28", "--size", "28"], "--input-shape gives the whole shape"),
])
def test_bad_shape_arguments_exit_3(argv, says, capsys):
    """Not 2 (argparse's usage error code): that would read as the verdict INCONCLUSIVE."""
    try:
        code = main(["verify", *argv])
    except SystemExit as e:
        code = e.code
    assert code == 3
    assert says in capsys.readouterr().err


def test_parse_shape():
    assert parse_shape("2,1,28,28") == (2, 1, 28, 28) and parse_shape("(8, 4)") == (8, 4)
    for bad in ("", "2,0", "two"):
        with pytest.raises(Exception, match="is not a shape"):
            parse_shape(bad)


def test_a_module_that_does_not_import_says_what_was_tried(capsys):
    code, _, err = _run(capsys, "no_such_package.models:make")
    assert code == 3
    assert "cannot import module 'no_such_package.models'" in err and "no module named 'no_such_package'" in err
    assert "pip install -e ." in err and "PYTHONPATH" in err
    assert "Traceback" not in err


def test_a_module_in_the_current_folder_but_not_on_sys_path(tmp_path, monkeypatch, capsys):
    """The `jvpgraph` command does not put the current folder on sys.path: the hint says PYTHONPATH=."""
    (tmp_path / "mynet_here.py").write_text("import torch.nn as nn\ndef make():\n    return nn.Linear(4, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    code, _, err = _run(capsys, "mynet_here:make", "--input-shape", "2,4")
    assert code == 3 and "./mynet_here.py is in the current folder" in err and "PYTHONPATH=. jvpgraph" in err


def test_factory_mistakes_are_named(models, tmp_path, capsys):
    code, _, err = _run(capsys, f"{models}:nothing_here")
    assert code == 3 and "has no 'nothing_here'" in err and "live_head" in err and "zero_head" in err
    code, _, err = _run(capsys, f"{models}:needs_args")
    assert code == 3 and "called with no arguments" in err and "TypeError" in err
    code, _, err = _run(capsys, f"{models}:not_a_model")
    assert code == 3 and "returned a int, not an nn.Module" in err
    code, _, err = _run(capsys, "models/net.py:make")
    assert code == 3 and "is a file path" in err and "models.net:make" in err
    (tmp_path / "broken_cli_model.py").write_text("x = 1 / 0\n")
    code, _, err = _run(capsys, "broken_cli_model:make")
    assert code == 3 and "raised ZeroDivisionError" in err
    sys.modules.pop("broken_cli_model", None)


def test_exit_codes_are_in_the_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for line in ("0  OK", "1  FAILED", "2  INCONCLUSIVE", "3  could not run", "--input-shape", "--keep-init"):
        assert line in text


def test_draw_takes_the_same_input_shape_option(tmp_path, capsys):
    out = tmp_path / "mlp.svg"
    assert main(["draw", "sigmoid_mlp", "--input-shape", "3,4", "-o", str(out)]) == 0
    assert out.exists()


@pytest.mark.slow
def test_vit_b_16_from_the_command_line(capsys):
    """The real case (~20 s a run here): vit_b_16's zero head is re-initialized, and said; --keep-init gives
    INCONCLUSIVE."""
    code, out, _ = _run(capsys, "vit_b_16")
    assert code == 0 and "is built with all-zero weights in heads.head" in out and "verdict: OK" in out
    code, out, err = _run(capsys, "vit_b_16", "--keep-init")
    assert code == 2 and "verdict: INCONCLUSIVE" in out and "heads.head.weight" in err
