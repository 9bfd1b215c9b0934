"""One rule per aten op family: how the dims of an op's inputs map to the dims of its output.

A rule receives the graph being built and the FX node, couples slots through the Builder and
returns the output's slots (a list per output for ops returning tuples). Any dim of an input or
output tensor that a rule does not mention is frozen afterwards, so a rule can only be too
cautious, never silently wrong. An op with no rule freezes all its dims and is listed in the
report (`frozen_ops`).

Rules that carry shape literals (view sizes, split sizes, conv groups, norm shapes) register a
rewrite that recomputes the literal from the pruned slot sizes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import numpy as np
import torch
from torch.fx import Node

from .graph import Builder, DependencyGraph

aten = torch.ops.aten
RULES: dict[object, Callable] = {}

# A rewrite gets the node of the module being pruned and `kept(slot) -> np.ndarray` (kept indices).
Kept = Callable[[int], np.ndarray]


def rule(*ops):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


def _val(node) -> object:
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


def _arg(node: Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _set_arg(node: Node, i: int, name: str, value) -> None:
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


def apply_rule(g: DependencyGraph, node: Node):
    b = g.builder
    outs = _out_tensors(node)
    ins = _tensor_inputs(node)
    if outs is None and node.target is not operator.getitem:
        # ops producing no tensor (sym_size, asserts): nothing to couple
        return None
    fn = RULES.get(node.target) or RULES.get(getattr(node.target, "overloadpacket", None))
    if fn is None and _is_pointwise(node.target):
        fn = pointwise
    result = None
    if fn is not None:
        result = fn(g, node)
    if fn is None or result is NotImplemented:
        g.frozen_ops[_op_name(node.target)] += 1
        result = None
    if result is None and outs is not None:
        # no rule: fresh slots for the outputs, everything frozen below
        result = [b.new_like(t.shape) if t is not None else [] for t in outs]
        if isinstance(_val(node), torch.Tensor):
            result = result[0]
    # freeze whatever the rule did not account for
    for a in ins:
        for s in g.slots_of(a) or []:
            if s not in b.handled:
                b.freeze(s)
    flat = result if (not result or not isinstance(result[0], list)) else [s for r in result for s in r]
    for s in flat or []:
        if s not in b.handled:
            b.freeze(s)
    return result


def _op_name(target) -> str:
    return getattr(target, "__name__", None) or str(target)


def _is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


# ---------------------------------------------------------------------------------------------
# elementwise and broadcasting
# ---------------------------------------------------------------------------------------------


def _broadcast(g: DependencyGraph, node: Node, inputs: list[Node], out_shape) -> list[int]:
    """Output slots of a broadcasting op over `inputs` (see `_align`)."""
    operands = [(sl, _shape(a)) for a in inputs if (sl := g.slots_of(a)) is not None]
    return _align(g, operands, tuple(out_shape))


def _align(g: DependencyGraph, operands: list[tuple[list[int], tuple]], out_shape: tuple) -> list[int]:
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
                if out[o] is None:
                    out[o] = s
                    b.handled.add(s)
                else:
                    b.union(out[o], s)
    return [o if o is not None else b.new(out_shape[i]) for i, o in enumerate(out)]


def _same(a, b) -> bool:
    """Equal sizes. Symbolic sizes compare by expression: `a == b` on SymInts would build (and guard) a
    symbolic boolean, which costs more than all the rest of a small graph's rules."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    ea, eb = getattr(getattr(a, "node", None), "expr", None), getattr(getattr(b, "node", None), "expr", None)
    return ea is not None and ea == eb


_SUMS = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor}


def pointwise(g: DependencyGraph, node: Node):
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return NotImplemented
    inputs = _tensor_inputs(node)
    out = _broadcast(g, node, inputs, tuple(v.shape))
    if node.target in _SUMS and len(inputs) == 2:
        # a skip connection (x + f(x)): the dims both operands carry at full size
        shape = tuple(v.shape)
        sa, sb = _shape(inputs[0]), _shape(inputs[1])
        for i in range(1, min(len(sa), len(sb)) + 1):
            if _same(sa[-i], shape[-i]) and _same(sb[-i], shape[-i]):
                g.builder.residual_slots.add(out[-i])
    return out


