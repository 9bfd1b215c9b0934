"""Tests for the sequence / transformer model zoo (tests.zoo_seq): deterministic builds, non-identity
norms, exports whose outputs match eager at other batch sizes and, where declared, other sequence lengths."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import zoo, zoo_seq

EXPECTED = {
    "vit",
    "gpt",
    "encoder_manual",
    "llama",
    "lstm_tagger",
    "lstm_tagger_bi",
    "gru_tagger",
    "swin_block",
    "hf_bert",
    "hf_gpt2",
    "hf_vit",
    "hf_llama",
    "hf_qwen2",
    "hf_mistral",
    "hf_distilbert",
    "hf_t5",
}
IMAGE = {"vit", "swin_block", "hf_vit"}
RECURRENT = {"lstm_tagger", "lstm_tagger_bi", "gru_tagger"}  # sequence models whose seq dim cannot be dynamic
DYNAMIC_SEQ = EXPECTED - IMAGE - RECURRENT
NOT_NORMALISED = RECURRENT

OUTPUT_SHAPES = {  # at batch B and sequence length T
    "vit": lambda b, t: (b, 10),
    "gpt": lambda b, t: (b, t, 256),
    "encoder_manual": lambda b, t: (b, 10),
    "llama": lambda b, t: (b, t, 256),
    "lstm_tagger": lambda b, t: (b, t, 8),
    "lstm_tagger_bi": lambda b, t: (b, t, 8),
    "gru_tagger": lambda b, t: (b, t, 8),
    "swin_block": lambda b, t: (b, 10),
    "hf_bert": lambda b, t: (b, 3),
    "hf_gpt2": lambda b, t: (b, t, 1000),
    "hf_vit": lambda b, t: (b, 10),
    "hf_llama": lambda b, t: (b, t, 1000),
    "hf_qwen2": lambda b, t: (b, t, 1000),
    "hf_mistral": lambda b, t: (b, t, 1000),
    "hf_distilbert": lambda b, t: (b, 2),
    "hf_t5": lambda b, t: (b, t, 64),
}


def _params(names: set[str]) -> list:
    """One pytest param per entry; ``transformers`` entries skip where it is not installed."""
    out = []
    for name in sorted(names):
        marks = []
        if name.startswith("hf_"):
            marks.append(pytest.mark.skipif(not zoo_seq.available(name), reason="transformers is not installed"))
        out.append(pytest.param(name, marks=marks))
    return out


@functools.cache
def _exported(name: str) -> torch.export.ExportedProgram:
    return zoo_seq.export(name, seed=0)


@functools.cache
def _model(name: str) -> nn.Module:
    return zoo_seq.build(name, seed=0)[0]


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _user_placeholders(ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    return [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]


def _check_close(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
    with torch.no_grad():
        expected = _model(name)(*inputs)
        got = _exported(name).module()(*inputs)
    t = inputs[0].shape[1] if name not in IMAGE else None
    assert got.shape == expected.shape == OUTPUT_SHAPES[name](inputs[0].shape[0], t)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_contents() -> None:
    assert set(zoo_seq.SEQ_ZOO) == EXPECTED == set(OUTPUT_SHAPES)
    assert not set(zoo_seq.SEQ_ZOO) & set(zoo.ZOO)
    for name, entry in zoo_seq.SEQ_ZOO.items():
        assert isinstance(entry, zoo.ZooModel)
        assert entry.name == name and entry.description
        assert entry.dynamic_seq == (name in DYNAMIC_SEQ)
        assert (entry.seq_len is None) == (name in IMAGE)
        assert (entry.seq_max is not None) == entry.dynamic_seq
        if entry.dynamic_seq:
            assert entry.seq_min <= entry.seq_len <= entry.seq_max
        assert entry.normalised == (name not in NOT_NORMALISED)
        assert entry.requires == ("transformers" if name.startswith("hf_") else None)


def test_unknown_name() -> None:
    with pytest.raises(KeyError):
        zoo_seq.build("no_such_model")
    with pytest.raises(ValueError, match="dynamic sequence"):
        zoo_seq.dynamic_shapes("lstm_tagger", dynamic_seq=True)


def test_dynamic_shapes_spec() -> None:
    (spec,) = zoo_seq.dynamic_shapes("gpt")
    assert set(spec) == {0, 1}
    assert spec[1].min == 1 and spec[1].max == 32
    (spec,) = zoo_seq.dynamic_shapes("vit")
    assert set(spec) == {0}
    assert zoo_seq.dynamic_shapes("gpt", dynamic_batch=False, dynamic_seq=False) is None


def test_inputs() -> None:
    (tokens,) = zoo_seq.SEQ_ZOO["gpt"].example_inputs(5)
    assert tokens.dtype == torch.int64 and tokens.shape == (5, 16)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 256
    (tokens,) = zoo_seq.SEQ_ZOO["llama"].make_inputs(3, 40)
    assert tokens.shape == (3, 40)
    (images,) = zoo_seq.SEQ_ZOO["swin_block"].make_inputs(4, None)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32


@pytest.mark.parametrize("name", _params(EXPECTED))
def test_build_deterministic(name: str) -> None:
    m1, x1 = zoo_seq.build(name, seed=0)
    m2, x2 = zoo_seq.build(name, seed=0)
    m3, _ = zoo_seq.build(name, seed=1)
    assert not m1.training and all(not m.training for m in m1.modules())
    assert _same_state(m1, m2)
    assert not _same_state(m1, m3)
    assert len(x1) == len(x2) == 1 and torch.equal(x1[0], x2[0])
    assert x1[0].shape[0] == 2
    with torch.no_grad():
        torch.testing.assert_close(m1(*x1), m2(*x2), rtol=0, atol=0)


@pytest.mark.parametrize("name", _params(EXPECTED - NOT_NORMALISED))
def test_norms_not_identity(name: str) -> None:
    norms = [m for m in _model(name).modules() if type(m).__name__.lower().endswith("norm")]
    assert norms
    for m in norms:
        weight = m._parameters.get("weight")
        if weight is not None:
            assert not torch.allclose(weight, torch.ones_like(weight)), type(m).__name__


@pytest.mark.parametrize("name", _params(EXPECTED))
def test_export_matches_eager(name: str) -> None:
    """One export per entry: the batch dim is symbolic and outputs match eager at batch 2, 3 and 1; the
    sequence dim is symbolic and matches at other lengths where declared, and is the traced length elsewhere."""
    ep = _exported(name)
    entry = zoo_seq.SEQ_ZOO[name]
    (node,) = _user_placeholders(ep)
    shape = node.meta["val"].shape
    assert isinstance(shape[0], torch.SymInt), "batch dim specialised"
    for batch in (2, 3, 1):
        _check_close(name, entry.example_inputs(batch))
    if entry.dynamic_seq:
        assert isinstance(shape[1], torch.SymInt), "sequence dim specialised"
        assert entry.seq_max is not None
        for batch, seq in ((3, 9), (1, entry.seq_min), (2, entry.seq_max)):
            _check_close(name, entry.make_inputs(batch, seq))
    elif entry.seq_len is not None:
        assert shape[1] == entry.seq_len


@pytest.mark.parametrize("name", ["lstm_tagger", "gru_tagger"])
def test_recurrent_seq_cannot_be_dynamic(name: str) -> None:
    """The documented limitation still holds (if torch lifts it, flip ``dynamic_seq`` for the taggers)."""
    model, inputs = zoo_seq.build(name)
    seq = torch.export.Dim("seq", min=1, max=64)
    with pytest.raises(Exception, match="specialized"):
        torch.export.export(model, inputs, dynamic_shapes=({1: seq},))


def test_static_export() -> None:
    ep = zoo_seq.export("gpt", dynamic_batch=False, dynamic_seq=False)
    (node,) = _user_placeholders(ep)
    assert tuple(node.meta["val"].shape) == (2, 16)
    (x,) = zoo_seq.SEQ_ZOO["gpt"].example_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), _model("gpt")(x))


def test_gpt_weights_tied() -> None:
    model = _model("gpt")
    assert model.lm_head.weight is model.tok_emb.weight


def test_llama_gqa_shapes() -> None:
    attn = _model("llama").layers[0].attn
    assert attn.heads == 4 and attn.kv_heads == 2
    assert attn.q_proj.out_features == 64 and attn.k_proj.out_features == attn.v_proj.out_features == 32


def test_rmsnorm_matches_functional() -> None:
    norm = zoo_seq.RMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), norm.weight, eps=1e-6))


def test_rotate_half() -> None:
    x = torch.arange(4.0)
    assert zoo_seq.rotate_half(x).tolist() == [-2.0, -3.0, 0.0, 1.0]


def test_window_partition_roundtrip() -> None:
    x = torch.randn(2, 8, 8, 5)
    windows = zoo_seq.window_partition(x, 4)
    assert windows.shape == (8, 16, 5)
    torch.testing.assert_close(windows[0], x[0, :4, :4].reshape(16, 5))
    torch.testing.assert_close(zoo_seq.window_reverse(windows, 4, 8, 8), x)


def test_shift_mask() -> None:
    mask = zoo_seq._shift_mask(8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region only
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert torch.equal(mask, mask.transpose(1, 2))
