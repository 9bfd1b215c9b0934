"""Recurrent layers (`aten.lstm.input`, `aten.gru.input`) and the creation ops building their initial state
(`aten.zeros` & co.): the hidden size is pruned with every gate block aligned, the `zeros([L*D, B, H])` literal
follows, and the zeroed-channel oracle holds.

Why the oracle holds for a recurrent layer: with all of hidden unit j's rows zeroed (every gate, in w_ih,
w_hh, b_ih, b_hh), an LSTM unit has i = f = o = sigmoid(0) = 1/2 and g = tanh(0) = 0, so from c0 = 0 its
cell stays 0 and h_j = o * tanh(c_j) = 0; a GRU unit has z = 1/2 and n = tanh(0 + r * 0) = 0, so
h_j = (1 - z) * n + z * h_j' = h_j' / 2 = 0 from h0 = 0. The unit outputs 0 at every step, so its w_hh
column, the next layer's w_ih columns and the tagger's input column no longer matter either.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunery.core import PruneConfig, apply_zeroing, count, load_program, prune
from tests import zoo_seq

RATIOS = (0.3, 0.5)
GATES = {"lstm_tagger": 4, "lstm_tagger_bi": 4, "gru_tagger": 3}
LAYOUT = {"lstm_tagger": (1, 1), "lstm_tagger_bi": (2, 2), "gru_tagger": (1, 1)}  # (layers, directions)
VOCAB, EMB, HIDDEN, TAGS = 128, 32, 48, 8
RNN_OPS = ("lstm.input", "gru.input", "zeros.default")


@pytest.fixture(scope="module")
def programs():
    cache: dict[str, torch.export.ExportedProgram] = {}

    def get(name: str) -> torch.export.ExportedProgram:
        if name not in cache:
            cache[name] = zoo_seq.export(name)
        return cache[name]

    return get


def _kept(n: int, ratio: float) -> int:
    return int(n * (1.0 - ratio) + 1e-9)


def _expected_params(name: str, emb: int, hidden: int) -> int:
    gates, (layers, dirs) = GATES[name], LAYOUT[name]
    total = VOCAB * emb + dirs * hidden * TAGS + TAGS
    for layer in range(layers):
        width = emb if layer == 0 else dirs * hidden
        total += dirs * gates * hidden * (width + hidden + 2)
    return total


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", sorted(GATES))
def test_recurrent_tagger_prunes_hidden_size(name: str, ratio: float, programs, tmp_path) -> None:
    ep = programs(name)
    result = prune(ep, PruneConfig(ratio=ratio))
    report, plan = result.report, result.plan
    gates, (layers, dirs) = GATES[name], LAYOUT[name]
    h, e = _kept(HIDDEN, ratio), _kept(EMB, ratio)

    # nothing about the recurrent layer is frozen any more
    assert not set(report["frozen_ops"]) & set(RNN_OPS), report["frozen_ops"]

    # every layer and direction shrinks to the same H' (the op has one hidden size), gates G*H' rows
    new = result.program.state_dict
    suffixes = [f"_l{layer}{'_reverse' if d else ''}" for layer in range(layers) for d in range(dirs)]
    for sfx in suffixes:
        width = e if sfx.startswith("_l0") else dirs * h
        assert tuple(new[f"rnn.weight_hh{sfx}"].shape) == (gates * h, h)
        assert tuple(new[f"rnn.weight_ih{sfx}"].shape) == (gates * h, width)
        assert tuple(new[f"rnn.bias_ih{sfx}"].shape) == tuple(new[f"rnn.bias_hh{sfx}"].shape) == (gates * h,)
    assert tuple(new["out.weight"].shape) == (TAGS, dirs * h)
    assert tuple(new["embed.weight"].shape) == (VOCAB, e)

    # gate blocks aligned: row k*H' + i of the pruned weight is row k*H + kept[i] of the original, every gate k
    kept = torch.as_tensor(plan.kept(plan.graph.params["rnn.weight_hh_l0"].slots[1]))
    assert len(kept) == h
    old = ep.state_dict
    for sfx in suffixes:
        for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            w_old, w_new = old[f"rnn.{p}{sfx}"], new[f"rnn.{p}{sfx}"]
            for k in range(gates):
                rows = w_old[k * HIDDEN + kept]
                if p == "weight_hh":
                    rows = rows[:, kept]
                if p == "weight_ih" and not sfx.startswith("_l0"):
                    rows = rows[:, torch.cat([d * HIDDEN + kept for d in range(dirs)])]
                if p == "weight_ih" and sfx.startswith("_l0"):
                    continue  # its columns are the embedding group's: checked by the oracle below
                torch.testing.assert_close(w_new[k * h: (k + 1) * h], rows, rtol=0, atol=0)

    # the initial-state literal follows H': zeros([layers * dirs, B, H'])
    zeros = [n for n in result.program.graph.nodes if n.target is torch.ops.aten.zeros.default]
    assert zeros and all(n.args[0][0] == layers * dirs and n.args[0][2] == h for n in zeros)

    # params drop as computed from H' and E'
    assert report["params_before"] == _expected_params(name, EMB, HIDDEN)
    assert report["params_after"] == _expected_params(name, e, h) == count(result.program).params

    # batch stays dynamic: run at batch 3 (traced at 2); output shape kept
    x = zoo_seq.SEQ_ZOO[name].example_inputs(3)
    with torch.no_grad():
        y_ref = ep.module()(*x)
        y = result.program.module()(*x)
        y_zeroed = apply_zeroing(ep, plan)(*x)
    assert y.shape == y_ref.shape == (3, 8, TAGS)
    assert not torch.allclose(y, y_ref, atol=1e-3)  # pruning changed the function: the oracle is not vacuous
    torch.testing.assert_close(y, y_zeroed, atol=1e-5, rtol=1e-4)

    # saves and reloads through the safe intake, same outputs, any batch
    path = tmp_path / "pruned.pt2"
    torch.export.save(result.program, path)
    reloaded = load_program(path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module()(*x), y)
        assert reloaded.module()(*zoo_seq.SEQ_ZOO[name].example_inputs(1)).shape == (1, 8, TAGS)


# ---------------------------------------------------------------------------------------------------------------
# layouts the zoo does not cover
# ---------------------------------------------------------------------------------------------------------------


class _Rnn(nn.Module):
    def __init__(self, cell: str = "lstm", batch_first: bool = True, bias: bool = True, layers: int = 1,
                 bidirectional: bool = False, proj_size: int = 0) -> None:
        super().__init__()
        kw = {"proj_size": proj_size} if proj_size else {}
        self.inp = nn.Linear(10, 16)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](16, 12, num_layers=layers, batch_first=batch_first,
                                                        bias=bias, bidirectional=bidirectional, **kw)
        self.out = nn.Linear((proj_size or 12) * (2 if bidirectional else 1), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.rnn(self.inp(x))[0]))


class _RnnWithState(_Rnn):
    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.out(self.rnn(self.inp(x), h0)[0])


def _export(model: nn.Module, args: tuple, batch_dim: int | None) -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    model.eval()
    ds = None
    if batch_dim is not None:
        b = torch.export.Dim("batch", min=1, max=64)
        ds = tuple({batch_dim if i == 0 else 1: b} for i in range(len(args)))
    return torch.export.export(model, args, dynamic_shapes=ds, strict=False)


@pytest.mark.parametrize(
    "kwargs, x, batch_dim",
    [
        ({"batch_first": False}, torch.randn(7, 2, 10), 1),
        ({"cell": "gru", "bias": False}, torch.randn(2, 7, 10), 0),
        ({"bias": False, "layers": 3, "bidirectional": True}, torch.randn(2, 7, 10), 0),
        ({"cell": "gru", "layers": 2, "bidirectional": True, "batch_first": False}, torch.randn(7, 2, 10), 1),
        ({}, torch.randn(7, 10), None),  # unbatched: input (T, F), state (L*D, H)
        ({"cell": "gru", "layers": 2, "bidirectional": True}, torch.randn(7, 10), None),
    ],
    ids=["lstm-time-major", "gru-no-bias", "lstm-3-layers-bi-no-bias", "gru-2-layers-bi-time-major",
         "lstm-unbatched", "gru-unbatched-bi"],
)
def test_recurrent_layouts_prune_and_match_the_oracle(kwargs: dict, x: torch.Tensor, batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = _Rnn(**kwargs)
    ep = _export(model, (x,), batch_dim)
    result = prune(ep, PruneConfig(ratio=0.5))
    assert not set(result.report["frozen_ops"]) & set(RNN_OPS), result.report["frozen_ops"]
    gates = 3 if kwargs.get("cell") == "gru" else 4
    assert tuple(result.program.state_dict["rnn.weight_hh_l0"].shape) == (gates * 6, 6)
    xs = [x]
    if batch_dim is not None:
        shape = list(x.shape)
        shape[batch_dim] = 3
        xs.append(torch.randn(shape))
    for xi in xs:
        with torch.no_grad():
            y = result.program.module()(xi)
            assert y.shape == ep.module()(xi).shape
            torch.testing.assert_close(y, apply_zeroing(ep, result.plan)(xi), atol=1e-5, rtol=1e-4)


def test_lstm_with_projections_is_left_whole_and_reported() -> None:
    ep = _export(_Rnn(proj_size=6), (torch.randn(2, 7, 10),), 0)
    result = prune(ep, PruneConfig(ratio=0.5))
    assert "lstm.input" in result.report["frozen_ops"]
    for k, v in ep.state_dict.items():
        if k.startswith("rnn."):
            assert result.program.state_dict[k].shape == v.shape, k
    x = torch.randn(3, 7, 10)
    with torch.no_grad():
        torch.testing.assert_close(result.program.module()(x), apply_zeroing(ep, result.plan)(x))


def test_a_state_given_by_the_caller_keeps_the_hidden_size() -> None:
    """h0 is a program input (its size is the caller's): H stays, the input features may still go."""
    ep = _export(_RnnWithState("gru"), (torch.randn(2, 7, 10), torch.zeros(1, 2, 12)), 0)
    result = prune(ep, PruneConfig(ratio=0.5))
    assert "gru.input" not in result.report["frozen_ops"]
    new = result.program.state_dict
    assert tuple(new["rnn.weight_hh_l0"].shape) == (36, 12)
    assert tuple(new["rnn.weight_ih_l0"].shape) == (36, 8)
    x, h0 = torch.randn(3, 7, 10), torch.randn(1, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(result.program.module()(x, h0), apply_zeroing(ep, result.plan)(x, h0),
                                   atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# creation ops outside recurrent layers
# ---------------------------------------------------------------------------------------------------------------


class _Creation(nn.Module):
    """Channel-sized tensors made from size literals, added to a conv's output: their channel literal must shrink."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = y + torch.zeros(1, 8, 1, 1) + torch.full((8, 1, 1), 0.5) * torch.ones(1, 8, 1, 1)
        y = y + y.new_zeros(y.shape) + y.new_full((8, 1, 1), 0.25) * y.new_ones((1, 8, 6, 6))
        # empty's values are never read (the mask is all True; `fill_` has no rule of its own)
        y = torch.where(torch.ones(1, 8, 1, 1, dtype=torch.bool), y, torch.empty(8, 1, 1))
        return self.conv2(y)


def test_creation_ops_rewrite_their_size_literals() -> None:
    ep = _export(_Creation(), (torch.randn(2, 3, 6, 6),), 0)
    targets = {n.target for n in ep.graph.nodes}
    aten = torch.ops.aten
    assert {aten.zeros.default, aten.full.default, aten.ones.default, aten.new_zeros.default,
            aten.new_full.default, aten.new_ones.default, aten.empty.memory_format} <= targets
    result = prune(ep, PruneConfig(ratio=0.5))
    assert not any(op.split(".")[0] in ("zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full")
                   for op in result.report["frozen_ops"]), result.report["frozen_ops"]
    assert tuple(result.program.state_dict["conv1.weight"].shape) == (4, 3, 3, 3)
    assert tuple(result.program.state_dict["conv2.weight"].shape) == (4, 4, 3, 3)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        y = result.program.module()(x)
        assert y.shape == ep.module()(x).shape
        # removed channels carry the constants but meet zeroed conv2 columns: the oracle holds
        torch.testing.assert_close(y, apply_zeroing(ep, result.plan)(x), atol=1e-5, rtol=1e-4)
