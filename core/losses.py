"""Training losses: cross-entropy on class ids, MSE on values, distillation from a teacher (the unpruned
program) with a loss per output kind (`distill.py`), and cross-entropy with a share of the teacher's KL; one
optimisation step on a loss (`_optimise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram

from .distill import OUTPUT_KINDS, distill_loss_for, metric_for, single_loss, tree_distill
from .trainable import TrainError, _as_module, _call, _primary, _to

LOSS_KINDS = ("ce", "kl", "mse", "cosine")
LOGIT_KINDS = ("logits", "classes")  # output kinds with a class dim (the last one)


# --- losses -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loss:
    """loss(output, target): `target` is the batch's targets, or the teacher's outputs when `distill`.
    `fn` reads the primary outputs (the first tensor of each), or the whole output trees with `tree`.
    `metric`: the held-out metric that fits it (None: chosen from the held-out targets)."""

    kind: str
    fn: Callable[[Any, Any], torch.Tensor]
    distill: bool = False
    tree: bool = False
    metric: str | None = None
    with_labels: bool = False  # with `distill`: the target is (targets, teacher outputs)

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        if self.with_labels:
            labels, teacher = target
            return self.fn(_primary(output), (labels, _primary(teacher)))
        if self.tree:
            return self.fn(output, target)
        return self.fn(_primary(output), _primary(target))


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with integer targets; (..., C) logits with (...) targets are flattened (sequences),
    other layouts go to F.cross_entropy as they are ((B, C, H, W) with (B, H, W))."""
    target = target.long()
    if logits.dim() == target.dim() + 1 and logits.shape[:-1] == target.shape:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
    return F.cross_entropy(logits.float(), target)


def loss_fn(kind: str, *, temperature: float = 2.0, distill: bool | None = None) -> Loss:
    """"ce" (integer targets), "kl" (distillation at `temperature`), "mse" (float targets, or the teacher's raw
    outputs with `distill=True`) or "cosine" (1 - cosine similarity over the last dim). `distill` defaults to
    True for "kl", False otherwise. Each reads the primary output (`make_loss` distils every output)."""
    if kind not in LOSS_KINDS:
        raise TrainError(f"unknown loss {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    if kind == "ce":
        if distill:
            raise TrainError("cross-entropy needs class-id targets, not a teacher")
        return Loss("ce", _ce, False)
    if kind == "kl":
        if distill is False:
            raise TrainError("KL divergence is a distillation loss: it needs a teacher")
        if temperature <= 0:
            raise TrainError(f"temperature must be positive, got {temperature}")
        return Loss("kl", single_loss("kl", temperature), True)
    return Loss(kind, single_loss(kind), bool(distill))


def make_loss(dataset_has_targets: bool, distill: bool, output_kind: str = "logits", *,
              temperature: float = 2.0, kinds: Sequence[str | None] | None = None,
              distill_loss: str | None = None, teacher_weight: float = 0.0) -> Loss:
    """The loss for a task: with targets and no distillation, cross-entropy ("logits" / "classes" outputs,
    class dim last) or MSE (any other output kind: regression) — for class ids with `teacher_weight` > 0, mixed
    with KL from the teacher's logits (Hinton's knowledge distillation: (1 - w) CE + w KL at `temperature`);
    else distillation from the teacher over every float output, each with the loss that fits its kind (`kinds`,
    from `distill.output_kinds`; default [`output_kind`]): KL on logits, 1 - cosine on embeddings, MSE on
    hidden states and values, or `distill_loss` for all of them."""
    logits = output_kind in LOGIT_KINDS
    if dataset_has_targets and not distill:
        if logits and teacher_weight > 0:
            return _ce_with_teacher(teacher_weight, temperature)
        return loss_fn("ce") if logits else loss_fn("mse")
    kinds = list(kinds) if kinds is not None else ["logits" if logits else output_kind]
    kinds = [k if k in OUTPUT_KINDS or k is None else "hidden" for k in kinds]
    try:
        losses = distill_loss_for(kinds, distill_loss)
    except ValueError as e:
        raise TrainError(str(e)) from None
    primary = next((i for i, k in enumerate(kinds) if k is not None), None)
    if primary is None:
        raise TrainError("the program has no floating-point output to distil from")
    name = "+".join(dict.fromkeys(x for x in losses if x))  # the primary output's loss when all share one
    return Loss(name, tree_distill(losses, temperature), True, tree=True,
                metric=metric_for(kinds[primary], losses[primary]))


def _ce_with_teacher(weight: float, temperature: float) -> Loss:
    if not 0 < weight <= 1:
        raise TrainError(f"the teacher's weight must be in (0, 1], got {weight}")
    kl = single_loss("kl", temperature)

    def fn(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, teacher = target
        return (1 - weight) * _ce(logits, labels) + weight * kl(logits, teacher)

    return Loss("ce+kl", fn, distill=True, with_labels=True)


def _as_loss(loss: str | Loss | Callable) -> Loss:
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        return loss_fn(loss)
    if callable(loss):
        return Loss("custom", loss, False)
    raise TrainError(f"not a loss: {loss!r}")


def _teacher_module(teacher: ExportedProgram | nn.Module | None, device: torch.device) -> nn.Module | None:
    return None if teacher is None else _as_module(teacher, device)


def _target(loss: Loss, targets: Any, teacher: nn.Module | None, inputs: Any, device: torch.device) -> Any:
    if loss.distill:
        if teacher is None:
            raise TrainError(f"the {loss.kind} loss distils from a teacher, and none was given")
        with torch.no_grad():
            out = _call(teacher, inputs)
        if loss.with_labels:
            if targets is None:
                raise TrainError(f"the {loss.kind} loss needs targets, and a batch has none")
            return _to(targets, device), out
        return out
    if targets is None:
        raise TrainError(f"the {loss.kind} loss needs targets, and a batch has none (distil from a teacher?)")
    return _to(targets, device)


def _check_finite(value: float, step: int) -> None:
    if not math.isfinite(value):
        raise TrainError(f"the loss is not finite at step {step} ({value}); lower the learning rate or reg")


def _optimise(module: nn.Module, opt: torch.optim.Optimizer, loss: Loss, inputs: Any, targets: Any,
              teacher: nn.Module | None, device: torch.device, step: int,
              penalty: Callable[[], torch.Tensor] | None = None, clip_grad: float = 0.0) -> float:
    """One optimiser step on a batch: the task loss (plus `penalty()`, the regulariser), refused when not finite,
    the gradient's global L2 norm clipped to `clip_grad` (0: not clipped). Returns the loss."""
    inputs = _to(inputs, device)
    total = loss(_call(module, inputs), _target(loss, targets, teacher, inputs, device))
    if penalty is not None:
        total = total + penalty()
    opt.zero_grad(set_to_none=True)
    total.backward()
    value = float(total.detach())
    _check_finite(value, step)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], clip_grad)
    opt.step()
    return value
