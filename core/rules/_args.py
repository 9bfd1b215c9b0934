"""The argument and shape helpers every family of rules shares (private to the rules package).

Reading a node: its fake value (`_val`, `_shape`, `_out_tensors`, `_outs`), its tensor inputs, its positional
arguments as its op's schema types them (`_op_args`), an argument by position or name (`_arg`) and writing it back
in a rewrite (`_set_arg`); comparing sizes without guarding on symbolic ones (`_same`); broadcasting operands'
slots to an output's (`_align`, `_broadcast`); an op's name as the report lists it (`_op_name`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from ..builder import CallSite, RuleGraph


def _val(node) -> Any:
    """The fake value export recorded for a node (a tensor, a list of them, a symbolic scalar), else None."""
    return node.meta.get("val") if isinstance(node, Node) else None


def _shape(node) -> tuple:
    return tuple(_val(node).shape)


def _tensor_inputs(node: Node) -> list[Node]:
    out: list[Node] = []

    def visit(a):
        if isinstance(a, Node):
            if isinstance(_val(a), torch.Tensor):
                out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    for a in node.args:
        visit(a)
    for a in node.kwargs.values():
        visit(a)
    return out


def _op_args(node: Node) -> tuple[Any, ...]:
    """`node.args`, each argument typed by the rule that reads it: the rule knows its op's schema (a dim is an int,
    sizes a list of ints), torch.fx types every argument as `Argument`, the union of all an argument can be."""
    return node.args


def _arg(node: CallSite, i: int, name: str, default=None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _set_arg(node: CallSite, i: int, name: str, value) -> None:
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs


def _out_tensors(node: Node) -> list | None:
    v = _val(node)
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) or x is None for x in v):
        return list(v)
    return None


def _outs(node: Node) -> list:
    """The output tensors of a node a rule runs on: `apply_rule` calls rules only for nodes that have them."""
    outs = _out_tensors(node)
    assert outs is not None, "a rule runs on a node producing tensors"
    return outs


def _op_name(target) -> str:
    return getattr(target, "__name__", None) or str(target)


def _broadcast(g: RuleGraph, node: Node, inputs: list[Node], out_shape) -> list[int]:
    """Output slots of a broadcasting op over `inputs` (see `_align`)."""
    operands = [(sl, _shape(a)) for a in inputs if (sl := g.slots_of(a)) is not None]
    return _align(g, operands, tuple(out_shape))


def _align(g: RuleGraph, operands: list[tuple[list[int], tuple]], out_shape: tuple) -> list[int]:
    """Broadcasting, right-aligned: each output dim is the (aliased) dim of the operands that carry it at
    full size, those are coupled; size-1 broadcast dims of an operand stay uncoupled (and get frozen)."""
    b = g.builder
    nd = len(out_shape)
    out: list[int | None] = [None] * nd
    for sl, shp in operands:
        off = nd - len(sl)
        for i, s in enumerate(sl):
            o = off + i
            if _same(shp[i], out_shape[o]):
                seen = out[o]
                if seen is None:
                    out[o] = s
                    b.handled.add(s)
                else:
                    b.union(seen, s)
    return [o if o is not None else b.new(out_shape[i]) for i, o in enumerate(out)]


def _same(a, b) -> bool:
    """Equal sizes. Symbolic sizes compare by expression: `a == b` on SymInts would build (and guard) a
    symbolic boolean, which costs more than all the rest of a small graph's rules."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    ea, eb = getattr(getattr(a, "node", None), "expr", None), getattr(getattr(b, "node", None), "expr", None)
    return ea is not None and ea == eb
