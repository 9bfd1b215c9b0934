"""The rule registry refuses a second rule for an op (at registration, naming the op and both functions), and
importing the rules package registers every family's rules."""

from __future__ import annotations

import pytest
import torch

from prunery.core import rules
from prunery.core.rules import RULES, DuplicateRuleError, rule
from prunery.core.rules.conv import conv

aten = torch.ops.aten


def _another(g, node):  # a rule that would replace an existing one
    return NotImplemented


def test_a_second_rule_for_an_op_is_refused_naming_the_op_and_both_functions() -> None:
    with pytest.raises(DuplicateRuleError) as info:
        rule(aten.conv2d.default)(_another)
    message = str(info.value)
    assert "aten.conv2d.default" in message
    assert "prunery.core.rules.conv.conv" in message
    assert f"{__name__}._another" in message
    assert RULES[aten.conv2d.default] is conv  # the first stays


def test_a_refused_registration_registers_none_of_its_ops() -> None:
    new_op = object()  # stands for an op with no rule yet
    with pytest.raises(DuplicateRuleError):
        rule(new_op, aten.linear.default)(_another)
    assert new_op not in RULES
    with pytest.raises(DuplicateRuleError, match="duplicate rule for"):
        rule(new_op, new_op)(_another)  # one op listed twice
    assert new_op not in RULES


def test_a_rule_for_a_new_op_registers() -> None:
    new_op = object()
    try:
        assert rule(new_op)(_another) is _another
        assert RULES[new_op] is _another
        assert rules.lookup(new_op) is _another
    finally:
        del RULES[new_op]


def test_importing_the_package_registers_every_family() -> None:
    families = {fn.__module__ for fn in RULES.values()}
    assert families == {f"prunery.core.rules.{m}" for m in (
        "attention", "conv", "creation", "elementwise", "indexing", "layout", "linalg", "norm", "recurrent",
        "reduction", "spatial")}
    assert rules.lookup(aten.lstm.input).__name__ == "rnn"
    assert rules.lookup(aten.zeros.default).__name__ == "creation"
    assert rules.lookup(aten.add.Tensor) is None  # pointwise ops fall back to `pointwise` in apply_rule
