"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``), seen by jvpgraph as plain models.

FSDP2 keeps each parameter as a DTensor shard and all-gathers it in hooks around every forward (freeing it
after). jvpgraph's emitted graph takes the parameters as arguments, so it needs the whole parameters, not the
hooks: for a sharded model every call

- all-gathers each sharded parameter once with :class:`Gather`, whose backward averages the gradient over the
  ranks and reduce-scatters it into the shard's ``.grad`` — the gradient FSDP's own backward gives the shard
  (its default ``reduce-scatter`` divides by the data-parallel world size), so the regularizer's gradient adds
  to the loss's as it would through FSDP;
- traces (on a cache miss) inside :func:`plain_view`: FSDP's forward hooks are set aside and the gathered
  parameters stand in the modules' parameter slots, then both are put back.

Memory: the gathered parameters of the whole model are alive during a call (FSDP gathers one group at a
time); the activations are jvpgraph's, not FSDP's. Not supported, refused by :func:`check` with what runs:
a mixed-precision policy that casts the parameters or the output (a ``reduce_dtype`` alone is allowed:
jvpgraph reduces in the parameter's dtype), tensor parallelism (a parameter that is a DTensor before ``fully_shard``), and
a custom gradient divide factor.

Example (one process; ``torchrun`` launches several):
    >>> import tempfile, torch, torch.nn as nn, torch.distributed as dist, jvpgraph
    >>> from torch.distributed.fsdp import fully_shard
    >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    >>> net = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    >>> plain = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)); plain.load_state_dict(net.state_dict())
    <All keys matched successfully>
    >>> _ = fully_shard(net[0]); _ = fully_shard(net)
    >>> x, v = torch.randn(4, 6), torch.randn(4, 6)
    >>> torch.testing.assert_close(jvpgraph.jvp(net, (x,), (v,))[1], torch.func.jvp(plain, (x,), (v,))[1])
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["check", "gathered", "plain_view", "Gather"]

_FSDP_MODULE = "torch.distributed.fsdp._fully_shard"


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return None
    return FSDPModule


def _groups(module: nn.Module):
    """``(path, FSDP module, its parameter groups)`` for every module of the tree that ``fully_shard`` wrapped."""
    cls = _fsdp_module_class()
    if cls is None:
        return []
    out = []
    for name, m in module.named_modules():
        if isinstance(m, cls):
            state = m._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch <= 2.9: one group per state
                one = getattr(state, "_fsdp_param_group", None)
                groups = [one] if one is not None else []
            out.append((name or "the model itself", m, groups))
    return out


def check(f) -> bool:
    """Whether ``f`` (a module) holds modules sharded with ``fully_shard``; raises ``NotImplementedError``
    naming the module for what jvpgraph does not support of FSDP2 (see the module's docstring).

    Example:
        >>> import torch.nn as nn
        >>> check(nn.Linear(2, 3)), check(lambda x: x)
        (False, False)
    """
    if not isinstance(f, nn.Module):
        return False
    groups = _groups(f)
    if not groups:
        return False
    from torch.distributed.tensor import Replicate, Shard

    what = f"jvpgraph cannot run {type(f).__name__}"
    runs = ("What runs: fully_shard with the default MixedPrecisionPolicy and gradient divide factor, "
            "DistributedDataParallel (docs/howto/distributed.md), or an unsharded copy of the model.")
    for name, m, pgs in groups:
        for pg in pgs:
            # The policy sits on the group (torch 2.14), on the state (2.15) and on each parameter (both).
            held = [getattr(pg, "mp_policy", None), getattr(m._get_fsdp_state(), "_mp_policy", None)]
            held += [getattr(fp, "mp_policy", None) for fp in pg.fsdp_params]
            for policy in (p for p in held if p is not None):
                if (getattr(policy, "output_dtype", None) is not None
                        or getattr(policy, "param_dtype_override_fn", None) is not None
                        or any(getattr(policy, "param_dtype", None) not in (None, fp.sharded_param.dtype)
                               for fp in pg.fsdp_params)):
                    raise NotImplementedError(
                        f"{what}: {name} is sharded with fully_shard and a mixed-precision policy ({policy}); "
                        "jvpgraph gathers the parameters in their own dtype and would differentiate another function "
                        f"than the one FSDP runs. {runs}")
            if getattr(pg, "gradient_divide_factor", None) is not None:
                raise NotImplementedError(
                    f"{what}: {name} is sharded with fully_shard and a custom gradient divide factor; "
                    f"jvpgraph's gradient averages over the ranks as FSDP's default does. {runs}")
            for fp in pg.fsdp_params:
                shard = fp.sharded_param
                if any(type(p) not in (Shard, Replicate) for p in shard.placements):
                    raise NotImplementedError(
                        f"{what}: a parameter of {name} ({fp._module_info.param_name}) has placements "
                        f"{shard.placements}: tensor parallelism under fully_shard is not supported (its gradient "
                        f"is not an average over the ranks). {runs}")
    return True


