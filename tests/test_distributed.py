"""The regularized training step under PyTorch DDP (torchrun, two processes, gloo on the CPU)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import jvpgraph

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402


def _launch(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _torchrun(tmp_path, *extra):
    out = tmp_path / "params"
    _launch(str(HERE / "ddp_worker.py"), str(out), *extra)
    return [torch.load(f"{out}.rank{r}") for r in (0, 1)]


def test_ddp_spectral_step_equals_single_process_over_the_global_batch(tmp_path):
    """Two ranks, four samples each, vs one process on all eight: the same parameters after three steps
    (the penalty's per-sample mean, averaged by DDP over the ranks, is the global mean; each sample's starting
    vector depends on its dataset index only, so the ranks' power iterations are the single process's)."""
    rank0, rank1 = _torchrun(tmp_path)
    net = ddp_worker.model()
    ddp_worker.train(net, jvpgraph.Regularized(net, jvpgraph.SpectralRegularizer(net, n_iter=ddp_worker.N_ITER)),
                     slice(None))
    start = ddp_worker.model().state_dict()
    for name, want in net.state_dict().items():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)  # DDP keeps the ranks identical
        assert not torch.equal(want, start[name])  # the steps moved every parameter
        torch.testing.assert_close(rank0[name], want, rtol=1e-7, atol=1e-9, msg=name)


def test_ddp_with_train_mode_batchnorm_runs_with_per_rank_statistics(tmp_path):
    """BatchNorm in train mode under DDP: each rank normalizes with its own batch's statistics (DDP's usual
    semantics, not the global batch's), the ranks stay identical, and the running statistics are rank 0's."""
    rank0, rank1 = _torchrun(tmp_path, "--bn")
    for name in rank0:
        if name.endswith(("running_mean", "running_var")):
            continue  # DDP broadcasts rank 0's buffers at each forward: the last update is each rank's own
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    assert int(rank0["1.num_batches_tracked"]) == ddp_worker.STEPS


def test_jvpgraph_train_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m jvpgraph train` against one process's run_experiment with the same
    arguments: every method whose steps do not depend on the split (all but frobenius) ends with the same
    weights and the same per-epoch losses, to float32 rounding. 100 images in batches of 33: the last batch
    has one image, so one rank runs a zero-weight sample in that step."""
    from jvpgraph.experiments.runner import run_experiment

    regs = ["none", "l2", "spectral", "spectral-bound"]
    common = dict(dataset="digits", model="ddp_worker:digits_model", lams=[0.1], lrs=[0.05], batch_sizes=[33],
                  epochs=2, seeds=[0], size=12, limit=100)
    one = run_experiment(str(tmp_path / "one"), regs=regs, progress=False, log=None, **common)
    proc = _launch("-m", "jvpgraph", "train", "--dataset", "digits", "--model", common["model"], "--reg", *regs,
                   "--lam", "0.1", "--lr", "0.05", "--batch-size", "33", "--epochs", "2", "--seeds", "0",
                   "--size", "12", "--limit", "100", "--no-progress", "--out", str(tmp_path / "two"))
    assert "2 processes" in proc.stdout and proc.stdout.count("| spectral |") == 1  # rank 0 alone reports
    for run in one["runs"]:
        a = torch.load(tmp_path / "one" / run["checkpoint"], weights_only=False)
        b = torch.load(tmp_path / "two" / run["checkpoint"], weights_only=False)
        for name, want in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][name], want, rtol=1e-5, atol=1e-6,
                                       msg=f"{run['checkpoint']}: {name}")
        for ea, eb in zip(a["history"], b["history"]):
            for key in ("train_loss", "penalty", "val_loss", "val_acc"):
                assert eb[key] == pytest.approx(ea[key], rel=1e-5, abs=1e-7), (run["checkpoint"], key)
    start = ddp_worker.digits_model().state_dict()
    assert all(not torch.equal(a["state_dict"]["1." + k], v) for k, v in start.items())  # it trained


def test_shard_covers_each_batch_once_with_weights_of_the_global_mean():
    """The split of a global batch over ranks: every sample on exactly one rank, always the same rank, and the
    weights of all ranks sum to world (DDP divides by it) -- a rank without samples runs one at weight 0."""
    from jvpgraph.experiments.train import _shard

    g = torch.Generator().manual_seed(0)
    for world in (1, 2, 3):
        for size in (1, 2, 5, 33):
            idx = torch.randperm(100, generator=g)[:size]
            parts = [_shard(idx, r, world) for r in range(world)]
            seen = torch.cat([idx[rows][w > 0] for rows, w in parts])
            assert sorted(seen.tolist()) == sorted(idx.tolist())
            assert all(bool((idx[rows][w > 0] % world == r).all()) for r, (rows, w) in enumerate(parts))
            assert float(sum(w.sum() for _, w in parts)) == pytest.approx(world)


