"""Sparse training with the group regulariser (DepGraph, "group-level sparsity"). For every group g selected
(by default every group not `hidden`, the residual stream being pruned only when asked) and every prunable
index k of g (a component, `g.components[k]`), let

    S[g,k] = sum over parameter members m of g of ||w_m[k-slice]||_2^2

where the k-slice of member m is every index i along `m.dim` whose component label is k (usually one
index; several for a flatten into a Linear or a grouped conv). Then

    I[g,k]     = S[g,k] / C[g,k]                  (C[g,k]: number of members carrying k; = importance.py's l2)
    gamma[g,k] = 2 ** (alpha * (max_k I[g,k] - I[g,k]) / (max_k I[g,k] - min_k I[g,k] + 1e-12))
    R          = reg * sum_g sum_k gamma[g,k] * sqrt(S[g,k] + eps)        (eps = 1e-8)

so the strongest index of a group has gamma = 1 and the weakest gamma = 2 ** alpha (alpha = 4 by default).
gamma is a constant (not differentiated) recomputed every `refresh` steps; R is a group lasso on the
group's L2 norm at each index, dR/dw_m[k-slice] = reg * gamma[g,k] * w_m[k-slice] / sqrt(S[g,k] + eps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import ExportedProgram

from .graph import DependencyGraph, Group
from .group_index import _Layout, _select_groups
from .losses import Loss, _as_loss, _optimise, _teacher_module
from .trainable import (
    Batches,
    TrainError,
    _cycle,
    _device,
    _lr_factor,
    _optimizer,
    _trainable,
    trainable_module,
    updated_program,
)

# --- the regulariser ----------------------------------------------------------------------------------------


class GroupRegulariser:
    """R = reg * sum_g sum_k gamma[g,k] * sqrt(S[g,k] + eps) over the module's parameters (see the module
    docstring); `penalty()` is differentiable, `refresh()` recomputes gamma from the current weights."""

    def __init__(self, graph: DependencyGraph, module: nn.Module, reg: float, alpha: float = 4.0, *,
                 groups: Iterable[Group] | None = None, include_hidden: bool = False, eps: float = 1e-8) -> None:
        if reg < 0:
            raise TrainError(f"reg must be non-negative, got {reg}")
        self.reg = float(reg)
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.layout = _Layout(graph, module, _select_groups(graph, groups, include_hidden))
        self.gamma = torch.ones(self.layout.total, device=self.layout.device)
        self.refresh()

    def _squares(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """S per position: the squared L2 norm of every member's slice, summed over the group's members."""
        return self.layout.per_index(lambda w, _: w.float().pow(2), dtype=dtype)

    @torch.no_grad()
    def refresh(self) -> None:
        lay = self.layout
        if lay.total == 0:
            return
        imp = self._squares(torch.float64) / lay.carriers
        n = len(lay.groups)
        hi = torch.full((n,), -math.inf, dtype=imp.dtype, device=imp.device).scatter_reduce(
            0, lay.group_of, imp, "amax")
        lo = torch.full((n,), math.inf, dtype=imp.dtype, device=imp.device).scatter_reduce(
            0, lay.group_of, imp, "amin")
        hi, lo = hi[lay.group_of], lo[lay.group_of]
        self.gamma = torch.pow(2.0, self.alpha * (hi - imp) / (hi - lo + 1e-12)).float()

    def penalty(self) -> torch.Tensor:
        if self.layout.total == 0:
            return torch.zeros((), device=self.layout.device)
        return self.reg * (self.gamma * torch.sqrt(self._squares() + self.eps)).sum()

    def importance(self) -> dict[int, np.ndarray]:
        """I[g,k] = S[g,k] / C[g,k] by group id (importance.py's l2), from the current weights."""
        with torch.no_grad():
            return self.layout.split(self._squares(torch.float64) / self.layout.carriers)

    def norms(self) -> dict[int, np.ndarray]:
        """sqrt(S[g,k]) by group id: the group's L2 norm at each index."""
        with torch.no_grad():
            return self.layout.split(self._squares(torch.float64).sqrt())

    def gammas(self) -> dict[int, np.ndarray]:
        return self.layout.split(self.gamma)


def sparse_train(
    ep: ExportedProgram,
    graph: DependencyGraph,
    dataset_batches: Batches,
    *,
    steps: int,
    lr: float,
    reg: float,
    alpha: float = 4.0,
    loss: str | Loss | Callable,
    teacher: ExportedProgram | nn.Module | None = None,
    on_step: Callable[[int, float], Any] | None = None,
    refresh: int = 10,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    groups: Iterable[Group] | None = None,
    include_hidden: bool = False,
    device: str | torch.device | None = None,
    warmup: int = 0,
    clip_grad: float = 0.0,
    batchnorm: str = "train",
) -> tuple[ExportedProgram, list[float]]:
    """DepGraph's sparse training: `steps` steps of SGD (momentum 0.9; `optimizer="adam"`/`"adamw"` for Adam)
    on the task loss + the group regulariser, cycling over the batches, at a constant `lr` after `warmup` steps
    of linear warm-up, the gradient clipped to `clip_grad` (0: not); gamma is refreshed every `refresh` steps.
    Batch norms train as in a module in training mode (`batchnorm="train"`) or stay on their running statistics
    ("frozen"). `graph` is the program's dependency graph. `on_step(step, loss)` follows each step (step counts
    from 1; loss is the step's objective, task + penalty). Returns the trained program and the per-step
    objectives; prune it afterwards (the weak indices' norms are near zero, so the L2 importance ranks them last)."""
    if steps < 0 or refresh < 1 or warmup < 0:
        raise TrainError(f"steps and warmup must be >= 0 and refresh >= 1, got {steps}, {warmup} and {refresh}")
    dev = _device(device)
    loss_ = _as_loss(loss)
    module = trainable_module(ep, dev, batchnorm)
    teacher_m = _teacher_module(teacher, dev) if loss_.distill else None
    regulariser = GroupRegulariser(graph, module, reg, alpha, groups=groups, include_hidden=include_hidden)
    opt = _optimizer(optimizer, _trainable(module), lr, momentum, weight_decay)
    losses: list[float] = []
    for step, (inputs, targets) in zip(range(steps), _cycle(dataset_batches), strict=False):
        if step and step % refresh == 0:
            regulariser.refresh()
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor("constant", step, steps, warmup)
        value = _optimise(module, opt, loss_, inputs, targets, teacher_m, dev, step + 1, regulariser.penalty,
                          clip_grad)
        losses.append(value)
        if on_step is not None:
            on_step(step + 1, value)
    return updated_program(ep, module), losses
