"""The paper's protocol (Appendix A.2): a grid of settings per method, several seeds each, model selection by
lowest mean validation loss, a table of mean ± std test accuracy per method (Table 1).

Every run is checkpointed (``OUT/runs/<run>.pt``: weights, configuration, history, test metrics); an
interrupted experiment resumes where it stopped. ``OUT/results.json`` holds every run and the selection,
``OUT/results.md`` the table.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from .data import load
from .models import build_model
from .train import REGULARIZERS, TrainConfig, _NoBar, _progress, _rank_world, evaluate, fit

__all__ = ["GRIDS", "Setting", "settings", "run_experiment", "select", "results_table", "load_run",
           "robustness_report", "robustness_table"]

#: The hyper-parameter grids of the paper's Appendix A.2.
GRIDS = {
    "lenet": {"lr": [0.01, 0.001], "batch_size": [16, 32], "lam": [1e-4, 1e-3, 1e-2, 1e-1]},
    "vgg16_bn": {"lr": [0.1], "batch_size": [128], "lam": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], "schedule": "cosine",
                 "augment": True},
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the grid (``lam`` is 0 for ``none``)."""

    reg: str
    lam: float
    lr: float
    batch_size: int

    @property
    def name(self) -> str:
        lam = "" if self.reg == "none" else f"_lam{self.lam:g}"
        return f"{self.reg}{lam}_lr{self.lr:g}_bs{self.batch_size}"


def settings(regs: Sequence[str], lams: Sequence[float], lrs: Sequence[float], batch_sizes: Sequence[int]
             ) -> list[Setting]:
    """Every combination; ``none`` has no weight to search over.

    Example:
        >>> [s.name for s in settings(["none", "spectral"], [0.01, 0.1], [0.01], [32])]
        ['none_lr0.01_bs32', 'spectral_lam0.01_lr0.01_bs32', 'spectral_lam0.1_lr0.01_bs32']
    """
    for r in regs:
        if r not in REGULARIZERS:
            raise ValueError(f"--reg {r!r}: expected some of {', '.join(REGULARIZERS)}")
    out = []
    for reg in regs:
        for lam, lr, bs in itertools.product([0.0] if reg == "none" else lams, lrs, batch_sizes):
            out.append(Setting(reg, float(lam), float(lr), int(bs)))
    return out


def load_run(path: str, model: str, in_channels: int, num_classes: int, size: int) -> tuple[nn.Module, dict]:
    """A checkpointed run: the trained model (eval mode) and its record."""
    record = torch.load(path, map_location="cpu", weights_only=False)
    net = _model(model, in_channels, num_classes, size, record["mean"], record["std"])
    net.load_state_dict(record["state_dict"])
    return net.eval(), record


def _model(model: str, in_channels: int, num_classes: int, size: int, mean, std) -> nn.Module:
    from .data import Normalize

    return nn.Sequential(Normalize(mean, std), build_model(model, in_channels, num_classes, size))


