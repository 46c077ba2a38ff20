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


def _torchrun(tmp_path, *extra):
    out = tmp_path / "params"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "ddp_worker.py"), str(out), *extra], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
    assert pytest  # keeps the import for markers below if needed