@rule(aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
      aten.detach.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
      aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
      aten.native_dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
      aten.lift_fresh_copy.default, aten.type_as.default, aten.where.self, aten.where.ScalarOther,
      aten.where.ScalarSelf, aten.where.Scalar, aten.zeros_like.default, aten.ones_like.default,
      aten.full_like.default, aten.empty_like.default, aten.fill.Scalar, aten.fill_.Scalar, aten.masked_fill.Scalar,
      aten.masked_fill.Tensor, aten.hardtanh_.default, aten.relu_.default, aten.silu_.default,
      aten.hardswish_.default, aten.hardsigmoid_.default, aten.leaky_relu_.default)
def same_shape(g: DependencyGraph, node: Node):
    outs = _out_tensors(node)
    main = _tensor_inputs(node)
    if node.target is aten.native_dropout.default:
        s = _broadcast(g, node, main[:1], _shape(node.args[0]))
        return [s, list(s)]
    return _broadcast(g, node, main, tuple(outs[0].shape))


# ---------------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------------

_CONV = {  # op -> (transposed, index of groups arg)
    aten.conv1d.default: (False, 6), aten.conv2d.default: (False, 6), aten.conv3d.default: (False, 6),
    aten.conv1d.padding: (False, 6), aten.conv2d.padding: (False, 6), aten.conv3d.padding: (False, 6),
    aten.conv_transpose1d.default: (True, 6), aten.conv_transpose2d.input: (True, 6),
    aten.conv_transpose3d.input: (True, 6), aten.convolution.default: (None, 8),
}


@rule(*_CONV)
def conv(g: DependencyGraph, node: Node):
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

    def rw(n: Node, kept: Kept) -> None:
        _set_arg(n, gi, "groups", len(kept(cin_slot)))

    b.rewrites[node.name] = rw


# ---------------------------------------------------------------------------------------------
# linear algebra
# ---------------------------------------------------------------------------------------------


@rule(aten.linear.default)
def linear(g: DependencyGraph, node: Node):
    b = g.builder
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias")
    xs, ws = g.slots_of(x), g.slots_of(w)
    if xs is None or ws is None or len(ws) != 2:
        return NotImplemented
    b.union(xs[-1], ws[1])
    out = list(xs[:-1]) + [ws[0]]
    b.handled.update(out)
    if bias is not None and g.slots_of(bias):
        b.union(g.slots_of(bias)[0], ws[0])
    return out


def _matmul_slots(g: DependencyGraph, a: Node, c: Node, out_shape) -> list[int] | None:
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
def matmul(g: DependencyGraph, node: Node):
    r = _matmul_slots(g, node.args[0], node.args[1], _shape(node))
    return NotImplemented if r is None else r


@rule(aten.scaled_dot_product_attention.default)
def sdpa(g: DependencyGraph, node: Node):
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

        def rw(n: Node, kept: Kept) -> None:
            if len(kept(e_slot)) != e:
                _set_arg(n, 6, "scale", 1.0 / math.sqrt(e))

        b.rewrites[node.name] = rw
    return out


@rule(aten.addmm.default)
def addmm(g: DependencyGraph, node: Node):
    inp, a, c = node.args[0], node.args[1], node.args[2]
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
def einsum(g: DependencyGraph, node: Node):
    b = g.builder
    eq, operands = node.args[0], node.args[1]
    eq = eq.replace(" ", "")
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
def embedding(g: DependencyGraph, node: Node):
    b = g.builder
    w, idx = node.args[0], node.args[1]
    ws, si = g.slots_of(w), g.slots_of(idx)
    if ws is None or si is None or len(ws) != 2:
        return NotImplemented
    b.freeze(ws[0])
    b.handled.update(si)
    b.handled.add(ws[1])
    return list(si) + [ws[1]]


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------


