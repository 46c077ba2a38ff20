"""Training with a Jacobian regularizer (the paper's eq. 1): ``loss = CE + λ · mean_i h(‖J(x_i)‖)``.

One loop for every method of the paper's Table 1 (``none``, ``l2``, ``frobenius``, ``spectral-bound``,
``spectral``), SGD with momentum 0.8 as in its Appendix A.2, per-epoch validation, and the spectral norm of the
trained model measured exactly as jvpgraph measures it (:func:`jvpgraph.spectral_norm`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..regularizers import FrobeniusRegularizer, SpectralBoundRegularizer, SpectralRegularizer
from ..spectral import spectral_norm

__all__ = ["REGULARIZERS", "TrainConfig", "History", "make_regularizer", "fit", "evaluate", "sigma_per_sample",
           "augment"]

#: The methods of the paper's Table 1.
REGULARIZERS = ("none", "l2", "frobenius", "spectral-bound", "spectral")


@dataclasses.dataclass
class TrainConfig:
    """One training run. ``lam`` weighs the penalty (for ``l2``: ``λ Σ‖θ‖²``); ``n_iter`` is the number of
    power iterations (spectral, spectral-bound) or random projections (frobenius) per step; ``schedule``
    ``"cosine"`` anneals the learning rate to 0 over the epochs; ``augment`` takes random 4-pixel-padded crops
    and horizontal flips of each batch (the paper's VGG16/CIFAR-10 protocol)."""

    reg: str = "none"
    lam: float = 0.0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.8
    seed: int = 0
    n_iter: int = 1
    schedule: str = "constant"
    augment: bool = False

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r}: expected 'constant' or 'cosine'")
        if self.reg not in REGULARIZERS:
            raise ValueError(f"reg={self.reg!r}: expected one of {', '.join(REGULARIZERS)}")
        for name in ("epochs", "batch_size", "n_iter"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.lam < 0 or self.lr <= 0:
            raise ValueError(f"lam={self.lam}, lr={self.lr}: expected lam >= 0 and lr > 0")


@dataclasses.dataclass
class History:
    """Per-epoch records (``epoch``, ``train_loss``, ``penalty``, ``val_loss``, ``val_acc``, ``step_time``) of
    one :func:`fit`."""

    config: TrainConfig
    epochs: list[dict[str, float]] = dataclasses.field(default_factory=list)

    @property
    def step_time(self) -> float:
        """Median seconds per optimizer step over the epochs after the first (which pays for tracing)."""
        ts = sorted(e["step_time"] for e in (self.epochs[1:] or self.epochs))
        return ts[len(ts) // 2]

    def as_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "epochs": self.epochs}


def make_regularizer(model: nn.Module, reg: str, n_iter: int = 1, seed: int = 0
                     ) -> Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]] | None:
    """The penalty of ``reg`` as ``f(x, index) -> (model(x), penalty per sample)``; ``None`` for ``none``/``l2``
    (no Jacobian term).

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
        >>> out, pen = make_regularizer(net, "spectral")(torch.randn(5, 4), torch.arange(5))
        >>> out.shape, pen.shape
        (torch.Size([5, 3]), torch.Size([5]))
    """
    g = torch.Generator().manual_seed(seed)
    if reg == "spectral":
        # fit passes dataset indices: each sample's right singular vector carries over between epochs, so one
        # iteration per step converges over training (cold, one iteration would only give ‖Jv‖ for a random v)
        return SpectralRegularizer(model, n_iter=n_iter, warm_start=True, generator=g)
    if reg == "frobenius":
        return FrobeniusRegularizer(model, n_proj=n_iter, generator=g)
    if reg == "spectral-bound":
        return SpectralBoundRegularizer(model, n_iter=n_iter, generator=g)
    if reg in ("none", "l2"):
        return None
    raise ValueError(f"reg={reg!r}: expected one of {', '.join(REGULARIZERS)}")


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 512) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (its ``training`` flag is restored).

    Example:
        >>> import torch, torch.nn as nn
        >>> from torch.utils.data import TensorDataset
        >>> r = evaluate(nn.Linear(2, 2), TensorDataset(torch.randn(8, 2), torch.zeros(8, dtype=torch.long)))
        >>> sorted(r)
        ['acc', 'loss']
    """
    was = model.training
    model.eval()
    try:
        x, y = data.tensors
        loss, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            out = model(x[i:i + batch_size])
            loss += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
            correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
        return {"loss": loss / len(x), "acc": correct / len(x)}
    finally:
        model.train(was)


def sigma_per_sample(model: nn.Module, x: torch.Tensor, n_iter: int = 50, batch_size: int = 256) -> torch.Tensor:
    """Per-sample spectral norm ``‖J(x_i)‖₂`` of the model in eval mode (power iteration to ``1e-5``).

    Example:
        >>> import torch, torch.nn as nn
        >>> sigma_per_sample(nn.Linear(3, 2, bias=False), torch.randn(4, 3)).shape
        torch.Size([4])
    """
    was = model.training
    model.eval()
    try:
        parts = [spectral_norm(model, x[i:i + batch_size], n_iter=n_iter, tol=1e-5).sigma
                 for i in range(0, len(x), batch_size)]
        return torch.cat(parts).detach()
    finally:
        model.train(was)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the zero-padded images (``pad`` pixels each side) and random horizontal flips, one draw
    per image from ``generator``.

    Example:
        >>> import torch
        >>> x = torch.rand(5, 3, 8, 8)
        >>> augment(x, torch.Generator().manual_seed(0)).shape
        torch.Size([5, 3, 8, 8])
        >>> y = augment(x, torch.Generator().manual_seed(0), pad=0)  # no room to crop: flips only
        >>> all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(y, x))
        True
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return torch.where(flip.reshape(-1, 1, 1, 1), out.flip(-1), out)


def _progress(total: int, desc: str | None, enabled: bool, unit: str = "step"):
    """One progress bar over ``total`` units (tqdm, on a terminal only); a no-op without tqdm."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are an optional extra
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, leave=True, file=sys.stderr, dynamic_ncols=True,
                disable=None)  # None: off when stderr is not a terminal (logs, CI)


