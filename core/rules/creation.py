"""Tensor creation with a size literal: `zeros`, `ones`, `full`, `empty`, `new_zeros`, `new_ones`, `new_full`.

General (any creation op with a literal size list); the recurrent rules need them: `nn.LSTM` / `nn.GRU` build
their initial state with `aten.zeros([layers * dirs, B, H])`, a size literal that must shrink with H.
"""

from __future__ import annotations

from types import NotImplementedType

import torch
from torch.fx import Node

from ..builder import CallSite, Kept, RuleGraph
from ._args import _arg, _set_arg, _val
from .registry import rule

aten = torch.ops.aten


# op -> index of the size argument (the other tensor argument, if any, gives dtype/device only)
_CREATION: dict[object, int] = {
    aten.zeros.default: 0,
    aten.ones.default: 0,
    aten.full.default: 0,
    aten.empty.memory_format: 0,
    aten.new_zeros.default: 1,
    aten.new_ones.default: 1,
    aten.new_full.default: 1,
}


@rule(*_CREATION)
def creation(g: RuleGraph, node: Node) -> list[int] | NotImplementedType:
    """`zeros(size)` and friends. Couplings: none of their own. Every output dim is a fresh slot (marked
    handled, so it is coupled only by the ops that consume the tensor; symbolic dims are frozen by the
    Builder); the `self` of `new_*` lends only dtype and device, so its dims are handled too and left to
    their other users. The rewrite recomputes each int entry of the size literal from the kept count of
    its output slot (`zeros([L*D, B, H])` with H pruned); symbolic entries stay as they are."""
    b = g.builder
    v = _val(node)
    idx = _CREATION[node.target]
    size = _arg(node, idx, "size")
    if not isinstance(v, torch.Tensor) or not isinstance(size, (list, tuple)) or len(size) != v.dim():
        return NotImplemented
    out = b.new_like(v.shape)
    b.handled.update(out)
    if idx == 1:
        src = g.slots_of(node.args[0])
        b.handled.update(src or [])

    def rw(n: CallSite, kept: Kept) -> None:
        old = _arg(n, idx, "size")
        new = [len(kept(s)) if isinstance(x, int) else x for x, s in zip(old, out, strict=True)]
        _set_arg(n, idx, "size", new)

    b.rewrites[node.name] = rw
    return out