def _couple_affine(g: DependencyGraph, node: Node, channel_slot: int, idxs: tuple[int, ...],
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
def batch_norm(g: DependencyGraph, node: Node):
    x = node.args[0]
    xs = g.slots_of(x)
    if xs is None or len(xs) < 2:
        return NotImplemented
    out = list(xs)
    g.builder.handled.update(out)
    _couple_affine(g, node, xs[1], (1, 2, 3, 4), ("weight", "bias", "running_mean", "running_var"), 1)
    outs = _out_tensors(node)
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
def group_norm(g: DependencyGraph, node: Node):
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

        def rw(n: Node, kept: Kept) -> None:
            _set_arg(n, 4, "C", len(kept(c_slot)))

        b.rewrites[node.name] = rw
        return [out, b.new_like(_out_tensors(node)[1].shape), b.new_like(_out_tensors(node)[2].shape)]
    return out


@rule(aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default)
def layer_norm(g: DependencyGraph, node: Node):
    b = g.builder
    x, shape = node.args[0], node.args[1]
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

    def rw(n: Node, kept: Kept) -> None:
        _set_arg(n, 1, "normalized_shape", [len(kept(s)) for s in norm_slots])

    b.rewrites[node.name] = rw
    if node.target is aten.native_layer_norm.default:
        outs = _out_tensors(node)
        return [out, b.new_like(outs[1].shape), b.new_like(outs[2].shape)]
    return out


# ---------------------------------------------------------------------------------------------
# spatial ops keeping (batch, channel): pooling, resampling, padding
# ---------------------------------------------------------------------------------------------


@rule(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
      aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
      aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
      aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default,
      aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default,
      aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
      aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
      aten.upsample_bilinear2d.vec, aten.upsample_linear1d.vec, aten.upsample_trilinear3d.vec,
      aten.upsample_bicubic2d.vec, aten.upsample_nearest2d.default, aten.upsample_bilinear2d.default)
def spatial(g: DependencyGraph, node: Node):
    """(N, C, *spatial) -> (N, C, *spatial'); unbatched (C, *spatial) too: the leading dims carry over."""
    b = g.builder
    x = node.args[0]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    outs = _out_tensors(node)
    n_spatial = {"1d": 1, "2d": 2, "3d": 3}
    name = _op_name(node.target)
    k = next((v for key, v in n_spatial.items() if key in name), 2)
    lead = len(xs) - k
    res = []
    for t in outs:
        sl = list(xs[:lead]) + [b.new(s) for s in t.shape[lead:]]
        b.handled.update(xs[:lead])
        res.append(sl)
    return res[0] if len(outs) == 1 and isinstance(_val(node), torch.Tensor) else res


@rule(aten.constant_pad_nd.default, aten.pad.default, aten.reflection_pad1d.default,
      aten.reflection_pad2d.default, aten.replication_pad2d.default, aten.reflection_pad3d.default)
def pad(g: DependencyGraph, node: Node):
    b = g.builder
    x, p = node.args[0], node.args[1]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    n_padded = len(p) // 2
    out = []
    for i, s in enumerate(xs):
        from_last = len(xs) - 1 - i
        if from_last < n_padded and (p[2 * from_last] != 0 or p[2 * from_last + 1] != 0):
            out.append(b.new(_shape(node)[i]))
        else:
            out.append(s)
            b.handled.add(s)
    return out


# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------


@rule(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
      aten.std.correction, aten.var.dim, aten.std.dim, aten.logsumexp.default, aten.norm.ScalarOpt_dim,
      aten.linalg_vector_norm.default, aten.mean.default, aten.sum.default, aten.max.dim, aten.min.dim,
      aten.argmax.default, aten.argmin.default, aten.prod.dim_int)
def reduction(g: DependencyGraph, node: Node):
    b = g.builder
    x = node.args[0]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    nd = len(xs)
    name = _op_name(node.target)
    if node.target in (aten.mean.default, aten.sum.default):
        dims, keep = list(range(nd)), False
    elif node.target in (aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim):
        dims, keep = _arg(node, 2, "dim"), bool(_arg(node, 3, "keepdim", False))
    elif "correction" in name or node.target is aten.var.dim or node.target is aten.std.dim:
        dims, keep = _arg(node, 1, "dim"), bool(node.kwargs.get("keepdim", node.args[3] if len(node.args) > 3
                                                                else False))
    else:
        dims, keep = _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False))
    if dims is None or dims == []:
        dims = list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    dims = {d % nd for d in dims} if nd else set()
    out_shape = _shape(node) if isinstance(_val(node), torch.Tensor) else tuple(_out_tensors(node)[0].shape)
    out: list[int] = []
    j = 0
    for i, s in enumerate(xs):
        if i in dims:
            b.handled.add(s)  # values change, shapes do not: the reduced dim may be pruned
            if keep:
                out.append(b.new(out_shape[j]))
                j += 1
        else:
            out.append(s)
            b.handled.add(s)
            j += 1
    if keep and _is_norm_statistic(node, x):
        b.norm_slots.update(xs[d] for d in dims)
    if node.target in (aten.max.dim, aten.min.dim):
        return [out, list(out)]
    return out


