"""The builder of the dependency graph: slots, element couplings and shape rewrites, filled by the op rules.

The op rules (`core/rules/`) see the graph under construction through `RuleGraph` (the builder, the slots of
every node so far); `graph.DependencyGraph` walks the program, calls the rules and computes the closure.
Neither the rules nor this module import the graph.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

FROZEN = 0  # sentinel element id


class CallSite(Protocol):
    """The call a rewrite changes: a node of the module being pruned (`torch.fx.Node`), or the
    `program_module.NodeCall` standing for it when the program runs as it is; a rewrite reads and sets these."""

    name: str
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


# A rewrite gets the call of the module being pruned and `kept(slot) -> np.ndarray` (kept indices).
Kept = Callable[[int], np.ndarray]
Rewrite = Callable[[CallSite, Kept], None]


class Builder:
    """Collects slots and element couplings while the op rules walk the graph."""

    def __init__(self) -> None:
        self.slot_off: list[int] = []
        self.slot_size: list[int] = []
        self.slot_symbolic: list[bool] = []
        self.slot_frozen_hint: list[bool] = []  # eager, slot-level guess used only to choose factors
        self.n_elems = 1  # element 0 is FROZEN
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.handled: set[int] = set()
        # node name -> rewrite(node, kept) -> None; filled by rules that carry shape literals
        self.rewrites: dict[str, Rewrite] = {}
        self.roles: dict[int, str] = {}  # slot -> role of the parameter dim it belongs to
        # slot identity classes (union-find over slots joined by `union`), to recognise one dim seen by several
        # ops; rules mark attention head dims and normalised (residual stream) dims on them
        self._slot_parent: list[int] = []
        self.head_slots: set[int] = set()
        self.head_links: list[tuple[int, int]] = []  # (a, b): b's heads are a's, repeated (grouped-query attention)
        self.norm_slots: set[int] = set()  # dims a LayerNorm/RMSNorm normalises
        self.residual_slots: set[int] = set()  # dims two operands of an add share (skip connections)
        # split/merge of a dim into factors (reshape), decided when the graph is complete: which factor stays
        # free depends on what the factors turn out to be (attention heads, head dims, channels)
        self.factor_splits: list[tuple[int, list[int], list[int]]] = []

    # --- slots -----------------------------------------------------------------------------
    def new(self, size: int | torch.SymInt) -> int:
        sid = len(self.slot_off)
        concrete = isinstance(size, int)
        n = int(size) if concrete else 1
        self.slot_off.append(self.n_elems)
        self.slot_size.append(n)
        self.slot_symbolic.append(not concrete)
        self.slot_frozen_hint.append(False)
        self._slot_parent.append(sid)
        self.n_elems += n
        if not concrete:
            self.freeze(sid)
        return sid

    def new_like(self, shape: Sequence) -> list[int]:
        return [self.new(s) for s in shape]

    def size(self, slot: int) -> int:
        return self.slot_size[slot]

    def elems(self, slot: int) -> np.ndarray:
        off = self.slot_off[slot]
        return np.arange(off, off + self.slot_size[slot], dtype=np.int64)

    # --- couplings -------------------------------------------------------------------------
    def _pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        self.edges_a.append(np.asarray(a, dtype=np.int64))
        self.edges_b.append(np.asarray(b, dtype=np.int64))

    def freeze(self, slot: int) -> None:
        self.handled.add(slot)
        self.slot_frozen_hint[slot] = True
        e = self.elems(slot)
        self._pairs(e, np.zeros_like(e))

    def union(self, a: int, b: int) -> None:
        """Identity coupling: element i of slot a is element i of slot b."""
        self.handled.update((a, b))
        if a == b:
            return
        if self.slot_symbolic[a] or self.slot_symbolic[b] or self.slot_size[a] != self.slot_size[b]:
            self.freeze(a)
            self.freeze(b)
            return
        if self.slot_frozen_hint[a] or self.slot_frozen_hint[b]:
            self.slot_frozen_hint[a] = self.slot_frozen_hint[b] = True
        ra, rb = self.slot_class(a), self.slot_class(b)
        if ra != rb:
            self._slot_parent[max(ra, rb)] = min(ra, rb)
        self._pairs(self.elems(a), self.elems(b))

    def slot_class(self, slot: int) -> int:
        """The identity class of a slot: slots joined element for element by `union` share it."""
        parent = self._slot_parent
        root = slot
        while parent[root] != root:
            root = parent[root]
        while parent[slot] != root:
            parent[slot], slot = root, parent[slot]
        return root

    def split_factors(self, whole: int, factors: list[int], sizes: list[int]) -> None:
        """`whole` (size prod(sizes)) is the row-major merge of `factors`; coupled at the end (`resolve_factors`)."""
        self.handled.add(whole)
        self.handled.update(factors)
        self.factor_splits.append((whole, list(factors), list(sizes)))

    def resolve_factors(self, attention: str) -> None:
        """Couple every recorded split through one free factor, the others frozen (row-major index arithmetic:
        with two free factors every element would join every other). The free factor is the head factor of
        an attention dim (`attention="heads"`: whole heads go), the factor inside it ("head-dim": the same
        dims of every head go), none ("none"); elsewhere the largest not frozen (channels in a flatten,
        per-group channels in a shuffle)."""
        heads = {self.slot_class(s) for s in self.head_slots}

        def default(factors: list[int], sizes: list[int]) -> int | None:
            candidates = [k for k, f in enumerate(factors) if not self.slot_frozen_hint[f] and sizes[k] > 1]
            return max(candidates, key=lambda k: (sizes[k], k)) if candidates else None

        # a head dim split into (or merged from) factors of its own, as grouped-query attention's key/value heads
        # repeated to the query heads: the factor that stays free is a head dim too
        changed = True
        while changed:
            changed = False
            for a, c in self.head_links:
                ka, kc = self.slot_class(a), self.slot_class(c)
                if (ka in heads) != (kc in heads):
                    heads.update((ka, kc))
                    changed = True
            for whole, factors, sizes in self.factor_splits:
                if self.slot_class(whole) in heads and not any(self.slot_class(f) in heads for f in factors):
                    k = default(factors, sizes)
                    if k is not None:
                        heads.add(self.slot_class(factors[k]))
                        changed = True
        for whole, factors, sizes in self.factor_splits:
            head_k = [k for k, f in enumerate(factors) if self.slot_class(f) in heads]
            whole_head = self.slot_class(whole) in heads
            free: int | None
            if self.slot_frozen_hint[whole]:
                free = None
            elif not head_k and not whole_head:
                free = default(factors, sizes)
            elif attention == "heads":
                free = head_k[0] if head_k else default(factors, sizes)
            elif attention == "head-dim" and head_k and not whole_head:
                inner = [k for k in range(head_k[0] + 1, len(factors))
                         if sizes[k] > 1 and not self.slot_frozen_hint[factors[k]]]
                free = inner[0] if inner else None
            else:
                free = None
            if free is None:
                for f in factors:
                    self.freeze(f)
                self.freeze(whole)
                continue
            total = math.prod(sizes)
            stride = math.prod(sizes[free + 1:])
            t = np.arange(total)
            self.union_map(whole, t, factors[free], (t // stride) % sizes[free])
            for k, f in enumerate(factors):
                if k != free:
                    self.freeze(f)

    def union_map(self, a: int, ia: np.ndarray, b: int, ib: np.ndarray) -> None:
        """Element ia[j] of slot a is coupled to element ib[j] of slot b (offsets, blocks, groups)."""
        self.handled.update((a, b))
        if self.slot_symbolic[a] or self.slot_symbolic[b]:
            self.freeze(a)
            self.freeze(b)
            return
        self._pairs(self.slot_off[a] + np.asarray(ia, dtype=np.int64),
                    self.slot_off[b] + np.asarray(ib, dtype=np.int64))

    def tie_blocks(self, slot: int, n_blocks: int) -> None:
        """Couple index j of every one of `n_blocks` equal contiguous blocks of `slot` (group structure)."""
        self.handled.add(slot)
        n = self.slot_size[slot]
        if n_blocks <= 1 or self.slot_symbolic[slot]:
            return
        per = n // n_blocks
        first = np.tile(np.arange(per), n_blocks - 1)
        others = np.arange(per, n)
        self.union_map(slot, first, slot, others)


class RuleGraph(Protocol):
    """What an op rule sees of the graph being built (`graph.DependencyGraph` is one)."""

    builder: Builder
    node_slots: dict[str, object]  # node name -> list[int] | list[list[int]] | None
    frozen_ops: Counter[str]  # ops frozen for want of a rule (or refused by theirs), for the report

    def slots_of(self, arg: object) -> list[int] | None:
        """The slots of a tensor node seen so far (None for anything else, or a node of several outputs)."""
        ...
