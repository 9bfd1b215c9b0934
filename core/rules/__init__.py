"""One rule per aten op family: how the dims of an op's inputs map to the dims of its output.

A rule receives the graph being built (`builder.RuleGraph`) and the FX node, couples slots through the
Builder and returns the output's slots (a list per output for ops returning tuples). Any dim of an input or
output tensor that a rule does not mention is frozen afterwards, so a rule can only be too cautious, never
silently wrong. An op with no rule freezes all its dims and is listed in the report (`frozen_ops`).

Rules that carry shape literals (view sizes, split sizes, conv groups, norm shapes) register a rewrite that
recomputes the literal from the pruned slot sizes.

Layout: `registry` (op -> rule; a second rule for an op is refused), `_args` (the helpers the families share),
`dispatch` (`apply_rule`, which the graph calls for every op node), and one module per op family. Importing
this package imports every family, which registers every rule.
"""

from __future__ import annotations

from ..builder import Kept
from . import (  # noqa: F401  (each family registers its rules on import)
    attention,
    conv,
    creation,
    elementwise,
    indexing,
    layout,
    linalg,
    norm,
    recurrent,
    reduction,
    spatial,
)
from ._args import _op_name as _op_name  # with `_is_pointwise`: for benchmarks/probe_zoo_seq.py
from .dispatch import _is_pointwise as _is_pointwise
from .dispatch import apply_rule
from .elementwise import pointwise
from .registry import RULES, DuplicateRuleError, lookup, rule

__all__ = ["RULES", "DuplicateRuleError", "Kept", "apply_rule", "lookup", "pointwise", "rule"]
