"""Parameters and multiply-accumulates of an ExportedProgram, read off its graph's shapes.

MACs count convolutions, transposed convolutions, linear layers and matrix products (the ops that
dominate the cost), at the shapes of the program's example inputs (symbolic dims take the value
they were traced with).
"""

from __future__ import annotations

import math
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


def _numel(t: torch.Tensor) -> int:
    return math.prod(_int(s) for s in t.shape)


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


def count_macs(ep: ExportedProgram) -> int:
    conv, tconv = _conv_ops(), _tconv_ops()
    total = 0
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        out = n.meta.get("val")
        if not isinstance(out, torch.Tensor):
            continue
        t = n.target
        if t in conv or t in tconv:
            w = n.args[1].meta["val"]
            x = n.args[0].meta["val"]
            kernel = math.prod(_int(s) for s in w.shape[2:])
            transposed = t in tconv or (t is aten.convolution.default and bool(n.args[6]))
            if transposed:
                total += _numel(x) * _int(w.shape[1]) * kernel
            else:
                total += _numel(out) * _int(w.shape[1]) * kernel
        elif t is aten.linear.default:
            total += _numel(out) * _int(n.args[1].meta["val"].shape[-1])
        elif t in (aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default):
            a = n.args[1 if t is aten.addmm.default else 0].meta["val"]
            total += _numel(out) * _int(a.shape[-1])
    return total


def count(ep: ExportedProgram) -> Counts:
    return Counts(params=count_params(ep), macs=count_macs(ep))
