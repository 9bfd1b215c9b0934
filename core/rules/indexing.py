"""Concatenation, splitting, slicing and indexing.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.fx import Node

from ..builder import CallSite, Kept, RuleGraph
from ._args import _arg, _op_args, _outs, _shape, _val
from .registry import rule

aten = torch.ops.aten


@rule(aten.cat.default, aten.concat.default, aten.concatenate.default)
def cat(g: RuleGraph, node: Node):
    b = g.builder
    tensors = _op_args(node)[0]
    out_shape = _shape(node)
    dim = _arg(node, 1, "dim", 0) % len(out_shape)
    found = [(t, g.slots_of(t)) for t in tensors]
    if any(s is None for _, s in found):
        return NotImplemented
    # legacy empty 1-D tensors are skipped
    parts = [(t, s) for t, s in found if s is not None and len(s) == len(out_shape)]
    out: list[int] = []
    for d in range(len(out_shape)):
        if d == dim:
            o = b.new(out_shape[d])
            off = 0
            for t, s in parts:
                n = _shape(t)[d]
                if not isinstance(n, int) or not isinstance(out_shape[d], int):
                    b.freeze(s[d])
                    b.freeze(o)
                    continue
                b.union_map(s[d], np.arange(n), o, np.arange(off, off + n))
                off += n
            out.append(o)
        else:
            first = parts[0][1][d]
            b.handled.add(first)
            for _, s in parts[1:]:
                b.union(first, s[d])
            out.append(first)
    return out


def _piece_slots(g: RuleGraph, x: Node, xs: list[int], dim: int, sizes: list) -> list[list[int]]:
    b = g.builder
    res = []
    off = 0
    for n in sizes:
        sl = list(xs)
        p = b.new(n)
        if isinstance(n, int) and b.size(xs[dim]) == _shape(x)[dim] and not b.slot_symbolic[xs[dim]]:
            b.union_map(xs[dim], np.arange(off, off + n), p, np.arange(n))
            off += n
        else:
            b.freeze(p)
            b.freeze(xs[dim])
        sl[dim] = p
        b.handled.update(sl)
        res.append(sl)
    return res


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections,
      aten.split_with_sizes_copy.default, aten.split_copy.Tensor, aten.unsafe_split.Tensor)
def split(g: RuleGraph, node: Node):
    x = _op_args(node)[0]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    outs = _outs(node)
    dim = _arg(node, 2, "dim", 0) % len(xs)
    sizes = [t.shape[dim] for t in outs]
    pieces = _piece_slots(g, x, xs, dim, sizes)

    def rw(n: CallSite, kept: Kept) -> None:
        n.target = aten.split_with_sizes.default
        n.args = (n.args[0], [len(kept(p[dim])) for p in pieces], dim)
        n.kwargs = {}

    g.builder.rewrites[node.name] = rw
    return pieces


@rule(aten.unbind.int)
def unbind(g: RuleGraph, node: Node):
    b = g.builder
    xs = g.slots_of(node.args[0])
    if xs is None:
        return NotImplemented
    dim = _arg(node, 1, "dim", 0) % len(xs)
    b.freeze(xs[dim])
    rest = [s for i, s in enumerate(xs) if i != dim]
    b.handled.update(rest)
    return [list(rest) for _ in _outs(node)]


@rule(operator.getitem)
def getitem(g: RuleGraph, node: Node):
    src, i = node.args
    slots = g.node_slots.get(src.name) if isinstance(src, Node) else None
    if not isinstance(i, int) or not isinstance(slots, list) or not slots or not isinstance(slots[0], list) \
            or i >= len(slots):
        return NotImplemented if isinstance(_val(node), torch.Tensor) else None
    out = slots[i]
    g.builder.handled.update(out)
    return list(out)


@rule(aten.slice.Tensor, aten.narrow.default, aten.slice_copy.Tensor)
def slice_(g: RuleGraph, node: Node):
    b = g.builder
    x = node.args[0]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    shp = _shape(x)
    dim = _arg(node, 1, "dim", 0) % len(xs)
    n_in = shp[dim]
    if node.target is aten.narrow.default:
        start, length = node.args[2], node.args[3]
        end, step = (start + length if isinstance(start, int) and isinstance(length, int) else None), 1
    else:
        start, end, step = _arg(node, 2, "start", 0), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    out = list(xs)
    b.handled.update(xs)
    o = b.new(_shape(node)[dim])
    out[dim] = o
    concrete = all(isinstance(v, int) or v is None for v in (start, end, step)) and isinstance(n_in, int)
    if concrete and not b.slot_symbolic[xs[dim]]:
        s0, e0, st = slice(start, end, step).indices(n_in)
        idx = np.arange(s0, e0, st)
        if step == 1 and len(idx) == b.size(o):
            b.union_map(xs[dim], idx, o, np.arange(len(idx)))
            xslot = xs[dim]

            def rw(n: CallSite, kept: Kept) -> None:
                k = kept(xslot)
                new_start, new_end = int(np.searchsorted(k, s0)), int(np.searchsorted(k, e0))
                if n.target is aten.narrow.default:
                    n.args = (n.args[0], dim, new_start, new_end - new_start)
                else:
                    n.args = (n.args[0], dim, new_start, new_end) + tuple(n.args[4:5])

            b.rewrites[node.name] = rw
            return out
    b.freeze(xs[dim])
    b.freeze(o)
    return out


@rule(aten.select.int)
def select(g: RuleGraph, node: Node):
    b = g.builder
    args = _op_args(node)
    xs = g.slots_of(args[0])
    if xs is None:
        return NotImplemented
    dim = args[1] % len(xs)
    b.freeze(xs[dim])
    out = [s for i, s in enumerate(xs) if i != dim]
    b.handled.update(out)
    return out


@rule(aten.index.Tensor)
def index(g: RuleGraph, node: Node):
    """x[..., idx, ...] with one index tensor (a relative position bias table gathered by an index buffer): the
    indexed dim is replaced by the index's dims (and stays whole: the index values point into it); the other
    dims of x pass through."""
    b = g.builder
    args = _op_args(node)
    x, indices = args[0], args[1]
    xs = g.slots_of(x)
    tensors = [i for i, t in enumerate(indices) if t is not None]
    if xs is None or len(tensors) != 1:
        return NotImplemented
    k = tensors[0]
    si = g.slots_of(indices[k])
    if si is None or _val(indices[k]).dtype == torch.bool:
        return NotImplemented
    out = list(xs[:k]) + list(si) + list(xs[k + 1:])
    b.handled.update(out)
    return out
