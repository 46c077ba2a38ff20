"""Each written rule family against PyTorch's own derivatives, in float64.

One table of ``(name, function, input builder)``. For every entry jvpgraph's ``J v`` must equal the explicit
reverse-mode Jacobian times ``v`` (``jacrev`` / ``autograd.functional.jacobian``) and, where PyTorch has a
forward-AD formula, ``torch.func.jvp``. The primal output must equal the eager one. Entries marked
``written=True`` must also be served by a written rule (no node of the flipped graph went through the
fallback chain), so the written rule itself is what the test exercises.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jvpgraph
from jvpgraph.rules import FALLBACK_KINDS

from conftest import (F64, assert_adjoint, assert_all_close, func_jvp, jac_times_v, jvpgraph_jvp, random_tangents,
                      seeded)

D = torch.float64


def rn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=D) * scale


def pos(*shape):
    return torch.rand(*shape, dtype=D) + 0.5


def perm_rows(n_rows, n, k):
    """Row-wise distinct indices (so scatter/index_put without accumulation is well defined)."""
    return torch.stack([torch.randperm(n)[:k] for _ in range(n_rows)])


@dataclasses.dataclass
class Case:
    name: str
    f: Callable
    build: Callable[[], tuple]
    written: bool = True  # every active node must use a written rule (no fallback)
    bn: str = "batch"
    ref: Callable[[tuple], Callable] | None = None  # reference function (default: f itself)
    forward_ad: bool = True  # False where torch.func.jvp is known to be wrong (a silent zero): not a reference
    marks: Any = ()

    def param(self):
        return pytest.param(self, id=self.name, marks=self.marks)


C = Case
CASES: list[Case] = []


def add(*cases):
    CASES.extend(cases)


# ------------------------------------------------------------------ elementwise
X = lambda: (rn(3, 5),)  # noqa: E731
X4 = lambda: (rn(3, 5, scale=4.0),)  # noqa: E731  spans the kinks of the "hard" functions
P = lambda: (pos(3, 5),)  # noqa: E731
add(
    C("sigmoid", torch.sigmoid, X),
    C("tanh", torch.tanh, X),
    C("gelu", F.gelu, X4),
    C("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), X4),
    C("silu", F.silu, X4),
    C("elu", F.elu, X4),
    C("elu_alpha", lambda x: F.elu(x, alpha=1.7), X4),
    C("selu", F.selu, X4),
    C("celu", lambda x: F.celu(x, alpha=0.6), X4, written=False),  # aten.celu: no written rule
    C("softplus", F.softplus, X4),
    C("softplus_beta_threshold", lambda x: F.softplus(x, beta=2.0, threshold=3.0), X4),
    C("hardswish", F.hardswish, X4),
    C("hardsigmoid", F.hardsigmoid, X4),
    C("mish", F.mish, X4),
    C("relu", F.relu, X),
    C("leaky_relu", lambda x: F.leaky_relu(x, 0.2), X),
    C("relu6", F.relu6, lambda: (rn(3, 5, scale=6.0),)),
    C("hardtanh", lambda x: F.hardtanh(x, -0.5, 0.7), X),
    C("threshold", lambda x: F.threshold(x, 0.1, 20.0), X),
    C("exp", torch.exp, X),
    C("log", torch.log, P),
    C("log1p", torch.log1p, P),
    C("expm1", torch.expm1, X),
    C("pow_tensor_scalar_int", lambda x: x ** 3, X),
    C("pow_tensor_scalar_square", lambda x: x ** 2, X),
    C("pow_tensor_scalar_frac", lambda x: x ** 2.5, P),
    C("pow_tensor_scalar_neg", lambda x: torch.pow(x, -1.5), P),
    C("pow_tensor_tensor", torch.pow, lambda: (pos(3, 5), rn(3, 5))),
    C("pow_tensor_tensor_broadcast", torch.pow, lambda: (pos(3, 5), rn(5))),
    C("pow_scalar_tensor", lambda x: torch.pow(2.0, x), X),
    C("pow_scalar_tensor_e", lambda x: 0.3 ** x, X),
    C("sqrt", torch.sqrt, P),
    C("rsqrt", torch.rsqrt, P),
    C("reciprocal", torch.reciprocal, P),
    C("div_tensor_tensor", torch.div, lambda: (rn(3, 5), pos(3, 5))),
    C("div_broadcast", torch.div, lambda: (rn(3, 5), pos(3, 1))),
    C("div_scalar", lambda x: x / 3.0, X),
    C("div_rounding_floor", lambda x, y: torch.div(x, y, rounding_mode="floor") + x, lambda: (rn(3, 5), pos(3, 5))),
    C("abs", torch.abs, X),
    C("clamp", lambda x: torch.clamp(x, -0.5, 0.6), X),
    C("clamp_min", lambda x: torch.clamp(x, min=0.2), X),
    C("clamp_max", lambda x: torch.clamp(x, max=-0.1), X),
    C("maximum", torch.maximum, lambda: (rn(3, 5), rn(3, 5))),
    C("minimum", torch.minimum, lambda: (rn(3, 5), rn(3, 5))),
    C("maximum_broadcast", torch.maximum, lambda: (rn(3, 5), rn(5))),
    C("maximum_ties", lambda x, y: torch.maximum(x.round(), y.round()) * (x + y),
      lambda: (rn(4, 6, scale=2.0), rn(4, 6, scale=2.0))),
    C("erf", torch.erf, X),
    C("clamp_tensor_bounds", torch.clamp, lambda: (rn(3, 5), rn(3, 5) - 1, rn(5) + 1), written=False),
    C("pow_zero_exponent", lambda x: x ** 0 + x ** 1, X),
    C("pow_zero_base", lambda x: 0.0 ** x, P),
    C("log_sigmoid", F.logsigmoid, X4),
    C("sin_cos_atan", lambda x: torch.sin(x) * torch.cos(x) + torch.atan(x), X),
    C("square", torch.square, X),
    C("mul_same_input", lambda x: x * x * x, X),
    C("sub_rsub_alpha", lambda x, y: torch.sub(x, y, alpha=0.3) + (2.0 - x) + torch.add(x, y, alpha=-1.5),
      lambda: (rn(3, 5), rn(3, 5))),
)

# ------------------------------------------------------------------ linear ops: linear / conv
add(
    C("linear", F.linear, lambda: (rn(2, 3, 4), rn(5, 4), rn(5))),
    C("linear_nobias", F.linear, lambda: (rn(3, 4), rn(5, 4))),
    C("linear_vector", F.linear, lambda: (rn(4), rn(5, 4), rn(5))),
    C("linear_vector_via_matmul", lambda x, w, b: w @ x + b, lambda: (rn(4), rn(5, 4), rn(5))),
    C("conv1d", F.conv1d, lambda: (rn(2, 3, 9), rn(4, 3, 3), rn(4))),
    C("conv1d_stride_pad", lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1),
      lambda: (rn(2, 3, 9), rn(4, 3, 3), rn(4))),
    C("conv1d_dilation_groups", lambda x, w, b: F.conv1d(x, w, b, dilation=2, groups=3),
      lambda: (rn(2, 3, 11), rn(6, 1, 3), rn(6))),
    C("conv1d_same", lambda x, w: F.conv1d(x, w, padding="same"), lambda: (rn(2, 3, 8), rn(2, 3, 4))),
    C("conv2d", F.conv2d, lambda: (rn(2, 3, 6, 6), rn(4, 3, 3, 3), rn(4))),
    C("conv2d_stride_pad", lambda x, w, b: F.conv2d(x, w, b, stride=(2, 1), padding=(1, 2)),
      lambda: (rn(2, 3, 7, 6), rn(4, 3, 3, 2), rn(4))),
    C("conv2d_dilation", lambda x, w, b: F.conv2d(x, w, b, dilation=2, padding=1),
      lambda: (rn(1, 2, 8, 8), rn(3, 2, 3, 3), rn(3))),
    C("conv2d_groups", lambda x, w, b: F.conv2d(x, w, b, groups=2, stride=2),
      lambda: (rn(2, 4, 7, 7), rn(6, 2, 3, 3), rn(6))),
    C("conv2d_depthwise_nobias", lambda x, w: F.conv2d(x, w, groups=3, padding=1),
      lambda: (rn(2, 3, 5, 5), rn(3, 1, 3, 3))),
    C("conv2d_same_dilation", lambda x, w, b: F.conv2d(x, w, b, padding="same", dilation=(1, 2)),
      lambda: (rn(1, 2, 6, 7), rn(3, 2, 3, 3), rn(3))),
    C("conv2d_module_reflect", nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect").double(),
      lambda: (rn(2, 2, 5, 5),)),
    C("conv3d", F.conv3d, lambda: (rn(1, 2, 5, 5, 5), rn(3, 2, 3, 3, 3), rn(3))),
    C("conv3d_stride_pad_groups", lambda x, w, b: F.conv3d(x, w, b, stride=2, padding=1, groups=2),
      lambda: (rn(1, 4, 5, 4, 5), rn(4, 2, 2, 3, 3), rn(4))),
    C("conv_transpose1d", lambda x, w, b: F.conv_transpose1d(x, w, b, stride=2, padding=1, output_padding=1),
      lambda: (rn(2, 3, 5), rn(3, 2, 3), rn(2))),
    C("conv_transpose2d", F.conv_transpose2d, lambda: (rn(2, 3, 4, 4), rn(3, 2, 3, 3), rn(2))),
    C("conv_transpose2d_outpad_groups",
      lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=2, dilation=1),
      lambda: (rn(2, 4, 3, 4), rn(4, 3, 3, 3), rn(6))),
    C("conv_transpose2d_dilation",
      lambda x, w: F.conv_transpose2d(x, w, stride=(2, 3), padding=(0, 1), output_padding=(1, 2), dilation=2),
      lambda: (rn(1, 2, 3, 3), rn(2, 3, 2, 3))),
    C("conv_transpose3d", lambda x, w, b: F.conv_transpose3d(x, w, b, stride=2),
      lambda: (rn(1, 2, 2, 3, 2), rn(2, 2, 2, 2, 2), rn(2))),
)

# ------------------------------------------------------------------ pooling, upsampling, padding
add(
    C("max_pool1d", lambda x: F.max_pool1d(x, 3, stride=2), lambda: (rn(2, 3, 11),)),
    C("max_pool1d_pad_dilation", lambda x: F.max_pool1d(x, 3, stride=1, padding=1, dilation=2),
      lambda: (rn(2, 2, 9),)),
    C("max_pool2d", lambda x: F.max_pool2d(x, 2), lambda: (rn(2, 3, 6, 6),)),
    C("max_pool2d_stride_pad", lambda x: F.max_pool2d(x, 3, stride=2, padding=1), lambda: (rn(2, 3, 7, 6),)),
    C("max_pool2d_dilation_ceil", lambda x: F.max_pool2d(x, 2, stride=2, dilation=2, ceil_mode=True),
      lambda: (rn(1, 2, 9, 8),)),
    C("max_pool2d_overlapping", lambda x: F.max_pool2d(x, 3, stride=1), lambda: (rn(1, 2, 6, 6),)),
    C("max_pool3d", lambda x: F.max_pool3d(x, 2), lambda: (rn(1, 2, 4, 4, 4),)),
    C("max_pool3d_stride_pad", lambda x: F.max_pool3d(x, 3, stride=2, padding=1), lambda: (rn(1, 2, 5, 4, 5),)),
    C("avg_pool1d", lambda x: F.avg_pool1d(x, 3, stride=2, padding=1), lambda: (rn(2, 3, 9),)),
    C("avg_pool2d", lambda x: F.avg_pool2d(x, 2), lambda: (rn(2, 3, 6, 6),)),
    C("avg_pool2d_ceil_nopad",
      lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
      lambda: (rn(2, 3, 8, 7),)),
    C("avg_pool2d_divisor", lambda x: F.avg_pool2d(x, 2, divisor_override=3), lambda: (rn(1, 2, 4, 6),)),
    C("avg_pool3d", lambda x: F.avg_pool3d(x, 2, stride=1), lambda: (rn(1, 2, 3, 4, 3),)),
    C("adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x, 4), lambda: (rn(2, 3, 7),)),
    C("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (3, 2)), lambda: (rn(2, 3, 7, 5),)),
    C("adaptive_avg_pool2d_global", lambda x: F.adaptive_avg_pool2d(x, 1), lambda: (rn(2, 3, 4, 5),)),
    C("adaptive_max_pool2d", lambda x: F.adaptive_max_pool2d(x, (3, 2)), lambda: (rn(2, 3, 7, 5),)),
    C("adaptive_max_pool1d", lambda x: F.adaptive_max_pool1d(x, 3), lambda: (rn(2, 3, 8),)),
    C("upsample_nearest", lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), lambda: (rn(1, 2, 3, 4),)),
    C("upsample_nearest_size", lambda x: F.interpolate(x, size=(5, 7), mode="nearest"), lambda: (rn(1, 2, 3, 4),)),
    C("upsample_nearest_exact", lambda x: F.interpolate(x, size=(5, 7), mode="nearest-exact"),
      lambda: (rn(1, 2, 3, 4),)),
    C("upsample_bilinear", lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), lambda: (rn(1, 2, 3, 4),)),
    C("upsample_bilinear_align", lambda x: F.interpolate(x, size=(5, 6), mode="bilinear", align_corners=True),
      lambda: (rn(1, 2, 3, 4),)),
    C("upsample_bilinear_frac", lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear"),
      lambda: (rn(1, 2, 4, 4),)),
    C("upsample_bicubic", lambda x: F.interpolate(x, size=(5, 6), mode="bicubic"), lambda: (rn(1, 2, 3, 4),)),
    C("upsample_linear1d", lambda x: F.interpolate(x, size=7, mode="linear"), lambda: (rn(1, 2, 4),)),
    C("upsample_nearest3d", lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), lambda: (rn(1, 1, 2, 2, 3),)),
    C("pad_constant", lambda x: F.pad(x, (1, 2, 0, 1), value=0.5), lambda: (rn(2, 3, 4, 5),)),
    C("pad_constant_negative", lambda x: F.pad(x, (-1, 2)), lambda: (rn(2, 3, 5),)),
    C("pad_reflect", lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect"), lambda: (rn(1, 2, 4, 5),)),
    C("pad_reflect1d", lambda x: F.pad(x, (2, 3), mode="reflect"), lambda: (rn(2, 3, 5),)),
    C("pad_replicate", lambda x: F.pad(x, (2, 1, 1, 3), mode="replicate"), lambda: (rn(1, 2, 4, 5),)),
    C("pad_replicate3d", lambda x: F.pad(x, (1, 1, 0, 1, 1, 0), mode="replicate"), lambda: (rn(1, 1, 2, 3, 3),)),
    C("pad_circular", lambda x: F.pad(x, (1, 2, 2, 1), mode="circular"), lambda: (rn(1, 2, 4, 5),)),
)

# ------------------------------------------------------------------ structural: cat/stack/split/index/shape
IDX = lambda: torch.tensor([2, 0, 2, 1])  # noqa: E731
add(
    C("cat", lambda x, y: torch.cat([x, 2 * y, x], dim=1), lambda: (rn(3, 2), rn(3, 4))),
    C("cat_with_constant", lambda x: torch.cat([torch.ones(2, 3, dtype=D), x]), lambda: (rn(4, 3),)),
    C("stack", lambda x, y: torch.stack([x, y, x * y], dim=-1), lambda: (rn(3, 4), rn(3, 4))),
    C("split", lambda x: torch.split(x, [1, 3], dim=1), lambda: (rn(3, 4),)),
    C("split_equal", lambda x: [a * (i + 1) for i, a in enumerate(torch.split(x, 2, dim=0))], lambda: (rn(5, 3),)),
    C("chunk", lambda x: torch.chunk(x, 3, dim=0), lambda: (rn(6, 2),)),
    C("unbind", lambda x: torch.unbind(x, dim=1), lambda: (rn(3, 4),)),
    C("unbind_sum", lambda x: sum(a.sin() for a in x.unbind(0)), lambda: (rn(3, 4),)),
    C("slice_select", lambda x: x[1:, ::2] * x[0, 1] + x[1:, -1:], lambda: (rn(4, 5),)),
    C("narrow_unfold", lambda x: x.narrow(1, 1, 3).unfold(1, 2, 1), lambda: (rn(4, 5),)),
    C("advanced_index", lambda x, i: x[i] * 2, lambda: (rn(4, 3), IDX())),
    C("advanced_index_2d", lambda x, i, j: x[i, j], lambda: (rn(4, 5), IDX(), torch.tensor([4, 0, 1, 1]))),
    C("bool_mask_index_constant", lambda x: x[:, torch.tensor([True, False, True])], lambda: (rn(2, 3),)),
    C("gather", lambda x, i: torch.gather(x, 1, i), lambda: (rn(3, 5), torch.randint(0, 5, (3, 4)))),
    C("index_select", lambda x, i: torch.index_select(x, 0, i), lambda: (rn(4, 3), IDX())),
    C("scatter", lambda x, s, i: x.scatter(1, i, s), lambda: (rn(3, 5), rn(3, 3), perm_rows(3, 5, 3))),
    C("scatter_value", lambda x, i: x.scatter(1, i, 2.5), lambda: (rn(3, 5), perm_rows(3, 5, 2))),
    C("scatter_add", lambda x, s, i: x.scatter_add(1, i, s),
      lambda: (rn(3, 5), rn(3, 4), torch.randint(0, 5, (3, 4)))),
    C("scatter_reduce_sum", lambda x, s, i: x.scatter_reduce(1, i, s, "sum"),
      lambda: (rn(3, 5), rn(3, 4), torch.randint(0, 5, (3, 4)))),
    C("index_add", lambda x, s, i: x.index_add(0, i, s), lambda: (rn(4, 3), rn(4, 3), IDX())),
    C("index_put", lambda x, y, i: x.index_put((i,), y), lambda: (rn(5, 3), rn(3, 3), torch.tensor([4, 0, 2]))),
    C("index_put_accumulate", lambda x, y, i: x.index_put((i,), y, accumulate=True),
      lambda: (rn(4, 3), rn(4, 3), IDX())),
    C("setitem", lambda x, y: x.clone().index_put_((torch.tensor([1]),), y) * 1.0, lambda: (rn(3, 4), rn(1, 4))),
    C("slice_assign", lambda x, y: _slice_assign(x, y), lambda: (rn(4, 5), rn(2, 5))),
    C("masked_fill", lambda x, m: x.masked_fill(m, 3.0), lambda: (rn(3, 4), torch.rand(3, 4) > 0.5)),
    C("where", torch.where, lambda: (torch.rand(3, 4) > 0.5, rn(3, 4), rn(4))),
    C("where_scalar", lambda c, x: torch.where(c, x, 0.0), lambda: (torch.rand(3, 4) > 0.5, rn(3, 4))),
    C("permute", lambda x: x.permute(2, 0, 1) * 1.5, lambda: (rn(2, 3, 4),)),
    C("transpose_view", lambda x: x.transpose(0, 1).reshape(-1) @ torch.arange(6.0, dtype=D),
      lambda: (rn(2, 3),)),
    C("reshape_flatten", lambda x: torch.flatten(x.reshape(3, 2, 4), 1) + x.view(3, 8), lambda: (rn(6, 4),)),
    C("expand", lambda x: x.expand(4, 3, 5) * torch.arange(5.0, dtype=D), lambda: (rn(3, 1),)),
    C("repeat", lambda x: x.repeat(2, 3, 1), lambda: (rn(3, 2),)),
    C("squeeze_unsqueeze", lambda x: x.unsqueeze(0).squeeze(2).transpose(0, 2), lambda: (rn(3, 1, 4),)),
    C("flip_roll", lambda x: torch.roll(torch.flip(x, [0]), 2, 1), lambda: (rn(3, 5),)),
    C("movedim_tile", lambda x: torch.tile(torch.movedim(x, 0, -1), (2, 1)), lambda: (rn(2, 3),)),
    C("repeat_interleave", lambda x: torch.repeat_interleave(x, 2, dim=1), lambda: (rn(3, 2),)),
    C("tril_triu_diag", lambda x: x.tril() + 2 * x.triu(1) + torch.diagonal(x).sum(), lambda: (rn(4, 4),)),
    C("pixel_shuffle", lambda x: F.pixel_shuffle(x, 2), lambda: (rn(1, 8, 2, 3),)),
    C("scatter_reduce_mean", lambda x, s, i: x.scatter_reduce(1, i, s, "mean", include_self=False),
      lambda: (rn(3, 5), rn(3, 4), torch.randint(0, 5, (3, 4)))),
    # amax/amin/prod are not linear: the written scatter_reduce rule declines them, the fallback serves them
    *[C(f"scatter_reduce_{red}", (lambda red: lambda x, s, i: x.scatter_reduce(1, i, s, red))(red),
        lambda: (rn(3, 5), rn(3, 4), torch.randint(0, 5, (3, 4))), written=False)
      for red in ("amax", "amin")],
    # reduce="prod": PyTorch's forward AD gives wrong tangents here (not a reference); zeros in src are exact
    C("scatter_reduce_prod", lambda x, s, i: x.scatter_reduce(1, i, s, "prod"),
      lambda: (rn(3, 5), rn(3, 4), torch.randint(0, 5, (3, 4))), forward_ad=False),
    *[C(f"scatter_reduce_prod_zeros_self{inc}", lambda x, s, i, inc=inc: x.scatter_reduce(0, i, s, "prod",
                                                                                          include_self=inc),
        lambda: (rn(4, 3) * (torch.rand(4, 3) > 0.3), rn(6, 3) * (torch.rand(6, 3) > 0.4),
                 torch.randint(0, 4, (6, 3))), forward_ad=False) for inc in (True, False)],
    *[C(f"index_reduce_prod_self{inc}", lambda x, s, i, inc=inc: x.index_reduce(1, i, s, "prod", include_self=inc),
        lambda: (rn(3, 4), rn(3, 6) * (torch.rand(3, 6) > 0.3), torch.randint(0, 4, (6,))), forward_ad=False)
      for inc in (True, False)],
    C("masked_index_put_accumulate",
      lambda x, m, i, v: torch.ops.aten._unsafe_masked_index_put_accumulate(x, m, [i], v),
      lambda: (rn(5, 3), torch.rand(6, 3) > 0.5, torch.randint(0, 5, (6,)), rn(6, 3))),
    *[C(f"segment_reduce_{red}", lambda x, red=red: torch.segment_reduce(x, red, lengths=_SEG_LENGTHS, axis=0,
                                                                         initial=0.5 if red in ("sum", "mean") else None),
        lambda: (torch.tensor([[1.0, 2.0], [1.0, 0.0], [3.0, 3.0], [0.0, -1.0], [2.5, 0.0], [2.5, 4.0]],
                              dtype=D) + 0.1 * rn(6, 2) * torch.tensor([[0.0], [0.0], [1.0], [1.0], [0.0], [0.0]]),),
        forward_ad=False) for red in ("sum", "mean", "max", "min", "prod")],  # ties and zeros in the data
    C("vector_norm_2", lambda x: torch.linalg.vector_norm(x, dim=1), lambda: (rn(3, 5),)),
    C("vector_norm_inf", lambda x: torch.linalg.vector_norm(x, float("inf"), dim=1), lambda: (rn(3, 5),)),
    C("vector_norm_neg_inf_ties", lambda x: torch.linalg.vector_norm(x, -float("inf"), dim=1, keepdim=True),
      lambda: (torch.tensor([[1.0, -2.0, 2.0], [3.0, 0.5, -0.5], [1.0, 1.0, 4.0]], dtype=D),)),  # ties average
    C("vector_norm_half_with_zeros", lambda x: torch.linalg.vector_norm(x * (x > 0), 0.5, dim=1),
      lambda: (rn(3, 5),)),
    C("vector_norm_negative_p", lambda x: torch.linalg.vector_norm(x, -1.5), lambda: (rn(3, 5),)),
    C("vector_norm_3_keepdim", lambda x: torch.linalg.vector_norm(x, 3, dim=(0, 1), keepdim=True), lambda: (rn(3, 5),)),
    C("vector_norm_zero_row", lambda x: torch.linalg.vector_norm(x * (torch.arange(3, dtype=D) > 0)[:, None], dim=1),
      lambda: (rn(3, 5),)),
    C("masked_fill_tensor_value", lambda x, m, y: x.masked_fill(m, y),
      lambda: (rn(3, 4), torch.rand(3, 4) > 0.5, rn(()))),
    C("fill_tensor_value", lambda x, y: torch.zeros(3, dtype=D).fill_(y) * x, lambda: (rn(3), rn(()))),
    C("add_scalar_overload", lambda x: torch.ops.aten.add.Scalar(x, 2.0) * x, X),
    C("sub_scalar_overload", lambda x: torch.ops.aten.sub.Scalar(x, 2.0) * x, X),
    C("to_float32_and_back", lambda x: (x.float() * 1.0).double(), lambda: (rn(3, 4),), written=True),
)


def _slice_assign(x, y):
    z = x * 1.0
    z[1:3] = y * 2
    return z


# ------------------------------------------------------------------ reductions
add(
    C("sum_all", torch.sum, X),
    C("sum_dim", lambda x: x.sum(1), lambda: (rn(3, 4, 2),)),
    C("sum_dims_keepdim", lambda x: x.sum((0, 2), keepdim=True), lambda: (rn(3, 4, 2),)),
    C("mean", lambda x: x.mean(), X),
    C("mean_dim", lambda x: x.mean(-1, keepdim=True), lambda: (rn(3, 4, 2),)),
    C("var_dim", lambda x: x.var(1), lambda: (rn(3, 5),)),
    C("var_unbiased_false", lambda x: x.var(0, unbiased=False), lambda: (rn(4, 5),)),
    C("var_all", lambda x: x.var(), lambda: (rn(3, 5),)),
    C("var_correction_keepdim", lambda x: torch.var(x, dim=(0, 2), correction=2, keepdim=True),
      lambda: (rn(3, 4, 5),)),
    C("std_dim", lambda x: x.std(1), lambda: (rn(3, 5),)),
    C("std_all", lambda x: x.std(), lambda: (rn(3, 5),)),
    C("std_biased", lambda x: x.std(-1, correction=0, keepdim=True), lambda: (rn(3, 5),)),
    C("var_mean", lambda x: torch.var_mean(x, dim=1), lambda: (rn(3, 5),)),
    C("std_mean", lambda x: torch.std_mean(x, dim=0, keepdim=True), lambda: (rn(4, 3),), written=False),
    C("cumsum", lambda x: torch.cumsum(x, 1), lambda: (rn(3, 5),)),
    C("cumsum_dim0", lambda x: torch.cumsum(x, 0), lambda: (rn(3, 5),)),
    C("max_dim", lambda x: x.max(1).values, lambda: (rn(3, 5),)),
    C("max_dim_keepdim", lambda x: x.max(0, keepdim=True)[0], lambda: (rn(3, 5),)),
    C("min_dim", lambda x: x.min(-1).values, lambda: (rn(3, 4, 5),)),
    C("max_dim_indices_out", lambda x: torch.max(x, 1), lambda: (rn(3, 5),)),
)

# ------------------------------------------------------------------ bilinear
add(
    C("mul", torch.mul, lambda: (rn(3, 4), rn(3, 4))),
    C("mul_broadcast", torch.mul, lambda: (rn(3, 1, 4), rn(2, 4))),
    C("mul_scalar", lambda x: x * 2.5, X),
    C("matmul_2d", torch.matmul, lambda: (rn(3, 4), rn(4, 5))),
    C("matmul_batched", torch.matmul, lambda: (rn(2, 3, 4), rn(2, 4, 5))),
    C("matmul_broadcast", torch.matmul, lambda: (rn(2, 1, 3, 4), rn(3, 4, 5))),
    C("matmul_3d_2d", torch.matmul, lambda: (rn(2, 3, 4), rn(4, 5))),
    C("matmul_vec_mat", torch.matmul, lambda: (rn(4), rn(2, 4, 5))),
    C("matmul_mat_vec", torch.matmul, lambda: (rn(3, 4), rn(4))),
    C("matmul_dot", torch.matmul, lambda: (rn(4), rn(4))),
    C("matmul_self", lambda x: x @ x.T, lambda: (rn(3, 4),)),
    C("bmm", torch.bmm, lambda: (rn(2, 3, 4), rn(2, 4, 5))),
    C("mm", torch.mm, lambda: (rn(3, 4), rn(4, 2))),
    C("mv", torch.mv, lambda: (rn(3, 4), rn(4))),
    C("dot", torch.dot, lambda: (rn(4), rn(4))),
    C("outer", torch.outer, lambda: (rn(3), rn(4))),
    C("einsum_bmm", lambda a, b: torch.einsum("bij,bjk->bik", a, b), lambda: (rn(2, 3, 4), rn(2, 4, 5))),
    C("einsum_contract", lambda a, b: torch.einsum("ij,kj->ik", a, b), lambda: (rn(3, 4), rn(2, 4))),
    C("einsum_rowdot", lambda a, b: torch.einsum("ij,ij->i", a, b), lambda: (rn(3, 4), rn(3, 4))),
    C("einsum_three", lambda a, b, c: torch.einsum("ij,jk,kl->il", a, b, c),
      lambda: (rn(2, 3), rn(3, 4), rn(4, 2))),
    C("einsum_attention", lambda q, k: torch.einsum("bhqd,bhkd->bhqk", q, k), lambda: (rn(2, 2, 3, 4), rn(2, 2, 5, 4))),
    C("baddbmm", torch.baddbmm, lambda: (rn(2, 3, 5), rn(2, 3, 4), rn(2, 4, 5))),
    C("baddbmm_alpha_beta", lambda c, a, b: torch.baddbmm(c, a, b, beta=0.5, alpha=2.0),
      lambda: (rn(3, 5), rn(2, 3, 4), rn(2, 4, 5))),
    C("addmm_alpha_beta", lambda c, a, b: torch.addmm(c, a, b, beta=0.3, alpha=1.7),
      lambda: (rn(5), rn(3, 4), rn(4, 5))),
    C("addmm", torch.addmm, lambda: (rn(3, 5), rn(3, 4), rn(4, 5))),
)

# ------------------------------------------------------------------ softmax family
add(
    C("softmax", lambda x: torch.softmax(x, -1), lambda: (rn(3, 5),)),
    C("softmax_dim0", lambda x: F.softmax(x, dim=0), lambda: (rn(3, 4, 2),)),
    C("log_softmax", lambda x: F.log_softmax(x, dim=-1), lambda: (rn(3, 5),)),
    C("log_softmax_dim1", lambda x: torch.log_softmax(x, 1), lambda: (rn(2, 4, 3),)),
    C("cross_entropy", lambda x, y: F.cross_entropy(x, y), lambda: (rn(4, 5), torch.tensor([0, 3, 4, 1])),
      written=False),
)


# ------------------------------------------------------------------ normalization
def _bn(cls, c, **kw):
    torch.manual_seed(7)
    m = cls(c, **kw).double()
    if getattr(m, "weight", None) is not None:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_()
    if getattr(m, "running_mean", None) is not None:
        with torch.no_grad():
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return m


def frozen_bn_reference(m):
    """BatchNorm with the batch mean and (biased) variance of ``x`` held constant (computed, detached)."""

    def ref_for(inputs):
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims).detach().view(shape)
        var = x.var(dims, unbiased=False).detach().view(shape)
        w = m.weight.detach().view(shape) if m.weight is not None else 1.0
        b = m.bias.detach().view(shape) if m.bias is not None else 0.0
        return lambda z: (z - mean) / torch.sqrt(var + m.eps) * w + b

    return ref_for


def eval_copy_reference(m):
    def ref_for(inputs):
        return copy.deepcopy(m).eval()

    return ref_for


BN2 = _bn(nn.BatchNorm2d, 3).train()
BN1 = _bn(nn.BatchNorm1d, 4).train()
BN1_3D = _bn(nn.BatchNorm1d, 3).train()
BN2_NOAFFINE = _bn(nn.BatchNorm2d, 3, affine=False).train()
BN2_NOSTATS = _bn(nn.BatchNorm2d, 3, track_running_stats=False).train()
BN3 = _bn(nn.BatchNorm3d, 2).train()
IN2 = _bn(nn.InstanceNorm2d, 3, affine=True).train()
IN2_STATS = _bn(nn.InstanceNorm2d, 3, affine=True, track_running_stats=True).train()
BN_INPUT = lambda: (rn(4, 3, 3, 3, scale=2.0) + 0.5,)  # noqa: E731

add(
    C("layer_norm", lambda x, w, b: F.layer_norm(x, (5,), w, b), lambda: (rn(2, 3, 5), pos(5), rn(5))),
    C("layer_norm_2dims", lambda x, w, b: F.layer_norm(x, (3, 4), w, b), lambda: (rn(2, 3, 4), pos(3, 4), rn(3, 4))),
    C("layer_norm_noaffine", lambda x: F.layer_norm(x, (4,)), lambda: (rn(3, 4),)),
    C("layer_norm_module", _bn(nn.LayerNorm, 6), lambda: (rn(2, 3, 6),)),
    C("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b), lambda: (rn(2, 4, 3, 3), pos(4), rn(4))),
    C("group_norm_noaffine_1d", lambda x: F.group_norm(x, 3), lambda: (rn(2, 6, 5),)),
    C("group_norm_module", _bn(nn.GroupNorm, 2, num_channels=4), lambda: (rn(3, 4, 2, 3),)),
    C("batch_norm2d_train", BN2, BN_INPUT),
    C("batch_norm1d_train", BN1, lambda: (rn(6, 4),)),
    C("batch_norm1d_3d_train", BN1_3D, lambda: (rn(4, 3, 5),)),
    C("batch_norm3d_train", BN3, lambda: (rn(2, 2, 2, 3, 2),)),
    C("batch_norm2d_train_noaffine", BN2_NOAFFINE, BN_INPUT),
    C("batch_norm2d_train_no_running_stats", BN2_NOSTATS, BN_INPUT),
    C("batch_norm_functional_train", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
      lambda: (rn(5, 3, 2), pos(3), rn(3))),
    C("batch_norm2d_frozen", BN2, BN_INPUT, bn="frozen", ref=frozen_bn_reference(BN2)),
    C("batch_norm1d_frozen", BN1, lambda: (rn(6, 4),), bn="frozen", ref=frozen_bn_reference(BN1)),
    C("batch_norm2d_bn_eval", BN2, BN_INPUT, bn="eval", ref=eval_copy_reference(BN2)),
    C("batch_norm2d_eval", copy.deepcopy(BN2).eval(), BN_INPUT),
    C("batch_norm1d_eval", copy.deepcopy(BN1).eval(), lambda: (rn(6, 4),)),
    C("batch_norm_functional_eval",
      lambda x, w, b: F.batch_norm(x, torch.zeros(3, dtype=D) + 0.3, torch.ones(3, dtype=D) * 1.7, w, b),
      lambda: (rn(5, 3, 2), pos(3), rn(3))),
    C("instance_norm", lambda x, w, b: F.instance_norm(x, weight=w, bias=b), lambda: (rn(2, 3, 4, 4), pos(3), rn(3))),
    C("instance_norm_module", IN2, lambda: (rn(2, 3, 4, 4),)),
    C("instance_norm_module_running_stats", IN2_STATS, lambda: (rn(2, 3, 4, 4),)),
    # InstanceNorm has no batch statistics: bn="frozen"/"eval" (which concern BatchNorm) must not change it
    C("instance_norm_bn_frozen", lambda x: F.instance_norm(x), lambda: (rn(2, 3, 4, 4),), bn="frozen",
      ref=lambda inputs: F.instance_norm),
    C("instance_norm_module_bn_eval", IN2_STATS, lambda: (rn(2, 3, 4, 4),), bn="eval",
      ref=lambda inputs: IN2_STATS),
    C("instance_norm_module_bn_frozen", IN2, lambda: (rn(2, 3, 4, 4),), bn="frozen",
      ref=lambda inputs: IN2),
    C("group_norm_bn_frozen", _bn(nn.GroupNorm, 1, num_channels=3), lambda: (rn(2, 3, 4, 4),), bn="frozen",
      ref=lambda inputs: _bn(nn.GroupNorm, 1, num_channels=3)),
)

# ------------------------------------------------------------------ attention
QKV = lambda: (rn(2, 2, 5, 4), rn(2, 2, 5, 4), rn(2, 2, 5, 4))  # noqa: E731
QKV_RECT = lambda: (rn(2, 2, 3, 4), rn(2, 2, 6, 4), rn(2, 2, 6, 3))  # noqa: E731
_SEG_LENGTHS = torch.tensor([2, 0, 3, 1])  # an empty segment too
_FLOAT_MASK = torch.randn(5, 5, dtype=D, generator=torch.Generator().manual_seed(3))
_QKV_CONSTANT = torch.randn(3, 2, 2, 5, 4, dtype=D, generator=torch.Generator().manual_seed(4)).unbind(0)
_BOOL_MASK = (torch.rand(5, 5, generator=torch.Generator().manual_seed(4)) > 0.4) | torch.eye(5, dtype=torch.bool)
add(
    C("sdpa", F.scaled_dot_product_attention, QKV),
    C("sdpa_rect", F.scaled_dot_product_attention, QKV_RECT, written=False),  # math path
    C("sdpa_causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), QKV),
    C("sdpa_causal_rect", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), QKV_RECT,
      written=False),
    C("sdpa_scale", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3), QKV),
    C("sdpa_float_mask_constant", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_FLOAT_MASK), QKV),
    C("sdpa_float_mask_input", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
      lambda: (*QKV(), rn(5, 5))),  # the mask's tangent reaches the written rule (tkwargs)
    C("sdpa_float_mask_input_only", lambda m: F.scaled_dot_product_attention(*_QKV_CONSTANT, attn_mask=m),
      lambda: (rn(5, 5),)),
    C("sdpa_bool_mask_constant", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_BOOL_MASK), QKV),
    C("sdpa_bool_mask_input", lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
      lambda: (*QKV(), _BOOL_MASK.clone())),
    C("sdpa_3d", F.scaled_dot_product_attention, lambda: (rn(2, 5, 4), rn(2, 5, 4), rn(2, 5, 4))),
)


def _mha(**kw):
    torch.manual_seed(11)
    return nn.MultiheadAttention(8, 2, batch_first=True, **kw).double()


MHA = _mha()
MHA_KV = _mha(kdim=6, vdim=5)
MHA_BIAS = _mha(add_bias_kv=True)
TOKENS = lambda: (rn(2, 4, 8),)  # noqa: E731
add(
    C("mha_self", lambda x: MHA(x, x, x), TOKENS),
    C("mha_self_no_weights", lambda x: MHA(x, x, x, need_weights=False)[0], TOKENS),
    C("mha_module_qkv", MHA, lambda: (rn(2, 3, 8), rn(2, 4, 8), rn(2, 4, 8))),
    C("mha_kdim_vdim", MHA_KV, lambda: (rn(2, 3, 8), rn(2, 4, 6), rn(2, 4, 5))),
    C("mha_causal_mask", lambda x: MHA(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(
        4, dtype=D), need_weights=False)[0], TOKENS),
    C("mha_key_padding_mask", lambda x, m: MHA(x, x, x, key_padding_mask=m)[0],
      lambda: (rn(2, 4, 8), torch.tensor([[False, False, True, False], [False, True, True, False]]))),
    C("mha_bias_kv", lambda x: MHA_BIAS(x, x, x)[0], TOKENS),
    C("mha_unbatched", lambda x: MHA(x, x, x, average_attn_weights=False), lambda: (rn(3, 8),)),
)

# ------------------------------------------------------------------ embedding, embedding_bag, grid_sample
BAG = lambda: (rn(7, 3), torch.tensor([1, 2, 4, 5, 4, 3, 2, 6]), torch.tensor([0, 3, 3, 6]))  # noqa: E731  (bag 1 empty)
BAG_NONEMPTY = lambda: (rn(7, 3), torch.tensor([1, 2, 4, 5, 4, 3, 2, 6]), torch.tensor([0, 3, 4, 6]))  # noqa: E731
add(
    C("embedding", lambda w, i: F.embedding(i, w), lambda: (rn(6, 3), torch.tensor([[0, 2, 5], [5, 5, 1]]))),
    C("embedding_bag_sum", lambda w, i, o: F.embedding_bag(i, w, o, mode="sum"), BAG),
    C("embedding_bag_mean", lambda w, i, o: F.embedding_bag(i, w, o, mode="mean"), BAG),
    C("embedding_bag_max", lambda w, i, o: F.embedding_bag(i, w, o, mode="max"), BAG_NONEMPTY),
    C("embedding_bag_max_empty_bag", lambda w, i, o: F.embedding_bag(i, w, o, mode="max"), BAG),
    C("embedding_bag_2d_input", lambda w, i: F.embedding_bag(i, w, mode="mean"),
      lambda: (rn(7, 3), torch.tensor([[0, 2, 5], [5, 5, 1]]))),
    C("embedding_bag_per_sample_weights",
      lambda w, i, o, p: F.embedding_bag(i, w, o, mode="sum", per_sample_weights=p),
      lambda: (*BAG(), rn(8))),
    C("embedding_bag_include_last_offset",
      lambda w, i, o: F.embedding_bag(i, w, o, mode="sum", include_last_offset=True),
      lambda: (rn(7, 3), torch.tensor([1, 2, 4, 5, 4, 3, 2, 6]), torch.tensor([0, 3, 5, 8]))),
)

GRID = lambda: (rn(2, 2, 4, 5), torch.rand(2, 3, 4, 2, dtype=D) * 2.2 - 1.1)  # noqa: E731
add(
    C("grid_sample_bilinear", lambda x, g: F.grid_sample(x, g, align_corners=False), GRID, written=False),
    C("grid_sample_bilinear_border_align", lambda x, g: F.grid_sample(
        x, g, padding_mode="border", align_corners=True), GRID, written=False),
    C("grid_sample_reflection", lambda x, g: F.grid_sample(x, g, padding_mode="reflection", align_corners=False),
      GRID, written=False),
    C("fmod", lambda x: torch.fmod(x, 1.7), lambda: (rn(3, 5, scale=3.0),), written=False),
    C("remainder", lambda x: torch.remainder(x, 1.7), lambda: (rn(3, 5, scale=3.0),), written=False),
    C("grid_sample_nearest", lambda x, g: F.grid_sample(x, g, mode="nearest", align_corners=False), GRID,
      written=False),
    C("grid_sample_bicubic", lambda x, g: F.grid_sample(x, g, mode="bicubic", align_corners=False), GRID,
      written=False),
)


# ------------------------------------------------------------------ composites of the above (losses, distances)
TGT = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D)
add(
    C("pairwise_distance", F.pairwise_distance, lambda: (rn(4, 3), rn(4, 3)), written=False),
    C("triplet_margin_loss", lambda a, p, n: F.triplet_margin_loss(a, p, n, reduction="none"),
      lambda: (rn(4, 3), rn(4, 3), rn(4, 3)), written=False),
    C("margin_ranking_loss_margin", lambda a, b: F.margin_ranking_loss(a, b, TGT, margin=0.5, reduction="none"),
      lambda: (rn(4), rn(4)), written=False),
    C("margin_ranking_loss_mean", lambda a, b: F.margin_ranking_loss(a, b, TGT), lambda: (rn(4), rn(4)),
      written=False),
    C("hinge_embedding_loss", lambda a: F.hinge_embedding_loss(a, TGT.expand(3, 4), reduction="none"),
      lambda: (rn(3, 4),), written=False),
    C("cosine_similarity", F.cosine_similarity, lambda: (rn(3, 4), rn(3, 4)), written=False),
    C("normalize", lambda x: F.normalize(x, dim=1), lambda: (rn(3, 4),), written=False),
    C("kl_div", lambda a, b: F.kl_div(F.log_softmax(a, 1), F.softmax(b, 1), reduction="batchmean"),
      lambda: (rn(3, 4), rn(3, 4)), written=False),
    C("mse_loss", F.mse_loss, lambda: (rn(3, 4), rn(3, 4)), written=False),
    C("smooth_l1_loss", F.smooth_l1_loss, lambda: (rn(3, 4), rn(3, 4)), written=False),
    C("nll_loss_of_softmax_log", lambda a: F.nll_loss(torch.log(F.softmax(a, 1)), torch.tensor([0, 3, 1])),
      lambda: (rn(3, 4),), written=False),
)


# ------------------------------------------------------------------ the test
def _how(f, inputs, bn):
    traced = jvpgraph.trace(f, *inputs, bn=bn)
    return traced.flipped.how


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_rule_matches_pytorch(case: Case):
    torch.manual_seed(0)
    inputs = case.build()
    tangents = random_tangents(inputs)
    out, jv = jvpgraph_jvp(case.f, inputs, tangents, bn=case.bn)

    ref_f = case.f if case.ref is None else case.ref(inputs)
    expected_out = ref_f(*inputs)
    assert_all_close(out, expected_out, "primal output", **F64)

    want = jac_times_v(ref_f, inputs, tangents)
    assert_all_close(jv, want, "Jv vs jacobian @ v", **F64)
    fj = func_jvp(ref_f, inputs, tangents) if case.forward_ad else None
    if fj is not None:
        assert_all_close(jv, fj, "Jv vs torch.func.jvp", **F64)
    if case.written:
        how = _how(case.f, inputs, case.bn)
        fallbacks = {k: h for k, h in how.items() if h in FALLBACK_KINDS}
        assert not fallbacks, f"expected written rules only, got fallbacks {fallbacks}"


@pytest.mark.parametrize("case", [c.param() for c in CASES if c.bn == "batch" and c.ref is None][::7])
def test_rule_adjoint_identity(case: Case):
    """A sample of the table: ``<u, J v> == <Jᵀ u, v>`` with the VJP from autograd."""
    torch.manual_seed(0)
    inputs = case.build()
    tangents = random_tangents(inputs)
    _, jv = jvpgraph_jvp(case.f, inputs, tangents)
    assert_adjoint(case.f, inputs, tangents, jv)


# ------------------------------------------------------------------ dropout
@pytest.mark.parametrize("p", [0.0, 0.3, 0.75])
def test_dropout_uses_the_forward_mask(p):
    x, v = torch.randn(6, 7, dtype=D), torch.randn(6, 7, dtype=D)
    f = lambda z: F.dropout(z, p, training=True)  # noqa: E731
    with seeded(123):
        out, jv = jvpgraph.jvp(f, (x,), (v,))
    kept = out != 0  # x has no zeros, so the mask is where the output is nonzero
    if p > 0:
        assert 0 < kept.sum() < kept.numel()
    # J is diag(mask / (1-p)): the tangent is v through the same mask, with the same scaling as x
    torch.testing.assert_close(jv, torch.where(kept, v * (out / x), torch.zeros_like(v)), rtol=1e-12, atol=0)
    # and the same as PyTorch's double-backward jvp under the same seed (same mask)
    with seeded(123):
        ref_out, ref = torch.autograd.functional.jvp(f, x, v)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(jv, ref, **F64)


def test_dropout_module_in_network_with_seed():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.4), nn.Linear(8, 3)).double().train()
    x, v = torch.randn(4, 5, dtype=D), torch.randn(4, 5, dtype=D)
    with seeded(77):
        out, jv = jvpgraph.jvp(net, (x,), (v,))
    with seeded(77):
        ref_out, ref = torch.autograd.functional.jvp(net, x, v)
    with seeded(77):
        fj = torch.func.jvp(net, (x,), (v,))[1]
    torch.testing.assert_close(out, ref_out, **F64)
    torch.testing.assert_close(jv, ref, **F64)
    torch.testing.assert_close(jv, fj, **F64)


def test_dropout_eval_is_identity():
    net = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2)).double().eval()
    x, v = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    _, jv = jvpgraph.jvp(net, (x,), (v,))
    torch.testing.assert_close(jv, v @ net[1].weight.T, **F64)


def test_frozen_bn_differs_from_batch_bn():
    """Sanity check that the two BatchNorm modes really are different maps (the tests above can fail)."""
    x, v = BN_INPUT()[0], torch.randn(4, 3, 3, 3, dtype=D)
    _, jv_batch = jvpgraph.jvp(BN2, (x,), (v,), bn="batch")
    _, jv_frozen = jvpgraph.jvp(BN2, (x,), (v,), bn="frozen")
    assert (jv_batch - jv_frozen).abs().max() > 1e-3


def test_embedding_padding_idx_matches_forward_ad():
    """``padding_idx`` only zeroes the *gradient*; the function's derivative (forward AD, finite differences)
    is the ordinary row lookup, which is what jvpgraph returns."""
    w, i = torch.randn(5, 3, dtype=D), torch.tensor([0, 2, 0, 4])
    f = lambda w: F.embedding(i, w, padding_idx=0)  # noqa: E731
    t = torch.randn_like(w)
    _, jv = jvpgraph.jvp(f, (w,), (t,))
    torch.testing.assert_close(jv, torch.func.jvp(f, (w,), (t,))[1], **F64)
    torch.testing.assert_close(jv, t[i], **F64)


def test_sdpa_dropout_shares_the_forward_mask():
    """Attention dropout is random: Jv must use the mask of the returned output (same seed references)."""
    q, v = torch.randn(2, 2, 5, 4, dtype=D), torch.randn(2, 2, 5, 4, dtype=D)
    f = lambda z: F.scaled_dot_product_attention(z, z, z, dropout_p=0.3)  # noqa: E731
    with seeded(3):
        out, jv = jvpgraph.jvp(f, (q,), (v,))
    with seeded(3):
        ref_out, ref = torch.autograd.functional.jvp(f, q, v)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(jv, ref, **F64)
    eps = 1e-6
    with seeded(3):
        plus = f(q + eps * v)
    with seeded(3):
        minus = f(q - eps * v)
    torch.testing.assert_close(jv, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("is_causal", [False, True])
def test_flash_attention_logsumexp_output_has_its_tangent(is_causal):
    """The CPU flash kernel also returns the row-wise logsumexp; its tangent is softmax . ds, not zero."""
    aten = torch.ops.aten
    g = torch.Generator().manual_seed(0)
    xs = tuple(torch.randn(2, 3, n, 8, dtype=torch.float64, generator=g) for n in (4, 6, 6))
    vs = tuple(torch.randn(x.shape, dtype=torch.float64, generator=g) for x in xs)

    def f(q, k, v):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=is_causal)[:2]
        return out, lse

    _, (t_out, t_lse) = jvpgraph.jvp(f, xs, vs)
    eps = 1e-6
    plus = f(*(x + eps * v for x, v in zip(xs, vs)))
    minus = f(*(x - eps * v for x, v in zip(xs, vs)))
    fd = [(p - m) / (2 * eps) for p, m in zip(plus, minus)]
    assert t_lse.abs().max() > 0.1
    assert_all_close([t_out, t_lse], fd, rtol=1e-6, atol=1e-8)


def _central_differences(f, xs, vs, eps=1e-6):
    plus = f(*(x + eps * v for x, v in zip(xs, vs)))
    minus = f(*(x - eps * v for x, v in zip(xs, vs)))
    return (plus - minus) / (2 * eps)


# PyTorch has no derivative at all for the legacy scatter(..., reduce=...) nor a right reverse-mode Jacobian for
# as_strided_scatter with a storage offset (autograd.functional.jacobian disagrees with finite differences):
# finite differences are the reference
FD_ONLY = [
    ("scatter_legacy_multiply", lambda x, s: x.scatter(1, IDX34, s, reduce="multiply"),
     lambda: (rn(3, 5), rn(3, 6) * (torch.rand(3, 6) > 0.3))),
    ("scatter_legacy_add", lambda x, s: x.scatter(1, IDX34, s, reduce="add"), lambda: (rn(3, 5), rn(3, 6))),
    ("scatter_value_multiply", lambda x: x.scatter(1, IDX34, 2.5, reduce="multiply"), lambda: (rn(3, 5),)),
    ("scatter_value_add", lambda x: x.scatter(1, IDX34, 2.5, reduce="add"), lambda: (rn(3, 5),)),
    ("as_strided_scatter_offset", lambda x, s: torch.as_strided_scatter(x, s, (2, 2), (1, 2), 1),
     lambda: (rn(3, 3), rn(2, 2))),
]
IDX34 = torch.tensor([[0, 1, 1, 4], [2, 2, 2, 0], [3, 1, 0, 4]])


@pytest.mark.parametrize("name,f,build", FD_ONLY, ids=[c[0] for c in FD_ONLY])
def test_rule_matches_finite_differences(name, f, build):
    torch.manual_seed(0)
    xs = build()
    vs = tuple(torch.randn_like(x) for x in xs)
    _, jv = jvpgraph.jvp(f, xs, vs)
    torch.testing.assert_close(jv, _central_differences(f, xs, vs), rtol=1e-6, atol=1e-8)
    assert all(h not in FALLBACK_KINDS for h in _how(f, xs, "batch").values())


def test_logcumsumexp_is_accurate_over_a_wide_range():
    """x spanning ±1e4: the tangent sum_{j<=i} exp(x_j - y_i) t_j against the same sum in long double (PyTorch's
    own forward AD is off by ~1e-6 relative here; finite differences cannot resolve it)."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g) * 1e4
    x[0] = torch.tensor([0.0, -1e4, 3.0, 1e4, 2.0, 1e4 - 1.0])
    v = torch.randn(4, 6, dtype=torch.float64, generator=g)
    _, jv = jvpgraph.jvp(lambda a: torch.logcumsumexp(a, 1), (x,), (v,))
    X, V = x.numpy().astype(np.longdouble), v.numpy().astype(np.longdouble)
    want = np.zeros_like(X)
    for i in range(X.shape[1]):
        w = np.exp(X[:, : i + 1] - X[:, : i + 1].max(1, keepdims=True))
        want[:, i] = (w * V[:, : i + 1]).sum(1) / w.sum(1)
    torch.testing.assert_close(jv, torch.from_numpy(want.astype(np.float64)), rtol=1e-11, atol=1e-12)


