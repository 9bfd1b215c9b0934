"""Normalisation: batch, instance, group, layer and RMS norms, with their affine parameters and running
statistics.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..builder import CallSite, Kept, RuleGraph
from ._args import _arg, _op_args, _outs, _same, _set_arg, _shape
from .registry import rule

aten = torch.ops.aten


def _couple_affine(g: RuleGraph, node: Node, channel_slot: int, idxs: tuple[int, ...],
                   names: tuple[str, ...], weight_index: int) -> None:
    for i, name in zip(idxs, names, strict=True):
        p = _arg(node, i, name)
        ps = g.slots_of(p)
        if ps:
            g.builder.union(ps[0], channel_slot)
            if i == weight_index:
                g.builder.roles[ps[0]] = "norm_weight"


@rule(aten.batch_norm.default, aten.instance_norm.default, aten._native_batch_norm_legit_no_training.default,
      aten._native_batch_norm_legit_functional.default, aten._native_batch_norm_legit.default,
      aten._native_batch_norm_legit.no_stats,
      aten.native_batch_norm.default, aten.cudnn_batch_norm.default)
def batch_norm(g: RuleGraph, node: Node):
    x = node.args[0]
    xs = g.slots_of(x)
    if xs is None or len(xs) < 2:
        return NotImplemented
    out = list(xs)
    g.builder.handled.update(out)
    _couple_affine(g, node, xs[1], (1, 2, 3, 4), ("weight", "bias", "running_mean", "running_var"), 1)
    outs = _outs(node)
    if len(outs) == 1:
        return out
    # tuple variants: (out, save_mean, save_invstd, [running_mean, running_var])
    res = [out]
    for t in outs[1:]:
        if t is not None and t.dim() == 1 and _same(t.shape[0], _shape(x)[1]):
            res.append([xs[1]])
        else:
            res.append(g.builder.new_like(t.shape) if t is not None else [])
    return res


@rule(aten.group_norm.default, aten.native_group_norm.default)
def group_norm(g: RuleGraph, node: Node):
    b = g.builder
    x = node.args[0]
    xs = g.slots_of(x)
    native = node.target is aten.native_group_norm.default
    groups = node.args[6] if native else _arg(node, 1, "num_groups")
    if xs is None or len(xs) < 2 or not isinstance(groups, int):
        return NotImplemented
    b.tie_blocks(xs[1], groups)
    w_i, b_i = (1, 2) if native else (2, 3)
    _couple_affine(g, node, xs[1], (w_i, b_i), ("weight", "bias"), w_i)
    out = list(xs)
    b.handled.update(out)
    if native:
        c_slot = xs[1]

        def rw(n: CallSite, kept: Kept) -> None:
            _set_arg(n, 4, "C", len(kept(c_slot)))

        b.rewrites[node.name] = rw
        return [out, b.new_like(_outs(node)[1].shape), b.new_like(_outs(node)[2].shape)]
    return out


@rule(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default)
def layer_norm(g: RuleGraph, node: Node):
    b = g.builder
    args = _op_args(node)
    x, shape = args[0], args[1]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    k = len(shape)
    norm_slots = xs[len(xs) - k:]
    b.norm_slots.update(norm_slots)
    for i, name in ((2, "weight"), (3, "bias")):
        p = _arg(node, i, name)
        ps = g.slots_of(p)
        if ps:
            for a, s in zip(ps, norm_slots, strict=True):
                b.union(a, s)
            if name == "weight":
                b.roles[ps[-1]] = "norm_weight"
    out = list(xs)
    b.handled.update(out)

    def rw(n: CallSite, kept: Kept) -> None:
        _set_arg(n, 1, "normalized_shape", [len(kept(s)) for s in norm_slots])

    b.rewrites[node.name] = rw
    if node.target is aten.native_layer_norm.default:
        outs = _outs(node)
        return [out, b.new_like(outs[1].shape), b.new_like(outs[2].shape)]
    return out
