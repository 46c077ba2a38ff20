"""jvpgraph bench: every row checks its Jv against double-backward, failing baselines are results, the
README section is generated from the JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import jvpgraph
from jvpgraph.cli import main
from jvpgraph.experiments import bench, bench_report
from jvpgraph.experiments.models import LeNet


def _project_bench():
    """benchmarks/bench.py: the project's targets and notes (not in the installed package)."""
    spec = importlib.util.spec_from_file_location(
        "project_bench", Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_baseline_that_cannot_run_is_reported_not_raised():
    """On the ViT, forward AD cannot run (attention kernels without a forward formula): the row says so with
    PyTorch's error, jvpgraph's Jv agrees with double-backward, and the target falls back to double-backward."""
    r = bench.bench_model("vit", "eval", batch=2, repeats=1, methods=["new", "func_jvp", "double_backward"])
    assert r["methods"]["func_jvp"]["runs"] is False
    assert "forward AD" in r["methods"]["func_jvp"]["error"]
    assert r["methods"]["new"]["ok"] and r["methods"]["new"]["rel_err"] < 1e-4
    targets = _project_bench().targets([r])
    assert [t["target"] for t in targets] == ["new batch vs double-backward (torch.func.jvp fails)"]


def test_every_method_agrees_with_double_backward_in_train_mode():
    r = bench.bench_model("lenet", "train", batch=4, repeats=1)
    for key, entry in r["methods"].items():
        assert entry["runs"], (key, entry.get("error"))
        if key != "forward":
            assert entry["ok"], (key, entry["rel_err"])
    assert r["ratios"]["new_vs_func_jvp"] > 0 and r["ratios"]["memory_new_vs_func_jvp"] > 0


def test_exact_penalty_is_the_exact_sigma_and_differentiable():
    torch.manual_seed(0)
    model = LeNet().double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.double)
    out, sigma = bench._exact_penalty(model, x)
    torch.testing.assert_close(sigma, jvpgraph.spectral_norm(model, x, method="exact").sigma)
    sigma.sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_markdown_and_readme_section(tmp_path):
    res = bench.run(tmp_path, parts=["trace"], models=["mlp"], repeats=1, log=lambda s: None)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["trace"][0]["model"] == "mlp" and saved["meta"]["threads"] == torch.get_num_threads()
    md = bench_report.markdown(res)
    assert "| mlp |" in md and "torch.func.jvp" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench_report.README_BEGIN}\nold\n{bench_report.README_END}\noutro\n")
    bench.run(tmp_path, parts=["trace"], models=["mlp"], repeats=1, readme=readme, log=lambda s: None)
    text = readme.read_text()
    assert "old" not in text and "| mlp |" in text and text.startswith("intro") and text.endswith("outro\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:begin"):
        bench.run(tmp_path, parts=["trace"], models=["mlp"], repeats=1, readme=readme, log=lambda s: None)


def test_cli_bench_and_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--parts", "trace", "--models", "mlp", "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert "Trace cost" in capsys.readouterr().out
    assert (tmp_path / "trace_amortization.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="unknown model"):
        main(["bench", "--parts", "trace", "--models", "resnet50", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown method"):
        bench.bench_model("mlp", methods=["jax"])


def test_project_targets_and_notes_travel_with_the_results(tmp_path):
    """benchmarks/bench.py checks the project's targets on the Jv rows it measured and puts its notes under the
    table; the installed command has neither, and its report says nothing it did not measure."""
    project = _project_bench()
    args = ["--parts", "jvp", "--models", "mlp", "--modes", "eval", "--repeats", "1"]
    assert project.main([*args, "--out", str(tmp_path / "project")]) == 0
    saved = json.loads((tmp_path / "project" / "bench.json").read_text())
    assert saved["targets"] == project.targets(saved["jvp"]) and saved["targets"]  # from this run's rows
    md = (tmp_path / "project" / "bench.md").read_text()
    assert f"Targets met: {sum(t['met'] for t in saved['targets'])}/{len(saved['targets'])}" in md
    assert project.NOTES["jvp"][0] in md
    assert main(["bench", *args, "--out", str(tmp_path / "plain")]) == 0
    plain = (tmp_path / "plain" / "bench.md").read_text()
    assert "Targets met" not in plain and project.NOTES["jvp"][0] not in plain and "| mlp | eval |" in plain


def test_readme_section_is_the_saved_results():
    """The README's benchmark section is what the committed benchmarks/results/bench.json renders to: no
    figure in it was typed by hand, and none went stale without the section."""
    root = Path(__file__).resolve().parent.parent
    results = json.loads((root / "benchmarks" / "results" / "bench.json").read_text())
    readme = (root / "README.md").read_text()
    section = readme.split(bench_report.README_BEGIN + "\n", 1)[1].split(bench_report.README_END, 1)[0]
    assert section == bench_report.markdown(results)
