"""Reductions (mean, sum, max, var, norms, ...) over some dims, kept or dropped.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..builder import RuleGraph
from ._args import _arg, _op_args, _op_name, _outs, _shape, _val
from .registry import rule

aten = torch.ops.aten


@rule(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
      aten.std.correction, aten.var.dim, aten.std.dim, aten.logsumexp.default, aten.norm.ScalarOpt_dim,
      aten.linalg_vector_norm.default, aten.mean.default, aten.sum.default, aten.max.dim, aten.min.dim,
      aten.argmax.default, aten.argmin.default, aten.prod.dim_int)
def reduction(g: RuleGraph, node: Node):
    b = g.builder
    x = node.args[0]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    nd = len(xs)
    name = _op_name(node.target)
    if node.target in (aten.mean.default, aten.sum.default):
        dims, keep = list(range(nd)), False
    elif node.target in (aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim):
        dims, keep = _arg(node, 2, "dim"), bool(_arg(node, 3, "keepdim", False))
    elif "correction" in name or node.target is aten.var.dim or node.target is aten.std.dim:
        dims, keep = _arg(node, 1, "dim"), bool(node.kwargs.get("keepdim", node.args[3] if len(node.args) > 3
                                                                else False))
    else:
        dims, keep = _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False))
    if dims is None or dims == []:
        dims = list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    reduced = {d % nd for d in dims} if nd else set()
    out_shape = _shape(node) if isinstance(_val(node), torch.Tensor) else tuple(_outs(node)[0].shape)
    out: list[int] = []
    j = 0
    for i, s in enumerate(xs):
        if i in reduced:
            b.handled.add(s)  # values change, shapes do not: the reduced dim may be pruned
            if keep:
                out.append(b.new(out_shape[j]))
                j += 1
        else:
            out.append(s)
            b.handled.add(s)
            j += 1
    if keep and _is_norm_statistic(node, x):
        b.norm_slots.update(xs[d] for d in reduced)
    if node.target in (aten.max.dim, aten.min.dim):
        return [out, list(out)]
    return out


def _is_norm_statistic(node: Node, x) -> bool:
    """A normalisation written out by hand: the variance, or the mean of squares (RMSNorm), kept for broadcasting."""
    if node.target in (aten.var.correction, aten.var.dim):
        return True
    if node.target is not aten.mean.dim or not isinstance(x, Node):
        return False
    if x.target is aten.pow.Tensor_Scalar:
        return _op_args(x)[1] == 2
    return x.target is aten.mul.Tensor and len(x.args) == 2 and x.args[0] is x.args[1]