def run_experiment(out_dir: str, *, dataset: str = "digits", model: str = "lenet", regs: Sequence[str] = REGULARIZERS,
                   lams: Sequence[float] = (1e-3, 1e-2, 1e-1), lrs: Sequence[float] = (0.01,),
                   batch_sizes: Sequence[int] = (32,), epochs: int = 10, seeds: Sequence[int] = (0, 1, 2),
                   data_dir: str | None = None, size: int | None = None, n_iter: int = 1, limit: int | None = None,
                   schedule: str = "constant", augment: bool = False, progress: bool = True,
                   log="stdout") -> dict[str, Any]:
    """Train every setting with every seed (skipping runs already checkpointed), select per method, write the
    results; returns what ``results.json`` holds.

    In every process of an initialized ``torch.distributed`` group (``torchrun ... jvpgraph train``), each run
    trains data-parallel (:func:`~jvpgraph.experiments.train.fit`); rank 0 alone reads and writes ``out_dir``
    and logs, and every rank returns rank 0's result.

    Example:
        >>> import tempfile
        >>> res = run_experiment(tempfile.mkdtemp(), regs=["none", "spectral"], lams=[0.01], epochs=1, seeds=[0],
        ...                      size=16, model="sigmoid_bn_cnn", limit=200, progress=False, log=None)
        >>> sorted(res["selected"]), len(res["runs"])
        (['none', 'spectral'], 2)
    """
    rank, world = _rank_world()

    def say(msg):  # log: a file, None (quiet) or "stdout" (the one current at the call); rank 0 only
        if log is not None and rank == 0:
            print(msg, file=sys.stdout if log == "stdout" else log, flush=True)

    def on_rank0(value):  # rank 0's value on every rank (what it read from out_dir)
        if world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    data = load(dataset, data_dir, size=size, seed=0, limit=limit)
    x0 = data.train.tensors[0]
    in_channels, img = x0.shape[1], x0.shape[-1]
    grid = settings(regs, lams, lrs, batch_sizes)
    if rank == 0:
        os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    total = len(grid) * len(seeds)
    procs = f", {world} processes" if world > 1 else ""
    say(f"jvpgraph train: {dataset} ({len(data.train)} train / {len(data.val)} val / {len(data.test)} test, "
        f"{tuple(x0.shape[1:])}), {model}, {len(grid)} settings x {len(seeds)} seeds = {total} runs of "
        f"{epochs} epochs{procs} -> {out_dir}")
    bar = _progress(total, None, progress and rank == 0, unit="run")
    quiet_bar = isinstance(bar, _NoBar) or getattr(bar, "disable", False)
    runs = []
    t_start = time.perf_counter()
    for k, (setting, seed) in enumerate(itertools.product(grid, seeds)):
        path = os.path.join(out_dir, "runs", f"{setting.name}_seed{seed}.pt")
        if on_rank0(os.path.exists(path)):
            record = torch.load(path, map_location="cpu", weights_only=False) if rank == 0 else {}
            status = "done earlier"
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = _model(model, in_channels, data.num_classes, img, data.mean, data.std)
            cfg = TrainConfig(setting.reg, lam=setting.lam, epochs=epochs, batch_size=setting.batch_size,
                              lr=setting.lr, seed=seed, n_iter=n_iter, schedule=schedule, augment=augment)
            t0 = time.perf_counter()
            try:
                hist = fit(net, data.train, data.val, cfg, progress=False)
                test = evaluate(net, data.test)
                diverged = False
            except FloatingPointError as e:  # a setting of the grid can diverge: recorded, never selected
                hist, test, diverged = None, {"loss": float("inf"), "acc": float("nan")}, str(e)
            record = {"setting": dataclasses.asdict(setting), "seed": seed, "dataset": dataset, "model": model,
                      "epochs": epochs, "history": hist.epochs if hist else [], "test": test,
                      "diverged": diverged, "seconds": time.perf_counter() - t0,
                      "state_dict": net.state_dict(), "mean": data.mean, "std": data.std,
                      "step_time": hist.step_time if hist else None}
            if rank == 0:
                torch.save(record, path)
            status = "diverged" if diverged else f"test acc {test['acc']:.1%}"
        runs.append({k2: v for k2, v in record.items() if k2 not in ("state_dict", "mean", "std")} |
                    {"checkpoint": os.path.relpath(path, out_dir)})
        bar.update()
        bar.set_postfix_str(f"{setting.name} seed {seed}: {status}")
        if quiet_bar:  # no bar on screen (a log, CI): a line per run instead
            say(f"  [{k + 1}/{total}] {setting.name} seed {seed}: {status}")
    bar.close()
    if rank != 0:
        return on_rank0(None)
    selected = select(runs)
    result = {"dataset": dataset, "model": model, "input_shape": list(x0.shape[1:]), "epochs": epochs,
              "seeds": list(seeds), "n_iter": n_iter, "schedule": schedule, "augment": augment,
              "grid": {"reg": list(regs), "lam": list(lams), "lr": list(lrs), "batch_size": list(batch_sizes)},
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
              "seconds": time.perf_counter() - t_start, "runs": runs, "selected": selected}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    table = results_table(result)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    say(table)
    return on_rank0(result)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(xs) > 1 else 0.0


