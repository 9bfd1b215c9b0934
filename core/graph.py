"""The dependency graph: which parameter slices must be removed together.

Model (DepGraph, refined to index level): every dimension of every tensor in the program is a
*slot*; each index of a slot is an *element*. Op rules (`rules/`) state how the elements of an
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
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from .builder import FROZEN, Builder
from .rules import apply_rule
from .tensors import program_tensors, tied_names

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


@dataclass
class ParamInfo:
    name: str
    kind: str
    slots: list[int]


class DependencyGraph:
    """Dependency graph of an ExportedProgram; see the module docstring."""

    def __init__(self, ep: ExportedProgram, ignore: Sequence[str] = (), attention: str = "heads"):
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
                    assert target is not None  # parameters, buffers and constants are named by their input spec
                    self.params[target] = ParamInfo(target, kind, slots)
                    seen = first_slots.setdefault(tied.get(target, target), slots)
                    if seen is not slots:  # another name of a tied tensor: the same dims
                        for a, c in zip(slots, seen, strict=True):
                            b.union(a, c)
                    if any(fnmatch.fnmatchcase(target, pat) for pat in ignore):
                        for s in slots:
                            b.freeze(s)
            elif node.op == "call_function":
                self.node_slots[node.name] = apply_rule(self, node)
            elif node.op == "output":
                user_outputs = [
                    spec.arg.name
                    for spec in sig.output_specs
                    if spec.kind in (OutputKind.USER_OUTPUT, OutputKind.USER_INPUT_MUTATION)
                    and hasattr(spec.arg, "name")
                ]
                for name in user_outputs:
                    for s in _flat_slots(self.node_slots.get(name)):
                        b.freeze(s)
        b.resolve_factors(attention)
        self._finalize()
        self.build_s = time.perf_counter() - t0

    # --- helpers for rules -------------------------------------------------------------------
    def slots_of(self, arg) -> list[int] | None:
        if isinstance(arg, torch.fx.Node):
            s = self.node_slots.get(arg.name)
            if not isinstance(s, list) or (s and isinstance(s[0], list)):  # None, or a node of several outputs
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