def _is_norm_statistic(node: Node, x) -> bool:
    """A normalisation written out by hand: the variance, or the mean of squares (RMSNorm), kept for broadcasting."""
    if node.target in (aten.var.correction, aten.var.dim):
        return True
    if node.target is not aten.mean.dim or not isinstance(x, Node):
        return False
    if x.target is aten.pow.Tensor_Scalar:
        return x.args[1] == 2
    return x.target is aten.mul.Tensor and len(x.args) == 2 and x.args[0] is x.args[1]


# ---------------------------------------------------------------------------------------------
# concatenation, splitting, slicing, indexing
# ---------------------------------------------------------------------------------------------


@rule(aten.cat.default, aten.concat.default, aten.concatenate.default)
def cat(g: DependencyGraph, node: Node):
    b = g.builder
    tensors = node.args[0]
    out_shape = _shape(node)
    dim = _arg(node, 1, "dim", 0) % len(out_shape)
    parts = [(t, g.slots_of(t)) for t in tensors]
    if any(s is None for _, s in parts):
        return NotImplemented
    parts = [(t, s) for t, s in parts if len(s) == len(out_shape)]  # legacy empty 1-D tensors are skipped
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


def _piece_slots(g: DependencyGraph, x: Node, dim: int, sizes: list) -> list[list[int]]:
    b = g.builder
    xs = g.slots_of(x)
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
def split(g: DependencyGraph, node: Node):
    x = node.args[0]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    outs = _out_tensors(node)
    dim = _arg(node, 2, "dim", 0) % len(xs)
    sizes = [t.shape[dim] for t in outs]
    pieces = _piece_slots(g, x, dim, sizes)

    def rw(n: Node, kept: Kept) -> None:
        n.target = aten.split_with_sizes.default
        n.args = (n.args[0], [len(kept(p[dim])) for p in pieces], dim)
        n.kwargs = {}

    g.builder.rewrites[node.name] = rw
    return pieces


@rule(aten.unbind.int)
def unbind(g: DependencyGraph, node: Node):
    b = g.builder
    xs = g.slots_of(node.args[0])
    if xs is None:
        return NotImplemented
    dim = _arg(node, 1, "dim", 0) % len(xs)
    b.freeze(xs[dim])
    rest = [s for i, s in enumerate(xs) if i != dim]
    b.handled.update(rest)
    return [list(rest) for _ in _out_tensors(node)]


@rule(operator.getitem)
def getitem(g: DependencyGraph, node: Node):
    src, i = node.args
    slots = g.node_slots.get(src.name) if isinstance(src, Node) else None
    if not isinstance(i, int) or not slots or not isinstance(slots[0], list) or i >= len(slots):
        return NotImplemented if isinstance(_val(node), torch.Tensor) else None
    out = slots[i]
    g.builder.handled.update(out)
    return list(out)


@rule(aten.slice.Tensor, aten.narrow.default, aten.slice_copy.Tensor)
def slice_(g: DependencyGraph, node: Node):
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

            def rw(n: Node, kept: Kept) -> None:
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
def select(g: DependencyGraph, node: Node):
    b = g.builder
    xs = g.slots_of(node.args[0])
    if xs is None:
        return NotImplemented
    dim = node.args[1] % len(xs)
    b.freeze(xs[dim])
    out = [s for i, s in enumerate(xs) if i != dim]
    b.handled.update(out)
    return out


