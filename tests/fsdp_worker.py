"""One rank of the FSDP2 test (tests/test_distributed.py): the same regularized steps as ddp_worker.py on a
model sharded with ``fully_shard``, a MeanFlow step on a sharded TinyDiT, and Jv/spectral norms of the
sharded model. Run: torchrun --standalone --nproc_per_node 2 fsdp_worker.py OUT.

Also importable: ``dit()`` and ``meanflow_steps()`` give the single-process run.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ddp_worker
import jvpgraph
from jvpgraph.cli import _exit_skipping_shutdown
from jvpgraph.experiments.meanflow import TinyDiT, meanflow_loss

MEANFLOW_STEPS, MEANFLOW_BATCH = 3, 4  # per rank


def dit() -> nn.Module:
    torch.manual_seed(0)
    return TinyDiT(image_size=4, patch=1, width=16, depth=2, heads=2).double()


def meanflow_steps(net: nn.Module, ranks) -> None:
    """Three SGD steps of the MeanFlow loss; ``ranks``: the ranks whose batches this process holds — each rank
    ``r`` has its own images and draws its noise and times from a generator seeded by ``(step, r)``; the loss is
    the mean over the ranks held (FSDP averages the ranks' gradients)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    data = torch.Generator().manual_seed(2)
    images = torch.rand(MEANFLOW_STEPS, 2, MEANFLOW_BATCH, 1, 4, 4, generator=data, dtype=torch.float64) * 2 - 1
    for step in range(MEANFLOW_STEPS):
        loss = sum(meanflow_loss(net, images[step, r], torch.Generator().manual_seed(10 * step + r))
                   for r in ranks) / len(ranks)
        opt.zero_grad()
        loss.backward()
        opt.step()


def shard(net: nn.Module, blocks) -> nn.Module:
    for m in blocks:
        fully_shard(m)
    fully_shard(net)
    return net


def full(net: nn.Module) -> dict:
    """The whole state dict (a collective: every rank calls it)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in net.state_dict().items()}


def _registered(net: nn.Module) -> list:
    """What FSDP keeps on the modules: the tensors in the parameter slots and the forward hooks."""
    return [(id(p), len(m._forward_pre_hooks), len(m._forward_hooks)) for m in net.modules()
            for p in m._parameters.values()]


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = ddp_worker.GLOBAL_BATCH // world
    rows = slice(rank * per, (rank + 1) * per)
    saved = {}

    # the regularized steps, the model's output from jvpgraph's forward
    net = ddp_worker.model()
    shard(net, [net[0], net[3]])
    reg = jvpgraph.SpectralRegularizer(net, n_iter=ddp_worker.N_ITER)
    ddp_worker.train(net, reg, rows)
    saved["spectral"] = full(net)

    # the same, the model's output from FSDP's own forward (its gradient reduced by FSDP, the penalty's by jvpgraph)
    net = ddp_worker.model()
    shard(net, [net[0], net[3]])
    reg = jvpgraph.SpectralRegularizer(net, n_iter=ddp_worker.N_ITER)
    ddp_worker.train(net, lambda x, idx: (net(x), reg(x, index=idx)[1]), rows)
    saved["spectral, FSDP forward"] = full(net)

    # MeanFlow: Jv of the whole sharded transformer inside the loss
    net = dit()
    shard(net, list(net.blocks))
    meanflow_steps(net, [rank])
    saved["meanflow"] = full(net)

    # Jv and spectral norms of the sharded model on this rank's rows (the single process checks them)
    x, _ = ddp_worker.batches()
    net = ddp_worker.model()
    shard(net, [net[0]])
    g = torch.Generator().manual_seed(3 + rank)
    v = torch.randn(x[0][rows].shape, generator=g, dtype=torch.float64)
    before = _registered(net)
    saved["jvp"] = (x[0][rows], v, jvpgraph.jvp(net, (x[0][rows],), (v,))[1])
    saved["sigma"] = jvpgraph.spectral_norm(net, x[0][rows]).sigma
    saved["left as it was"] = _registered(net) == before and all(isinstance(p, DTensor) for p in net.parameters())
    torch.save(saved, f"{out}.rank{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    _exit_skipping_shutdown(0)  # PyTorch 2.14's gloo threads can abort the shutdown (jvpgraph.cli.console)
