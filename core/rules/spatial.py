"""Spatial ops keeping (batch, channel): pooling, resampling, padding.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..builder import RuleGraph
from ._args import _op_args, _op_name, _outs, _shape, _val
from .registry import rule

aten = torch.ops.aten


@rule(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
      aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
      aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
      aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default,
      aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default,
      aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
      aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
      aten.upsample_bilinear2d.vec, aten.upsample_linear1d.vec, aten.upsample_trilinear3d.vec,
      aten.upsample_bicubic2d.vec, aten.upsample_nearest2d.default, aten.upsample_bilinear2d.default)
def spatial(g: RuleGraph, node: Node):
    """(N, C, *spatial) -> (N, C, *spatial'); unbatched (C, *spatial) too: the leading dims carry over."""
    b = g.builder
    x = node.args[0]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    outs = _outs(node)
    n_spatial = {"1d": 1, "2d": 2, "3d": 3}
    name = _op_name(node.target)
    k = next((v for key, v in n_spatial.items() if key in name), 2)
    lead = len(xs) - k
    res = []
    for t in outs:
        sl = list(xs[:lead]) + [b.new(s) for s in t.shape[lead:]]
        b.handled.update(xs[:lead])
        res.append(sl)
    return res[0] if len(outs) == 1 and isinstance(_val(node), torch.Tensor) else res


@rule(aten.constant_pad_nd.default, aten.pad.default, aten.reflection_pad1d.default,
      aten.reflection_pad2d.default, aten.replication_pad2d.default, aten.reflection_pad3d.default)
def pad(g: RuleGraph, node: Node):
    b = g.builder
    args = _op_args(node)
    x, p = args[0], args[1]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    n_padded = len(p) // 2
    out = []
    for i, s in enumerate(xs):
        from_last = len(xs) - 1 - i
        if from_last < n_padded and (p[2 * from_last] != 0 or p[2 * from_last + 1] != 0):
            out.append(b.new(_shape(node)[i]))
        else:
            out.append(s)
            b.handled.add(s)
    return out
