"""Convolutions, plain, grouped, depthwise and transposed, in every dimensionality.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from ..builder import Builder, CallSite, Kept, RuleGraph
from ._args import _arg, _set_arg, _shape
from .registry import rule

aten = torch.ops.aten


_CONV: dict[object, tuple[bool | None, int]] = {  # op -> (transposed, index of groups arg)
    aten.conv1d.default: (False, 6), aten.conv2d.default: (False, 6), aten.conv3d.default: (False, 6),
    aten.conv1d.padding: (False, 6), aten.conv2d.padding: (False, 6), aten.conv3d.padding: (False, 6),
    aten.conv_transpose1d.default: (True, 6), aten.conv_transpose2d.input: (True, 6),
    aten.conv_transpose3d.input: (True, 6), aten.convolution.default: (None, 8),
}


@rule(*_CONV)
def conv(g: RuleGraph, node: Node):
    b = g.builder
    transposed, gi = _CONV[node.target]
    if transposed is None:
        transposed = bool(node.args[6])
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias")
    groups = _arg(node, gi, "groups", 1)
    xs, ws = g.slots_of(x), g.slots_of(w)
    if xs is None or ws is None or not isinstance(groups, int):
        return NotImplemented
    out_shape = _shape(node)
    batched = len(out_shape) == len(_shape(w))
    out = [xs[0]] if batched else []
    b.handled.add(xs[0]) if batched else None
    cin_slot = xs[1 if batched else 0]
    # weight layout: conv (Cout, Cin/g, k...), transposed (Cin, Cout/g, k...)
    w_in, w_out = (ws[0], ws[1]) if transposed else (ws[1], ws[0])
    cin, cout = b.size(cin_slot), out_shape[1 if batched else 0]
    if groups == 1:
        b.union(cin_slot, w_in)
        if transposed:
            out_c = b.new(cout)
            b.union(out_c, w_out)
        else:
            out_c = w_out
            b.handled.add(out_c)
    elif cin // groups == 1 and not transposed:
        # depthwise-like: input channel a feeds outputs a*m .. a*m+m-1; pruning removes whole groups
        m = cout // groups
        out_c = w_out
        b.handled.add(out_c)
        b.union_map(cin_slot, np.repeat(np.arange(cin), m), out_c, np.arange(cout))
        b.freeze(w_in)
        _register_groups_rewrite(b, node, gi, cin_slot)
    else:
        # grouped: prune index j inside every group at once, the group count stays
        if transposed:
            out_c = b.new(cout)
            b.tie_blocks(out_c, groups)
            b.union_map(w_out, np.arange(b.size(w_out)), out_c, np.arange(b.size(w_out)))
            b.tie_blocks(cin_slot, groups)
            b.union(cin_slot, w_in)
        else:
            out_c = w_out
            b.tie_blocks(out_c, groups)
            b.tie_blocks(cin_slot, groups)
            b.union_map(cin_slot, np.arange(b.size(w_in)), w_in, np.arange(b.size(w_in)))
    if bias is not None:
        bs = g.slots_of(bias)
        if bs:
            b.union(bs[0], out_c)
    out.append(out_c)
    for s in out_shape[len(out):]:
        out.append(b.new(s))  # spatial dims: frozen by default
    return out


def _register_groups_rewrite(b: Builder, node: Node, gi: int, cin_slot: int) -> None:
    """A depthwise-like conv has one input channel per group: the group count is the kept channel count."""

    def rw(n: CallSite, kept: Kept) -> None:
        _set_arg(n, gi, "groups", len(kept(cin_slot)))

    b.rewrites[node.name] = rw
