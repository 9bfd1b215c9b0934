"""The engine on transformers (tests.zoo_seq): whole heads or head dims pruned consistently (Q, K, V and the
output projection, grouped-query heads with the query heads sharing them, rotary pairs, fused projections,
relative position tables), the residual stream left whole unless asked, tied embeddings kept tied, shapes and
dynamic sequence dims kept, saves and reloads through the safe intake, and the zeroed-head oracle: zeroing what
is pruned in the original program gives the pruned program's outputs."""

from __future__ import annotations

import functools
import re

import pytest
import torch

from prunery.core import PruneConfig, apply_zeroing, count, load_program, prune
from tests import zoo_seq

RECURRENT = {"lstm_tagger", "lstm_tagger_bi", "gru_tagger"}  # tests/core/test_rules_rnn.py
ATTENTION = sorted(set(zoo_seq.SEQ_ZOO) - RECURRENT)
MODES = ("heads", "head-dim")
ATTN = re.compile(r"(attn|attention)\.", re.IGNORECASE)
NORM = re.compile(r"(norm|ln_|layernorm)[^.]*\.weight$", re.IGNORECASE)

# in-repo models: (projection whose output rows are query heads x head dim, key projection, heads, kv heads, dim)
HEADS = {
    "gpt": ("blocks.0.attn.q.weight", "blocks.0.attn.k.weight", 4, 4, 16),
    "encoder_manual": ("layers.0.attn.q.weight", "layers.0.attn.k.weight", 4, 4, 16),
    "llama": ("layers.0.attn.q_proj.weight", "layers.0.attn.k_proj.weight", 4, 2, 16),
}


def _params(names: list[str]) -> list:
    return [pytest.param(n, marks=[pytest.mark.skipif(not zoo_seq.available(n), reason="transformers not installed")]
                         if n.startswith("hf_") else []) for n in names]


@functools.cache
def _exported(name: str) -> torch.export.ExportedProgram:
    return zoo_seq.export(name, seed=0)


@functools.cache
def _pruned(name: str, mode: str, ratio: float):
    return prune(_exported(name), PruneConfig(ratio=ratio, attention=mode))


def _inputs(name: str, batch: int = 3) -> tuple[torch.Tensor, ...]:
    entry = zoo_seq.SEQ_ZOO[name]
    return entry.make_inputs(batch, 9 if entry.dynamic_seq else entry.seq_len)


def _shapes(report: dict) -> dict[str, tuple[list[int], list[int] | None]]:
    return {layer["name"]: (layer["shape_before"], layer["shape_after"]) for layer in report["layers"]}


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", _params(ATTENTION))
def test_transformer_prunes_and_the_zeroed_oracle_holds(name: str, mode: str, ratio: float) -> None:
    ep = _exported(name)
    result = _pruned(name, mode, ratio)
    report = result.report
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert count(result.program).params == report["params_after"]
    x = _inputs(name)
    with torch.no_grad():
        y, y_ref = result.program.module()(*x), ep.module()(*x)
        assert y.shape == y_ref.shape
        # the zeroed-head oracle: what was removed, set to zero in the original, changes nothing more
        torch.testing.assert_close(y, apply_zeroing(ep, result.plan)(*x), atol=2e-4, rtol=1e-3)
    shapes = _shapes(report)
    # the residual stream is left whole by default: every normalisation weight keeps its size
    norms = {n: s for n, s in shapes.items() if NORM.search(n)}
    assert norms and all(before == after for before, after in norms.values()), norms
    # some attention projection lost rows
    attention = [n for n in shapes if ATTN.search(n) and shapes[n][0] != shapes[n][1]]
    assert attention, f"{mode}: no attention parameter was pruned"
    if name in HEADS:
        q_name, k_name, heads, kv_heads, dim = HEADS[name]
        q_rows, k_rows = shapes[q_name][1][0], shapes[k_name][1][0]
        if mode == "heads":  # whole heads: multiples of the head dim; kv groups keep their query heads
            assert q_rows % dim == 0 and k_rows % dim == 0 and q_rows < heads * dim
            assert q_rows // dim == (k_rows // dim) * (heads // kv_heads)
        else:  # the same dims inside every head: every head kept, each smaller
            assert q_rows % heads == 0 and k_rows % kv_heads == 0 and q_rows < heads * dim
            assert q_rows // heads == k_rows // kv_heads


@pytest.mark.parametrize("name", _params(ATTENTION))
def test_pruned_transformer_keeps_dynamic_dims_and_reloads(name: str, tmp_path) -> None:
    result = _pruned(name, "heads", 0.5)
    entry = zoo_seq.SEQ_ZOO[name]
    path = tmp_path / "pruned.pt2"
    torch.export.save(result.program, path)
    reloaded = load_program(path).module()
    with torch.no_grad():
        x = _inputs(name)
        torch.testing.assert_close(reloaded(*x), result.program.module()(*x))
        if entry.dynamic_seq:
            for seq in (entry.seq_min, entry.seq_max):
                out = reloaded(*entry.make_inputs(2, seq))
                assert out.shape == _exported(name).module()(*entry.make_inputs(2, seq)).shape
        assert reloaded(*_inputs(name, batch=1)).shape[0] == 1


def test_attention_none_leaves_attention_whole_and_prunes_the_mlp() -> None:
    shapes = _shapes(prune(_exported("gpt"), PruneConfig(ratio=0.5, attention="none")).report)
    assert all(before == after for n, (before, after) in shapes.items() if ".attn." in n)
    assert shapes["blocks.0.mlp.fc1.weight"] == ([128, 64], [64, 64])


def test_prune_hidden_shrinks_the_residual_stream_and_keeps_tied_embeddings_tied() -> None:
    ep = _exported("gpt")
    result = prune(ep, PruneConfig(ratio=0.5, prune_hidden=True))
    shapes = _shapes(result.report)
    assert shapes["tok_emb.weight"] == ([256, 64], [256, 32]) and shapes["lm_head.weight"] == ([256, 64], [256, 32])
    assert all(after == [32] for n, (_, after) in shapes.items() if NORM.search(n))
    module = result.program.module()
    assert module.tok_emb.weight is module.lm_head.weight  # one tensor, counted once
    tied = module.tok_emb.weight.numel()
    assert count(result.program).params == sum(p.numel() for p in module.parameters())  # parameters() dedups
    assert tied == 256 * 32
    x = _inputs("gpt")
    with torch.no_grad():
        assert module(*x).shape == ep.module()(*x).shape


@pytest.mark.parametrize("name", _params(["vit", "hf_bert", "llama"]))
def test_prune_hidden_takes_the_embeddings_and_norms_along(name: str) -> None:
    """The hidden size goes everywhere at once: patch embedding conv, class token and position table (ViT),
    word/position/type embeddings and every LayerNorm (BERT), RMSNorm weights and the embedding (LLaMA)."""
    ep = _exported(name)
    result = prune(ep, PruneConfig(ratio=0.5, prune_hidden=True))
    shapes = _shapes(result.report)
    norms = {n: s for n, s in shapes.items() if NORM.search(n)}
    widths = {after[-1] for before, after in norms.values()}
    assert len(widths) == 1 and widths.pop() < norms[next(iter(norms))][0][-1], norms  # one smaller width
    embeddings = {n: s for n, s in shapes.items() if re.search(r"(embed|embeddings\.|cls_token)", n)}
    assert embeddings and all(after != before for before, after in embeddings.values()), embeddings
    x = _inputs(name)
    with torch.no_grad():
        assert result.program.module()(*x).shape == ep.module()(*x).shape
