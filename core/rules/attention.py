"""`scaled_dot_product_attention`, grouped-query attention included (hand-written attention is
`linalg.matmul`'s batched case).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.fx import Node

from ..builder import CallSite, Kept, RuleGraph
from ._args import _align, _arg, _same, _set_arg, _shape
from .registry import rule

aten = torch.ops.aten


@rule(aten.scaled_dot_product_attention.default)
def sdpa(g: RuleGraph, node: Node):
    """q (..., Hq, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev) -> (..., Hq, L, Ev). E of q and k is contracted
    (coupled), Ev runs from v to the output, S from k to v, L from q to the output; the batch dims are shared
    and, with grouped-query attention (`enable_gqa`, Hk < Hq), query head h reads key/value head h // (Hq/Hk).
    The head dims are marked for `Builder.resolve_factors`. When E may shrink, the default scale 1/sqrt(E) is
    written out so that the pruned program keeps the original one."""
    b = g.builder
    q, k, v = node.args[0], node.args[1], node.args[2]
    qs, ks, vs = g.slots_of(q), g.slots_of(k), g.slots_of(v)
    if qs is None or ks is None or vs is None or not (len(qs) == len(ks) == len(vs) >= 2):
        return NotImplemented
    qsh, ksh, vsh = _shape(q), _shape(k), _shape(v)
    b.union(qs[-1], ks[-1])
    b.union(ks[-2], vs[-2])
    nb = len(qs) - 2
    if nb >= 1 and not _same(qsh[-3], ksh[-3]):  # grouped-query attention
        hq, hk = qsh[-3], ksh[-3]
        if not (isinstance(hq, int) and isinstance(hk, int) and hk and hq % hk == 0) or not _same(ksh[-3], vsh[-3]):
            return NotImplemented
        b.union(ks[-3], vs[-3])
        b.union_map(qs[-3], np.arange(hq), ks[-3], np.arange(hq) // (hq // hk))
        b.head_links.append((ks[-3], qs[-3]))
        batch = _align(g, [(qs[:-3], qsh[:-3]), (ks[:-3], ksh[:-3]), (vs[:-3], vsh[:-3])], tuple(_shape(node)[:-3]))
        batch.append(qs[-3])
        b.handled.add(qs[-3])
    else:
        batch = _align(g, [(qs[:-2], qsh[:-2]), (ks[:-2], ksh[:-2]), (vs[:-2], vsh[:-2])], tuple(_shape(node)[:-2]))
    if nb >= 1:
        b.head_slots.update((qs[-3], ks[-3], vs[-3]))
    out = batch + [qs[-2], vs[-1]]
    b.handled.update(out)
    mask = _arg(node, 3, "attn_mask")
    ms = g.slots_of(mask)
    if ms is not None:  # broadcast to (..., Hq, L, S)
        full = batch + [qs[-2], ks[-2]]
        msh, fsh = _shape(mask), tuple(_shape(node)[:-1]) + (ksh[-2],)
        for i in range(1, min(len(ms), len(full)) + 1):
            if _same(msh[-i], fsh[-i]):
                b.union(ms[-i], full[-i])
            else:
                b.handled.add(ms[-i])  # a size-1 dim broadcast: carries nothing
    e = qsh[-1]
    if _arg(node, 6, "scale") is None and isinstance(e, int):
        e_slot = qs[-1]

        def rw(n: CallSite, kept: Kept) -> None:
            if len(kept(e_slot)) != e:
                _set_arg(n, 6, "scale", 1.0 / math.sqrt(e))

        b.rewrites[node.name] = rw
    return out
