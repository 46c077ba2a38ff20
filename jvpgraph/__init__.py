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

_TESTED = ((2, 11), (2, 14))  # the test suite passes on torch 2.11.0 and 2.14.1
if tuple(int(p) for p in _torch.__version__.split("+")[0].split(".")[:2]) not in _TESTED:
    _warnings.warn(f"jvpgraph is tested on torch 2.14 and 2.11, not on {_torch.__version__}: run "
                   "`jvpgraph verify` on your model (or the test suite) before trusting its Jv", stacklevel=2)

from .api import Linearized, Traced, explain, jvp, linearize, trace, vjp
from .flip import FlippedGraph
from .graph import Graph
from .regularizers import FrobeniusRegularizer, Regularized, SpectralBoundRegularizer, SpectralRegularizer
from .rules import RuleError
from .spectral import SpectralNorm, spectral_norm
from .trace import TraceError
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = ["trace", "jvp", "vjp", "linearize", "explain", "Traced", "Linearized", "Graph", "FlippedGraph", "TraceError",
           "RuleError", "verify", "VerifyReport", "spectral_norm", "SpectralNorm", "SpectralRegularizer",
           "FrobeniusRegularizer", "SpectralBoundRegularizer", "Regularized"]
