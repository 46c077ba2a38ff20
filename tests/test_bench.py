"""jvpgraph bench: every row checks its Jv against double-backward, failing baselines are results, the
README section is generated from the JSON."""

from __future__ import annotations

import json

import pytest
import torch

import jvpgraph
from jvpgraph.cli import main
from jvpgraph.experiments import bench
from jvpgraph.experiments.models import LeNet


def test_baseline_that_cannot_run_is_reported_not_raised():
    """On the ViT, forward AD cannot run (attention kernels without a forward formula): the row says so with
    PyTorch's error, jvpgraph's Jv agrees with double-backward, and the target falls back to double-backward."""
    r = bench.bench_model("vit", "eval", batch=2, repeats=1, methods=["new", "func_jvp", "double_backward"])
    assert r["methods"]["func_jvp"]["runs"] is False
    assert "forward AD" in r["methods"]["func_jvp"]["error"]
    assert r["methods"]["new"]["ok"] and r["methods"]["new"]["rel_err"] < 1e-4
    assert [t["target"] for t in bench.targets([r])] == ["new batch vs double-backward (torch.func.jvp fails)"]


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
    md = bench.markdown(res)
    assert "| mlp |" in md and "torch.func.jvp" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.README_BEGIN}\nold\n{bench.README_END}\noutro\n")
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
