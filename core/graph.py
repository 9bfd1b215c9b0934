"""The dependency graph: which parameter slices must be removed together.

Model (DepGraph, refined to index level): every dimension of every tensor in the program is a
*slot*; each index of a slot is an *element*. Op rules (`rules.py`) state how the elements of an
op's input dims map to the elements of its output dims (identity, concat offsets, split ranges,
flatten blocks, grouped-conv group structure, ...). The transitive closure of those couplings is
computed once, as connected components over all elements (scipy, linear time). A component is one
prunable index: removing it removes the matching slice of every parameter it touches. A *group*
is a set of components that share slots (the paper's group): its members are (parameter, dim)
pairs, and its indices are its components.

Elements coupled to anything that must keep its size (program inputs and outputs, dims of ops we
have no rule for, symbolic dims, spatial dims) are joined to the FROZEN sentinel element 0 and are
never pruned. Index maps are built once; groups are read off the component labels, so querying a
group costs time linear in the group, never a re-walk of the graph.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from .tensors import program_tensors, tied_names

FROZEN = 0  # sentinel element id
ATTENTION_MODES = ("heads", "head-dim", "none")  # what attention dims may lose: whole heads, dims inside heads


@dataclass
class Member:
    """One (tensor, dim) coupled into a group: a parameter, buffer or constant of the program."""

    name: str  # fully qualified name, e.g. "layer1.0.conv1.weight"
    kind: str  # "parameter" | "buffer" | "constant"
    dim: int
    slot: int
    role: str = ""  # e.g. "norm_weight" for BN-scale importance


@dataclass
class Group:
    """Coupled slices: pruning index k removes slice k of every member at once."""

    id: int
    components: np.ndarray  # component labels, one per prunable index
    members: list[Member] = field(default_factory=list)
    # positions into `components`, one array per set of indices carried by the same members (the
    # channels of each producer feeding a concat, say); the ratio applies to each part
    parts: list[np.ndarray] = field(default_factory=list)
    # a transformer's residual stream (normalised by LayerNorm/RMSNorm and summed by skip connections), pruned
    # only when asked (`PruneConfig.prune_hidden`)
    hidden: bool = False

    @property
    def size(self) -> int:
        return int(len(self.components))


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
        # node name -> rewrite(kept_count, kept_indices) -> None; filled by rules that carry literals
        self.rewrites: dict[str, Callable] = {}
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


@dataclass
class ParamInfo:
    name: str
    kind: str
    slots: list[int]
    node_name: str


class DependencyGraph:
    """Dependency graph of an ExportedProgram; see the module docstring."""

    def __init__(self, ep: ExportedProgram, ignore: Sequence[str] = (), attention: str = "heads"):
        from . import rules  # late import: rules import Builder from here

        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        t0 = time.perf_counter()
        self.ep = ep
        self.ignore = tuple(ignore)
        self.attention = attention
        self.builder = b = Builder()
        self.frozen_ops: Counter[str] = Counter()
        self.node_slots: dict[str, object] = {}  # node name -> list[int] | list[list[int]] | None
        self.params: dict[str, ParamInfo] = {}  # fqn -> info
        sig = ep.graph_signature
        kinds = {
            InputKind.PARAMETER: "parameter",
            InputKind.BUFFER: "buffer",
            InputKind.CONSTANT_TENSOR: "constant",
        }
        tied = tied_names(program_tensors(ep))
        first_slots: dict[str, list[int]] = {}  # tied tensors: the slots of the name seen first
        placeholder_kind: dict[str, tuple[str, str | None]] = {}
        for spec in sig.input_specs:
            placeholder_kind[spec.arg.name] = (kinds.get(spec.kind, "input"), spec.target)

        for node in ep.graph.nodes:
            b.handled = set()
            if node.op == "placeholder":
                val = node.meta.get("val")
                if not isinstance(val, torch.Tensor):
                    self.node_slots[node.name] = None
                    continue
                slots = b.new_like(val.shape)
                self.node_slots[node.name] = slots
                kind, target = placeholder_kind.get(node.name, ("input", None))
                if kind == "input":
                    for s in slots:
                        b.freeze(s)
                else:
                    self.params[target] = ParamInfo(target, kind, slots, node.name)
                    seen = first_slots.setdefault(tied.get(target, target), slots)
                    if seen is not slots:  # another name of a tied tensor: the same dims
                        for a, c in zip(slots, seen, strict=True):
                            b.union(a, c)
                    if any(fnmatch.fnmatchcase(target, pat) for pat in ignore):
                        for s in slots:
                            b.freeze(s)
            elif node.op == "call_function":
                self.node_slots[node.name] = rules.apply_rule(self, node)
            elif node.op == "output":
                user_outputs = [
                    spec.arg.name
                    for spec in sig.output_specs
                    if spec.kind in (OutputKind.USER_OUTPUT, OutputKind.USER_INPUT_MUTATION)
                    and hasattr(spec.arg, "name")
                ]
                for name in user_outputs:
                    slots = self.node_slots.get(name)
                    for s in _flat_slots(slots):
                        b.freeze(s)
        b.resolve_factors(attention)
        self._finalize()
        self.build_s = time.perf_counter() - t0

    # --- helpers for rules -------------------------------------------------------------------
    def slots_of(self, arg) -> list[int] | None:
        if isinstance(arg, torch.fx.Node):
            s = self.node_slots.get(arg.name)
            if s is None or (s and isinstance(s[0], list)):
                return None
            return s
        return None

    # --- closure -----------------------------------------------------------------------------
    def _finalize(self) -> None:
        b = self.builder
        n = b.n_elems
        if b.edges_a:
            ea = np.concatenate(b.edges_a)
            eb = np.concatenate(b.edges_b)
        else:
            ea = eb = np.zeros(0, dtype=np.int64)
        labels = _components(ea, eb, n)
        self.labels = labels
        frozen_label = labels[FROZEN]
        self.frozen_label = int(frozen_label)
        self.slot_off = np.asarray(b.slot_off, dtype=np.int64)
        self.slot_size = np.asarray(b.slot_size, dtype=np.int64)

        # groups: components linked through shared parameter slots
        param_slots = np.asarray(sorted({s for p in self.params.values() for s in p.slots}), dtype=np.int64)
        n_labels = int(labels.max()) + 1
        sizes = self.slot_size[param_slots]
        owner = np.repeat(np.arange(len(param_slots)), sizes)
        starts = np.repeat(self.slot_off[param_slots] - (np.cumsum(sizes) - sizes), sizes)
        lab = labels[starts + np.arange(int(sizes.sum()))]
        keep = lab != frozen_label
        key = np.unique(owner[keep] * n_labels + lab[keep])  # (slot, component) pairs, once each
        sidx, comps = key // n_labels, key % n_labels
        bounds = np.searchsorted(sidx, np.arange(len(param_slots) + 1))
        # non-frozen components carried by each parameter slot (reused by importance and parts)
        self.slot_comps: dict[int, np.ndarray] = {
            int(s): comps[bounds[i]: bounds[i + 1]] for i, s in enumerate(param_slots) if bounds[i + 1] > bounds[i]
        }
        comp_ids = [self.slot_comps.get(int(s), comps[:0]) for s in param_slots]
        self.groups: list[Group] = []
        self.slot_group: dict[int, int] = {}
        if len(comps):
            uniq, comp_pos = np.unique(comps, return_inverse=True)
            ns = len(param_slots)
            m = ns + len(uniq)
            glabels = _components(sidx, ns + comp_pos, m)
            comp_group = glabels[ns:]
            order = np.unique(comp_group)
            remap = {int(x): i for i, x in enumerate(order)}
            for i in range(len(order)):
                self.groups.append(Group(i, uniq[comp_group == order[i]]))
            for i, s in enumerate(param_slots):
                if len(comp_ids[i]):
                    self.slot_group[int(s)] = remap[int(glabels[i])]
        for p in self.params.values():
            for d, s in enumerate(p.slots):
                gid = self.slot_group.get(s)
                if gid is not None:
                    self.groups[gid].members.append(Member(p.name, p.kind, d, s, b.roles.get(s, "")))
        # groups made only of buffers or constants remove nothing worth removing: keep those with a parameter
        self.groups = [g for g in self.groups if any(m.kind == "parameter" for m in g.members)]
        normed, residual = self._labels_of(b.norm_slots), self._labels_of(b.residual_slots)
        for i, g in enumerate(self.groups):
            g.id = i
            # the residual stream: normalised, and summed along skip connections (an MLP's normalised hidden
            # layer is not; neither is a ResNet's channel group)
            g.hidden = bool(np.isin(g.components, normed).any() and np.isin(g.components, residual).any())
        self._split_parts()

    def _labels_of(self, slots: set[int]) -> np.ndarray:
        if not slots:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.concatenate([self.slot_labels(s) for s in slots]))

    def _split_parts(self) -> None:
        """Parts of a group: its components keyed by the set of member slots carrying them (a sum of
        random 64-bit tags per slot stands for the set)."""
        tags = _slot_tags(len(self.slot_off))
        sig = np.zeros(len(self.labels) and int(self.labels.max()) + 1, dtype=np.uint64)
        for g in self.groups:
            for m in g.members:
                sig[self.slot_comps[m.slot]] += tags[m.slot]
            _, inverse = np.unique(sig[g.components], return_inverse=True)
            order = np.argsort(inverse, kind="stable")
            bounds = np.flatnonzero(np.diff(inverse[order])) + 1
            g.parts = np.split(order, bounds)

    def slot_labels(self, slot: int) -> np.ndarray:
        off = self.slot_off[slot]
        return self.labels[off: off + self.slot_size[slot]]

    def summary(self) -> list[dict]:
        """Groups as plain data: members (name, dim) and size (prunable indices)."""
        return [
            {
                "id": g.id,
                "size": g.size,
                "members": [{"name": m.name, "dim": m.dim} for m in g.members],
            }
            for g in self.groups
        ]


def _components(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Connected-component label of each of n nodes, given undirected edges a[i]-b[i]. Labels are node
    ids (each component's smallest), not necessarily contiguous."""
    if len(a) <= _SMALL_GRAPH:
        return _components_small(a, b, n)
    order = np.argsort(a, kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(a, minlength=n), out=indptr[1:])
    adj = csr_matrix((np.ones(len(a), dtype=np.int8), b[order], indptr), shape=(n, n))
    return connected_components(adj, directed=True, connection="weak")[1]


