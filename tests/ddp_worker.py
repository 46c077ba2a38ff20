"""One rank of the DDP test (tests/test_distributed.py): train a few regularized steps under
DistributedDataParallel and save the parameters. Run: torchrun --standalone --nproc_per_node 2 ddp_worker.py OUT.

Also importable: ``model()``, ``batches()`` and ``train()`` give the single-process run over the same global batches.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import jvpgraph
from jvpgraph.cli import _exit_skipping_shutdown

STEPS, GLOBAL_BATCH, LAM, N_ITER = 3, 8, 0.5, 2


def model(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3)] + ([nn.BatchNorm2d(4)] if bn else []) + [nn.GELU(), nn.Flatten(),
                                                                          nn.Linear(4 * 6 * 6, 3)]
    return nn.Sequential(*layers).double()


def digits_model() -> nn.Module:
    """For ``jvpgraph train --model ddp_worker:digits_model --size 12`` (no BatchNorm: per-rank statistics would
    differ from one process's)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 10))


def batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, GLOBAL_BATCH), generator=g)
    return x, y


def train(net: nn.Module, step_fn, rows: slice) -> None:
    """``step_fn(x, index) -> (out, penalty)`` for this process's rows of each global batch."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    xs, ys = batches()
    for step in range(STEPS):
        idx = torch.arange(GLOBAL_BATCH)[rows] + step * GLOBAL_BATCH
        out, penalty = step_fn(xs[step][rows], idx)
        loss = F.cross_entropy(out, ys[step][rows]) + LAM * penalty.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(out: str, bn: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    net = model(bn)
    ddp = nn.parallel.DistributedDataParallel(
        jvpgraph.Regularized(net, jvpgraph.SpectralRegularizer(net, n_iter=N_ITER)))
    per = GLOBAL_BATCH // world
    train(net, ddp, slice(rank * per, (rank + 1) * per))
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, f"{out}.rank{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], bn="--bn" in sys.argv)
    _exit_skipping_shutdown(0)  # PyTorch 2.14's gloo threads can abort the shutdown (jvpgraph.cli.console)
