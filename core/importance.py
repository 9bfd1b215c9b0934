"""Group importance: one score per prunable index (component) of every group.

`I[g,k]` aggregates over every member of group g: the squared L2 norm (`l2`, the paper's formula)
or the L1 norm (`l1`) of slice k of each member, or the absolute scale of the normalisation
layers in the group (`bn`), or a random draw (`random`, a baseline). Members whose slot holds
several elements of one component (a flatten into a Linear, a grouped conv) add all of them.
The sum is divided by the number of members that carry index k: in most groups every index is
carried by every member and the ranking is the paper's, but where a group joins indices that appear
in different numbers of layers (the two halves of a split, one of which feeds a chain of blocks)
an index is not favoured merely for appearing more often.
The relative score `I[g,k] / mean_k I[g,k]` makes groups comparable for global pruning.
"""

from __future__ import annotations

import numpy as np
import torch

from .graph import DependencyGraph

IMPORTANCES = ("l1", "l2", "bn", "random")


def group_scores(
    graph: DependencyGraph, tensors: dict[str, torch.Tensor], importance: str = "l2", seed: int = 0
) -> dict[int, np.ndarray]:
    """Raw importance per group id, aligned with `group.components`."""
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCES)}")
    n_labels = int(graph.labels.max()) + 1
    acc = np.zeros(n_labels, dtype=np.float64)
    carriers = np.zeros(n_labels, dtype=np.float64)  # how many members carry each component
    rng = np.random.default_rng(seed)
    if importance != "random":
        for g in graph.groups:
            for m in g.members:
                if m.kind != "parameter":
                    continue  # running statistics are not weights
                if importance == "bn" and m.role != "norm_weight":
                    continue
                carriers[np.unique(graph.slot_labels(m.slot))] += 1
                t = tensors[m.name].detach().to(torch.float64)
                dims = [d for d in range(t.dim()) if d != m.dim]
                if importance == "l2":
                    s = t.pow(2).sum(dim=dims) if dims else t.pow(2)
                else:
                    s = t.abs().sum(dim=dims) if dims else t.abs()
                np.add.at(acc, graph.slot_labels(m.slot), s.cpu().numpy())
    out: dict[int, np.ndarray] = {}
    for g in graph.groups:
        if importance == "random":
            out[g.id] = rng.random(g.size)
        else:
            out[g.id] = acc[g.components] / np.maximum(carriers[g.components], 1)
    return out


def relative(scores: np.ndarray) -> np.ndarray:
    """The paper's relative score: importance over the group's mean importance."""
    mean = scores.mean() if len(scores) else 0.0
    return scores / mean if mean > 0 else np.ones_like(scores)