class Gather(torch.autograd.Function):
    """The whole tensor of a sharded parameter (all-gather); backward: the gradient averaged over the ranks,
    reduce-scattered into the shard (what FSDP's backward does with a parameter's gradient).

    Example (one process; every rank calls it for the same parameters in the same order, it is a collective):
        >>> import tempfile, torch, torch.distributed as dist
        >>> from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        >>> mesh = init_device_mesh("cpu", (1,))
        >>> shard = distribute_tensor(torch.arange(6.0).reshape(3, 2), mesh, [Shard(0)]).requires_grad_()
        >>> full = Gather.apply(shard)
        >>> type(full).__name__, full.shape
        ('Tensor', torch.Size([3, 2]))
        >>> (2 * full).sum().backward()
        >>> shard.grad.full_tensor()[0]
        tensor([2., 2.])
        >>> dist.destroy_process_group()
    """

    @staticmethod
    def forward(ctx, shard):
        ctx.mesh, ctx.placements = shard.device_mesh, shard.placements
        return shard.full_tensor()

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.placement_types import Partial

        mesh = ctx.mesh
        partial = DTensor.from_local(grad.contiguous() / mesh.size(), mesh, [Partial()] * mesh.ndim, run_check=False)
        return partial.redistribute(mesh, ctx.placements)


def gathered(module: nn.Module) -> dict[int, torch.Tensor]:
    """For every parameter ``fully_shard`` manages in ``module``'s tree, the whole tensor, by the ``id`` of
    what the module's slot holds now (the shard, or FSDP's unsharded parameter between its forward and
    backward) — one collective per parameter, in the same order on every rank. Differentiable (see
    :class:`Gather`) where the parameter requires a gradient and gradients are on.

    Example:
        >>> import tempfile, torch, torch.nn as nn, torch.distributed as dist
        >>> from torch.distributed.fsdp import fully_shard
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        >>> net = fully_shard(nn.Linear(2, 3))
        >>> full = gathered(net)
        >>> type(net.weight).__name__, type(full[id(net.weight)]).__name__, full[id(net.weight)].shape
        ('DTensor', 'Tensor', torch.Size([3, 2]))
        >>> dist.destroy_process_group()
    """
    out: dict[int, torch.Tensor] = {}
    for _, _, pgs in _groups(module):
        for pg in pgs:
            for fp in pg.fsdp_params:
                shard = fp.sharded_param
                if shard.requires_grad and torch.is_grad_enabled():
                    full = Gather.apply(shard)
                else:
                    with torch.no_grad():
                        full = shard.full_tensor()
                info = fp._module_info
                for m, name in [(info.module, info.param_name), *zip(info.shared_modules, info.shared_param_names)]:
                    now = m._parameters.get(name)
                    if now is not None:
                        out[id(now)] = full
                out[id(shard)] = full
    return out


@contextlib.contextmanager
def plain_view(module: nn.Module, full: dict[int, torch.Tensor]) -> Iterator[None]:
    """Inside: ``module`` runs as an unsharded model — FSDP's forward hooks set aside, and each parameter slot
    that holds a tensor of ``full`` (from :func:`gathered`) holds that whole tensor, detached. Everything is
    put back on exit, also on an error.

    Example:
        >>> import tempfile, torch, torch.nn as nn, torch.distributed as dist
        >>> from torch.distributed.fsdp import fully_shard
        >>> dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        >>> net = fully_shard(nn.Linear(2, 3))
        >>> with plain_view(net, gathered(net)):
        ...     print(type(net.weight).__name__, len(net._forward_pre_hooks))
        Parameter 0
        >>> type(net.weight).__name__, len(net._forward_pre_hooks)
        ('DTensor', 1)
        >>> dist.destroy_process_group()
    """
    hooks = []
    slots = []
    for m in module.modules():
        for attr in ("_forward_pre_hooks", "_forward_hooks"):
            table = getattr(m, attr)
            mine = [k for k, h in table.items() if getattr(h, "__module__", "").startswith(_FSDP_MODULE)]
            if mine:
                hooks.append((table, dict(table)))
                for k in mine:
                    del table[k]
        for name, p in m._parameters.items():
            if p is not None and id(p) in full:
                slots.append((m, name, p))
                m._parameters[name] = nn.Parameter(full[id(p)].detach(), requires_grad=p.requires_grad)
    try:
        yield
    finally:
        for m, name, p in slots:
            m._parameters[name] = p
        for table, was in hooks:
            table.clear()
            table.update(was)
