"""The peak-memory meter used by the benchmarks counts what it should."""

from __future__ import annotations

import torch

from jvpgraph.measure import PeakTensorMemory, peak_memory, timeit

MB = 1 << 20


def test_views_count_once_and_inputs_not_at_all():
    x = torch.zeros(MB // 4)  # 1 MiB, made outside
    with PeakTensorMemory() as m:
        y = x + 1             # 1 MiB
        _ = y.view(-1, 4).t()  # views: nothing new
        _ = y[::2]
    assert m.peak == MB


def test_views_and_detaches_of_outside_tensors_are_not_counted():
    w = torch.zeros(MB // 4, requires_grad=True)  # 1 MiB, made outside: a parameter
    with PeakTensorMemory() as m:
        d = w.detach()          # shares w's storage
        _ = d.view(-1, 4)[1:]   # a view of that
        _ = d * 2               # 1 MiB: the only new storage
    assert m.peak == MB


def test_freed_storage_lowers_the_running_total():
    with PeakTensorMemory() as m:
        for _ in range(5):
            y = torch.ones(MB // 4) * 2  # each iteration frees the last one
        del y
        torch.ones(1)  # one more op, so the meter sees the last free
    assert MB <= m.peak <= 3 * MB  # never five live at once (ones and its product: two at a time)
    assert m.current < MB  # the last one was freed


def test_backward_pass_memory_is_seen():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)
    fwd = peak_memory(lambda: torch.tanh(x @ w).sum())
    both = peak_memory(lambda: torch.autograd.grad(torch.tanh(x @ w).sum(), w))
    assert both > fwd  # the gradient (256x256) and the saved activations


def test_fake_tensors_of_a_trace_made_inside_are_not_counted():
    """make_fx on fake tensors inside the block allocates nothing real: the meter counted each fake tensor's
    nominal storage (a Hessian-vector product's first call, which traces, read 8.7x its parameters' size)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(MB // 4)

    def f(a):
        return (a * 2).exp() + 1  # 3 MiB of intermediates if run for real

    assert peak_memory(lambda: make_fx(f, tracing_mode="fake")(x)) < MB
    with FakeTensorMode():
        assert peak_memory(lambda: f(torch.empty(MB // 4))) == 0
    assert peak_memory(lambda: f(x)) >= 2 * MB  # the same function run for real is counted


def test_timeit_is_a_median():
    calls = []
    assert timeit(lambda: calls.append(1), repeat=5, warmup=2) >= 0
    assert len(calls) == 7