def _rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes of the initialized default group (``(0, 1)`` if none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(idx: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a global batch and each row's weight in the global batch's mean.

    A sample goes to rank ``index % world`` in every epoch, so a warm-started power iteration finds its vector
    on the rank that kept it. The weights ``world / len(idx)`` make DDP's average of the ranks' gradients the
    gradient of the global batch's mean, however unevenly the batch splits; a rank that gets no sample runs
    one with weight 0 (DDP needs every rank in every step).

    Example:
        >>> rows, w = _shard(torch.tensor([4, 7, 2, 9, 6]), rank=1, world=2)  # indices 7, 9: odd ones
        >>> rows.tolist(), w.mul(5).tolist()  # 2 / 5 each: DDP divides by the 2 ranks
        ([1, 3], [2.0, 2.0])
        >>> _shard(torch.tensor([4]), rank=1, world=2)[1].tolist()  # nothing for rank 1: one sample, weight 0
        [0.0]
    """
    rows = (idx % world == rank).nonzero().flatten()
    if len(rows) == 0:
        return torch.zeros(1, dtype=torch.long), torch.zeros(1)
    return rows, torch.full((len(rows),), world / len(idx))


def fit(model: nn.Module, train: TensorDataset, val: TensorDataset, config: TrainConfig, *,
        progress: bool = True, desc: str | None = None) -> History:
    """Train ``model`` in place with SGD (momentum ``config.momentum``) on ``train``; validate each epoch.

    The batch order, the regularizer's random vectors and dropout come from ``config.seed``; the caller's
    global random number generator is restored afterwards.

    **Data-parallel.** Called in every process of an initialized ``torch.distributed`` group (as ``jvpgraph
    train`` does under ``torchrun``), the model and its regularizer run under
    :class:`~torch.nn.parallel.DistributedDataParallel`: each global batch of ``config.batch_size`` samples is
    split over the ranks by dataset index (``index % world``), the loss is weighted so that the averaged
    gradient is the global batch's mean, and the parameters after each step equal one process's over the same
    global batch for models without train-mode BatchNorm (``none``, ``l2``, ``spectral``, ``spectral-bound``;
    ``frobenius`` draws independent projections per rank). BatchNorm in train mode normalizes with each rank's
    samples; rank 0's running statistics are kept (broadcast before each validation). Dropout draws from
    ``config.seed + rank``.

    Example:
        >>> import torch, torch.nn as nn
        >>> from torch.utils.data import TensorDataset
        >>> x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> h = fit(net, TensorDataset(x, y), TensorDataset(x, y), TrainConfig("spectral", lam=0.01, epochs=3,
        ...         lr=0.1), progress=False)
        >>> len(h.epochs), h.epochs[-1]["val_acc"] > 0.8
        (3, True)
    """
    import torch.distributed as dist

    from ..regularizers import Regularized

    x_all, y_all = train.tensors
    n = len(x_all)
    rank, world = _rank_world()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + rank)
        order_gen = torch.Generator().manual_seed(config.seed)  # the same batches on every rank
        # frobenius: independent projections per rank; spectral's warm start and spectral-bound's vectors: shared
        reg_seed = config.seed + (rank if config.reg == "frobenius" else 0)
        reg = make_regularizer(model, config.reg, config.n_iter, reg_seed)
        step = model if reg is None else Regularized(model, reg)
        if world > 1:
            step = nn.parallel.DistributedDataParallel(step)
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs) \
            if config.schedule == "cosine" else None
        history = History(config)
        model.train()
        steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
        bar = _progress(steps_per_epoch * config.epochs, desc or config.reg, progress and rank == 0)
        for epoch in range(1, config.epochs + 1):
            perm = torch.randperm(n, generator=order_gen)
            batches = [perm[i:i + config.batch_size] for i in range(0, n, config.batch_size)]
            totals = torch.zeros(2, dtype=torch.float64)  # this rank's share of Σ loss, Σ penalty over the epoch
            step_times = []
            for idx in batches:
                n_batch = len(idx)  # the global batch (idx becomes this rank's part below)
                t0 = time.perf_counter()
                x, y = x_all[idx], y_all[idx]
                if config.augment:  # the whole global batch: every rank draws what one process would
                    x = augment(x, order_gen)
                if world > 1:
                    rows, w = _shard(idx, rank, world)
                    x, y, idx = x[rows], y[rows], idx[rows]
                if reg is None:
                    out = step(x)
                    pen = out.new_zeros(len(idx))
                else:
                    out, pen = step(x, idx)
                if world > 1:
                    w = w.to(out.dtype)
                    ce = (w * F.cross_entropy(out, y, reduction="none")).sum()
                    penalty = (w * pen).sum()
                else:  # one process: the batch means (no copies, no weights)
                    ce, penalty = F.cross_entropy(out, y), pen.mean()
                if config.reg == "l2":
                    penalty = sum((p * p).sum() for p in model.parameters())
                loss = ce + config.lam * penalty
                finite = torch.isfinite(loss.detach())
                if world > 1:  # every rank stops at the same step, or the others would wait in backward
                    finite = finite.to(torch.int32)
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not bool(finite):
                    raise FloatingPointError(f"{desc or config.reg}: the loss became {float(loss)} in epoch "
                                             f"{epoch}; lower --lr or --lam")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step_times.append(time.perf_counter() - t0)
                bar.update()
                share = n_batch / world  # loss is this rank's part of the global mean, times world
                totals += torch.tensor([float(loss.detach()), float(penalty.detach())], dtype=torch.float64) * share
            if world > 1:
                dist.all_reduce(totals)
                for b in model.buffers():  # rank 0's running statistics on every rank, as DDP's next forward would
                    dist.broadcast(b, 0)
            lr_used = opt.param_groups[0]["lr"]
            if sched is not None:
                sched.step()
            ev = evaluate(model, val)
            step_times.sort()
            history.epochs.append({"epoch": epoch, "lr": lr_used, "train_loss": float(totals[0]) / n,
                                   "penalty": float(totals[1]) / n, "val_loss": ev["loss"], "val_acc": ev["acc"],
                                   "step_time": step_times[len(step_times) // 2]})
            bar.set_postfix_str(f"epoch {epoch}, val acc {ev['acc']:.1%}")
        bar.close()
    return history