def select(runs: list[dict]) -> dict[str, dict]:
    """Per method, the setting with the lowest validation loss (last epoch) averaged over its seeds; diverged
    settings are never selected. Returns, per method, the setting, its runs and mean ± std of test accuracy.

    Example:
        >>> r = lambda reg, lam, seed, vl, acc: {"setting": {"reg": reg, "lam": lam, "lr": 0.01, "batch_size": 32},
        ...     "seed": seed, "history": [{"val_loss": vl}], "test": {"acc": acc}, "diverged": False}
        >>> sel = select([r("spectral", 0.1, 0, 0.5, 0.9), r("spectral", 0.1, 1, 0.7, 0.8),
        ...               r("spectral", 0.01, 0, 0.4, 0.7), r("spectral", 0.01, 1, 0.9, 0.6)])
        >>> sel["spectral"]["setting"]["lam"], round(sel["spectral"]["test_acc_mean"], 2)
        (0.1, 0.85)
    """
    by_setting: dict[tuple, list[dict]] = {}
    for run in runs:
        s = run["setting"]
        by_setting.setdefault((s["reg"], s["lam"], s["lr"], s["batch_size"]), []).append(run)
    best: dict[str, dict] = {}
    for key, rs in by_setting.items():
        if any(r["diverged"] for r in rs):
            continue
        val = _mean_std([r["history"][-1]["val_loss"] for r in rs])[0]
        if key[0] not in best or val < best[key[0]]["val_loss_mean"]:
            acc_mean, acc_std = _mean_std([r["test"]["acc"] for r in rs])
            best[key[0]] = {"setting": rs[0]["setting"], "val_loss_mean": val, "test_acc_mean": acc_mean,
                            "test_acc_std": acc_std, "seeds": [r["seed"] for r in rs],
                            "checkpoints": [r.get("checkpoint") for r in rs]}
    order = {r: i for i, r in enumerate(REGULARIZERS)}
    return dict(sorted(best.items(), key=lambda kv: order.get(kv[0], 99)))


