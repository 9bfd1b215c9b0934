"""The rule registry: op -> the one rule that handles it.

`@rule(op, ...)` registers a rule for aten op overloads (or a whole overload packet, or `operator.getitem`).
An op has one rule: registering a second one for the same op raises `DuplicateRuleError` at import time, naming
the op and both functions (as `torch._decomp.register_decomposition` refuses), instead of silently replacing
the first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

# A rule gets the graph being built (`builder.RuleGraph`) and the FX node; it returns the output's slots (a list
# per output for ops returning several), None for an op producing no tensor, or NotImplemented to freeze the op.
Rule = Callable[..., Any]
R = TypeVar("R", bound=Rule)

RULES: dict[object, Rule] = {}


class DuplicateRuleError(RuntimeError):
    """A rule is registered for an op that already has one."""


def _qualname(fn: Rule) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _op_label(op: object) -> str:
    return str(op) if hasattr(op, "_schema") or hasattr(op, "_qualified_op_name") else getattr(op, "__name__", str(op))


def rule(*ops: object) -> Callable[[R], R]:
    """Register the decorated function as the rule of every op in `ops`; none of them may have one already
    (nothing is registered when one has)."""

    def deco(fn: R) -> R:
        seen: set[object] = set()
        for op in ops:
            if op in RULES or op in seen:
                other = RULES.get(op, fn)
                raise DuplicateRuleError(f"duplicate rule for {_op_label(op)}: {_qualname(other)} is registered, "
                                         f"{_qualname(fn)} would replace it")
            seen.add(op)
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


def lookup(target: object) -> Rule | None:
    """The rule of an op: of its overload, else of its overload packet; None when it has none."""
    return RULES.get(target) or RULES.get(getattr(target, "overloadpacket", None))
