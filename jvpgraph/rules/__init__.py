"""Local Jacobian rules: one registry (:mod:`.registry`), the written rules (:mod:`.core`), and the
theorem-per-node fallback (:mod:`.fallback`)."""

from . import core as _core  # noqa: F401  (registers the written rules)
from . import opaque as _opaque  # noqa: F401
from .fallback import FALLBACK_KINDS, RuleError, node_jvp
from .registry import EDGE_KINDS, RULES, Rule, deflinear, defjvp, defrule, lookup

__all__ = ["EDGE_KINDS", "FALLBACK_KINDS", "RULES", "Rule", "RuleError", "deflinear", "defjvp", "defrule",
           "lookup", "node_jvp"]
