"""jvpgraph: Jv for any PyTorch model by flipping its reverse-mode graph (Appendix C of "Exact Spectral
Norm Regularization for Neural Networks").

Example:
    >>> import torch, torch.nn as nn, jvpgraph
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    >>> x, v = torch.randn(5, 3), torch.randn(5, 3)
    >>> out, jv = jvpgraph.jvp(net, (x,), (v,))
    >>> torch.testing.assert_close(jv, torch.func.jvp(net, (x,), (v,))[1])
"""

import warnings as _warnings

import torch as _torch

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it (setuptools dynamic)

# The torch releases the whole test suite passed on (2.11.0, 2.14.1: CI's, 2.15.0). pyproject.toml admits
# >=2.11,<2.16, so 2.12 and 2.13 install too: they lie in that range but the suite has not been run on them.
TESTED_TORCH = ((2, 11), (2, 14), (2, 15))
SUPPORTED_TORCH = ((2, 11), (2, 16))  # [low, high): pyproject.toml's torch range


def _untested_torch(version: str) -> str | None:
    """The warning importing jvpgraph gives under torch ``version``; None for a tested release.

    Example:
        >>> _untested_torch("2.14.1+cu130") is None, _untested_torch("2.16.0.dev20270101")[:47]
        (True, 'jvpgraph is tested on torch 2.11, 2.14 and 2.15')
    """
    major, minor = version.split("+")[0].split(".")[:2]
    release = int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    if release in TESTED_TORCH:
        return None
    tested = ", ".join(f"{a}.{b}" for a, b in TESTED_TORCH[:-1]) + f" and {'.'.join(map(str, TESTED_TORCH[-1]))}"
    where = ("inside the range jvpgraph admits (>=2.11,<2.16) but untested" if SUPPORTED_TORCH[0] <= release
             < SUPPORTED_TORCH[1] else "outside the range jvpgraph admits (>=2.11,<2.16)")
    return (f"jvpgraph is tested on torch {tested}; torch {version} is {where}: run `jvpgraph verify` on your "
            "model (or the test suite) before trusting its Jv")


if (_msg := _untested_torch(str(_torch.__version__))) is not None:
    _warnings.warn(_msg, stacklevel=2)  # once: at the first import

from .api import Linearized, Traced, cached_trace, explain, jvp, linearize, trace, vjp
from . import draw as _draw  # noqa: F401  (adds Graph.draw)
from .flip import FlippedGraph
from .graph import Graph
from .hessian import Curvature, hvp
from .regularizers import FrobeniusRegularizer, Regularized, SpectralBoundRegularizer, SpectralRegularizer
from .rules import RuleError
from .spectral import SpectralNorm, spectral_norm
from .trace import TraceError
from .verify import VerifyReport, verify

__all__ = ["trace", "cached_trace", "jvp", "vjp", "linearize", "explain", "Traced", "Linearized", "Graph", "FlippedGraph", "TraceError",
           "RuleError", "verify", "VerifyReport", "spectral_norm", "SpectralNorm", "SpectralRegularizer",
           "FrobeniusRegularizer", "SpectralBoundRegularizer", "Regularized",
           "hvp", "Curvature"]
