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


def _flops_of_two_calls(fn) -> tuple[int, int]:
    """The FLOPs FlopCounterMode counts for ``fn()`` called twice in one ``with`` block: (first, second)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
        first = counter.get_total_flops()
        fn()
    return first, counter.get_total_flops() - first


def test_flop_counter_sees_a_calls_work_not_its_trace():
    """FlopCounterMode around a jvpgraph call counted the trace's ops on fake tensors (one Hv of ResNet-18
    read 62 GFLOP, its replay 18), and each new ``with`` block traced again (its module tracker is a global
    hook). The first call in a block now reads what every later call does, and no block traces again."""
    import torch.nn as nn

    import jvpgraph

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 64))
    x, v = torch.randn(32, 256), torch.randn(32, 256)
    traced = jvpgraph.cached_trace(net, x)
    first, replay = _flops_of_two_calls(lambda: traced.jvp((x,), (v,)))  # the first call traces
    assert first == replay
    assert _flops_of_two_calls(lambda: traced.jvp((x,), (v,))) == (replay, replay)  # a new block: no new trace
    assert len(traced.history) == 1
    forward = 2 * 32 * (256 * 512 + 512 * 64)  # the two matmuls of f(x)
    assert replay >= 2 * forward  # f(x) and J v each go through both weights


def test_flop_counter_sees_one_hessian_vector_product_not_its_traces():
    import torch.nn as nn

    import jvpgraph

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GELU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    net.train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    curv = jvpgraph.Curvature(net, nn.functional.cross_entropy)
    # the first call traces the loss, builds its gradient's graph and flips it
    first, replay = _flops_of_two_calls(lambda: curv.hvp(v, x, y))
    assert first == replay
    assert _flops_of_two_calls(lambda: curv.hvp(v, x, y)) == (replay, replay)
    grad, _ = _flops_of_two_calls(lambda: torch.autograd.grad(nn.functional.cross_entropy(net(x), y),
                                                              list(net.parameters())))
    assert replay > grad > 0  # Hv does more than a gradient's work


def test_timeit_is_a_median():
    calls = []
    assert timeit(lambda: calls.append(1), repeat=5, warmup=2) >= 0
    assert len(calls) == 7
