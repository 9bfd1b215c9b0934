"""Group importance: one score per prunable index (component) of every group.

`I[g,k]` aggregates over every member of group g: the squared L2 norm (`l2`, the paper's formula)
or the L1 norm (`l1`) of slice k of each member, or the absolute scale of the normalisation
layers in the group (`bn`; L2 magnitude where a group has none), or a random draw (`random`, a
baseline). Members whose slot holds several elements of one component (a flatten into a Linear,
a grouped conv) add all of them.
The sum is divided by the number of members that carry index k: in most groups every index is
carried by every member and the ranking is the paper's, but where a group joins indices that appear
in different numbers of layers (the two halves of a split, one of which feeds a chain of blocks)
an index is not favoured merely for appearing more often.
The relative score `I[g,k] / mean_k I[g,k]` makes groups comparable for global pruning.

Whatever its source, importance reaches the pruning as one type, `Importance`: a function of a program and its
dependency graph giving those scores (`magnitude` here; `core/recipe.py` makes the Taylor and Fisher ones from
data, `core/data_scores.py`). It is called on the program being pruned, so pruning to a target recomputes it on
the smaller program every round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch.export import ExportedProgram

from .graph import DependencyGraph, Group
from .spec import IMPORTANCES
from .tensors import program_tensors

Importance = Callable[[DependencyGraph, ExportedProgram], dict[int, np.ndarray]]


def magnitude(criterion: str = "l2", seed: int = 0, prune_hidden: bool = False) -> Importance:
    """The magnitude criterion `criterion` (`IMPORTANCES`) as an `Importance`, over the groups that may be
    pruned (the residual stream's only with `prune_hidden`)."""
    if criterion not in IMPORTANCES:
        raise ValueError(f"unknown importance {criterion!r}; choose one of {', '.join(IMPORTANCES)}")

    def scores(graph: DependencyGraph, ep: ExportedProgram) -> dict[int, np.ndarray]:
        groups = [g for g in graph.groups if prune_hidden or not g.hidden]
        return group_scores(graph, program_tensors(ep), criterion, seed, groups)

    return scores


def group_scores(
    graph: DependencyGraph, tensors: dict[str, torch.Tensor], importance: str = "l2", seed: int = 0,
    groups: Iterable[Group] | None = None,
) -> dict[int, np.ndarray]:
    """Raw importance per group id, aligned with `group.components`, for `groups` (default: all)."""
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCES)}")
    n_labels = int(graph.labels.max()) + 1
    acc = np.zeros(n_labels, dtype=np.float64)
    carriers = np.zeros(n_labels, dtype=np.float64)  # how many members carry each component
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for g in graph.groups if groups is None else groups:
        if importance == "random":
            out[g.id] = rng.random(g.size)
            continue
        members = [m for m in g.members if m.kind == "parameter"]  # running statistics are not weights
        norm = "l2" if importance == "l2" else "l1"
        if importance == "bn":
            scales = [m for m in members if m.role == "norm_weight"]
            # a group with no normalisation layer has no scale to read: its magnitude ranks it instead
            members, norm = (scales, "l1") if scales else (members, "l2")
        for m in members:
            lab = graph.slot_labels(m.slot)
            carriers[graph.slot_comps[m.slot]] += 1
            t = tensors[m.name].detach()
            t = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
            dims = [d for d in range(t.dim()) if d != m.dim]
            v = t.pow(2) if norm == "l2" else t.abs()
            # accumulated in float64 (a large layer's sum of squares loses digits in float32)
            v = v.sum(dim=dims, dtype=torch.float64) if dims else v.to(torch.float64)
            np.add.at(acc, lab, v.cpu().numpy())
        out[g.id] = acc[g.components] / np.maximum(carriers[g.components], 1)
    return out


def relative(scores: np.ndarray) -> np.ndarray:
    """The paper's relative score: importance over the group's mean importance."""
    mean = scores.mean() if len(scores) else 0.0
    return scores / mean if mean > 0 else np.ones_like(scores)