def test_sync_batchnorm_outside_a_process_group_is_batchnorm():
    """A model converted with SyncBatchNorm.convert_sync_batchnorm, run in one process (no group: PyTorch
    falls back to batch_norm): jvpgraph's Jv equals double-backward's and the regularizer runs. Under DDP on
    CPUs PyTorch itself refuses SyncBatchNorm ("SyncBatchNorm layers only work with GPU modules", raised by
    DistributedDataParallel's constructor), so the synchronized path cannot run on this machine."""
    from conftest import double_backward_jvp

    torch.manual_seed(0)
    net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(ddp_worker.model(bn=True))
    assert isinstance(net[1], torch.nn.SyncBatchNorm)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    _, jv = jvpgraph.jvp(net, (x,), (v,))
    torch.testing.assert_close(jv, double_backward_jvp(net, (x,), (v,))[0], rtol=1e-10, atol=1e-12)
    _, penalty = jvpgraph.SpectralRegularizer(net)(x, index=torch.arange(4))
    assert penalty.shape == (4,) and bool(torch.isfinite(penalty).all())


def test_fsdp2_regularized_steps_meanflow_and_jv_equal_one_process(tmp_path):
    """FSDP2 (fully_shard, two ranks, gloo): three regularized steps (the output from jvpgraph's forward, and
    from FSDP's own forward with the penalty's gradient beside FSDP's), three MeanFlow steps on a sharded
    TinyDiT, and each rank's Jv and spectral norms — against one process holding the whole model. The sharded
    model is left with its shards and FSDP's hooks."""
    import fsdp_worker

    out = tmp_path / "fsdp"
    _launch(str(HERE / "fsdp_worker.py"), str(out))
    ranks = [torch.load(f"{out}.rank{r}") for r in (0, 1)]
    net = ddp_worker.model()
    ddp_worker.train(net, jvpgraph.Regularized(net, jvpgraph.SpectralRegularizer(net, n_iter=ddp_worker.N_ITER)),
                     slice(None))
    dit = fsdp_worker.dit()
    fsdp_worker.meanflow_steps(dit, [0, 1])
    for key, want_model, start in [("spectral", net, ddp_worker.model()),
                                   ("spectral, FSDP forward", net, ddp_worker.model()),
                                   ("meanflow", dit, fsdp_worker.dit())]:
        start = start.state_dict()
        for name, want in want_model.state_dict().items():
            assert not torch.equal(want, start[name]), (key, name)  # the steps moved every parameter
            torch.testing.assert_close(ranks[1][key][name], ranks[0][key][name], rtol=0, atol=0)
            torch.testing.assert_close(ranks[0][key][name], want, rtol=1e-10, atol=1e-12, msg=f"{key}: {name}")
    plain = ddp_worker.model()
    for saved in ranks:
        x, v, jv = saved["jvp"]
        torch.testing.assert_close(jv, torch.func.jvp(plain, (x,), (v,))[1], rtol=1e-10, atol=1e-12)
        assert saved["sigma"].shape == (x.shape[0],) and bool((saved["sigma"] > 0).all())
        torch.testing.assert_close(saved["sigma"], jvpgraph.spectral_norm(plain, x).sigma, rtol=1e-10, atol=1e-12)
        assert saved["left as it was"]


def test_fsdp2_what_jvpgraph_does_not_support_is_refused_with_what_runs(tmp_path):
    """A mixed-precision policy casting the parameters: jvpgraph would differentiate another function than the
    one FSDP runs, so it refuses, naming the module; the default policy in the same process runs."""
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
        fully_shard(model[0], mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        fully_shard(model)
        x, v = torch.randn(4, 6), torch.randn(4, 6)
        for call in (lambda: jvpgraph.jvp(model, (x,), (v,)), lambda: jvpgraph.spectral_norm(model, x)):
            with pytest.raises(NotImplementedError, match=r"\b0 is sharded with fully_shard and a mixed-precision"):
                call()
        plain = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
        plain.load_state_dict({k: p.full_tensor() for k, p in model.state_dict().items()})
        fully_shard(plain[0])
        fully_shard(plain)
        assert jvpgraph.jvp(plain, (x,), (v,))[1].shape == (4, 3)
    finally:
        dist.destroy_process_group()
