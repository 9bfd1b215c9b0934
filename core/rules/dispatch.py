"""`apply_rule`: the one entry the graph calls for each op node; finds the op's rule (or the pointwise
fallback), runs it and freezes every input and output dim the rule did not account for.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ..builder import RuleGraph
from ._args import _op_name, _out_tensors, _tensor_inputs, _val
from .elementwise import pointwise
from .registry import lookup


def apply_rule(g: RuleGraph, node: Node):
    """The slots of `node`'s output(s), its couplings made (see the module docstring)."""
    b = g.builder
    outs = _out_tensors(node)
    ins = _tensor_inputs(node)
    if outs is None and node.target is not operator.getitem:
        # ops producing no tensor (sym_size, asserts): nothing to couple
        return None
    fn = lookup(node.target)
    if fn is None and _is_pointwise(node.target):
        fn = pointwise
    result = None
    if fn is not None:
        result = fn(g, node)
    if fn is None or result is NotImplemented:
        g.frozen_ops[_op_name(node.target)] += 1
        result = None
    if result is None and outs is not None:
        # no rule: fresh slots for the outputs, everything frozen below
        result = [b.new_like(t.shape) if t is not None else [] for t in outs]
        if isinstance(_val(node), torch.Tensor):
            result = result[0]
    # freeze whatever the rule did not account for
    for a in ins:
        for s in g.slots_of(a) or []:
            if s not in b.handled:
                b.freeze(s)
    flat = result if (not result or not isinstance(result[0], list)) else [s for r in result for s in r]
    for s in flat or []:
        if s not in b.handled:
            b.freeze(s)
    return result


def _is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
