"""Recurrent layers (LSTM, GRU) as `torch.export` writes them.

`aten.lstm.input(input, hx: [h0, c0], params, has_biases, num_layers, dropout, train, bidirectional,
batch_first) -> (output, h_n, c_n)` and `aten.gru.input(input, hx, params, ...) -> (output, h_n)` carry
every layer's weights in one flat list: per layer, per direction (forward, then reverse),
`w_ih (G*H, in), w_hh (G*H, H)[, b_ih (G*H,), b_hh (G*H,)]`, with G gate blocks of H rows each
(LSTM G=4: i, f, g, o; GRU G=3: r, z, n). The op takes one hidden size H for all layers and directions
(it reads it from `hx`, a plain (layers * dirs, B, H) tensor), so a single hidden slot stands for all of them.
"""

from __future__ import annotations

from types import NotImplementedType

import numpy as np
import torch
from torch.fx import Node

from ..builder import RuleGraph
from ._args import _op_args, _out_tensors, _same, _shape
from .registry import rule

aten = torch.ops.aten


_RNN: dict[object, int] = {aten.lstm.input: 4, aten.gru.input: 3}  # op -> gate blocks G


@rule(*_RNN)
def rnn(g: RuleGraph, node: Node) -> list[list[int]] | NotImplementedType:
    """`aten.lstm.input` / `aten.gru.input`, dense (no `proj_size`). Couplings, with one hidden slot `h` of
    size H shared by every layer and direction (the op has a single H, that of `hx`):

    - rows of every `w_ih`, `w_hh`, `b_ih`, `b_hh`: row k*H + j is hidden unit j of `h`, for every gate k;
    - columns of every `w_hh`: unit j of `h`;
    - columns of layer 0's `w_ih`: the input's last dim (features);
    - columns of layer l > 0's `w_ih` (D*H, forward then reverse): column d*H + j is unit j of `h`;
    - the output's last dim (D*H) likewise; its other dims are the input's (batch and time, whatever
      `batch_first` says, keep their order);
    - `h0`/`c0`/`h_n`/`c_n` (layers*D, B, H): last dim `h`, batch dim the input's batch dim, dim 0 frozen.

    Anything else (projections, a weight count or shape that does not fit, a non-tensor argument) is
    NotImplemented: every dim frozen and the op reported."""
    b = g.builder
    n_gates = _RNN[node.target]
    lstm = node.target is aten.lstm.input
    if len(node.args) < 9 or node.kwargs:
        return NotImplemented
    args = _op_args(node)
    x, hx, params = args[0], args[1], args[2]
    has_biases, num_layers = args[3], args[4]
    bidirectional, batch_first = args[7], args[8]
    if not (isinstance(num_layers, int) and num_layers >= 1 and isinstance(bidirectional, bool)
            and isinstance(has_biases, bool) and isinstance(batch_first, bool)):
        return NotImplemented
    states = list(hx) if lstm else [hx]
    if lstm and len(states) != 2:
        return NotImplemented
    n_dirs = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if not isinstance(params, (list, tuple)) or len(params) != num_layers * n_dirs * per:
        return NotImplemented  # an LSTM with proj_size adds w_hr: not handled

    xs = g.slots_of(x)
    if xs is None or len(xs) not in (2, 3):
        return NotImplemented
    batched = len(xs) == 3
    found = [g.slots_of(s) for s in states]
    state_slots = [s for s in found if s is not None and len(s) == len(xs)]
    if len(state_slots) != len(found):
        return NotImplemented
    hidden = _shape(states[0])[-1]
    if not isinstance(hidden, int) or not all(_same(_shape(s)[-1], hidden) for s in states):
        return NotImplemented
    outs = _out_tensors(node)
    n_dirs_hidden = n_dirs * hidden
    if (outs is None or len(outs) != len(states) + 1 or outs[0].dim() != len(xs)
            or not _same(outs[0].shape[-1], n_dirs_hidden)):
        return NotImplemented
    gh = n_gates * hidden
    shapes = []
    for p in params:
        ps = g.slots_of(p)
        if ps is None:
            return NotImplemented
        shapes.append((ps, _shape(p)))
    in_size = _shape(x)[-1]
    if not isinstance(in_size, int):
        return NotImplemented
    for layer in range(num_layers):
        want_in = in_size if layer == 0 else n_dirs * hidden
        for d in range(n_dirs):
            base = (layer * n_dirs + d) * per
            wanted = [(gh, want_in), (gh, hidden)] + [(gh,)] * (per - 2)
            if any(not _fits(shapes[base + k][1], w) for k, w in enumerate(wanted)):
                return NotImplemented

    h = b.new(hidden)
    rows = np.arange(gh)
    unit_of_row = np.tile(np.arange(hidden), n_gates)
    cols = np.arange(n_dirs_hidden)
    unit_of_col = np.tile(np.arange(hidden), n_dirs)
    for layer in range(num_layers):
        for d in range(n_dirs):
            base = (layer * n_dirs + d) * per
            ih, hh = shapes[base][0], shapes[base + 1][0]
            b.union_map(ih[0], rows, h, unit_of_row)
            b.union_map(hh[0], rows, h, unit_of_row)
            for k in range(2, per):
                b.union_map(shapes[base + k][0][0], rows, h, unit_of_row)
            b.union(hh[1], h)
            if layer == 0:
                b.union(xs[-1], ih[1])
            else:
                b.union_map(ih[1], cols, h, unit_of_col)

    feat = b.new(n_dirs_hidden)
    b.union_map(feat, cols, h, unit_of_col)
    out = list(xs[:-1]) + [feat]
    b.handled.update(out)

    batch_slot = (xs[0] if batch_first else xs[1]) if batched else None
    for ss in state_slots:
        b.union(ss[-1], h)
        if batch_slot is not None:
            b.union(ss[1], batch_slot)
    results = [out]
    for t in outs[1:]:
        sl = b.new_like(t.shape)  # dim 0 (layers * dirs) stays unhandled: frozen
        b.union(sl[-1], h)
        if batch_slot is not None:
            b.union(sl[1], batch_slot)
        results.append(sl)
    return results


def _fits(shape: tuple, want: tuple[int, ...]) -> bool:
    """`shape` is exactly the concrete `want` (no symbolic size compared, so no guard is built)."""
    return len(shape) == len(want) and all(isinstance(a, int) and a == w for a, w in zip(shape, want, strict=True))