def results_table(result: dict) -> str:
    """The Markdown table of the selected settings (the paper's Table 1 layout).

    Example:
        >>> print(results_table({"dataset": "digits", "model": "lenet", "epochs": 1, "seeds": [0, 1],
        ...     "selected": {"none": {"setting": {"reg": "none", "lam": 0.0, "lr": 0.01, "batch_size": 32},
        ...     "val_loss_mean": 0.3, "test_acc_mean": 0.9, "test_acc_std": 0.01}}}).splitlines()[4])
        | none | 90.00 ± 1.00 | — | 0.01 | 32 | 0.300 |
    """
    lines = [f"Test accuracy (%), mean ± std over seeds {result['seeds']}, {result['model']} on "
             f"{result['dataset']}, {result['epochs']} epochs; per method the setting with the lowest mean "
             f"validation loss.", "",
             "| method | test accuracy | λ | learning rate | batch size | val loss |", "|---|---|---|---|---|---|"]
    for reg, sel in result["selected"].items():
        s = sel["setting"]
        lam = "—" if reg == "none" else f"{s['lam']:g}"
        lines.append(f"| {reg} | {100 * sel['test_acc_mean']:.2f} ± {100 * sel['test_acc_std']:.2f} | {lam} | "
                     f"{s['lr']:g} | {s['batch_size']} | {sel['val_loss_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def robustness_report(out_dir: str, *, noise: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.4),
                      attacks: Sequence[str] = ("pgd", "tpgd", "square"), iterations: Sequence[int] = (1, 2, 5, 10),
                      square_queries: Sequence[int] = (10, 50, 100, 200), n_test: int = 500,
                      n_boundary: int = 50, n_directions: int = 100, max_radius: float = 100.0,
                      eps: float = 32 / 255, alpha: float = 2 / 255,
                      data_dir: str | None = None, log="stdout") -> dict[str, Any]:
    """Figures 3 and 4 for the models :func:`run_experiment` selected in ``out_dir``: accuracy drop under white
    noise, accuracy under PGD, TPGD (``iterations`` steps) and Square (``square_queries``), each per seed, and
    distances to the decision boundary of correctly classified test points. Writes ``robustness.json``,
    ``robustness.png`` and ``boundary.png``; returns the JSON's content.
    """
    from .plots import plot_boundary, plot_robustness
    from .robustness import attack_accuracy, boundary_distance, noisy_accuracy

    def say(msg):  # log: a file, None (quiet) or "stdout" (the one current at the call)
        if log is not None:
            print(msg, file=sys.stdout if log == "stdout" else log, flush=True)

    with open(os.path.join(out_dir, "results.json")) as f:
        result = json.load(f)
    data = load(result["dataset"], data_dir, size=result["input_shape"][-1], seed=0)
    xt, yt = (t[:n_test] for t in data.test.tensors)
    test = TensorDataset(xt, yt)
    in_channels, num_classes, img = xt.shape[1], data.num_classes, xt.shape[-1]
    report: dict[str, Any] = {"dataset": result["dataset"], "model": result["model"], "n_test": len(xt),
                              "eps": eps, "alpha": alpha, "n_directions": n_directions, "max_radius": max_radius,
                              "noise": list(noise), "iterations": list(iterations),
                              "square_queries": list(square_queries), "methods": {}}
    for reg, sel in result["selected"].items():
        per_seed = []
        for ckpt in sel["checkpoints"]:
            net, record = load_run(os.path.join(out_dir, ckpt), result["model"], in_channels, num_classes, img)
            clean = noisy_accuracy(net, test, 0.0)
            row = {"seed": record["seed"], "clean": clean,
                   "noise_drop": [clean - noisy_accuracy(net, test, s, seed=record["seed"]) for s in noise]}
            for atk in attacks:
                its = square_queries if atk == "square" else iterations
                row[atk] = [attack_accuracy(net, test, atk, k, eps=eps, alpha=alpha, seed=record["seed"])
                            for k in its]
            with torch.no_grad():
                ok = (net(xt).argmax(1) == yt).nonzero().flatten()[:n_boundary]
            row["boundary"] = boundary_distance(net, xt[ok], n_directions=n_directions, max_radius=max_radius,
                                                seed=record["seed"]).tolist()
            per_seed.append(row)
            say(f"  {reg} seed {record['seed']}: clean {clean:.1%}, "
                + ", ".join(f"{a} {row[a][-1]:.1%}" for a in attacks)
                + f", median boundary distance {float(torch.tensor(row['boundary']).median()):.2f}")
        report["methods"][reg] = {"setting": sel["setting"], "seeds": per_seed}
    with open(os.path.join(out_dir, "robustness.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "robustness.md"), "w") as f:
        f.write(robustness_table(report))
    plot_robustness(report, os.path.join(out_dir, "robustness.png"))
    plot_boundary(report, os.path.join(out_dir, "boundary.png"))
    say(f"robustness: {os.path.join(out_dir, 'robustness.png')}, {os.path.join(out_dir, 'boundary.png')}")
    return report



def robustness_table(report: dict) -> str:
    """Markdown summary of :func:`robustness_report`: per method, mean ± std over seeds of the accuracy under
    the largest noise and the most iterations of each attack, and the median distance to the boundary.

    Example:
        >>> rep = {"dataset": "d", "model": "m", "n_test": 10, "eps": 32 / 255, "noise": [0.1], "iterations": [1, 5],
        ...        "square_queries": [9], "methods": {"none": {"seeds": [{"clean": 0.9, "noise_drop": [0.1],
        ...        "pgd": [0.5, 0.4], "boundary": [1.0, 2.0, 3.0]}]}}}
        >>> print(robustness_table(rep).splitlines()[-1])
        | none | 90.0 ± 0.0 | 10.0 ± 0.0 | 40.0 ± 0.0 | 2.00 |
    """
    attacks = [a for a in ("pgd", "tpgd", "square") if any(a in s for m in report["methods"].values()
                                                          for s in m["seeds"])]
    cols = [f"drop at noise {report['noise'][-1]:g}"] + [
        f"{a.upper()} {report['square_queries'][-1] if a == 'square' else report['iterations'][-1]}"
        + (" queries" if a == "square" else " steps") for a in attacks]
    lines = [f"Robustness of the selected models, {report['model']} on {report['dataset']}, {report['n_test']} test "
             f"images, attacks with ε = {report['eps'] * 255:.0f}/255: accuracy (%) mean ± std over seeds; "
             f"boundary: median L2 distance (pixels in [0, 1]) over correctly classified points, all seeds.", "",
             "| method | clean | " + " | ".join(cols) + " | boundary |", "|---" * (len(cols) + 3) + "|"]
    for reg, m in report["methods"].items():
        def ms(key, i=-1):
            return _mean_std([100 * (s[key][i] if isinstance(s[key], list) else s[key]) for s in m["seeds"]])
        cells = [ms("clean"), ms("noise_drop")] + [ms(a) for a in attacks]
        d = torch.tensor([x for s in m["seeds"] for x in s["boundary"]], dtype=torch.float64)
        lines.append(f"| {reg} | " + " | ".join(f"{a:.1f} ± {b:.1f}" for a, b in cells)
                     + f" | {float(d.median()):.2f} |")
    return "\n".join(lines) + "\n"