_SMALL_GRAPH = 50_000  # edges; below this scipy's fixed per-call costs outweigh the work


def _components_small(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Min-label hooking with pointer jumping, vectorised: every node ends labelled with the smallest id in
    its component. A few rounds for the graphs op rules make; cheaper than scipy's setup on small ones."""
    parent = np.arange(n)
    while True:
        pa, pb = parent[a], parent[b]
        moved = pa != pb
        if not moved.any():
            return parent
        np.minimum.at(parent, np.maximum(pa, pb)[moved], np.minimum(pa, pb)[moved])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


_TAGS = np.random.default_rng(0).integers(1, 2**63, size=1 << 12, dtype=np.uint64)


def _slot_tags(n: int) -> np.ndarray:
    """Fixed random 64-bit tags, one per slot: their sums stand for sets of slots."""
    global _TAGS
    if n > len(_TAGS):
        _TAGS = np.random.default_rng(0).integers(1, 2**63, size=2 * n, dtype=np.uint64)
    return _TAGS[:n]


def _flat_slots(slots) -> list[int]:
    if slots is None:
        return []
    out: list[int] = []
    for s in slots:
        if isinstance(s, list):
            out.extend(s)
        else:
            out.append(s)
    return out


def build_graph(
    model: ExportedProgram | torch.nn.Module,
    example_inputs: tuple | None = None,
    ignore: Sequence[str] = (),
) -> DependencyGraph:
    """Dependency graph of an ExportedProgram, or of a module exported with `example_inputs` first."""
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ValueError("an nn.Module needs example_inputs to be exported")
        model = torch.export.export(model, tuple(example_inputs))
    return DependencyGraph(model, ignore=ignore)