def test_embedding_max_norm_follows_autograd_and_leaves_the_weight():
    """F.embedding(max_norm=...) renormalizes rows of the weight in place, under no_grad: the output uses the
    renormalized rows while the tangent passes as if unchanged (torch.func.jvp agrees); jvpgraph warns that it
    does not write the renormalized rows back into the caller's weight, and does not."""
    idx = torch.tensor([[0, 2], [1, 2]])
    w = torch.randn(4, 3, dtype=D) * 3
    v = torch.randn_like(w)
    f = lambda weight: F.embedding(idx, weight, max_norm=1.0)  # noqa: E731
    before = w.clone()
    with pytest.warns(UserWarning, match="writes in place into its parameters or inputs"):
        out, jv = jvpgraph.jvp(f, (w,), (v,))
    assert torch.equal(w, before)
    ref_out, ref = torch.func.jvp(f, (w.clone(),), (v,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(jv, ref)


LSTSQ = [("gels", (5, 3), (5, 2)), ("gelsy", (3, 5), (3, 2)), ("gelsd", (2, 5, 3), (2, 5, 2)),
         ("gelss", (1, 6, 4), (3, 6, 2)), ("gelsd", (5, 3), (5,)), ("gelss", (4, 4), (4, 1))]


@pytest.mark.parametrize("driver,a_shape,b_shape", LSTSQ, ids=[f"{d}-{a}-{b}" for d, a, b in LSTSQ])
def test_lstsq_every_output_matches_finite_differences(driver, a_shape, b_shape):
    """All four outputs of linalg.lstsq against central differences, by the written rule: the singular values
    (gelsd, gelss) too, which PyTorch declares non-differentiable — its zero tangent is not the derivative;
    the residuals (tall A) and the solution for tall, wide, batched, broadcast and vector right-hand sides.
    Then the gradient of <u, Jv> in A (what a Jacobian penalty trains with) against differences of Jv."""
    torch.manual_seed(0)
    f = lambda a, b: tuple(torch.linalg.lstsq(a, b, driver=driver))  # noqa: E731
    A, B = rn(*a_shape), rn(*b_shape)
    dA, dB = torch.randn_like(A), torch.randn_like(B)
    _, jv = jvpgraph.jvp(f, (A, B), (dA, dB))
    eps = 1e-6
    plus, minus = f(A + eps * dA, B + eps * dB), f(A - eps * dA, B - eps * dB)
    checked = 0
    for i in (0, 1, 3):  # rank (2) is an integer
        if plus[i].numel():
            torch.testing.assert_close(jv[i], (plus[i] - minus[i]) / (2 * eps), rtol=1e-6, atol=1e-8)
            checked += 1
    assert checked == 1 + (driver != "gelsy" and a_shape[-2] > a_shape[-1]) + (driver in ("gelsd", "gelss"))
    if driver in ("gelsd", "gelss"):
        assert jv[3].abs().max() > 0.1  # not the zero PyTorch declares
    assert all(h not in FALLBACK_KINDS for h in _how(f, (A, B), "batch").values())

    u = torch.randn_like(jv[0])
    s = lambda a: (u * jvpgraph.jvp(f, (a, B), (dA, dB))[1][0]).sum()  # noqa: E731
    a = A.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(s(a), a)
    w = torch.randn_like(A)
    eps = 1e-5
    torch.testing.assert_close((g * w).sum(), (s(A + eps * w) - s(A - eps * w)) / (2 * eps), rtol=1e-6, atol=1e-8)


@torch.library.custom_op("jvpgraph_test::softclip", mutates_args=())
def _softclip(x: torch.Tensor) -> torch.Tensor:
    return 2 * torch.tanh(x)


@_softclip.register_fake
def _(x):
    return torch.empty_like(x)


def _softclip_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


_softclip.register_autograd(lambda ctx, g: g * (2 - ctx.saved_tensors[0] ** 2 / 2), setup_context=_softclip_setup)


@pytest.mark.parametrize("detach", [False, True])
def test_a_written_rules_own_derivative_is_the_second_derivative(detach):
    """Autograd through the emitted graph differentiates a written rule whole: the gradient of ⟨u, Jv⟩ is the
XX, and a ``.detach()`` in the rule is
    traced as an alias (docs/howto/verify-custom-op.md), so it does not hold ``out`` constant."""
    from jvpgraph.rules import RULES, defjvp

    op = torch.ops.jvpgraph_test.softclip.default
    hold = (lambda o: o.detach()) if detach else (lambda o: o)
    defjvp(op, lambda t, out, x: (2 - hold(out) * hold(out) / 2) * t)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        v, u = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
        _, jv = jvpgraph.jvp(_softclip, (x,), (v,))
        torch.testing.assert_close(jv, 2 * (1 - torch.tanh(x) ** 2) * v)
        got = torch.autograd.grad((u * jv).sum(), x)[0]
        th = torch.tanh(x.detach())
        torch.testing.assert_close(got, u * v * (-4 * th * (1 - th ** 2)), rtol=1e-12, atol=1e-14)
    finally:
        RULES.pop(op)
