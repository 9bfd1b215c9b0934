"""Where each group's prunable indices live among a trainable module's parameters (the regulariser and
the data-driven scores share it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .graph import DependencyGraph, Group
from .trainable import TrainError, _get

# --- group layout (shared by the regulariser and the data-driven scores) ----------------------------------


class _Layout:
    """The selected groups' indices laid end to end (position = group offset + index in `components`), and
    for every parameter member its tensor, its dim and the position of each index of that dim (indices
    outside the selection, frozen ones, go to a spare last position)."""

    def __init__(self, graph: DependencyGraph, module: nn.Module, groups: Sequence[Group]) -> None:
        self.groups = list(groups)
        sizes = [g.size for g in self.groups]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total = total = int(self.offsets[-1])
        pos = np.full(int(graph.labels.max()) + 1, total, dtype=np.int64)
        group_of = np.zeros(total, dtype=np.int64)
        carriers = np.zeros(total + 1, dtype=np.float64)
        self.terms: list[tuple[str, torch.Tensor, int, torch.Tensor]] = []
        for i, g in enumerate(self.groups):
            pos[g.components] = self.offsets[i] + np.arange(g.size)
            group_of[self.offsets[i]: self.offsets[i + 1]] = i
        for g in self.groups:
            for m in g.members:
                if m.kind != "parameter":  # running statistics are not weights
                    continue
                p = _get(module, m.name)
                labels = graph.slot_labels(m.slot)
                if p.dim() <= m.dim or p.shape[m.dim] != len(labels):
                    raise TrainError(f"the dependency graph does not match the module at {m.name}:{m.dim}")
                carriers[pos[graph.slot_comps[m.slot]]] += 1
                self.terms.append((m.name, p, m.dim, torch.as_tensor(pos[labels], device=p.device)))
        self.device = self.terms[0][1].device if self.terms else torch.device("cpu")
        self.group_of = torch.as_tensor(group_of, device=self.device)
        self.carriers = torch.as_tensor(np.maximum(carriers[:total], 1.0), device=self.device)

    def per_index(self, values: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None],
                  grads: dict[int, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sum over members of `values(w, grad)` (elementwise) summed over each index's slice, per position."""
        acc = torch.zeros(self.total + 1, dtype=dtype, device=self.device)
        cache: dict[int, torch.Tensor | None] = {}
        for _, p, dim, idx in self.terms:
            key = id(p)
            if key not in cache:
                cache[key] = values(p, None if grads is None else grads.get(key))
            v = cache[key]
            if v is None:
                continue
            dims = [d for d in range(v.dim()) if d != dim]
            v = v.sum(dim=dims) if dims else v
            acc = acc.index_add(0, idx, v.to(dtype))
        return acc[: self.total]

    def split(self, values: torch.Tensor) -> dict[int, np.ndarray]:
        flat = values.detach().cpu().double().numpy()
        return {g.id: flat[self.offsets[i]: self.offsets[i + 1]].copy() for i, g in enumerate(self.groups)}


def _select_groups(graph: DependencyGraph, groups: Iterable[Group] | None, include_hidden: bool) -> list[Group]:
    if groups is not None:
        return list(groups)
    return [g for g in graph.groups if include_hidden or not g.hidden]
