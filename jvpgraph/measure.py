"""Measuring a call: peak tensor memory on any device (the CPU included), and wall time.

``torch.cuda.max_memory_allocated`` exists only for CUDA; on the CPU the process RSS is noisy and never goes
down. :class:`PeakTensorMemory` instead watches every aten op while a block runs and keeps the running total
of bytes held by the tensor storages created inside it (views share their base's storage and are counted
once; storages that existed before — parameters, inputs, and views or detaches of them made inside — are not
counted). Its ``peak`` is the largest
that total got: the working memory of the block, comparable between two ways of computing the same thing.

Example:
    >>> import torch
    >>> x = torch.randn(1000)  # made outside: not counted
    >>> with PeakTensorMemory() as m:
    ...     y = x * 2          # 4000 bytes (1000 float32)
    ...     z = y + 1          # 4000 more while y is alive: 8000 at the peak
    ...     del y
    >>> m.peak
    8000
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import is_fake
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["PeakTensorMemory", "peak_memory", "timeit", "median_times"]


class PeakTensorMemory(TorchDispatchMode):
    """Context manager: ``peak`` (bytes) of the storages created inside the block and alive at once (real
    ones: the fake tensors of a trace made inside the block hold no memory and are not counted).

    It sees the ops autograd runs in a backward pass, those that ``torch.func`` transforms lower to, and those
    inside ops written in Python with ``torch.library.custom_op``; it adds Python overhead to each op, so time
    a call without it.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _collect(self):
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = _python_body(func)
        if body is not None:  # its temporaries are the op's working memory too: run its body under the mode
            with self:
                out = body(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        self._collect()
        # an output on an argument's storage (a view, detach, an in-place op) holds nothing new: counted with
        # its base if the base was made inside, not at all if it was made before (a parameter's detach)
        given = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in pytree.tree_leaves(out):
            # a fake or meta tensor (a trace made inside the block, make_fx's and torch.func's) holds no memory
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_meta and not is_fake(t):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self._live and key not in given and st.nbytes() > 0:
                    self._live[key] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _python_body(func) -> Callable | None:
    """The Python function an op made with ``torch.library.custom_op`` runs (jvpgraph's blockwise attention
    tangent, a user's op), whose own ops a mode sees only if it runs it: ``None`` for any other op."""
    if not isinstance(func, torch._ops.OpOverload) or func.namespace in ("aten", "prim", "prims"):
        return None
    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:  # a torch without it: such ops count as one
        return None
    return getattr(_maybe_get_opdef(func), "_init_fn", None)


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor storage that ``fn()`` holds at once (see :class:`PeakTensorMemory`).

    Example:
        >>> import torch
        >>> w = torch.randn(64, 64)
        >>> peak_memory(lambda: (w @ w).sum()) >= 64 * 64 * 4
        True
    """
    with PeakTensorMemory() as m:
        fn()
    return m.peak


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` calls after ``warmup`` calls.

    Example:
        >>> timeit(lambda: sum(range(1000)), repeat=3) < 1.0
        True
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def median_times(fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 5, warmup: int = 2) -> dict:
    """Median seconds per call of each function, for ratios measured in one run.

    Calls run in blocks (one function at a time, ``warmup`` calls first) and the blocks rotate over
    ``rounds``, so slow drift of the machine hits every function alike while each block sees the allocator
    in its own steady state (interleaving single calls made LeNet's numbers swing by 3x here: each call then
    found the freed memory of another).

    Example:
        >>> t = median_times({"a": lambda: sum(range(100)), "b": lambda: sum(range(10000))}, repeats=10)
        >>> t["a"] < t["b"]
        True
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
