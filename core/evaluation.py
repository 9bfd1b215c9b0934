"""Evaluation of a program on held-out batches: accuracy on class-id targets, top-1 agreement and output
cosine similarity with a teacher, and the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import ExportedProgram

from .losses import Loss, _as_loss, _teacher_module, loss_fn
from .trainable import (
    IGNORE_INDEX,
    Batches,
    TrainError,
    _as_module,
    _call,
    _device,
    _is_class_ids,
    _primary,
    _reiterable,
    _to,
)

METRICS = ("accuracy", "agreement", "cosine", "neg_loss")


# --- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def _teacher_outputs(teacher: nn.Module | None, batches: Iterable, device: torch.device) -> list | None:
    if teacher is None:
        return None
    return [_primary(_call(teacher, _to(inputs, device))) for inputs, _ in batches]


def _class_correct(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    if logits.dim() == target.dim() + 1 and logits.shape[:-1] == target.shape:
        pred = logits.argmax(-1)
    elif logits.dim() == target.dim() + 1 and logits.shape[0] == target.shape[0] \
            and logits.shape[2:] == target.shape[1:]:
        pred = logits.argmax(1)  # (B, C, ...) with (B, ...)
    else:
        raise TrainError(f"outputs {tuple(logits.shape)} do not match class-id targets {tuple(target.shape)}")
    keep = target != IGNORE_INDEX
    return int((pred[keep] == target[keep]).sum()), int(keep.sum())


@torch.no_grad()
def _evaluate(module: nn.Module, batches: Iterable, teacher_outs: list | None, loss: Loss | None,
              device: torch.device) -> dict:
    correct = total = agree = positions = 0
    cos_sum = 0.0
    cos_n = 0
    loss_sum = 0.0
    samples = 0
    batches_seen = 0
    for i, (inputs, targets) in enumerate(batches):
        out = _primary(_call(module, _to(inputs, device)))
        t_out = teacher_outs[i] if teacher_outs is not None else None
        targets = _to(targets, device) if targets is not None else None
        n = int(out.shape[0]) if out.dim() else 1
        batches_seen += 1
        if _is_class_ids(targets):
            c, k = _class_correct(out, targets)
            correct += c
            total += k
        if t_out is not None:
            agree += int((out.argmax(-1) == t_out.argmax(-1)).sum())
            positions += int(out.argmax(-1).numel())
            cos_sum += float(F.cosine_similarity(out.reshape(n, -1).float(), t_out.reshape(n, -1).float(),
                                                 dim=1).sum())
            cos_n += n
        batch_loss = _eval_loss(loss, out, targets, t_out)
        if batch_loss is not None:
            loss_sum += batch_loss * n
            samples += n
    res: dict = {"batches": batches_seen}
    if total:
        res["accuracy"] = correct / total
    if positions:
        res["agreement"] = agree / positions
        res["cosine"] = cos_sum / max(1, cos_n)
    if samples:
        res["loss"] = loss_sum / samples
    return res


def _eval_loss(loss: Loss | None, out: torch.Tensor, targets: torch.Tensor | None,
               t_out: torch.Tensor | None) -> float | None:
    if loss is None:  # a default: CE on class ids, MSE on float targets, KL with the teacher's logits
        if _is_class_ids(targets):
            loss = loss_fn("ce")
        elif targets is not None:
            loss = loss_fn("mse")
        elif t_out is not None:
            loss = loss_fn("kl")
        else:
            return None
    target: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = t_out if loss.distill else targets
    if loss.with_labels:
        target = None if targets is None or t_out is None else (targets, t_out)
    if target is None:
        return None
    return float(loss(out, target))


def evaluate(program: ExportedProgram | nn.Module, batches: Batches, *,
             teacher: ExportedProgram | nn.Module | None = None, loss: str | Loss | Callable | None = None,
             device: str | torch.device | None = None) -> dict:
    """Metrics of `program` on `batches`: "accuracy" (when targets are class ids; targets of -100 ignored),
    "agreement" (top-1 agreement with the teacher's argmax over the last dim, per position) and "cosine" (mean
    cosine similarity of each sample's flattened outputs with the teacher's) when a teacher is given, "loss"
    (mean per sample; `loss`, else CE on class ids, MSE on float targets, KL against the teacher's logits) and
    "batches"."""
    dev = _device(device)
    batches = _reiterable(batches)
    module = _as_module(program, dev)
    teacher_outs = _teacher_outputs(_teacher_module(teacher, dev), batches, dev)
    return _evaluate(module, batches, teacher_outs, None if loss is None else _as_loss(loss), dev)
