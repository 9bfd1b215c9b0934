"""Data-driven importance (same format as `importance.group_scores`: {group id: scores aligned with
`group.components`}), with g_b = dL_b/dw the gradient of batch b's (mean) loss, summed over batches b:

    taylor[g,k] = sum_b | sum_m sum_{i in k-slice of m} w_m[i] * g_b,m[i] |        (first order: |dL| estimate)
    fisher[g,k] = sum_b sum_m sum_{i in k-slice of m} (w_m[i] * g_b,m[i])^2 / 2  (OBD saliency, Fisher diagonal)

Neither is divided by the number of carriers (removing index k removes every member's slice at once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.export import ExportedProgram

from .graph import DependencyGraph, Group
from .group_index import _Layout
from .losses import Loss, _as_loss, _target, _teacher_module
from .trainable import Batches, TrainError, _call, _to, trainable_module

# --- data-driven importance ---------------------------------------------------------------------------------


def _saliency(kind: str, graph: DependencyGraph, module: ExportedProgram | nn.Module, batches: Batches,
              loss: str | Loss | Callable, groups: Iterable[Group] | None,
              teacher: ExportedProgram | nn.Module | None, device: str | torch.device | None) -> dict[int, np.ndarray]:
    if isinstance(module, ExportedProgram):
        module = trainable_module(module, device)
    layout = _Layout(graph, module, list(graph.groups if groups is None else groups))
    dev = layout.device
    loss_ = _as_loss(loss)
    teacher_m = _teacher_module(teacher, dev) if loss_.distill else None
    params = list({id(p): p for _, p, _, _ in layout.terms if p.requires_grad}.values())
    acc = torch.zeros(layout.total, dtype=torch.float64, device=dev)
    n = 0
    for inputs, targets in batches:
        inputs = _to(inputs, dev)
        target = _target(loss_, targets, teacher_m, inputs, dev)
        value = loss_(_call(module, inputs), target)
        grads = torch.autograd.grad(value, params, allow_unused=True) if params else ()
        gmap = {id(p): g for p, g in zip(params, grads, strict=True) if g is not None}

        def wg(w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor | None:
            if g is None:
                return None
            v = w.detach().double() * g.double()
            return v if kind == "taylor" else v.pow(2) / 2

        per = layout.per_index(wg, gmap, dtype=torch.float64)
        acc += per.abs() if kind == "taylor" else per
        n += 1
    if n == 0:
        raise TrainError("no batches to score on")
    return layout.split(acc)


def taylor_scores(graph: DependencyGraph, module: ExportedProgram | nn.Module, batches: Batches,
                  loss: str | Loss | Callable, groups: Iterable[Group] | None = None, *,
                  teacher: ExportedProgram | nn.Module | None = None,
                  device: str | torch.device | None = None) -> dict[int, np.ndarray]:
    """First-order Taylor importance, {group id: scores aligned with group.components} for `groups` (default
    all): I[g,k] = sum over batches b of |sum over parameter members m and the k-slice of m of w * dL_b/dw|.
    `module`: a program module (`trainable_module(ep)`) or the program itself."""
    return _saliency("taylor", graph, module, batches, loss, groups, teacher, device)


def fisher_scores(graph: DependencyGraph, module: ExportedProgram | nn.Module, batches: Batches,
                  loss: str | Loss | Callable, groups: Iterable[Group] | None = None, *,
                  teacher: ExportedProgram | nn.Module | None = None,
                  device: str | torch.device | None = None) -> dict[int, np.ndarray]:
    """Second-order (OBD with the empirical Fisher as Hessian diagonal) importance, same format:
    I[g,k] = sum over batches b, parameter members m and the k-slice of m of (w * dL_b/dw)^2 / 2."""
    return _saliency("fisher", graph, module, batches, loss, groups, teacher, device)