# ---------------------------------------------------------------------------------------------
# layout: permute, transpose, reshape family
# ---------------------------------------------------------------------------------------------


@rule(aten.permute.default, aten.permute_copy.default)
def permute(g: DependencyGraph, node: Node):
    xs = g.slots_of(node.args[0])
    if xs is None:
        return NotImplemented
    dims = [d % len(xs) for d in node.args[1]]
    g.builder.handled.update(xs)
    return [xs[d] for d in dims]


@rule(aten.transpose.int, aten.transpose_copy.int, aten.swapaxes.default, aten.t.default, aten.numpy_T.default)
def transpose(g: DependencyGraph, node: Node):
    xs = g.slots_of(node.args[0])
    if xs is None:
        return NotImplemented
    out = list(xs)
    if len(xs) >= 2:
        if node.target in (aten.t.default, aten.numpy_T.default):
            out = out[::-1]
        else:
            a, c = node.args[1] % len(xs), node.args[2] % len(xs)
            out[a], out[c] = out[c], out[a]
    g.builder.handled.update(xs)
    return out


@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.view_copy.default,
      aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
      aten.unsqueeze.default, aten.unsqueeze_copy.default, aten.squeeze_copy.dim, aten.expand.default,
      aten.expand_copy.default)
def reshape(g: DependencyGraph, node: Node):
    b = g.builder
    x = node.args[0]
    xs = g.slots_of(x)
    if xs is None:
        return NotImplemented
    in_shape, out_shape = _shape(x), _shape(node)
    if node.target in (aten.expand.default, aten.expand_copy.default):
        out = _broadcast(g, node, [x], out_shape)
        _register_shape_rewrite(b, node, 1, "size", out, keep_minus_one=True)
        return out
    out = _reshape_slots(g, xs, in_shape, out_shape)
    if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.view_copy.default):
        _register_shape_rewrite(b, node, 1, "size", out)
    elif node.target is aten.unflatten.int:
        d = node.args[1] % len(in_shape)
        sub = out[d: d + len(node.args[2])]
        _register_shape_rewrite(b, node, 2, "sizes", sub)
    return out


def _register_shape_rewrite(b: Builder, node: Node, idx: int, name: str, slots: list[int],
                            keep_minus_one: bool = False) -> None:
    def rw(n: Node, kept: Kept) -> None:
        old = _arg(n, idx, name)
        new = []
        for v, s in zip(old, slots, strict=True):
            if isinstance(v, int) and v != -1:
                new.append(len(kept(s)))
            else:
                new.append(v)
        _set_arg(n, idx, name, new)

    b.rewrites[node.name] = rw


def _reshape_slots(g: DependencyGraph, xs: list[int], in_shape, out_shape) -> list[int]:
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
                out[k] = b.new(out_shape[k])
                b.freeze(out[k])
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
    return out  # type: ignore[return-value]


def _is_one(v) -> bool:
    return isinstance(v, int) and v == 1


@rule(aten.repeat_interleave.self_int)
def repeat_interleave(g: DependencyGraph, node: Node):
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
def roll(g: DependencyGraph, node: Node):
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


@rule(aten.index.Tensor)
def index(g: DependencyGraph, node: Node):
    """x[..., idx, ...] with one index tensor (a relative position bias table gathered by an index buffer): the
    indexed dim is replaced by the index's dims (and stays whole: the index values point into it); the other
    dims of x pass through."""
    b = g.builder
    x, indices = node.args[0], node.args[1]
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


@rule(aten.repeat.default)
def repeat(g: DependencyGraph, node: Node):
    """x.repeat(r...): output index k*n + i along a repeated dim is input index i."""
    b = g.builder
    x, reps = node.args[0], node.args[1]
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


from . import rules_rnn  # noqa: E402,F401  (registers the recurrent-layer rules)
