"""Experiments: the embedded dataset, the training loop with every regularizer, robustness, the demo."""

from __future__ import annotations

import io
import math
import json

import pytest
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import jvpgraph
from jvpgraph.experiments.data import Normalize, digits, split_indices
from jvpgraph.experiments.models import SigmoidBNCNN
from jvpgraph.experiments.robustness import noisy_accuracy
from jvpgraph.experiments.train import REGULARIZERS, TrainConfig, evaluate, fit, sigma_per_sample


@pytest.fixture(scope="module")
def data():
    return digits(size=12)


def test_digits_splits_are_disjoint_stratified_and_normalizable(data):
    x, y = data.train.tensors
    assert x.shape[1:] == (1, 12, 12) and float(x.min()) >= 0 and float(x.max()) <= 1
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sum(sizes) == 1797 and abs(sizes[0] / 1797 - 0.6) < 0.01
    # no image appears in two splits (the 8x8 digits contain a few exact duplicates: compare indices)
    parts = split_indices(torch.tensor(load_digits().target))
    assert len(set(torch.cat(parts).tolist())) == 1797
    for k in range(10):  # every class in the same proportion in each split (±1 sample)
        n_k = [int((d.tensors[1] == k).sum()) for d in (data.train, data.val, data.test)]
        assert abs(n_k[1] - n_k[2]) <= 1 and n_k[0] > n_k[1]
    z = data.normalize()(x)
    torch.testing.assert_close(z.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(), torch.tensor(1.0), atol=1e-3, rtol=0)


def test_split_indices_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fractions"):
        split_indices(torch.arange(10), (0.5, 0.6))


def test_train_config_validates():
    with pytest.raises(ValueError, match="reg='spectral_norm'"):
        TrainConfig("spectral_norm")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


@pytest.mark.parametrize("reg", REGULARIZERS)
def test_every_regularizer_trains_a_batchnorm_model(data, reg):
    """One epoch with each method on a train-mode BatchNorm model: finite losses, running statistics updated
    once per step (as plain training does), the caller's RNG untouched, the run reproducible by seed."""
    def run():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = nn.Sequential(data.normalize(), SigmoidBNCNN(width=2))
        small = torch.utils.data.TensorDataset(*(t[:96] for t in data.train.tensors))
        rng = torch.get_rng_state()
        hist = fit(model, small, data.val, TrainConfig(reg, lam=0.01, epochs=1, batch_size=32, lr=0.05),
                   progress=False)
        assert torch.equal(rng, torch.get_rng_state())
        return model, hist

    model, hist = run()
    e = hist.epochs[0]
    assert all(torch.isfinite(torch.tensor(float(e[k]))) for k in ("train_loss", "val_loss", "penalty"))
    assert (e["penalty"] > 0) == (reg != "none")
    assert int(model[1][1].num_batches_tracked) == 3
    again, _ = run()
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_spectral_penalty_lowers_sigma_and_l2_lowers_weights(data):
    """The point of the penalty: after the same training, λ > 0 gives a smaller Jacobian spectral norm on the
    test set; l2 gives smaller weights."""
    results = {}
    for reg, lam in [("none", 0.0), ("spectral", 1.0), ("l2", 0.01)]:
        torch.manual_seed(0)
        model = nn.Sequential(data.normalize(), SigmoidBNCNN(width=4))
        fit(model, data.train, data.val, TrainConfig(reg, lam=lam, epochs=3, lr=0.05), progress=False)
        results[reg] = (float(sigma_per_sample(model, data.test.tensors[0][:64]).mean()),
                        sum(float(p.detach().pow(2).sum()) for p in model.parameters()))
    assert results["spectral"][0] < 0.7 * results["none"][0], results
    assert results["l2"][1] < results["none"][1]


def test_sigma_per_sample_is_the_exact_spectral_norm_in_eval_mode():
    torch.manual_seed(0)
    model = SigmoidBNCNN(width=2).double().train()
    model(torch.randn(16, 1, 8, 8, dtype=torch.double))  # running statistics away from their init
    x = torch.randn(5, 1, 8, 8, dtype=torch.double)
    exact = jvpgraph.spectral_norm(model.eval(), x, method="exact").sigma
    model.train()
    torch.testing.assert_close(sigma_per_sample(model, x), exact, rtol=1e-4, atol=0)
    assert model.training


def test_noisy_accuracy_is_seeded_and_clean_at_zero(data):
    torch.manual_seed(0)
    model = nn.Sequential(data.normalize(), SigmoidBNCNN(width=2)).train()
    clean = evaluate(model, data.test)["acc"]
    assert noisy_accuracy(model, data.test, 0.0) == clean
    assert noisy_accuracy(model, data.test, 0.3, seed=1) == noisy_accuracy(model, data.test, 0.3, seed=1)
    assert model.training
    with pytest.raises(ValueError, match="sigma"):
        noisy_accuracy(model, data.test, -1.0)


def test_normalize_is_linear_in_jv():
    n = Normalize(torch.tensor([0.5]), torch.tensor([0.25]))
    x = torch.rand(2, 1, 3, 3)
    v = torch.randn_like(x)
    torch.testing.assert_close(jvpgraph.jvp(n, (x,), (v,))[1], v / 0.25)


