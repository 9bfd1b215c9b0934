"""Layout: permute, transpose, the reshape family (view, reshape, flatten, unflatten, squeeze, unsqueeze,
expand), repeats and roll.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from ..builder import Builder, CallSite, Kept, RuleGraph
from ._args import _arg, _broadcast, _op_args, _same, _set_arg, _shape
from .registry import rule

aten = torch.ops.aten


@rule(aten.permute.default, aten.permute_copy.default)
def permute(g: RuleGraph, node: Node):
    args = _op_args(node)
    xs = g.slots_of(args[0])
    if xs is None:
        return NotImplemented
    dims = [d % len(xs) for d in args[1]]
    g.builder.handled.update(xs)
    return [xs[d] for d in dims]


@rule(aten.transpose.int, aten.transpose_copy.int, aten.swapaxes.default, aten.t.default, aten.numpy_T.default)
def transpose(g: RuleGraph, node: Node):
    args = _op_args(node)
    xs = g.slots_of(args[0])
    if xs is None:
        return NotImplemented
    out = list(xs)
    if len(xs) >= 2:
        if node.target in (aten.t.default, aten.numpy_T.default):
            out = out[::-1]
        else:
            a, c = args[1] % len(xs), args[2] % len(xs)
            out[a], out[c] = out[c], out[a]
    g.builder.handled.update(xs)
    return out


@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.view_copy.default,
      aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
      aten.unsqueeze.default, aten.unsqueeze_copy.default, aten.squeeze_copy.dim, aten.expand.default,
      aten.expand_copy.default)
def reshape(g: RuleGraph, node: Node):
    b = g.builder
    args = _op_args(node)
    x = args[0]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    in_shape, out_shape = _shape(x), _shape(node)
    if node.target in (aten.expand.default, aten.expand_copy.default):
        out = _broadcast(g, node, [x], out_shape)
        _register_shape_rewrite(b, node, 1, "size", out)
        return out
    out = _reshape_slots(g, xs, in_shape, out_shape)
    if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.view_copy.default):
        _register_shape_rewrite(b, node, 1, "size", out)
    elif node.target is aten.unflatten.int:
        d = args[1] % len(in_shape)
        sub = out[d: d + len(args[2])]
        _register_shape_rewrite(b, node, 2, "sizes", sub)
    return out


def _register_shape_rewrite(b: Builder, node: Node, idx: int, name: str, slots: list[int]) -> None:
    """Rewrite the size list argument `name` (position `idx`): each int entry becomes the kept count of its slot;
    -1 (inferred) and symbolic entries stay as they are."""

    def rw(n: CallSite, kept: Kept) -> None:
        old = _arg(n, idx, name)
        new = []
        for v, s in zip(old, slots, strict=True):
            if isinstance(v, int) and v != -1:
                new.append(len(kept(s)))
            else:
                new.append(v)
        _set_arg(n, idx, name, new)

    b.rewrites[node.name] = rw


def _reshape_slots(g: RuleGraph, xs: list[int], in_shape, out_shape) -> list[int]:
    """Match input and output dims in blocks of equal product; within a block, one-to-one dims alias,
    a dim split into factors (or factors merged into a dim) is coupled through one free factor with
    the others frozen (`Builder.split_factors`), anything else is frozen."""
    b = g.builder
    out: list[int | None] = [None] * len(out_shape)
    i = j = 0
    ni, no = len(in_shape), len(out_shape)
    # equal trailing dims map identically whatever comes before them ((B, N, C) -> (B*N, C) keeps C)
    while ni and no and _same(in_shape[ni - 1], out_shape[no - 1]) and not _is_one(in_shape[ni - 1]):
        out[no - 1] = xs[ni - 1]
        b.handled.add(xs[ni - 1])
        ni, no = ni - 1, no - 1
    while i < ni or j < no:
        # size-1 dims carry no channels: fresh (and frozen) on the output side
        if j < no and _is_one(out_shape[j]) and not (i < ni and _is_one(in_shape[i])):
            out[j] = b.new(1)
            j += 1
            continue
        if i < ni and _is_one(in_shape[i]) and not (j < no and _is_one(out_shape[j])):
            b.freeze(xs[i])
            i += 1
            continue
        if i >= ni or j >= no:
            for k in range(i, ni):
                b.freeze(xs[k])
            for k in range(j, no):
                out[k] = b.new(out_shape[k])
            break
        if _same(in_shape[i], out_shape[j]):
            out[j] = xs[i]
            b.handled.add(xs[i])
            i += 1
            j += 1
            continue
        # grow a block until the products agree
        bi, bj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        ok = isinstance(pi, int) and isinstance(pj, int)
        while ok and pi != pj:
            if pi < pj and bi[-1] + 1 < ni and isinstance(in_shape[bi[-1] + 1], int):
                bi.append(bi[-1] + 1)
                pi *= in_shape[bi[-1]]
            elif pj < pi and bj[-1] + 1 < no and isinstance(out_shape[bj[-1] + 1], int):
                bj.append(bj[-1] + 1)
                pj *= out_shape[bj[-1]]
            else:
                ok = False
        if not ok:
            # symbolic sizes folded into a block: freeze everything that is left
            for k in range(i, ni):
                b.freeze(xs[k])
            for k in range(j, no):
                out[k] = fresh = b.new(out_shape[k])
                b.freeze(fresh)
            break
        in_sizes = [in_shape[k] for k in bi]
        out_sizes = [out_shape[k] for k in bj]
        out_block = [b.new(s) for s in out_sizes]
        for k, s in zip(bj, out_block, strict=True):
            out[k] = s
        if len(bi) == 1:
            b.split_factors(xs[bi[0]], out_block, out_sizes)
        elif len(bj) == 1:
            b.split_factors(out_block[0], [xs[k] for k in bi], in_sizes)
        else:
            for k in bi:
                b.freeze(xs[k])
            for s in out_block:
                b.freeze(s)
        i, j = bi[-1] + 1, bj[-1] + 1
    return out  # type: ignore[return-value]  # every entry is set: the loops run until i == ni and j == no


def _is_one(v) -> bool:
    return isinstance(v, int) and v == 1


@rule(aten.repeat_interleave.self_int)
def repeat_interleave(g: RuleGraph, node: Node):
    """x.repeat_interleave(r, dim): output index i*r + j along `dim` is input index i (grouped-query attention
    repeating each key/value head for its query heads); the other dims pass through."""
    b = g.builder
    x, reps, dim = node.args[0], node.args[1], _arg(node, 2, "dim")
    xs = g.slots_of(x)
    if xs is None or dim is None or not isinstance(reps, int):
        return NotImplemented
    d = dim % len(xs)
    out = list(xs)
    n = b.size(xs[d])
    o = b.new(_shape(node)[d])
    if not b.slot_symbolic[xs[d]]:
        b.union_map(xs[d], np.arange(n * reps) // reps, o, np.arange(n * reps))
        b.head_links.append((xs[d], o))
    out[d] = o
    b.handled.update(out)
    return out


@rule(aten.roll.default)
def roll(g: RuleGraph, node: Node):
    """Shifted windows: the rolled dims (spatial) are left as they are; the others pass through."""
    b = g.builder
    x, dims = node.args[0], _arg(node, 2, "dims", [])
    xs = g.slots_of(x)
    if xs is None or not dims:
        return NotImplemented
    rolled = {d % len(xs) for d in ([dims] if isinstance(dims, int) else dims)}
    out = [b.new(_shape(node)[i]) if i in rolled else s for i, s in enumerate(xs)]
    b.handled.update(s for i, s in enumerate(xs) if i not in rolled)
    return out


@rule(aten.repeat.default)
def repeat(g: RuleGraph, node: Node):
    """x.repeat(r...): output index k*n + i along a repeated dim is input index i."""
    b = g.builder
    args = _op_args(node)
    x, reps = args[0], args[1]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    out_shape = _shape(node)
    lead = len(out_shape) - len(xs)
    out = [b.new(s) for s in out_shape[:lead]]
    for i, s in enumerate(xs):
        r = reps[lead + i]
        n = b.size(s)
        if isinstance(r, int) and r == 1:
            out.append(s)
            b.handled.add(s)
        elif isinstance(r, int) and not b.slot_symbolic[s]:
            o = b.new(out_shape[lead + i])
            b.union_map(s, np.tile(np.arange(n), r), o, np.arange(n * r))
            out.append(o)
        else:
            out.append(b.new(out_shape[lead + i]))
    return out
