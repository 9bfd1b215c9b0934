"""Recovery after pruning: fine-tuning with warm-up then a schedule, gradient clipping and the best
held-out checkpoint kept; batch-norm recalibration; the held-out score and the loss trend reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import ExportedProgram

from .distill import HiddenDistillation
from .evaluation import METRICS, _evaluate, _teacher_outputs
from .losses import Loss, _as_loss, _optimise, _teacher_module
from .program_module import BATCH_NORM_OPS, ProgramModule, has_batch_norm
from .trainable import (
    SCHEDULES,
    Batches,
    TrainError,
    _call,
    _cycle,
    _device,
    _get,
    _is_class_ids,
    _lr_factor,
    _optimizer,
    _reiterable,
    _state_names,
    _to,
    _trainable,
    trainable_module,
    updated_program,
)


def _choose_metric(metric: str | None, loss: Loss, held_out: Iterable, has_teacher: bool) -> str:
    if metric is not None:
        if metric not in METRICS:
            raise TrainError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        return metric
    first = next(iter(held_out), None)
    if first is None:
        raise TrainError("the held-out split is empty")
    if _is_class_ids(first[1]) and loss.kind != "mse":
        return "accuracy"
    if has_teacher and loss.metric is not None:
        return loss.metric
    if has_teacher and loss.kind in ("kl", "ce"):
        return "agreement"
    return "neg_loss"


def finetune(
    ep: ExportedProgram,
    train_batches: Batches,
    held_out: Batches,
    *,
    steps: int,
    lr: float,
    loss: str | Loss | Callable,
    teacher: ExportedProgram | nn.Module | None = None,
    schedule: str = "cosine",
    warmup: int = 0,
    eval_every: int | None = None,
    on_step: Callable[[int, float], Any] | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    metric: str | None = None,
    device: str | torch.device | None = None,
    clip_grad: float = 0.0,
    batchnorm: str = "train",
    hidden_layers: Sequence[str] = (),
    hidden_weight: float = 0.0,
) -> tuple[ExportedProgram, list[dict]]:
    """Recovery training (after pruning): SGD with momentum (or Adam, AdamW) under a `schedule` ("cosine",
    "linear" or "constant", after `warmup` steps of linear warm-up), the gradient clipped to `clip_grad` (0: not),
    batch norms in training mode (`batchnorm="train"`: batch statistics, running statistics updated; "frozen":
    running statistics), evaluated (batch norms on their running statistics) on `held_out` before training and
    every `eval_every` steps (default steps // 10) and at the end. The held-out metric: `metric`, else "accuracy"
    when the held-out targets are class ids, else the loss's own (`Loss.metric`: "agreement" for logits,
    "cosine" for embeddings), else "agreement" (top-1 with the teacher) for logits, else "neg_loss".
    With a distillation loss, `hidden_weight` > 0 adds hidden-state distillation at `hidden_layers` (node names
    both programs share: `distill.shared_layer_outputs`), `distill.HiddenDistillation`.
    Returns the checkpoint with the best held-out metric (on ties the lower held-out loss, then the first;
    possibly the program as given) and the curve: one dict per evaluation with step, loss (mean training loss since the
    previous evaluation, None at step 0), held_out (the metric), metric (its name) and lr."""
    if schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if steps < 0 or warmup < 0:
        raise TrainError(f"steps and warmup must be >= 0, got {steps} and {warmup}")
    eval_every = eval_every or max(1, steps // 10)
    dev = _device(device)
    loss_ = _as_loss(loss)
    held = _reiterable(held_out)
    module = trainable_module(ep, dev, batchnorm)
    teacher_m = _teacher_module(teacher, dev)
    name = _choose_metric(metric, loss_, held, teacher_m is not None)
    teacher_outs = _teacher_outputs(teacher_m, held, dev)
    opt = _optimizer(optimizer, _trainable(module), lr, momentum, weight_decay)
    names = _state_names(ep)
    penalty = None
    if hidden_weight > 0 and hidden_layers and loss_.distill and isinstance(module, ProgramModule) \
            and isinstance(teacher_m, ProgramModule):
        penalty = HiddenDistillation(module, teacher_m, hidden_layers, hidden_weight).penalty

    def measure() -> tuple[float, float]:
        module.eval()
        try:
            res = _evaluate(module, held, teacher_outs, loss_, dev)
        finally:
            module.train()
        if name != "neg_loss" and name not in res:
            raise TrainError(f"the held-out metric {name!r} cannot be computed on this split")
        return held_out_score(res, name)

    curve: list[dict] = []
    best = measure()
    best_state = {n: _get(module, n).detach().clone() for n in names}
    curve.append({"step": 0, "loss": None, "held_out": best[0], "metric": name, "lr": lr * _lr_factor(
        schedule, 0, steps, warmup)})
    since: list[float] = []
    for step, (inputs, targets) in zip(range(steps), _cycle(train_batches), strict=False):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(schedule, step, steps, warmup)
        value = _optimise(module, opt, loss_, inputs, targets, teacher_m, dev, step + 1, penalty, clip_grad)
        since.append(value)
        if on_step is not None:
            on_step(step + 1, value)
        done = step + 1
        if done % eval_every == 0 or done == steps:
            score = measure()
            curve.append({"step": done, "loss": float(np.mean(since)), "held_out": score[0], "metric": name,
                          "lr": opt.param_groups[0]["lr"]})
            since = []
            if score > best:
                best = score
                best_state = {n: _get(module, n).detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            _get(module, n).copy_(best_state[n])
    return updated_program(ep, module), curve


@torch.no_grad()
def recalibrate_batchnorm(ep: ExportedProgram, batches: Batches, *, max_batches: int = 20,
                          device: str | torch.device | None = None) -> ExportedProgram:
    """`ep` with the running statistics of its batch norms recomputed on `batches` (at most `max_batches`):
    the exact average of the batches' means and variances, as after pruning, where the kept channels' inputs
    have changed and the old statistics no longer fit. `ep` itself when it has no batch norm (or runs through
    `ep.module()`, whose batch norms already track their batches)."""
    if not has_batch_norm(ep):
        return ep
    dev = _device(device)
    module = trainable_module(ep, dev, "train")
    if not isinstance(module, ProgramModule):
        return ep
    for n in ep.graph.nodes:
        if n.op == "call_function" and n.target in BATCH_NORM_OPS:  # zero the statistics the average replaces
            mean, var = n.args[3], n.args[4]
            names = ep.graph_signature.inputs_to_buffers
            if isinstance(mean, torch.fx.Node) and isinstance(var, torch.fx.Node) \
                    and mean.name in names and var.name in names:
                _get(module, names[mean.name]).zero_()
                _get(module, names[var.name]).fill_(1.0)
    seen = 0
    for inputs, _ in batches:
        if seen >= max_batches:
            break
        module.batchnorm_momentum = 1.0 / (seen + 1)  # running = mean of the batches seen so far
        _call(module, _to(inputs, dev))
        seen += 1
    if seen == 0:
        raise TrainError("no batches to recalibrate batch norm on")
    return updated_program(ep, module)


def held_out_score(metrics: dict, metric: str) -> tuple[float, float]:
    """Higher is better: (the metric, or minus the loss for "loss"/"neg_loss"; minus the loss), so that a tie on
    a coarse metric (top-1 agreement of a model that almost always agrees) goes to the lower loss."""
    neg_loss = -metrics.get("loss", math.inf)
    value = neg_loss if metric in ("loss", "neg_loss") else metrics.get(metric, -math.inf)
    return value, neg_loss


def loss_trend(losses: Sequence[float]) -> dict:
    """Whether a loss curve went down: the mean of its first tenth (at least 1, at most 20 steps) against the
    mean of its last tenth; `improved` when the last is at least 1% lower."""
    if not losses:
        return {"first": None, "last": None, "improved": False}
    k = min(20, max(1, len(losses) // 10))
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    return {"first": round(first, 6), "last": round(last, 6), "improved": last < first - 0.01 * abs(first)}