def test_demo_writes_drawing_plots_and_results(tmp_path):
    buf = io.StringIO()
    from jvpgraph.cli import demo

    assert demo(batch=4, out=buf, out_dir=str(tmp_path), epochs=2, lams=(0.1,), progress=False) == 0
    text = buf.getvalue()
    assert "all checks passed" in text and "spectral (λ=0.1)" in text
    for name in ("flipped_graph.png", "training.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    res = json.loads((tmp_path / "results.json").read_text())
    methods = [r["method"] for r in res["results"]]
    assert methods == ["none", "spectral (λ=0.1)"]
    for r in res["results"]:
        assert 0 < r["test_acc"] <= 1 and r["sigma_mean"] > 0 and len(r["history"]) == 2
        assert f"{r['sigma_mean']:.2f}" in text  # the table prints what the file holds


# ------------------------------------------------------------------ the protocol: jvpgraph train / robustness
def test_train_cli_runs_selects_resumes_and_reports(tmp_path, capsys):
    """Two methods x two weights x two seeds on a slice of the digits: a checkpoint per run, the table picks
    per method the setting with the lowest mean validation loss, a second call resumes without training."""
    from jvpgraph.cli import main
    from jvpgraph.experiments.runner import select

    out = tmp_path / "exp"
    args = ["train", "--model", "sigmoid_bn_cnn", "--size", "12", "--reg", "none", "spectral", "--lam", "0.01",
            "1.0", "--epochs", "1", "--seeds", "0", "1", "--limit", "300", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 6 and len(list((out / "runs").glob("*.pt"))) == 6
    assert res["selected"] == json.loads(json.dumps(select(res["runs"])))
    sel = res["selected"]["spectral"]
    others = [r for r in res["runs"] if r["setting"]["reg"] == "spectral" and r["setting"]["lam"] != sel["setting"]["lam"]]
    mean_val = lambda rs: sum(r["history"][-1]["val_loss"] for r in rs) / len(rs)  # noqa: E731
    assert sel["val_loss_mean"] <= mean_val(others)
    table = (out / "results.md").read_text()
    assert f"{100 * sel['test_acc_mean']:.2f} ± {100 * sel['test_acc_std']:.2f}" in table
    capsys.readouterr()
    assert main(args) == 0  # resumes: every run is "done earlier"
    assert capsys.readouterr().out.count("done earlier") == 6


def test_robustness_cli_on_a_trained_experiment(tmp_path):
    from jvpgraph.cli import main

    out = tmp_path / "exp"
    assert main(["train", "--model", "sigmoid_bn_cnn", "--size", "12", "--reg", "none", "--epochs", "2",
                 "--seeds", "0", "--limit", "300", "--out", str(out), "--no-progress"]) == 0
    assert main(["robustness", str(out), "--n-test", "60", "--n-boundary", "5", "--n-directions", "20",
                 "--iterations", "1", "3", "--square-queries", "5", "--noise", "0.1", "0.5"]) == 0
    rep = json.loads((out / "robustness.json").read_text())
    row = rep["methods"]["none"]["seeds"][0]
    assert len(row["pgd"]) == 2 and len(row["square"]) == 1 and len(row["noise_drop"]) == 2
    assert all(0 <= a <= 1 for a in row["pgd"] + row["tpgd"] + row["square"])
    assert len(row["boundary"]) == 5 and all(d > 0 for d in row["boundary"])
    for name in ("robustness.png", "boundary.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_train_reads_a_local_dataset_folder(tmp_path):
    """The same command on KMNIST given a folder in torchvision's layout (small files in the real format)."""
    from dataset_files import write_mnist_like
    from jvpgraph.cli import main

    write_mnist_like(str(tmp_path / "data"), "KMNIST", n_train=80, n_test=20)
    out = tmp_path / "exp"
    assert main(["train", "--dataset", "kmnist", "--data-dir", str(tmp_path / "data"), "--reg", "none",
                 "spectral", "--lam", "0.1", "--epochs", "1", "--seeds", "0", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "kmnist" and res["input_shape"] == [1, 28, 28] and set(res["selected"]) == {
        "none", "spectral"}
    with pytest.raises(SystemExit, match="KMNIST/raw"):
        main(["train", "--dataset", "kmnist", "--data-dir", str(tmp_path / "nothing"), "--out", str(out)])


def test_cosine_schedule_and_augmentation():
    """The VGG/CIFAR protocol's options: the learning rate follows half a cosine over the epochs; augmented
    batches train (the crops and flips are seeded: two runs agree)."""
    x, y = torch.rand(64, 3, 16, 16), torch.randint(0, 10, (64,))
    data = torch.utils.data.TensorDataset(x, y)

    def run():
        torch.manual_seed(0)
        net = SigmoidBNCNN(in_channels=3, width=2)
        cfg = TrainConfig("spectral", lam=0.01, epochs=4, lr=0.1, schedule="cosine", augment=True)
        return net, fit(net, data, data, cfg, progress=False)

    net, hist = run()
    lrs = [e["lr"] for e in hist.epochs]
    want = [0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(want)
    net2, _ = run()
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


def test_fit_warm_starts_the_spectral_penalty():
    """fit passes dataset indices and the regularizer keeps each sample's vector: over epochs the penalty is the
    spectral norm, not the cold one-step ‖Jv‖ of a random v (which estimates ‖J‖_F/√n)."""
    from jvpgraph.experiments.train import make_regularizer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x, y = torch.randn(40, 6, dtype=torch.double), torch.randint(0, 4, (40,))
    reg = make_regularizer(net, "spectral")
    assert reg.warm_start
    idx = torch.arange(40)
    with torch.no_grad():
        for _ in range(30):  # 30 epochs of one visit per sample, weights held
            _, sigma = reg(x, index=idx)
    exact = jvpgraph.spectral_norm(net, x, method="exact").sigma
    torch.testing.assert_close(sigma, exact, rtol=1e-2, atol=0)  # 38 of 40 to 1e-6; close singular values lag
    with torch.no_grad():
        _, cold = make_regularizer(net, "spectral")(x)
    assert float((cold / exact).mean()) < 0.8  # a half iteration from random vectors falls well short
