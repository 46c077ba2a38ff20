"""The rule for a user ``torch.autograd.Function`` kept opaque by tracing (``jvpgraph::autograd_function``).

If the Function defines ``jvp``, that formula is used (through forward-mode dual tensors); otherwise its
``backward`` is flipped (the theorem on this one node), so the Jv is consistent with the backward the user
wrote — a straight-through estimator gets the straight-through tangent, not zero.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from ..ops import OPAQUE, flat_outputs, orig_apply
from .fallback import _via_flipped_vjp
from .registry import defrule

_OP = torch.ops.jvpgraph.autograd_function.default


def _defines_jvp(cls) -> bool:
    return getattr(cls, "jvp", None) is not torch.autograd.Function.jvp


def _opaque_rule(tangents, out, inputs, key):
    cls, rebuild = OPAQUE[key]
    tin = tangents[0] if tangents and tangents[0] is not None else [None] * len(inputs)
    if _defines_jvp(cls):
        with fwAD.dual_level():
            duals = [x if t is None else fwAD.make_dual(x, t) for x, t in zip(inputs, tin)]
            outs = flat_outputs(orig_apply(cls, *rebuild(duals)))
            return [fwAD.unpack_dual(o).tangent for o in outs]
    try:
        return _via_flipped_vjp(_OP, (tin, None), {}, out, (inputs, key), {})
    except RuntimeError as e:  # a backward autograd cannot differentiate (out= ops, in-place on saved tensors)
        raise NotImplementedError(
            f"{cls.__module__}.{cls.__qualname__}: jvpgraph flips a Function's backward, and this backward is not "
            f"differentiable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); give the Function a jvp "
            "staticmethod, or compute that part with ordinary torch ops") from e


defrule(_OP, _opaque_rule, "opaque")
