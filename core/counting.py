"""Parameters and multiply-accumulates of an ExportedProgram, read off its graph's shapes.

MACs count convolutions, transposed convolutions, linear layers and matrix products (the ops that
dominate the cost), at the shapes of the program's example inputs (symbolic dims take the value
they were traced with).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from .tensors import tied_names

aten = torch.ops.aten


@dataclass(frozen=True)
class Counts:
    params: int
    macs: int


def _int(v) -> int:
    if isinstance(v, int):
        return v
    hint = getattr(getattr(v, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


def count_params(ep: ExportedProgram) -> int:
    names = [s.target for s in ep.graph_signature.input_specs if s.kind == InputKind.PARAMETER]
    sd = ep.state_dict
    tensors = {n: sd[n] for n in names if n in sd}
    tied = tied_names(tensors)  # a tied weight counts once
    return sum(t.numel() for n, t in tensors.items() if n not in tied)


def _conv_ops() -> set:
    return {
        aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
        aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default,
    }


def _tconv_ops() -> set:
    return {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}


DimSize = Callable[[torch.fx.Node, int], int]  # (node, dim) -> the size of that dim of the node's value


def traced_size(node: torch.fx.Node, dim: int) -> int:
    return _int(node.meta["val"].shape[dim])


def count_macs(ep: ExportedProgram, size: DimSize = traced_size) -> int:
    """Multiply-accumulates of the convolutions, linear layers and matrix products at the example inputs'
    shapes; `size` gives every dim's size (default: as traced; `plan_counts` passes the sizes a pruning
    plan would leave, so a candidate is counted without building it)."""
    conv, tconv = _conv_ops(), _tconv_ops()
    total = 0

    def numel(node: torch.fx.Node) -> int:
        return math.prod(size(node, d) for d in range(node.meta["val"].dim()))

    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        out = n.meta.get("val")
        if not isinstance(out, torch.Tensor):
            continue
        t = n.target
        if t in conv or t in tconv:
            w, x = n.args[1], n.args[0]
            kernel = math.prod(size(w, d) for d in range(2, w.meta["val"].dim()))
            transposed = t in tconv or (t is aten.convolution.default and bool(n.args[6]))
            total += (numel(x) if transposed else numel(n)) * size(w, 1) * kernel
        elif t is aten.linear.default:
            total += numel(n) * size(n.args[1], -1)
        elif t in (aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default):
            total += numel(n) * size(n.args[1 if t is aten.addmm.default else 0], -1)
    return total


def count(ep: ExportedProgram) -> Counts:
    return Counts(params=count_params(ep), macs=count_macs(ep))
