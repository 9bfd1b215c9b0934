"""Linear algebra: linear, matmul/mm/bmm, addmm, einsum, and the embedding lookup.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..builder import RuleGraph
from ._args import _align, _arg, _op_args, _same, _shape
from .registry import rule

aten = torch.ops.aten


@rule(aten.linear.default)
def linear(g: RuleGraph, node: Node):
    b = g.builder
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias")
    xs, ws = g.slots_of(x), g.slots_of(w)
    if xs is None or ws is None or len(ws) != 2:
        return NotImplemented
    b.union(xs[-1], ws[1])
    out = list(xs[:-1]) + [ws[0]]
    b.handled.update(out)
    if bias is not None and (bs := g.slots_of(bias)):
        b.union(bs[0], ws[0])
    return out


def _matmul_slots(g: RuleGraph, a: Node, c: Node, out_shape) -> list[int] | None:
    b = g.builder
    sa, sc = g.slots_of(a), g.slots_of(c)
    if sa is None or sc is None:
        return None
    if len(sa) == 1 and len(sc) == 1:
        b.union(sa[0], sc[0])
        return []
    if len(sc) == 1:  # (..., n, k) @ (k,)
        b.union(sa[-1], sc[0])
        out = list(sa[:-1])
        b.handled.update(out)
        return out
    if len(sa) == 1:  # (k,) @ (..., k, m)
        b.union(sa[0], sc[-2])
        batch = _align(g, [(list(sc[:-2]), _shape(c)[:-2])], tuple(out_shape[:-1]))
        return batch + [sc[-1]]
    b.union(sa[-1], sc[-2])
    batch = _align(g, [(list(sa[:-2]), _shape(a)[:-2]), (list(sc[:-2]), _shape(c)[:-2])], tuple(out_shape[:-2]))
    b.handled.update((sa[-2], sc[-1]))
    # (batch, heads, ...) @ (batch, heads, ...): attention written out by hand; its head dims, for resolve_factors
    b.head_slots.update(batch[1:])
    return batch + [sa[-2], sc[-1]]


@rule(aten.matmul.default, aten.mm.default, aten.bmm.default)
def matmul(g: RuleGraph, node: Node):
    args = _op_args(node)
    r = _matmul_slots(g, args[0], args[1], _shape(node))
    return NotImplemented if r is None else r


@rule(aten.addmm.default)
def addmm(g: RuleGraph, node: Node):
    args = _op_args(node)
    inp, a, c = args[0], args[1], args[2]
    mm = _matmul_slots(g, a, c, _shape(node))
    if mm is None:
        return NotImplemented
    si = g.slots_of(inp)
    if si is not None:
        off = 2 - len(si)
        for i, s in enumerate(si):
            if _same(_shape(inp)[i], _shape(node)[off + i]):
                g.builder.union(s, mm[off + i])
    return mm


@rule(aten.einsum.default)
def einsum(g: RuleGraph, node: Node):
    b = g.builder
    args = _op_args(node)
    eq, operands = args[0].replace(" ", ""), args[1]
    if "..." in eq or "->" not in eq:
        return NotImplemented
    lhs, rhs = eq.split("->")
    letter_slot: dict[str, int] = {}
    for spec, op in zip(lhs.split(","), operands, strict=False):
        sl = g.slots_of(op)
        if sl is None or len(sl) != len(spec):
            return NotImplemented
        for ch, s in zip(spec, sl, strict=True):
            if ch in letter_slot:
                b.union(letter_slot[ch], s)
            else:
                letter_slot[ch] = s
                b.handled.add(s)
    out_shape = _shape(node)
    return [letter_slot[ch] if ch in letter_slot else b.new(out_shape[i]) for i, ch in enumerate(rhs)]


@rule(aten.embedding.default)
def embedding(g: RuleGraph, node: Node):
    b = g.builder
    w, idx = node.args[0], node.args[1]
    ws, si = g.slots_of(w), g.slots_of(idx)
    if ws is None or si is None or len(ws) != 2:
        return NotImplemented
    b.freeze(ws[0])
    b.handled.update(si)
    b.handled.add(ws[1])
    return list(si) + [ws[1]]
