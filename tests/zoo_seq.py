"""Sequence and transformer models for the pruning engine's tests and benchmarks.

The companion of ``tests.zoo`` (CNNs) for token and patch sequences. The in-repo architectures are
written from scratch for Prunery; each model class's docstring names the dependency ("coupling")
pattern it exercises for the pruner. The ``hf_*`` entries are ``transformers`` models built from
small configs with random weights (nothing is downloaded), wrapped so that ``forward`` takes one tensor
and returns one tensor.

``SEQ_ZOO`` holds small models (a few thousand to a few hundred thousand parameters) whose inputs are
``(batch, seq)`` int64 token ids or ``(batch, 3, 32, 32)`` images. ``build`` returns a model and
example inputs; ``export`` returns a ``torch.export`` program whose batch dim, and for sequence models
whose sequence dim, are dynamic.

All models are returned in eval mode. Normalisation layers (LayerNorm, and RMSNorm whether written by
hand, ``nn.RMSNorm`` or a ``transformers`` class) have randomised affine parameters so that they are
never the identity (an identity norm hides pruning bugs).

``transformers`` is imported only when an ``hf_*`` entry is built (the import takes seconds); it is
not a dependency of the package but a dev extra, so ``available(name)`` tells whether an entry can be built
here. Like ``tests.zoo``, this file (`tests/zoo_seq.py`) is not part of the installed package.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo import ZooModel, _randomise_norms

__all__ = ["SEQ_ZOO", "SeqZooModel", "available", "build", "dynamic_shapes", "export"]

BATCH_MAX = 1024


@dataclass(frozen=True)
class SeqZooModel(ZooModel):
    """A sequence zoo entry: a ``ZooModel`` plus what the sequence dim of its inputs may do.

    ``example_inputs(batch)`` is ``make_inputs(batch, seq_len)``. ``make_inputs(batch, seq)`` builds
    inputs with any batch size and, for sequence models, any sequence length (image models ignore
    ``seq``); like ``example_inputs`` it uses a private generator. ``seq_len`` is the traced sequence
    length, ``None`` for image inputs (no sequence dim). ``dynamic_seq`` is True if the model exports
    with dim 1 of its input dynamic in ``[seq_min, seq_max]`` (``seq_max``: the position-table size
    where there is one); where it is False the model's docstring says why. ``requires`` names an
    optional package the entry needs (``"transformers"`` for the ``hf_*`` entries).
    """

    make_inputs: Callable[[int, int | None], tuple[torch.Tensor, ...]]
    seq_len: int | None
    dynamic_seq: bool
    seq_min: int = 1
    seq_max: int | None = None
    requires: str | None = None


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

_STANDARD_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _randomise_seq_norms(model: nn.Module) -> nn.Module:
    """``zoo._randomise_norms`` plus every other norm-like module (``nn.RMSNorm``, the hand-written
    ``RMSNorm`` below, ``LlamaRMSNorm``, ``T5LayerNorm``, ...): a module whose class name ends in "Norm"
    (any case) and that owns a 1-D ``weight`` gets it uniform in [0.5, 1.5] (a 1-D ``bias``, small noise)."""
    _randomise_norms(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _STANDARD_NORMS) or not type(m).__name__.lower().endswith("norm"):
                continue
            weight = m._parameters.get("weight")
            bias = m._parameters.get("bias")
            if weight is not None and weight.dim() == 1:
                weight.uniform_(0.5, 1.5)
            if bias is not None and bias.dim() == 1:
                bias.normal_().mul_(0.1)
    return model


class RMSNorm(nn.Module):
    """RMSNorm written out, ``x * rsqrt(mean(x^2, -1) + eps) * weight`` (not ``nn.RMSNorm``): it traces to
    pow / mean(dim=-1, keepdim) / add / rsqrt / mul / mul rather than one ``aten.rms_norm`` node.

    Couplings: ``weight`` is tied to the normalised (last) dim; the mean over that dim mixes all of its
    channels, so pruning it changes the other channels' outputs (normalised=True).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MLP(nn.Module):
    """Linear -> activation -> Linear over the last dim: the hidden width is free, both ends are tied to
    the residual stream."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------------------


class FusedQKVAttention(nn.Module):
    """Self-attention whose q, k and v come from ONE ``Linear(dim, 3 * dim)``, reshaped to
    ``(B, N, 3, heads, head_dim)``, permuted to ``(3, B, heads, N, head_dim)`` and unbound; attention by
    ``F.scaled_dot_product_attention``; heads merged by ``transpose(1, 2).reshape(B, N, dim)``.

    Couplings: the qkv Linear's 3 * dim output rows are three blocks (q, k, v) each split into heads x
    head_dim: row ``s * dim + h * head_dim + d``. q's and k's head_dim are contracted together inside
    SDPA (q row j <-> k row j), v's rows carry through to the output projection's input columns. A pruner
    must remove the same (head, d) positions from the q and k blocks, keep the three blocks equal in size
    (the reshape literal 3 * heads * head_dim), and either prune whole heads or the same head_dim positions
    in every head.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class PreNormBlock(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``: the residual stream (all blocks' outputs, the
    norms' weights, the attention output projection rows and the MLP's output rows) is one coupled group."""

    def __init__(self, dim: int, attn: nn.Module, hidden: int, norm: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = attn
        self.norm2 = norm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer on (B, 3, 32, 32): ``Conv2d(3, dim, patch, stride=patch)`` patch
    embedding, ``flatten(2).transpose(1, 2)`` into 16 tokens, a learned class token (expanded over the
    batch and concatenated in front on the token dim), a learned position embedding added to all 17 tokens,
    pre-norm blocks with fused-qkv SDPA attention and a GELU MLP, a final LayerNorm and a Linear head on the
    class token (``x[:, 0]``).

    Couplings: the residual stream ties the patch conv's output channels, the class token's and position
    embedding's last dim (dim 2 of (1, N, dim) parameters), every block's norms / attention projection /
    MLP output and the head's input columns; a ``cat`` on the token dim (dim 1) must not be mistaken for a
    channel concat; the select of token 0 drops the token dim. Per block: the fused qkv pattern (see
    ``FusedQKVAttention``) and a free MLP width. Image input: no sequence dim (dynamic_seq=False), the
    17 tokens are fixed by the image size and the position table.
    """

    def __init__(
        self,
        image: int = 32,
        patch: int = 8,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        hidden: int = 128,
        num_classes: int = 10,
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.2)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.2)
        self.blocks = nn.Sequential(*[PreNormBlock(dim, FusedQKVAttention(dim, heads), hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# --------------------------------------------------------------------------------------------------
# GPT
# --------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Separate q, k, v ``Linear(dim, dim)``; heads split by ``view(B, T, heads, head_dim).transpose(1, 2)``
    (B and T symbolic in the view's size list); causal ``F.scaled_dot_product_attention(is_causal=True)``;
    heads merged by ``transpose(1, 2).reshape(B, T, dim)``.

    Couplings: q's and k's output rows are contracted together (same heads, same head_dim positions);
    v's output rows are tied to the output projection's input columns; the view literals (heads,
    head_dim) must follow what is kept.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class GPT(nn.Module):
    """A GPT-style decoder over int64 tokens (B, T): token embedding + position embedding (looked up with
    ``torch.arange(T)``, T symbolic), pre-norm blocks with causal SDPA (separate q/k/v), a final LayerNorm
    and an ``lm_head`` whose weight IS the token embedding's weight (tied), giving (B, T, vocab) logits.

    Couplings: the tied weight is one parameter used twice: its dim 1 (the embedding width) is the
    residual stream at the input (embedding) and at the output (lm_head's input columns), its dim 0 (the
    vocabulary) is both the embedding's index range and the logits' width (a program output: frozen).
    The position embedding's dim 1 is tied to the same stream. ``torch.export`` lifts the tied tensor under
    both names (two parameter inputs) but the graph reads only one of them (``lm_head.weight``, for the
    embedding and the head): the other placeholder has no users. Dynamic T up to the position table size.
    """

    def __init__(
        self, vocab: int = 256, ctx: int = 32, dim: int = 64, depth: int = 2, heads: int = 4, hidden: int = 128
    ):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(ctx, dim)
        self.blocks = nn.Sequential(
            *[PreNormBlock(dim, CausalSelfAttention(dim, heads), hidden) for _ in range(depth)]
        )
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        return self.lm_head(self.ln_f(self.blocks(x)))


# --------------------------------------------------------------------------------------------------
# post-norm encoder with hand-written attention
# --------------------------------------------------------------------------------------------------


class ManualAttention(nn.Module):
    """Attention written out: ``softmax(q @ k.transpose(-2, -1) * scale) @ v`` with heads split by
    ``view(B, T, heads, head_dim).transpose(1, 2)`` and merged by ``transpose(1, 2).contiguous().view(B, T,
    dim)``.

    Couplings: as ``CausalSelfAttention`` but through explicit matmuls: the first contracts q's and k's
    head_dim (the pruner must see the transpose of k), the second keeps v's head_dim; the (B, heads, T, T)
    score tensor has no channel dim at all.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).contiguous().view(b, n, c)
        return self.out(y)


class PostNormEncoderLayer(nn.Module):
    """``norm1(x + attn(x))`` then ``norm2(x + mlp(x))`` (the original Transformer's post-norm order, ReLU
    MLP): each LayerNorm sits on the residual stream itself, between blocks."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.attn = ManualAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden, act=nn.ReLU)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class ManualEncoder(nn.Module):
    """A post-norm Transformer encoder classifier over int64 tokens (B, T): token embedding scaled by
    sqrt(dim), plus a learned position table ``pos`` of shape (1, max_len, dim) sliced ``pos[:, :T]`` (a slice
    with a symbolic end on a parameter), post-norm layers with hand-written attention, mean over tokens,
    Linear classifier to (B, 10).

    Couplings: the residual stream ties the embedding's dim 1, ``pos``'s dim 2, every layer's attention
    output rows, MLP output rows and LayerNorm weights, and the classifier's input columns; the slice on
    ``pos`` is on the token dim, not a channel slice; the mean over the (dynamic) token dim keeps channels.
    """

    def __init__(
        self,
        vocab: int = 256,
        max_len: int = 32,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        hidden: int = 128,
        num_classes: int = 10,
    ):
        super().__init__()
        self.scale = math.sqrt(dim)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.5)
        self.layers = nn.Sequential(*[PostNormEncoderLayer(dim, heads, hidden) for _ in range(depth)])
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * self.scale + self.pos[:, : tokens.shape[1]]
        return self.classifier(self.layers(x).mean(dim=1))


# --------------------------------------------------------------------------------------------------
# LLaMA
# --------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding tables from position ids: ``angles = pos[:, None] * inv_freq[None, :]``,
    ``emb = cat([angles, angles], -1)``, returned as (cos, sin) of shape (T, head_dim). ``inv_freq`` is a
    non-persistent buffer of head_dim / 2 frequencies."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()


class GQAttention(nn.Module):
    """Grouped-query attention: ``q`` has ``heads`` heads, ``k`` and ``v`` have ``kv_heads`` < heads
    (separate bias-free Linears of dim -> heads * head_dim and dim -> kv_heads * head_dim); rotary
    embedding applied to q and k (``x * cos + rotate_half(x) * sin``); k and v repeated to ``heads`` with
    ``repeat_interleave(heads // kv_heads, dim=1)``; causal SDPA; output projection.

    Couplings: k's and v's output rows are each shared by ``heads // kv_heads`` query heads, so pruning a
    kv head removes a whole group of query heads, and head_dim positions of q and k are tied through the
    score contraction; rotary ties position d of head_dim to position d + head_dim / 2 (``rotate_half``'s
    slice / negate / cat, and the cat of the frequency table with itself), so head_dim can only lose
    (d, d + head_dim / 2) pairs; the ``rotate_half`` slice literals are head_dim / 2.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: gate's and up's output rows are tied elementwise (the product) and to
    down's input columns; the hidden width is free."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with GQA + rotary and SwiGLU."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int):
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = GQAttention(dim, heads, kv_heads)
        self.mlp_norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """A LLaMA-style decoder over int64 tokens (B, T): token embedding, blocks of hand-written RMSNorm,
    grouped-query attention (4 query heads, 2 kv heads) with rotary position embeddings computed from
    ``torch.arange(T)`` and causal SDPA, SwiGLU MLPs; final RMSNorm and an untied bias-free lm_head to
    (B, T, vocab).

    Couplings: the residual stream (embedding dim 1, every RMSNorm weight, o_proj and down rows, lm_head
    input columns), normalised by RMSNorm's mean over it; per block the GQA sharing of kv heads, the rotary
    pair coupling of head_dim and the SwiGLU gate/up product (see ``GQAttention``, ``SwiGLU``). No position
    table: any T works; the export bound is arbitrary.
    """

    def __init__(
        self,
        vocab: int = 256,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        kv_heads: int = 2,
        hidden: int = 128,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rotary = Rotary(dim // heads)
        self.layers = nn.ModuleList(LlamaBlock(dim, heads, kv_heads, hidden) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = self.rotary(positions)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------------------------------
# recurrent taggers
# --------------------------------------------------------------------------------------------------


class RNNTagger(nn.Module):
    """Embedding -> ``nn.LSTM`` or ``nn.GRU`` (batch_first; optionally several layers, bidirectional) ->
    ``Linear`` per token, over int64 tokens (B, T), giving (B, T, tags).

    Couplings: the embedding width is the first layer's input size (weight_ih_l0 columns); the hidden
    size H ties, per layer and direction, the rows of weight_ih / weight_hh / biases in 4 (LSTM: i, f, g,
    o) or 3 (GRU: r, z, n) gate blocks of H rows each, the columns of weight_hh (the recurrence), the next
    layer's weight_ih columns (2H of them, forward then backward, when bidirectional) and the tagger's
    input columns. All of that sits inside one ``aten.lstm`` / ``aten.gru`` node with a flat weight list.

    Exports with a dynamic batch dim only (dynamic_seq=False): the fake-tensor kernel of ``aten.lstm.input``
    / ``aten.gru.input`` is their Python decomposition, which loops over time steps, so tracing guards
    ``T == traced length`` and a dynamic T fails with "Constraints violated ... specialized it to be a
    constant (8)". The zoo entries trace at T = 8 (tracing cost grows with T for the same reason).
    """

    def __init__(
        self,
        cell: str = "lstm",
        vocab: int = 128,
        emb: int = 32,
        hidden: int = 48,
        layers: int = 1,
        bidirectional: bool = False,
        tags: int = 8,
    ):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.embed = nn.Embedding(vocab, emb)
        self.rnn = rnn(emb, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(hidden * (2 if bidirectional else 1), tags)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(tokens))
        return self.out(h)


# --------------------------------------------------------------------------------------------------
# Swin
# --------------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C) by view / permute / reshape."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B * nW, window * window, C) -> (B, H, W, C), the inverse of ``window_partition``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Attention inside windows of ``window x window`` tokens: fused qkv Linear, scores ``(q * scale) @
    k^T`` plus a learned relative position bias gathered from a ((2w-1)^2, heads) table by a (w^2, w^2)
    int64 index buffer (``table[index.view(-1)].view(N, N, heads).permute(2, 0, 1)``), plus, in shifted
    blocks, a (nW, N, N) additive mask buffer broadcast over the batch and heads
    (``attn.view(B, nW, heads, N, N) + mask[None, :, None]``), softmax, ``@ v``.

    Couplings: the bias table's dim 1 is the head dim of the scores (not a channel of the residual stream);
    its dim 0 is gathered by the index buffer (an ``aten.index.Tensor`` on a parameter); the qkv pattern
    of ``FusedQKVAttention``.
    """

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_bias = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (N, N, 2), >= 0
        self.register_buffer("rel_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.rel_bias[self.rel_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


def _shift_mask(res: int, window: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask of a cyclically shifted window: 0 between tokens of the same region of the
    unshifted map, -100 between tokens that the roll brought together from different regions."""
    region = torch.zeros(1, res, res, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[:, hs, ws, :] = label
            label += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, N)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class SwinBlock(nn.Module):
    """Pre-norm Swin block on (B, res * res, C) tokens: LayerNorm, view to (B, res, res, C), cyclic shift by
    ``torch.roll`` (shifted blocks), window partition, window attention (with the shift mask), window
    reverse, roll back, residual; then LayerNorm + GELU MLP + residual.

    Couplings: channels go through view / roll / partition / reverse (6-D permutes and reshapes whose
    channel dim is the last) untouched; the roll is on spatial dims only.
    """

    def __init__(self, dim: int, res: int, heads: int, window: int, shift: int, hidden: int):
        super().__init__()
        self.res, self.window, self.shift = res, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)
        self.attn_mask: torch.Tensor | None
        if shift:
            self.register_buffer("attn_mask", _shift_mask(res, window, shift))
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.norm1(x).view(b, self.res, self.res, c)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = self.attn(window_partition(h, self.window), self.attn_mask)
        h = window_reverse(win, self.window, self.res, self.res)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood merge: (B, res * res, C) -> view (B, res, res, C) -> the four strided slices
    ``x[:, i::2, j::2]`` concatenated on the channel dim (4C) -> LayerNorm(4C) -> ``Linear(4C, 2C)``.

    Couplings: channel c of the input appears at offsets c, C + c, 2C + c and 3C + c of the concatenation,
    so it owns four LayerNorm weights and four Linear input columns; the strided slices are spatial (step
    2), never channel slices.
    """

    def __init__(self, dim: int, res: int):
        super().__init__()
        self.res = res
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.res, self.res, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = x.view(b, (self.res // 2) ** 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """A small Swin Transformer on (B, 3, 32, 32): ``Conv2d(3, 32, 4, stride=4)`` patch embedding to an 8x8
    token grid + LayerNorm, a regular and a shifted (shift 2) window block (window 4, 2 heads), patch
    merging to 4x4 x 64, one window block at 64 channels (4 heads, one window), LayerNorm, mean over tokens,
    Linear head to (B, 10).

    Couplings: see ``WindowAttention``, ``SwinBlock`` and ``PatchMerging``: the residual stream of stage 1
    (32 channels) enters the merge's 4-way concat; stage 2 is a new stream starting at the merge's Linear.
    Image input: no sequence dim (dynamic_seq=False); the window grid and masks are fixed by the image size.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        dim, res, window = 32, 8, 4
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.embed_norm = nn.LayerNorm(dim)
        self.stage1 = nn.Sequential(
            SwinBlock(dim, res, heads=2, window=window, shift=0, hidden=2 * dim),
            SwinBlock(dim, res, heads=2, window=window, shift=window // 2, hidden=2 * dim),
        )
        self.merge = PatchMerging(dim, res)
        self.stage2 = SwinBlock(2 * dim, res // 2, heads=4, window=window, shift=0, hidden=4 * dim)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        x = self.stage2(self.merge(self.stage1(x)))
        return self.head(self.norm(x).mean(dim=1))


# --------------------------------------------------------------------------------------------------
# transformers models
# --------------------------------------------------------------------------------------------------


def _transformers() -> Any:
    """Import ``transformers`` offline: nothing here ever downloads (models are built from configs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    return transformers


class HFWrapper(nn.Module):
    """Calls a ``transformers`` model with one tensor (``input_ids`` or ``pixel_values``) and returns one
    tensor (the output field ``output``: ``logits`` or ``last_hidden_state``), so that ``torch.export``
    sees plain tensors in and out. With ``decoder``, ``use_cache=False`` is passed too (no KV cache in the
    graph)."""

    def __init__(
        self, model: nn.Module, input_name: str = "input_ids", output: str = "logits", decoder: bool = False
    ):
        super().__init__()
        self.model = model
        self.input_name = input_name
        self.output = output
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {self.input_name: x}
        if self.decoder:
            kwargs["use_cache"] = False
        return getattr(self.model(**kwargs), self.output)


_HF_DIMS = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_HF_SEQ_MAX = 64  # max_position_embeddings of the configs below (RoBERTa: + its padding offset)


def _hf_bert() -> nn.Module:
    """BertForSequenceClassification (3 labels): post-norm encoder, word + position + token-type embeddings
    (token types from a registered buffer, gathered by position ids), separate q/k/v, GELU
    MLP; pooler (tanh Linear on token 0) and classifier to (B, 3)."""
    t = _transformers()
    cfg = t.BertConfig(**_HF_DIMS, max_position_embeddings=_HF_SEQ_MAX, num_labels=3, attn_implementation="sdpa")
    return HFWrapper(t.BertForSequenceClassification(cfg), output="logits")


def _hf_gpt2() -> nn.Module:
    """GPT2LMHeadModel: pre-norm decoder whose projections are ``Conv1D`` (``addmm`` with a (in, out)
    weight: the transpose of a Linear's layout), a fused ``c_attn`` (dim -> 3 * dim, ``split`` on the last
    dim), learned positions, lm_head tied to the token embedding; logits (B, T, vocab)."""
    t = _transformers()
    cfg = t.GPT2Config(
        vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=_HF_SEQ_MAX,
        bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation="sdpa",
    )
    return HFWrapper(t.GPT2LMHeadModel(cfg), output="logits", decoder=True)


def _hf_vit() -> nn.Module:
    """ViTForImageClassification on 32x32 images, patch 8 (16 patches + CLS), 10 labels; separate q/k/v."""
    t = _transformers()
    cfg = t.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=10, attn_implementation="sdpa",
    )
    return HFWrapper(t.ViTForImageClassification(cfg), input_name="pixel_values", output="logits")


def _hf_llama() -> nn.Module:
    """LlamaForCausalLM with 4 query heads and 2 kv heads (``repeat_kv``: expand + reshape), rotary from
    position ids, RMSNorm, SwiGLU; logits (B, T, vocab)."""
    t = _transformers()
    cfg = t.LlamaConfig(
        **_HF_DIMS, num_key_value_heads=2, max_position_embeddings=_HF_SEQ_MAX, use_cache=False,
        attn_implementation="sdpa",
    )
    return HFWrapper(t.LlamaForCausalLM(cfg), output="logits", decoder=True)


def _hf_qwen2() -> nn.Module:
    """Qwen2ForCausalLM: LLaMA layout with biases on q/k/v (not on o), GQA 4/2; logits (B, T, vocab)."""
    t = _transformers()
    cfg = t.Qwen2Config(
        **_HF_DIMS, num_key_value_heads=2, max_position_embeddings=_HF_SEQ_MAX, use_cache=False,
        attn_implementation="sdpa",
    )
    return HFWrapper(t.Qwen2ForCausalLM(cfg), output="logits", decoder=True)


def _hf_mistral() -> nn.Module:
    """MistralForCausalLM, GQA 4/2, with a sliding attention window of 8 tokens (shorter than the traced
    16, so the mask is not plain causal); logits (B, T, vocab)."""
    t = _transformers()
    cfg = t.MistralConfig(
        **_HF_DIMS, num_key_value_heads=2, max_position_embeddings=_HF_SEQ_MAX, sliding_window=8,
        use_cache=False, attn_implementation="sdpa",
    )
    return HFWrapper(t.MistralForCausalLM(cfg), output="logits", decoder=True)


def _hf_distilbert() -> nn.Module:
    """DistilBertForSequenceClassification (2 labels): post-norm encoder, no token types, separate q/k/v
    (q_lin/k_lin/v_lin), ``pre_classifier`` Linear + ReLU on token 0, classifier; logits (B, 2)."""
    t = _transformers()
    cfg = t.DistilBertConfig(
        vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=_HF_SEQ_MAX,
        num_labels=2, attn_implementation="sdpa",
    )
    return HFWrapper(t.DistilBertForSequenceClassification(cfg), output="logits")


def _hf_t5() -> nn.Module:
    """T5EncoderModel (its output is the hidden state itself, so the residual stream is a program output:
    a pruner must leave it whole): pre-norm encoder with ``T5LayerNorm`` (RMS, no bias, no mean), no absolute positions
    but a bucketed relative position bias (computed in the first layer, shared by the second), bias-free
    q/k/v/o with inner dim heads * d_kv, ReLU MLP; last hidden state (B, T, d_model)."""
    t = _transformers()
    cfg = t.T5Config(
        vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, use_cache=False,
        attn_implementation="sdpa",
    )
    return HFWrapper(t.T5EncoderModel(cfg), output="last_hidden_state")


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def _builder(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build_model() -> nn.Module:
        return _randomise_seq_norms(factory()).eval()

    return build_model


def _tokens(vocab: int) -> Callable[[int, int | None], tuple[torch.Tensor, ...]]:
    def make_inputs(batch: int, seq: int | None) -> tuple[torch.Tensor, ...]:
        if seq is None:
            raise ValueError("token inputs need a sequence length")
        g = torch.Generator().manual_seed(1234)
        return (torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int64),)

    return make_inputs


def _images(batch: int, seq: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1234)
    return (torch.randn(batch, 3, 32, 32, generator=g),)


def _entry(
    name: str,
    factory: Callable[[], nn.Module],
    description: str,
    *,
    vocab: int | None = None,
    seq_len: int | None = 16,
    dynamic_seq: bool = True,
    seq_max: int | None = None,
    normalised: bool = True,
    requires: str | None = None,
) -> SeqZooModel:
    make_inputs = _images if vocab is None else _tokens(vocab)
    if vocab is None:
        seq_len, dynamic_seq = None, False

    def example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
        return make_inputs(batch, seq_len)

    return SeqZooModel(
        name=name,
        build=_builder(factory),
        example_inputs=example_inputs,
        normalised=normalised,
        description=description,
        make_inputs=make_inputs,
        seq_len=seq_len,
        dynamic_seq=dynamic_seq,
        seq_max=seq_max if dynamic_seq else None,
        requires=requires,
    )


_HF = "transformers"

SEQ_ZOO: dict[str, SeqZooModel] = {
    m.name: m
    for m in [
        _entry("vit", ViT, "ViT, 32x32 images, patch 8, dim 64, 2 pre-norm blocks, fused qkv + SDPA, CLS head"),
        _entry(
            "gpt",
            GPT,
            "GPT decoder, vocab 256, dim 64, 2 blocks, causal SDPA, separate q/k/v, lm_head tied to the embedding",
            vocab=256,
            seq_max=32,
        ),
        _entry(
            "encoder_manual",
            ManualEncoder,
            "Post-norm encoder, hand-written attention (q @ k^T, softmax, @ v), pos[:, :T], mean, Linear to 10",
            vocab=256,
            seq_max=32,
        ),
        _entry(
            "llama",
            Llama,
            "LLaMA decoder: hand-written RMSNorm, rotary, GQA 4/2 (repeat_interleave), SwiGLU, causal SDPA",
            vocab=256,
            seq_max=64,
        ),
        _entry(
            "lstm_tagger",
            RNNTagger,
            "Embedding(128, 32) -> 1-layer LSTM(48) -> Linear(48, 8) per token",
            vocab=128,
            seq_len=8,
            dynamic_seq=False,
            normalised=False,
        ),
        _entry(
            "lstm_tagger_bi",
            lambda: RNNTagger("lstm", layers=2, bidirectional=True),
            "Embedding(128, 32) -> 2-layer bidirectional LSTM(48) -> Linear(96, 8) per token",
            vocab=128,
            seq_len=8,
            dynamic_seq=False,
            normalised=False,
        ),
        _entry(
            "gru_tagger",
            lambda: RNNTagger("gru"),
            "Embedding(128, 32) -> 1-layer GRU(48) -> Linear(48, 8) per token",
            vocab=128,
            seq_len=8,
            dynamic_seq=False,
            normalised=False,
        ),
        _entry(
            "swin_block",
            SwinStage,
            "Swin stage: window attention + relative position bias, shifted windows (roll + mask), patch merging",
        ),
        _entry(
            "hf_bert",
            _hf_bert,
            "transformers BertForSequenceClassification, hidden 64, 2 layers, 4 heads, vocab 1000, 3 labels",
            vocab=1000,
            seq_max=_HF_SEQ_MAX,
            requires=_HF,
        ),
        _entry(
            "hf_gpt2",
            _hf_gpt2,
            "transformers GPT2LMHeadModel, n_embd 64, 2 layers, 4 heads, vocab 1000, Conv1D projections",
            vocab=1000,
            seq_max=_HF_SEQ_MAX,
            requires=_HF,
        ),
        _entry(
            "hf_vit",
            _hf_vit,
            "transformers ViTForImageClassification, 32x32 images, patch 8, hidden 64, 2 layers, 10 labels",
            requires=_HF,
        ),
        _entry(
            "hf_llama",
            _hf_llama,
            "transformers LlamaForCausalLM, hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 1000",
            vocab=1000,
            seq_max=_HF_SEQ_MAX,
            requires=_HF,
        ),
        _entry(
            "hf_qwen2",
            _hf_qwen2,
            "transformers Qwen2ForCausalLM, hidden 64, 2 layers, 4 heads / 2 kv heads, q/k/v biases",
            vocab=1000,
            seq_max=_HF_SEQ_MAX,
            requires=_HF,
        ),
        _entry(
            "hf_mistral",
            _hf_mistral,
            "transformers MistralForCausalLM, hidden 64, 2 layers, 4 heads / 2 kv heads, sliding window 8",
            vocab=1000,
            seq_max=_HF_SEQ_MAX,
            requires=_HF,
        ),
        _entry(
            "hf_distilbert",
            _hf_distilbert,
            "transformers DistilBertForSequenceClassification, dim 64, 2 layers, 4 heads, vocab 1000, 2 labels",
            vocab=1000,
            seq_max=_HF_SEQ_MAX,
            requires=_HF,
        ),
        _entry(
            "hf_t5",
            _hf_t5,
            "transformers T5EncoderModel, d_model 64, 2 layers, 4 heads, rel. position bias, last hidden state",
            vocab=1000,
            seq_max=_HF_SEQ_MAX,
            requires=_HF,
        ),
    ]
}


def _lookup(name: str) -> SeqZooModel:
    if name not in SEQ_ZOO:
        raise KeyError(f"unknown sequence zoo model {name!r}; known: {sorted(SEQ_ZOO)}")
    return SEQ_ZOO[name]


def available(name: str) -> bool:
    """True if entry ``name`` can be built here (its optional package, if any, is installed)."""
    entry = _lookup(name)
    return entry.requires is None or importlib.util.find_spec(entry.requires) is not None


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build sequence zoo model ``name`` with ``torch.manual_seed(seed)``; return the model in eval mode and
    example inputs with batch size 2 (and the entry's ``seq_len``)."""
    entry = _lookup(name)
    torch.manual_seed(seed)
    model = entry.build().eval()
    return model, entry.example_inputs(2)


def dynamic_shapes(
    name: str, dynamic_batch: bool = True, dynamic_seq: bool | None = None
) -> tuple[dict[int, torch.export.Dim], ...] | None:
    """The ``dynamic_shapes`` argument of ``torch.export.export`` for entry ``name``: dim 0 of every input is
    ``Dim("batch", min=1, max=1024)`` with ``dynamic_batch``; dim 1 is ``Dim("seq", min=seq_min,
    max=seq_max)`` with ``dynamic_seq`` (default: the entry's ``dynamic_seq``; True for an entry that cannot
    is a ValueError)."""
    entry = _lookup(name)
    if dynamic_seq is None:
        dynamic_seq = entry.dynamic_seq
    if dynamic_seq and not entry.dynamic_seq:
        raise ValueError(f"{name} does not export with a dynamic sequence dim")
    spec: dict[int, torch.export.Dim] = {}
    if dynamic_batch:
        spec[0] = torch.export.Dim("batch", min=1, max=BATCH_MAX)
    if dynamic_seq:
        spec[1] = torch.export.Dim("seq", min=entry.seq_min, max=entry.seq_max)
    if not spec:
        return None
    n_inputs = len(entry.example_inputs(1))
    return tuple(dict(spec) for _ in range(n_inputs))


def export(
    name: str, seed: int = 0, dynamic_batch: bool = True, dynamic_seq: bool | None = None
) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict) sequence zoo model ``name`` built with ``seed``, with the dynamic
    dims of ``dynamic_shapes(name, dynamic_batch, dynamic_seq)``."""
    model, inputs = build(name, seed)
    ds = dynamic_shapes(name, dynamic_batch, dynamic_seq)
    return torch.export.export(model, inputs, dynamic_shapes=ds, strict=False)
