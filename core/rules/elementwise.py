"""Elementwise and broadcasting ops: pointwise ops (any op with torch's `pointwise` tag falls back to
`pointwise`), dropout, copies, casts, softmax, `where`, `*_like`, masked fills, in-place activations.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..builder import RuleGraph
from ._args import _broadcast, _outs, _same, _shape, _tensor_inputs, _val
from .registry import rule

aten = torch.ops.aten


_SUMS = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor}


def pointwise(g: RuleGraph, node: Node):
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return NotImplemented
    inputs = _tensor_inputs(node)
    out = _broadcast(g, node, inputs, tuple(v.shape))
    if node.target in _SUMS and len(inputs) == 2:
        # a skip connection (x + f(x)): the dims both operands carry at full size
        shape = tuple(v.shape)
        sa, sb = _shape(inputs[0]), _shape(inputs[1])
        for i in range(1, min(len(sa), len(sb)) + 1):
            if _same(sa[-i], shape[-i]) and _same(sb[-i], shape[-i]):
                g.builder.residual_slots.add(out[-i])
    return out


@rule(aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
      aten.detach.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
      aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
      aten.native_dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
      aten.lift_fresh_copy.default, aten.type_as.default, aten.where.self, aten.where.ScalarOther,
      aten.where.ScalarSelf, aten.where.Scalar, aten.zeros_like.default, aten.ones_like.default,
      aten.full_like.default, aten.empty_like.default, aten.fill.Scalar, aten.fill_.Scalar, aten.masked_fill.Scalar,
      aten.masked_fill.Tensor, aten.hardtanh_.default, aten.relu_.default, aten.silu_.default,
      aten.hardswish_.default, aten.hardsigmoid_.default, aten.leaky_relu_.default)
def same_shape(g: RuleGraph, node: Node):
    outs = _outs(node)
    main = _tensor_inputs(node)
    if node.target is aten.native_dropout.default:
        s = _broadcast(g, node, main[:1], _shape(node.args[0]))
        return [s, list(s)]
    return _broadcast(g, node, main, tuple(outs[0].shape))
