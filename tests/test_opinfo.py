"""A fast slice of PyTorch's own OpInfo database: one or two entries per family of ops a network uses, the
first samples of each, float64 on the CPU (and complex128 for a list of ops that take complex tensors), each judged by :func:`jvpgraph.testing.check_opinfo_sample`
(``torch.func.jvp``, double-backward and finite differences as references).

The whole database (548 entries with a backward, every sample) is ``python benchmarks/opinfo.py``; its report
is benchmarks/results/opinfo.md.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("expecttest")  # OpInfo's module imports it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

from jvpgraph.hessian import _hvp_works  # noqa: E402
from jvpgraph.testing import check_opinfo_sample, check_opinfo_sample_second_order  # noqa: E402

FAST = [
    # elementwise nonlinearities
    "sigmoid", "tanh", "nn.functional.gelu", "nn.functional.silu", "nn.functional.softplus", "nn.functional.elu",
    "nn.functional.hardswish", "erf", "expm1", "pow", "div.no_rounding_mode", "atan2", "hypot", "clamp",
    # softmax family, normalization
    "softmax", "log_softmax", "nn.functional.layer_norm", "nn.functional.batch_norm",
    "nn.functional.group_norm", "nn.functional.instance_norm", "nn.functional.normalize", "linalg.vector_norm",
    "var_mean", "std",
    # linear maps
    "nn.functional.conv2d", "nn.functional.conv_transpose2d", "nn.functional.linear", "matmul", "addmm", "bmm",
    "einsum", "cdist",
    # pooling, resampling, padding
    "nn.functional.max_pool2d", "nn.functional.avg_pool2d", "nn.functional.adaptive_avg_pool2d", "grid_sampler_2d",
    "nn.functional.interpolate.bilinear", "nn.functional.pad.reflect", "nn.functional.pad.circular",
    # attention, embeddings, losses
    # (embedding and embedding_bag are left out: some of their samples use max_norm, which writes into the
    # weight; see the full sweep's report)
    "nn.functional.scaled_dot_product_attention",
    "nn.functional.cross_entropy", "nn.functional.binary_cross_entropy_with_logits", "nn.functional.mse_loss",
    # reductions, indexing, scatter
    "sum", "mean", "prod", "cumsum", "max.reduction_with_dim", "amax", "cat", "stack", "where", "gather",
    "index_select", "scatter_reduce.prod", "index_reduce.prod", "as_strided_scatter",
    # linear algebra
    "linalg.det", "linalg.cholesky",
]
MAX_SAMPLES = 3


def _entry(full_name):
    for op in op_db:
        if full_name in (op.name, f"{op.name}.{op.variant_test_name}") and (
                op.variant_test_name == "" or full_name.endswith(op.variant_test_name)):
            return op
    raise LookupError(f"no OpInfo entry {full_name!r} in this torch")


# complex128: ops whose rules needed the conjugate or the real part (sigmoid and tanh through their backward
# kernels, complex-to-real reductions), an op whose decomposition writes through views (cov: view_as_real and
# complex; before the decompositions were functionalized its Jv was silently 0), and a few holomorphic ones
COMPLEX = ["sigmoid", "tanh", "abs", "nn.functional.softsign", "linalg.vector_norm", "var_mean", "std", "cov",
           "angle", "mul", "matmul", "exp", "log", "reciprocal", "fft.fft", "view_as_real", "logcumsumexp"]
# real inputs, complex outputs (judged since the checker compares complex outputs too)
REAL_TO_COMPLEX = ["complex", "polar", "view_as_complex", "fft.rfft"]
CASES = [(n, torch.float64) for n in FAST + REAL_TO_COMPLEX] + [(n, torch.complex128) for n in COMPLEX]


@pytest.mark.parametrize("name,dtype", CASES, ids=[n if d == torch.float64 else f"{n}-complex128" for n, d in CASES])
def test_opinfo_entry(name, dtype):
    if name == "cdist" and torch.__version__ < (2, 14):
        pytest.skip("torch < 2.14: no fallback route for _cdist_forward (tests/test_fallback.py)")
    op = _entry(name)
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=False))
    # the first samples, and the last (OpInfo lists corner cases such as empty or 0-d tensors at either end)
    picked = samples[:MAX_SAMPLES] + samples[-1:] if len(samples) > MAX_SAMPLES else samples
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [check_opinfo_sample(op, s, seed=k) for k, s in enumerate(picked)]
    judged = [r for r in results if r[0] != "skip"]
    assert judged, f"{name}: no sample could be judged: {results}"
    bad = [r for r in judged if r[0] != "pass"]
    assert not bad, f"{name}: {len(bad)}/{len(judged)} samples fail: {bad[:3]}"


# Second order (the derivatives of Jv through the emitted graph, and jvpgraph.hvp) on the entries where the
# second-order sweep found a wrong answer or a missing route, and a few a network uses everywhere
# (benchmarks/opinfo.py --order 2; report in benchmarks/results/opinfo_second_order.md)
SECOND_ORDER = [
    "tanh", "nn.functional.gelu", "softmax", "nn.functional.layer_norm", "nn.functional.batch_norm",
    "nn.functional.conv2d", "nn.functional.scaled_dot_product_attention", "nn.functional.cross_entropy",
    "nn.functional.logsigmoid",  # the buffer's tangent: Hv was 0
    "nn.functional.multilabel_soft_margin_loss",  # through logsigmoid
    "native_layer_norm",  # mean and rstd: autograd holds them constant, jvpgraph differentiates them
    "linalg.solve", "linalg.det",  # backward formulas reused LU factors autograd holds constant
    "nn.functional.softshrink", "nn.functional.pad.replicate",  # backward kernels without a route before
    "remainder",  # a jump of the floor within the difference step: a smaller step decides
    "copysign",  # its decomposition's prims: their tangents are written in aten ops
    "angle",  # PyTorch's forward-AD node, differentiated by reverse mode over its formula
    "cdist", "nn.functional.multi_margin_loss",  # recorded in differentiable ops for the gradient graph
    "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu",  # its logsumexp output, queries != keys
    "masked_select", "scatter_reduce.prod",  # data-dependent lengths and branches in the gradient graph
    "diff", "nn.functional.instance_norm",  # functionalization's copy; running statistics closed over
]


@pytest.mark.skipif(not _hvp_works(), reason="torch < 2.14: jvpgraph refuses Hv (wrong there)")
@pytest.mark.parametrize("name", SECOND_ORDER)
def test_opinfo_entry_second_order(name):
    op = _entry(name)
    samples = list(op.sample_inputs("cpu", torch.float64, requires_grad=False))
    picked = samples[:MAX_SAMPLES] + samples[-1:] if len(samples) > MAX_SAMPLES else samples
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [check_opinfo_sample_second_order(op, s, seed=k) for k, s in enumerate(picked)]
    judged = [r for r in results if r[0] not in ("skip", "undecided")]
    assert judged, f"{name}: no sample could be judged: {results}"
    bad = [r for r in judged if r[0] != "pass"]
    assert not bad, f"{name}: {len(bad)}/{len(judged)} samples fail: {bad[:3]}"


@pytest.mark.skipif(not _hvp_works(), reason="torch < 2.14: jvpgraph refuses Hv (wrong there)")
@pytest.mark.parametrize("variant", ["lengths", "offsets"])
@pytest.mark.parametrize("reduce", ["prod", "mean"])
def test_segment_reduce_second_order_with_zeros(variant, reduce):
    """The derivatives of segment_reduce's Jv, and Hv through its backward kernel, where segments hold one, two
    and three zeros, an empty segment and (unsafe) an element in none: OpInfo's samples hold no zeros, and prod's
    'product of the others' is where a zero's own derivative can be lost."""
    from torch.testing._internal.opinfo.core import SampleInput

    op = _entry(f"_segment_reduce.{variant}")
    g = torch.Generator().manual_seed(0)
    data = torch.randn(11, 2, dtype=torch.float64, generator=g) + 2
    data[[1, 3, 4, 6, 7, 8], 0] = 0.0  # segments of column 0: one zero, two zeros, three zeros, none, empty
    lengths = torch.tensor([3, 2, 4, 0, 1])
    seg = dict(lengths=lengths) if variant == "lengths" else dict(offsets=torch.cat([torch.zeros(1, dtype=torch.long),
                                                                                     lengths.cumsum(0)]))
    results = [check_opinfo_sample_second_order(op, SampleInput(data, args=(reduce,), kwargs=dict(
        axis=0, unsafe=True, initial=initial, **seg)), seed=k) for k, initial in enumerate((None, 2.0))]
    assert all(r[0] == "pass" for r in results), results


def test_unpool_samples_with_repeated_indices_are_not_judged():
    """max_unpool2d with two values sent to one place keeps either write, differently from call to call on the
    CPU (no derivative there): such samples are skipped with that reason, the others judged (and pass)."""
    from torch.testing._internal.opinfo.core import SampleInput

    op = next(o for o in op_db if o.name == "nn.functional.max_unpool2d" and o.variant_test_name == "")
    x = torch.tensor([[[[4.0, 7.0, 7.0]]]], dtype=torch.float64)
    kw = dict(kernel_size=3, stride=2, output_size=(3, 6))
    status, why = check_opinfo_sample(op, SampleInput(x, args=(torch.tensor([[[[0, 1, 1]]]]),), kwargs=kw))
    assert status == "skip" and "duplicate indices" in why
    assert check_opinfo_sample(op, SampleInput(x, args=(torch.tensor([[[[0, 1, 5]]]]),), kwargs=kw))[0] == "pass"
